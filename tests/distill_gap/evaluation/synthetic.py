"""Synthetic suites and logits for the gap report and gate tests (plain functions, no models)."""

import numpy as np
import pandas as pd

from distill_gap.data.splits import Splits

LABELS3 = ["neg", "neu", "pos"]


def one_hot_logits(pred) -> np.ndarray:
    """(N, 2) logits whose argmax is `pred`."""
    out = np.zeros((len(pred), 2), dtype=np.float32)
    out[np.arange(len(pred)), pred] = 1.0
    return out


def two_site_splits() -> Splits:
    """40 test rows over 2 labels, the first 20 from site s1 (label a), the rest from s2 (label b)."""
    test = pd.DataFrame({"id": [str(i) for i in range(40)], "text": ["x"] * 40,
                         "label": ["a"] * 20 + ["b"] * 20, "site": ["s1"] * 20 + ["s2"] * 20})
    return Splits({"train": test, "test": test}, ["a", "b"], ["site"])


def three_class_splits(n: int = 60) -> Splits:
    """test, validation and an OOD set over 3 classes, with a slice column (slice "tiny" under 10 rows)."""
    def frame(prefix):
        return pd.DataFrame({"id": [f"{prefix}{i}" for i in range(n)], "text": [f"{prefix} text {i}" for i in range(n)],
                             "label": [LABELS3[i % 3] for i in range(n)],
                             "site": ["tiny" if i < 6 else ("a" if i % 2 else "b") for i in range(n)]})

    return Splits({"train": frame("tr"), "validation": frame("va"), "test": frame("te"), "ood:far": frame("oo")},
                  LABELS3, ["site"])


def confident_logits(truth, rng, scale, wrong=0.0) -> np.ndarray:
    """Logits peaked on the truth (or on a wrong class for a share `wrong` of rows), with margin `scale`."""
    out = rng.normal(0, 0.3, (len(truth), 3)).astype(np.float32)
    target = truth.copy()
    flip = rng.random(len(truth)) < wrong
    target[flip] = (target[flip] + 1) % 3
    out[np.arange(len(truth)), target] += scale
    return out


def digit_teacher(texts) -> np.ndarray:
    """A predictor over texts: the class is the number at the end of the text (mod 3), robust to noise around it."""
    def row(t):
        last = t.split()[-1].strip(".,!?;:")
        return np.eye(3)[int(last) % 3] * 5 if last.isdigit() else np.zeros(3)

    return np.stack([row(t) for t in texts]).astype(np.float32)


def case_fragile_edge(texts) -> np.ndarray:
    """digit_teacher, except that any upper-case letter makes it answer class 0."""
    out = digit_teacher(texts)
    out[[t != t.lower() for t in texts]] = np.array([5.0, 0, 0], dtype=np.float32)
    return out


class ZerosPredictor:
    """A Predictor over texts that returns all-zero logits of `num_classes` columns (a wrong width breaks a model)
    and features of 4 columns."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def predict_outputs(self, texts, *, batch_size: int = 32, desc=None):
        return np.zeros((len(texts), self.num_classes), dtype=np.float32), np.ones((len(texts), 4), dtype=np.float32)

    def predict_logits(self, texts, *, batch_size: int = 32, desc=None):
        return self.predict_outputs(texts)[0]


def zeros_predictor(num_classes: int) -> ZerosPredictor:
    return ZerosPredictor(num_classes)
