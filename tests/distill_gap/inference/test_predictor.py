"""load_predictor on the three runtimes of one tiny real BERT: the Hugging Face folder, its ONNX export and an
INC INT8 folder load from their files alone and agree with the torch model; bad folders are DistillErrors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from distill_gap.errors import DistillError
from distill_gap.inference.predictor import detect_runtime, load_predictor
from tests.conftest import LABELS

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def texts(review_frame):
    return review_frame["text"].tolist()[:40]


@pytest.fixture(scope="module")
def folders(tiny_model_dir, texts, tmp_path_factory):
    """runtime -> folder: the spread tiny model (logits vary by text), its ONNX export, its static INC INT8."""
    from distill_gap.edge.inc_quantization import autotune_int8
    from distill_gap.edge.onnx_export import export_onnx
    from tests.helpers import spread_classifier

    root = tmp_path_factory.mktemp("predictor")
    hf = spread_classifier(tiny_model_dir, texts, root / "hf", max_length=MAX_LENGTH)
    onnx = export_onnx(hf, root / "onnx", heldout_texts=texts[:4], max_length=MAX_LENGTH).path
    labels = np.arange(len(texts)) % 3
    int8 = autotune_int8(hf, texts, texts, labels, texts[:4], root / "int8", tolerable_loss=0.99, max_trials=1,
                         candidates=["static"], max_length=MAX_LENGTH).path
    return {"transformers": hf, "onnxruntime": onnx, "torch-pt2": int8}


@pytest.fixture(scope="module")
def torch_logits(folders, texts):
    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier

    model, tokenizer = load_classifier(folders["transformers"])
    logits = predict_logits(model, tokenizer, texts, max_length=MAX_LENGTH)
    assert np.bincount(logits.argmax(-1), minlength=3).min() > 0, "every class predicted: agreement means something"
    return logits


@pytest.mark.parametrize("runtime", ["transformers", "onnxruntime", "torch-pt2"])
def test_each_runtime_is_detected_and_agrees_with_the_torch_model(folders, texts, torch_logits, runtime):
    assert detect_runtime(folders[runtime]) == runtime
    predictor = load_predictor(folders[runtime], max_length=MAX_LENGTH)
    assert predictor.labels == LABELS and predictor.num_labels == 3
    logits = predictor.predict_logits(texts, batch_size=7)  # ragged last batch
    assert logits.shape == (len(texts), 3) and logits.dtype == np.float32
    agreement = float((logits.argmax(-1) == torch_logits.argmax(-1)).mean())
    if runtime == "torch-pt2":  # int8 weights and activations: near-ties of a random model may flip
        assert agreement >= 0.85 and 0 < np.abs(logits - torch_logits).max() < 1.0
    else:
        assert agreement == 1.0 and np.abs(logits - torch_logits).max() < 1e-4
    np.testing.assert_allclose(predictor.predict_logits(texts[5:6])[0], logits[5], atol=1e-4)  # alone = in a batch
    assert predictor.predict_logits([]).shape == (0, 3)


def test_bad_folders_are_distill_errors(folders, tmp_path):
    with pytest.raises(DistillError, match="does not exist") as err:
        load_predictor(tmp_path / "missing")
    assert err.value.fix
    with pytest.raises(DistillError, match="unknown runtime 'tflite'"):
        load_predictor(folders["transformers"], runtime="tflite")
    with pytest.raises(DistillError, match="not a Hugging Face model folder"):
        load_predictor(tmp_path)  # empty: detected as transformers, which needs config.json

    pickled = tmp_path / "pickled"
    shutil.copytree(folders["onnxruntime"], pickled)
    (pickled / "extra.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(DistillError, match=r"pickle-based weight files \['extra.pkl'\]"):
        load_predictor(pickled)

    truncated = tmp_path / "truncated"
    shutil.copytree(folders["onnxruntime"], truncated)
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(DistillError, match="cannot be loaded with onnxruntime") as err:
        load_predictor(truncated)
    assert "fetch or export it again" in err.value.fix

    no_archive = tmp_path / "no-archive"
    shutil.copytree(folders["torch-pt2"], no_archive)
    (no_archive / "model.pt2").unlink()
    with pytest.raises(DistillError, match="not an INT8 model folder"):
        load_predictor(no_archive)


def test_an_int8_folder_loads_in_a_fresh_process(folders, texts):
    """A fresh interpreter has imported neither INC nor torchao: loading must register the quantized ops itself."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json, sys; from distill_gap.inference.predictor import load_predictor; "
            "p = load_predictor(sys.argv[1]); print(json.dumps(p.predict_logits(json.loads(sys.argv[2])).tolist()))")
    sample = texts[:4]
    proc = subprocess.run([sys.executable, "-c", code, str(folders["torch-pt2"]), json.dumps(sample)],
                          cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = np.array(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_allclose(fresh, load_predictor(folders["torch-pt2"]).predict_logits(sample), atol=1e-5)
