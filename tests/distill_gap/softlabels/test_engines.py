"""The teacher pass: logits in the caller's order whatever the length-sorted batching did, with torch and with
the teacher's ONNX export."""

from __future__ import annotations

import numpy as np

from distill_gap.softlabels import engines
from distill_gap.softlabels.engines import teacher_logits
from tests.conftest import LABELS


def test_teacher_logits_restores_input_order(sharp_teacher_dir, rows, reference_logits):
    texts = rows["text"].tolist()
    lengths = [len(t) for t in texts]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True), "sorting must matter"
    # The reference rows differ from each other by far more than the tolerance, so a shuffle would show.
    spread = np.abs(reference_logits[:, None] - reference_logits[None]).max(-1)   # (N, N)
    assert np.median(spread[~np.eye(len(texts), dtype=bool)]) > 0.1

    got = teacher_logits(sharp_teacher_dir, texts, batch_size=16, max_length=64, progress=False)

    assert got.shape == (len(texts), len(LABELS)) and got.dtype == np.float32
    # The rescaled head amplifies fp32 rounding of the pooled output (and so of padding) to ~3e-4.
    np.testing.assert_allclose(got, reference_logits, atol=1e-3, rtol=0)


def test_teacher_logits_of_nothing(tiny_model_dir):
    assert teacher_logits(tiny_model_dir, [], progress=False).shape == (0, len(LABELS))


def test_onnxruntime_engine_exports_once_and_agrees_with_torch(sharp_teacher_dir, rows, reference_logits, tmp_path,
                                                               monkeypatch):
    """The teacher exported to ONNX (cached by digest, sha256 sidecar), loaded by the one predictor: the same
    logits as torch to 1e-3, and a later load reuses the export."""
    from distill_gap.digest import model_digest
    from distill_gap.inference.predictor import detect_runtime

    monkeypatch.setattr(engines, "ONNX_CACHE", tmp_path / "onnx")
    texts = rows["text"].tolist()

    got = teacher_logits(sharp_teacher_dir, texts, batch_size=16, max_length=64, progress=False, engine="onnxruntime")

    export = tmp_path / "onnx" / model_digest(sharp_teacher_dir)
    assert (export / "model.onnx.sha256").is_file() and detect_runtime(export) == "onnxruntime"
    assert got.shape == (len(texts), len(LABELS)) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_logits, atol=1e-3, rtol=0)
    exported_at = (export / "model.onnx").stat().st_mtime_ns
    assert engines.onnx_teacher(sharp_teacher_dir, model_digest(sharp_teacher_dir)) == export
    assert (export / "model.onnx").stat().st_mtime_ns == exported_at
