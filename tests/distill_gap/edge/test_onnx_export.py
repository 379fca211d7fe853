"""The fp32 ONNX export (optimum) and its ONNX Runtime INT8 copy of a tiny real BERT: self-contained folders
whose logits match (fp32) or track (INT8) the torch student's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_gap.edge.onnx_export import export_onnx, quantize_onnx_int8
from distill_gap.errors import DistillError
from distill_gap.inference.onnx_runtime import onnx_predict_logits

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def heldout(review_frame):
    return review_frame["text"].tolist()[96:192]


@pytest.fixture(scope="module")
def fp32_logits(spread_model_dir, heldout):
    from distill_gap.edge.checks import fp32_logits

    return fp32_logits(spread_model_dir, heldout, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def onnx(spread_model_dir, heldout, tmp_path_factory):
    return export_onnx(spread_model_dir, tmp_path_factory.mktemp("onnx") / "onnx", heldout_texts=heldout,
                       max_length=MAX_LENGTH)


def test_onnx_export_matches_fp32(onnx, heldout, fp32_logits, tmp_path):
    r = onnx
    assert (r.path / "model.onnx").is_file() and (r.path / "tokenizer.json").is_file()
    assert not r.path.with_name(r.path.name + ".partial").exists()
    assert r.parity["n"] == len(heldout) and r.parity["argmax_agreement"] == 1.0
    assert r.parity["max_abs_logit_diff"] < 1e-4
    odd = onnx_predict_logits(r.path, heldout[:7], batch_size=3, max_length=MAX_LENGTH)  # other batch shapes
    np.testing.assert_allclose(odd, fp32_logits[:7], atol=1e-4)
    with pytest.raises(DistillError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "onnx", heldout_texts=["b"])


def test_onnx_int8_is_smaller_and_close(onnx, heldout, fp32_logits, tmp_path):
    import onnx as onnx_lib

    for bits in (4, 8):
        r = quantize_onnx_int8(onnx.path, tmp_path / f"onnx-int8-{bits}", heldout_texts=heldout,
                               max_length=MAX_LENGTH, embedding_bits=bits, block_size=16, reference=fp32_logits)
        assert (r.path / "model.onnx").is_file() and (r.path / "tokenizer.json").is_file()
        assert (r.path / "model.onnx").stat().st_size < 0.6 * (onnx.path / "model.onnx").stat().st_size
        assert json.loads((r.path / "ort_int8.json").read_text())["embeddings"]["bits"] == bits
        ops = {n.op_type for n in onnx_lib.load(str(r.path / "model.onnx")).graph.node}
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops  # int8 MatMuls
        logits = onnx_predict_logits(r.path, heldout, max_length=MAX_LENGTH)
        np.testing.assert_allclose(logits, onnx_predict_logits(r.path, heldout, max_length=MAX_LENGTH))
        # ORT's dynamic per-tensor activation scales are coarse on this random 32-wide model (weights ~N(0, 0.2),
        # outlier activations); the trained demo student keeps 98.5% agreement. Random outputs would agree ~1/3.
        # Agreement swings between runs (0.59-0.78 seen: near-ties of a random model); the logits still track fp32
        # closely: their correlation is the stable signal (an unrelated model correlates ~0).
        corr = float(np.corrcoef((logits - logits.mean(0)).ravel(), (fp32_logits - fp32_logits.mean(0)).ravel())[0, 1])
        assert r.parity["finite"] and r.parity["argmax_agreement"] >= 0.45 and corr >= 0.8, (r.parity, corr)
        assert ("GatherBlockQuantized" in ops) == (bits == 4), ops
    with pytest.raises(DistillError, match="no model.onnx"):
        quantize_onnx_int8(tmp_path, tmp_path / "x", heldout_texts=["a"])
    with pytest.raises(DistillError, match="onnx_embedding_bits=2"):
        quantize_onnx_int8(onnx.path, tmp_path / "x", heldout_texts=["a"], embedding_bits=2)
