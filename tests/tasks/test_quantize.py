"""INT8 (INC PT2E) and ONNX artifacts of a tiny real BERT: reloadable, self-contained, close to fp32."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import DistillError
from tasks.quantize import export_onnx, load_int8, logit_parity, onnx_predict_logits, quantize_int8

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spread_model_dir(tiny_model_dir, review_frame, tmp_path_factory):
    """The tiny model with larger random weights and a centred head, so logits vary by text and class.

    Untrained at init scale, every text gets nearly the same logits and any parity check would pass.
    """
    import torch

    from tasks.inference import predict_logits
    from tasks.modeling import load_classifier, save_classifier

    model, tokenizer = load_classifier(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
        model.classifier.weight.normal_(0.0, 1.0)
        mean = predict_logits(model, tokenizer, review_frame["text"].tolist()[:96], max_length=64).mean(0)
        model.classifier.bias -= torch.from_numpy(mean)
    return save_classifier(model, tokenizer, tmp_path_factory.mktemp("spread-model"))


@pytest.fixture(scope="module")
def texts(review_frame):
    all_texts = review_frame["text"].tolist()
    return {"calibration": all_texts[:64], "heldout": all_texts[96:192]}


@pytest.fixture(scope="module")
def fp32_logits(spread_model_dir, texts):
    from tasks.inference import predict_logits
    from tasks.modeling import load_classifier

    model, tokenizer = load_classifier(spread_model_dir)
    return predict_logits(model, tokenizer, texts["heldout"], max_length=64)


@pytest.fixture(scope="module")
def static_int8(spread_model_dir, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "static"
    return quantize_int8(spread_model_dir, texts["calibration"], texts["heldout"], out, approach="static",
                         max_length=64, batch_size=32)


def _assert_close_to_fp32(parity: dict, int8_logits: np.ndarray, fp32: np.ndarray):
    spread = float(fp32.std(axis=0).min())  # how much each class logit varies across texts
    assert spread > 0.3, "the test model's logits must vary by text for parity to mean anything"
    assert np.bincount(fp32.argmax(-1), minlength=3).min() > 0, "every class must be predicted somewhere"
    assert parity["argmax_agreement"] >= 0.85  # random weights leave near-ties; the mean gap below is the signal
    assert 0.0 < parity["max_abs_logit_diff"] < spread  # > 0: it did quantize something
    assert float(np.abs(int8_logits - fp32).mean()) < 0.1 * spread


def test_static_int8_is_self_contained_and_close_to_fp32(static_int8, texts, fp32_logits):
    r = static_int8
    assert r.approach == "static" and r.calibration_examples == len(texts["calibration"])
    assert {"model.pt2", "int8_meta.json", "config.json", "tokenizer.json"} <= {p.name for p in r.path.iterdir()}
    assert not r.path.with_name(r.path.name + ".partial").exists()
    assert r.parity["n"] == len(texts["heldout"])
    json.dumps({k: v for k, v in vars(r).items() if k != "path"})  # JSON-able except the path

    predictor = load_int8(r.path)
    assert predictor.labels == ["negative", "neutral", "positive"]
    logits = predictor.predict_logits(texts["heldout"], batch_size=5)  # ragged last batch, other batch size
    assert logits.shape == (len(texts["heldout"]), 3) and logits.dtype == np.float32
    assert logit_parity(fp32_logits, logits) == pytest.approx(r.parity, abs=1e-5)
    _assert_close_to_fp32(r.parity, logits, fp32_logits)
    assert predictor.predict_logits([]).shape == (0, 3)
    single = predictor.predict_logits([texts["heldout"][3]])
    np.testing.assert_allclose(single[0], logits[3], atol=1e-4)


def test_int8_artifact_reloads_in_a_fresh_process(static_int8, texts):
    # A fresh interpreter has not imported INC/torchao: load_int8 must register the quantized ops itself.
    code = ("import json, sys; from tasks.quantize import load_int8; "
            "p = load_int8(sys.argv[1]); print(json.dumps(p.predict_logits(json.loads(sys.argv[2])).tolist()))")
    sample = texts["heldout"][:4]
    proc = subprocess.run([sys.executable, "-c", code, str(static_int8.path), json.dumps(sample)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = np.array(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_allclose(fresh, load_int8(static_int8.path).predict_logits(sample), atol=1e-5)


def test_dynamic_int8_close_to_fp32(spread_model_dir, texts, fp32_logits, tmp_path):
    r = quantize_int8(spread_model_dir, [], texts["heldout"], tmp_path / "dynamic", approach="dynamic",
                      max_length=64, int8_embeddings=False)
    assert r.approach == "dynamic" and r.calibration_examples == 0
    assert json.loads((r.path / "int8_meta.json").read_text())["int8_embeddings"] is False
    _assert_close_to_fp32(r.parity, load_int8(r.path).predict_logits(texts["heldout"]), fp32_logits)


def test_onnx_export_matches_fp32(spread_model_dir, texts, fp32_logits, tmp_path):
    r = export_onnx(spread_model_dir, tmp_path / "onnx", heldout_texts=texts["heldout"], max_length=64)
    assert (r.path / "model.onnx").is_file() and (r.path / "tokenizer.json").is_file()
    assert r.parity["n"] == len(texts["heldout"]) and r.parity["argmax_agreement"] == 1.0
    assert r.parity["max_abs_logit_diff"] < 1e-4
    odd = onnx_predict_logits(r.path, texts["heldout"][:7], batch_size=3, max_length=64)  # other batch shapes
    np.testing.assert_allclose(odd, fp32_logits[:7], atol=1e-4)


def test_user_errors_name_the_fix(tmp_path, spread_model_dir, texts):
    with pytest.raises(DistillError, match="does not exist") as err:
        quantize_int8(tmp_path / "missing", ["a"], ["b"], tmp_path / "out")
    assert err.value.fix
    with pytest.raises(DistillError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "onnx", heldout_texts=["b"])
    with pytest.raises(DistillError, match="approach"):
        quantize_int8(spread_model_dir, ["a"], ["b"], tmp_path / "out", approach="qat")
    with pytest.raises(DistillError, match="calibration"):
        quantize_int8(spread_model_dir, [], texts["heldout"], tmp_path / "out", approach="static")
    with pytest.raises(DistillError, match="held-out"):
        quantize_int8(spread_model_dir, texts["calibration"], [], tmp_path / "out")
    with pytest.raises(DistillError, match="INT8 model folder"):
        load_int8(spread_model_dir)
    assert not (tmp_path / "out").exists()
