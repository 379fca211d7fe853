"""Input checks of the evaluation statistics, in one place so that every public function fails the same way.

Inputs a user's data or model can get wrong (empty suite, NaN logits, wrong label set, mismatched lengths)
raise `DistillError`. Shapes: logits and probabilities are (N, C); truth and predictions are (N,) class ids.
"""

from __future__ import annotations

import numpy as np

from distill_gap.errors import DistillError


def check_logits(x, name: str, num_classes: int | None = None) -> np.ndarray:
    """(N, C) finite float64, N >= 1, C == num_classes when given."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise DistillError(f"{name} must be a 2-D (rows, classes) array, got shape {a.shape}",
                           "pass the model's logits for the whole suite, one row per example")
    if a.shape[0] == 0:
        raise DistillError(f"{name} is empty (0 rows)", "skip empty suites before scoring them")
    if not np.issubdtype(a.dtype, np.number):
        raise DistillError(f"{name} has dtype {a.dtype}, not a number type", "pass float logits")
    if num_classes is not None and a.shape[1] != num_classes:
        raise DistillError(f"{name} has {a.shape[1]} classes, expected {num_classes}",
                           "score every model over the same label set (data.labels, same order)")
    a = a.astype(np.float64, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise DistillError(f"{name} has NaN or inf in {len(rows)} of {len(a)} rows (first row {rows[0]})",
                           "the model's outputs are broken (often an INT8 export): re-export or re-quantize it")
    return a


def check_labels(x, name: str, num_classes: int | None = None) -> np.ndarray:
    """(N,) int64 class ids in [0, num_classes); N >= 1."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise DistillError(f"{name} must be 1-D class ids, got shape {a.shape}",
                           "pass argmax predictions / label ids, not logits or one-hot rows")
    if len(a) == 0:
        raise DistillError(f"{name} is empty (0 rows)", "skip empty suites before scoring them")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.all(a == np.round(a)):
            raise DistillError(f"{name} holds NaN or non-integer values",
                               "map every label to its class id (a NaN often means a label outside data.labels)")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iub":
        raise DistillError(f"{name} has dtype {a.dtype}, expected integer class ids",
                           "map label names to ids with data.labels before scoring")
    a = a.astype(np.int64, copy=False)
    if a.min() < 0 or (num_classes is not None and a.max() >= num_classes):
        raise DistillError(f"{name} has class ids outside [0, {num_classes}): min {a.min()}, max {a.max()}",
                           "use the same label set (data.labels) for the data and the model")
    return a


def check_scores(x, name: str) -> np.ndarray:
    """(N,) finite float64 scores, N >= 1."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0:
        raise DistillError(f"{name} must be a non-empty 1-D array of scores, got shape {a.shape}",
                           "score each row with msp_score or energy_score first")
    if not np.isfinite(a).all():
        raise DistillError(f"{name} has NaN or inf scores", "check the model's logits for NaN before scoring")
    return a


def check_probs(x, name: str = "probs") -> np.ndarray:
    """(N, C) rows in [0, 1] summing to 1 (to 1e-3): probabilities, not logits."""
    a = check_logits(x, name)
    if a.min() < 0 or a.max() > 1 or not np.allclose(a.sum(axis=1), 1.0, atol=1e-3):
        raise DistillError(f"{name} are not probabilities (each row in [0, 1], summing to 1)",
                           "these look like logits: apply scipy.special.softmax(logits, axis=1) first")
    return a


def same_length(**arrays) -> int:
    """The common row count of the named arrays; DistillError naming each count when they differ."""
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise DistillError(f"row counts differ: {lengths}", "pass arrays for the same rows of the same suite")
    return next(iter(lengths.values()))
