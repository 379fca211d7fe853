"""load_predictor on the three runtimes of one tiny real BERT: the Hugging Face folder, its ONNX export and an
INC INT8 folder load from their files alone and agree with the torch model; bad folders are DistillErrors. Every
runtime (and the ONNX Runtime INT8 copy) gives its own pooled features next to the logits; older artifacts with
logits alone still load."""

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
def onnx_int8(folders, texts, tmp_path_factory):
    """The ONNX Runtime INT8 copy of the ONNX export (dynamic int8 MatMuls, 4-bit embedding blocks)."""
    from distill_gap.edge.onnx_export import quantize_onnx_int8

    return quantize_onnx_int8(folders["onnxruntime"], tmp_path_factory.mktemp("predictor-onnx-int8") / "onnx-int8",
                              heldout_texts=texts[:4], max_length=MAX_LENGTH, block_size=16).path


@pytest.fixture(scope="module")
def torch_features(folders, texts):
    """The reference the runtimes' features are held to: the torch model's pooler output (BERT's tanh(dense)),
    computed without any hook, one padded batch of all texts. (N, D)"""
    import torch

    from distill_gap.models.loading import load_classifier

    model, tokenizer = load_classifier(folders["transformers"])
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        pooled = model.eval().bert(**batch).pooler_output.numpy()
    assert pooled.std(0).min() > 1e-3, "features vary by text: closeness means something"
    return pooled


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
        # 0.95 here alone; 0.825 once in a full fresh-clone run (2026-12-02), so the rows that decide are the ones
        # whose torch margin is not a near-tie: the more confident half must agree
        top = np.sort(torch_logits, -1)
        margin = top[:, -1] - top[:, -2]
        sure = margin >= np.median(margin)
        agree_sure = float((logits.argmax(-1) == torch_logits.argmax(-1))[sure].mean())
        assert agreement >= 0.75 and agree_sure >= 0.9, (agreement, agree_sure, np.round(margin, 3).tolist())
        assert 0 < np.abs(logits - torch_logits).max() < 1.0
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


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))  # (N,)


@pytest.mark.parametrize("runtime", ["transformers", "onnxruntime", "onnxruntime-int8", "torch-pt2"])
def test_each_runtime_gives_its_own_pooled_features(folders, onnx_int8, texts, torch_features, runtime):
    folder = onnx_int8 if runtime == "onnxruntime-int8" else folders[runtime]
    predictor = load_predictor(folder, max_length=MAX_LENGTH)
    logits, features = predictor.predict_outputs(texts, batch_size=7)  # ragged last batch
    dim = torch_features.shape[1]
    assert features.shape == (len(texts), dim) and features.dtype == np.float32 and predictor.num_features == dim
    np.testing.assert_array_equal(logits, predictor.predict_logits(texts, batch_size=7))  # the same logits
    gap = float(np.abs(features - torch_features).max())
    if runtime in ("transformers", "onnxruntime"):
        assert gap < 1e-4, gap
    else:  # quantization moves the features: each artifact gives its own, still close to fp32's
        assert np.isfinite(features).all() and gap > 1e-6, gap
        assert float(_cosine(features, torch_features).mean()) > 0.9
    if runtime != "onnxruntime-int8":  # (its activation scales are computed per batch)
        np.testing.assert_allclose(predictor.predict_outputs(texts[5:6])[1][0], features[5], atol=1e-5)
    empty_logits, empty_features = predictor.predict_outputs([])
    assert empty_logits.shape == (0, 3) and empty_features.shape == (0, dim)


def test_the_features_are_the_input_of_the_last_linear_with_a_logit_per_label(folders, texts, torch_features):
    import torch

    from distill_gap.inference.batching import classifier_head, predict_logits, predict_outputs
    from distill_gap.models.loading import load_classifier

    model, tokenizer = load_classifier(folders["transformers"])
    assert classifier_head(model) is model.classifier
    logits, features = predict_outputs(model, tokenizer, texts, batch_size=7, max_length=MAX_LENGTH)
    np.testing.assert_allclose(features, torch_features, atol=1e-5)
    np.testing.assert_array_equal(logits, predict_logits(model, tokenizer, texts, batch_size=7, max_length=MAX_LENGTH))
    assert not model.classifier._forward_pre_hooks, "the hook is removed afterwards"
    model.classifier = torch.nn.Linear(model.classifier.in_features, 4)  # no Linear with one output per label
    with pytest.raises(DistillError, match="no torch.nn.Linear with 3 outputs"):
        predict_outputs(model, tokenizer, texts[:2], max_length=MAX_LENGTH)


def test_an_onnx_graph_is_read_by_output_name_and_may_lack_features(folders, texts, tmp_path):
    """An export from before the "features" output gives features None; outputs are found by name, not position."""
    import onnx

    reference = load_predictor(folders["onnxruntime"], max_length=MAX_LENGTH).predict_outputs(texts)
    for case in ("no features", "features first"):
        folder = tmp_path / case.replace(" ", "-")
        shutil.copytree(folders["onnxruntime"], folder)
        model = onnx.load(str(folder / "model.onnx"))
        outputs = {o.name: o for o in model.graph.output}
        assert list(outputs) == ["logits", "features"]
        del model.graph.output[:]
        if case == "no features":
            model.graph.output.append(outputs["logits"])
            model.graph.node.remove(next(n for n in model.graph.node if "features" in n.output))
        else:
            model.graph.output.extend([outputs["features"], outputs["logits"]])
        onnx.save(model, str(folder / "model.onnx"))
        predictor = load_predictor(folder, max_length=MAX_LENGTH)
        assert predictor.num_labels == 3
        logits, features = predictor.predict_outputs(texts, batch_size=7)
        np.testing.assert_allclose(logits, reference[0], atol=1e-6)
        if case == "no features":
            assert features is None and predictor.num_features is None
            assert predictor.predict_outputs([])[1] is None
        else:
            np.testing.assert_allclose(features, reference[1], atol=1e-6)


def test_an_older_int8_program_with_logits_alone_still_loads(folders, texts, torch_logits, tmp_path):
    """A model.pt2 saved before the features output (its program returns one tensor) loads; its features are None."""
    import torch

    from distill_gap.inference.inc_int8 import encode
    from distill_gap.models.loading import load_classifier

    model, tokenizer = load_classifier(folders["transformers"])

    class LogitsOnly(torch.nn.Module):  # what the quantize stage exported before
        def __init__(self, classifier):
            super().__init__()
            self.model = classifier

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              return_dict=False)[0]

    seq = torch.export.Dim("seq", min=2, max=MAX_LENGTH)
    example = encode(tokenizer, ["example input", "a second, longer example input"], MAX_LENGTH, pad_to_max=True)
    program = torch.export.export(LogitsOnly(model).eval(), example,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1), 1: seq},) * 3)
    old = tmp_path / "old-int8"
    shutil.copytree(folders["torch-pt2"], old)
    torch.export.save(program, old / "model.pt2")
    predictor = load_predictor(old, max_length=MAX_LENGTH)
    assert predictor.num_features is None
    logits, features = predictor.predict_outputs(texts, batch_size=7)
    assert features is None and predictor.predict_outputs([])[1] is None
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4)  # an fp32 program: the torch model's logits
    np.testing.assert_array_equal(predictor.predict_logits(texts, batch_size=7), logits)
