"""The teacher pass: logits in the caller's order, whatever the length-sorted batching did."""

from __future__ import annotations

import numpy as np

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
