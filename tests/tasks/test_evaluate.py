"""Gap report: each model scored on its own, flags per suite, gates as data."""

import numpy as np
import pandas as pd

from flows.config import EvaluateConfig
from tasks.data import Splits
from tasks.evaluate import evaluate_gates, gap_report, score

LABELS = ["a", "b"]


def _splits():
    test = pd.DataFrame({"id": [str(i) for i in range(40)], "text": ["x"] * 40,
                         "label": ["a"] * 20 + ["b"] * 20, "site": ["s1"] * 20 + ["s2"] * 20})
    return Splits({"train": test, "test": test}, LABELS, ["site"])


def _logits(pred):
    out = np.zeros((len(pred), 2), dtype=np.float32)
    out[np.arange(len(pred)), pred] = 1.0
    return out


def test_score_uses_sklearn_metrics():
    m = score(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2, teacher_pred=np.array([0, 1, 1, 1]))
    assert m["accuracy"] == 0.75 and m["fidelity"] == 0.75 and abs(m["macro_f1"] - 0.7333) < 1e-3


def test_flags_a_slice_loss_hidden_by_the_aggregate():
    truth = np.array([0] * 20 + [1] * 20)
    student = truth.copy()
    student[20:26] = 0  # loses 6 of 20 on slice s2 only
    report = gap_report({"teacher": {"test": _logits(truth)}, "student": {"test": _logits(student)}}, _splits(), 0.02)
    assert report.metric("test", "student") == 0.85
    assert report.metric("slice:site=s1", "student") == 1.0
    flagged = {(f["suite"], f["model"]) for f in report.flags}
    assert ("slice:site=s2", "student") in flagged and ("slice:site=s1", "student") not in flagged
    assert report.worst_slices("student")[0][0] == "slice:site=s2"
    md = report.markdown()
    assert "slice:site=s2" in md and "⚠" in md


def test_gates_pass_and_fail_on_thresholds():
    truth = np.array([0] * 20 + [1] * 20)
    edge = truth.copy()
    edge[:2] = 1
    report = gap_report({"teacher": {"test": _logits(truth)}, "student": {"test": _logits(truth)},
                         "student-int8": {"test": _logits(edge)}}, _splits(), 0.02)
    gates = evaluate_gates(report, "student-int8", {"argmax_agreement": 0.99}, EvaluateConfig(max_edge_drop=0.01))
    assert not gates["edge_accuracy_drop_vs_student"]["passed"]
    assert gates["edge_argmax_agreement_vs_student"]["passed"]
    gates = evaluate_gates(report, "student-int8", {"argmax_agreement": 0.99}, EvaluateConfig(max_edge_drop=0.05))
    assert all(g["passed"] for g in gates.values())
