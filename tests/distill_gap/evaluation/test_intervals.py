"""Bootstrap intervals: the statistic against scikit-learn, the interval against scipy's, coverage, small suites."""

import json
import re

import numpy as np
import pytest
from scipy.stats import bootstrap
from sklearn.metrics import accuracy_score, f1_score, recall_score

from distill_gap.errors import DistillError
from distill_gap.evaluation.intervals import _confusion_stack, _metrics_from_confusion, bootstrap_metrics

C = 3


def _classifier(n, accuracy, seed=0, num_classes=C):
    """Truth and predictions where each prediction is right with probability `accuracy`."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, num_classes, n)
    wrong = (truth + rng.integers(1, num_classes, n)) % num_classes
    return truth, np.where(rng.random(n) < accuracy, truth, wrong)


def _ci(truth, pred, metric, **kwargs):
    """The interval of one metric (bootstrap_metrics computes several from one set of resamples)."""
    return bootstrap_metrics(truth, pred, metrics=(metric,), **kwargs)[metric]


def test_vectorised_statistic_matches_sklearn_on_resamples_with_missing_classes():
    rng = np.random.default_rng(1)
    truth, pred = _classifier(40, 0.6, seed=1, num_classes=4)
    idx = rng.integers(0, 12, (30, 12))  # small resamples: classes often absent from truth or predictions
    cm = _confusion_stack(truth[idx] * 4 + pred[idx], 4)
    got = _metrics_from_confusion(cm, ["accuracy", "macro_f1", "per_class_recall"])  # (2 + 4, 30)
    for b in range(30):
        t, p = truth[idx[b]], pred[idx[b]]
        assert got[0, b] == pytest.approx(accuracy_score(t, p), abs=1e-12)
        assert got[1, b] == pytest.approx(f1_score(t, p, labels=range(4), average="macro", zero_division=0), abs=1e-12)
        rec = recall_score(t, p, labels=range(4), average=None, zero_division=0)
        present = np.isin(range(4), t)
        np.testing.assert_allclose(got[2:, b][present], rec[present], atol=1e-12)
        assert np.isnan(got[2:, b][~present]).all()  # recall of an absent class is undefined, not 0


def test_point_estimates_equal_sklearn_and_intervals_contain_them():
    truth, pred = _classifier(500, 0.75, seed=2)
    pred[pred == 2] = 1  # class 2 never predicted: its F1 is 0 (zero_division=0)
    out = bootstrap_metrics(truth, pred, num_classes=C)
    assert out["accuracy"]["value"] == pytest.approx(accuracy_score(truth, pred))
    assert out["macro_f1"]["value"] == pytest.approx(f1_score(truth, pred, labels=range(C), average="macro", zero_division=0))
    rec = recall_score(truth, pred, labels=range(C), average=None, zero_division=0)
    assert [r["value"] for r in out["per_class_recall"]] == pytest.approx(rec)
    assert [r["support"] for r in out["per_class_recall"]] == np.bincount(truth).tolist()
    for ci in [out["accuracy"], out["macro_f1"], *out["per_class_recall"][:2]]:
        assert ci["low"] < ci["value"] < ci["high"]
    assert out["per_class_recall"][2] == {"value": 0.0, "low": 0.0, "high": 0.0, "support": int((truth == 2).sum())}
    json.dumps(out)  # JSON-able as is


def test_accuracy_interval_is_scipys_paired_percentile_interval():
    truth, pred = _classifier(300, 0.8, seed=3)
    ours = _ci(truth, pred, "accuracy", num_classes=C, seed=7)
    ref = bootstrap((truth, pred), lambda t, p, axis=-1: np.mean(t == p, axis=axis), paired=True, vectorized=True,
                    n_resamples=1000, method="percentile", rng=np.random.default_rng(7)).confidence_interval
    assert (ours["low"], ours["high"]) == pytest.approx((ref.low, ref.high))


def test_interval_narrows_with_more_rows_and_is_seeded():
    small = _ci(*_classifier(100, 0.8, seed=4), "macro_f1", num_classes=C)
    large = _ci(*_classifier(2000, 0.8, seed=4), "macro_f1", num_classes=C)
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])
    truth, pred = _classifier(200, 0.8, seed=5)
    assert _ci(truth, pred, "macro_f1", seed=1) == _ci(truth, pred, "macro_f1", seed=1)
    assert _ci(truth, pred, "macro_f1", seed=1) != _ci(truth, pred, "macro_f1", seed=2)


def test_95_percent_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    hits = 0
    for seed in range(100):
        ci = _ci(*_classifier(200, 0.8, seed=100 + seed), "accuracy", num_classes=C, n_boot=500, seed=seed)
        hits += ci["low"] <= 0.8 <= ci["high"]
    assert 85 <= hits <= 100


def test_small_suites_and_small_classes_get_no_interval():
    truth, pred = np.array([0, 1, 2, 1, 0]), np.array([0, 1, 1, 1, 0])
    assert _ci(truth, pred, "accuracy", num_classes=C) == {"value": 0.8, "low": None, "high": None,
                                                                   "note": "n too small"}
    truth, pred = _classifier(200, 0.8, seed=6)
    truth[:195], truth[195:] = np.where(truth[:195] == 2, 0, truth[:195]), 2  # class 2: 5 rows
    recall = _ci(truth, pred, "per_class_recall", num_classes=C)
    assert recall[0]["low"] is not None and recall[2]["low"] is None and recall[2]["note"] == "n too small"
    absent = _ci(np.array([0, 1] * 10), np.array([0, 1] * 10), "per_class_recall", num_classes=C)[2]
    assert absent == {"value": None, "low": None, "high": None, "note": "n too small", "support": 0}


def test_recall_interval_of_a_class_missing_from_some_resamples():
    truth, pred = np.array([0, 1] * 10 + [2]), np.array([0, 1] * 10 + [2])
    pred[:4] = 2  # class 2: one row (absent from ~37% of resamples), recalls of 0 and 1 below 1
    recall = _ci(truth, pred, "per_class_recall", num_classes=C, min_n=1)
    assert recall[2] == {"value": 1.0, "low": 1.0, "high": 1.0, "support": 1}  # over the resamples that hold it
    assert 0 <= recall[0]["low"] < recall[0]["value"] == 0.8 < recall[0]["high"] <= 1


def test_bootstrap_speed_500_rows_all_metrics():
    import time

    truth, pred = _classifier(500, 0.75, seed=8)
    bootstrap_metrics(truth, pred, num_classes=C)
    start = time.perf_counter()
    for _ in range(10):
        bootstrap_metrics(truth, pred, num_classes=C)
    per_call = (time.perf_counter() - start) / 10
    assert per_call < 0.2, f"{per_call * 1e3:.0f} ms for 1000 resamples x 500 rows (expect ~15 ms)"


@pytest.mark.parametrize("call, message", [
    (lambda: _ci(np.array([]), np.array([]), "accuracy"), "empty"),
    (lambda: _ci(np.array([0, 1]), np.array([0, 1, 1]), "accuracy"), "row counts differ"),
    (lambda: _ci(np.array([0, 3]), np.array([0, 1]), "accuracy", num_classes=3), "outside [0, 3)"),
    (lambda: _ci(np.array([0.0, np.nan]), np.array([0, 1]), "accuracy"), "NaN"),
    (lambda: _ci(np.array([0, 1]), np.zeros((2, C)), "accuracy"), "1-D class ids"),
])
def test_bad_inputs_raise_distill_error_with_a_fix(call, message):
    with pytest.raises(DistillError, match=re.escape(message)) as err:
        call()
    assert err.value.fix


@pytest.mark.parametrize("call", [
    lambda: _ci(np.array([0, 1]), np.array([0, 1]), "auc"),
    lambda: _ci(np.array([0, 1]), np.array([0, 1]), "accuracy", alpha=1.5),
    lambda: _ci(np.array([0, 1]), np.array([0, 1]), "accuracy", n_boot=0),
    lambda: bootstrap_metrics(np.array([0, 1]), np.array([0, 1]), metrics=()),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
