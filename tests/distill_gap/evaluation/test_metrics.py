"""Classification metrics and calibration: known answers, cross-checks against scikit-learn / scipy, user errors."""

import json
import re

import numpy as np
import pytest
from scipy.special import log_softmax, rel_entr, softmax

from distill_gap.errors import DistillError
from distill_gap.evaluation.metrics import ece, fit_temperature, mean_kl, reliability_bins, score

C = 3


def _calibrated(n, seed=0, scale=2.0):
    """Logits z and labels drawn from softmax(z): softmax(z) is perfectly calibrated for them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, C)) * scale
    p = softmax(z, axis=1)
    truth = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, truth


def _nll(logits, truth, temperature=1.0):
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    return float(-np.mean(log_softmax(logits / temperature, axis=1)[np.arange(len(truth)), truth]))


# ---------------------------------------------------------------------------------------------
# classification and agreement with the teacher


def test_score_uses_sklearn_metrics():
    m = score(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2, teacher_pred=np.array([0, 1, 1, 1]))
    assert m["accuracy"] == 0.75 and m["fidelity"] == 0.75 and abs(m["macro_f1"] - 0.7333) < 1e-3
    assert score(np.array([], int), np.array([], int), 2) == {"n": 0}  # an empty suite is reported, not scored


def test_kl_known_values():
    teacher = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    model = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 4.0], [0.0, 2.0, 0.0]])
    expected = rel_entr(softmax(teacher, 1), softmax(model, 1)).sum(axis=1).mean()
    assert mean_kl(teacher, model) == pytest.approx(expected, rel=1e-12)
    expected_t2 = rel_entr(softmax(teacher / 2, 1), softmax(model / 2, 1)).sum(axis=1).mean()
    assert mean_kl(teacher, model, temperature=2.0) == pytest.approx(expected_t2, rel=1e-12)
    assert mean_kl(teacher, teacher) == 0.0


def test_kl_is_finite_when_a_model_probability_underflows():
    teacher = np.array([[0.0, 0.0, 0.0]])
    model = np.array([[1e4, -1e4, 0.0]])  # softmax gives exactly 0 for class 1: rel_entr would be inf
    assert np.isinf(rel_entr(softmax(teacher, 1), softmax(model, 1)).sum())
    assert mean_kl(teacher, model) == pytest.approx((0 + 2e4 + 1e4) / 3 - np.log(3), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# calibration


def _ece_reference(probs, truth, n_bins):
    """Direct top-label ECE, bin by bin (bins [lo, hi), confidence 1.0 in the last bin)."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for i in range(n_bins):
        upper = conf <= edges[i + 1] if i == n_bins - 1 else conf < edges[i + 1]
        in_bin = (conf >= edges[i]) & upper
        if in_bin.any():
            total += in_bin.mean() * abs((pred[in_bin] == truth[in_bin]).mean() - conf[in_bin].mean())
    return total


def test_ece_near_zero_when_calibrated_and_large_when_over_confident():
    z, truth = _calibrated(20000, seed=9)
    calibrated = ece(softmax(z, 1), truth)
    over = ece(softmax(3 * z, 1), truth)
    assert calibrated < 0.015 and over > 0.1
    for probs in (softmax(z, 1), softmax(3 * z, 1), softmax(0.3 * z, 1)):
        assert ece(probs, truth) == pytest.approx(_ece_reference(probs, truth, 15), abs=1e-12)
        assert ece(probs, truth, n_bins=5) == pytest.approx(_ece_reference(probs, truth, 5), abs=1e-12)
    # torchmetrics' MulticlassCalibrationError(n_bins=15, norm="l1") on these sets agrees to ~3e-6 (float32);
    # torchmetrics is not a project dependency, so the direct formula above is the reference here.


def test_ece_known_value_and_one_hot_predictions():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    truth = np.array([0, 1, 0, 0])  # bin 0.9: acc 0.5, conf 0.9; bin 0.6: acc 1.0, conf 0.6
    assert ece(probs, truth, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert ece(np.eye(2)[[0, 1, 1]], np.array([0, 1, 1])) == 0.0  # confidence 1.0 lands in the last bin


def test_reliability_bins_sum_to_the_rows_and_reproduce_ece():
    z, truth = _calibrated(3000, seed=10)
    probs = softmax(2 * z, 1)
    bins = reliability_bins(probs, truth, n_bins=10)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 3000
    assert bins[0] == {"low": 0.0, "high": 0.1, "count": 0, "confidence": None, "accuracy": None}  # conf >= 1/3
    filled = [b for b in bins if b["count"]]
    assert all(b["low"] <= b["confidence"] <= b["high"] for b in filled)
    from_bins = sum(b["count"] / 3000 * abs(b["accuracy"] - b["confidence"]) for b in filled)
    assert from_bins == pytest.approx(ece(probs, truth, n_bins=10))
    json.dumps(bins)


def test_temperature_recovers_the_over_confidence_and_lowers_nll():
    z, truth = _calibrated(5000, seed=11)
    over = 3 * z  # over-confident: logits 3x too large, so T ~ 3 undoes it
    t = fit_temperature(over, truth)
    assert 2.6 < t < 3.4
    assert _nll(over, truth, temperature=t) < _nll(over, truth) - 0.1
    assert ece(softmax(over / t, 1), truth) < 0.5 * ece(softmax(over, 1), truth)
    assert 0.2 < fit_temperature(z / 3, truth) < 0.45  # under-confident: T < 1 sharpens
    assert 0.9 < fit_temperature(z, truth) < 1.1


# ---------------------------------------------------------------------------------------------
# errors users can cause

GOOD = np.zeros((4, C))


@pytest.mark.parametrize("call, message", [
    (lambda: mean_kl(GOOD, np.zeros((4, 2))), "has 2 classes, expected 3"),
    (lambda: mean_kl(GOOD, np.zeros((5, C))), "row counts differ"),
    (lambda: ece(np.array([[2.0, -1.0]]), np.array([0])), "not probabilities"),
    (lambda: ece(softmax(GOOD, 1), np.array([0, 1])), "row counts differ"),
    (lambda: fit_temperature(np.full((2, C), np.nan), np.array([0, 1])), "NaN"),
    (lambda: fit_temperature(GOOD, np.array([0, 1, 2, 3])), "outside [0, 3)"),
])
def test_bad_inputs_raise_distill_error_with_a_fix(call, message):
    with pytest.raises(DistillError, match=re.escape(message)) as err:
        call()
    assert err.value.fix


@pytest.mark.parametrize("call", [
    lambda: ece(softmax(GOOD, 1), np.zeros(4, int), n_bins=0),
    lambda: fit_temperature(GOOD, np.zeros(4, int), bounds=(0.0, 2.0)),
    lambda: mean_kl(GOOD, GOOD, temperature=0.0),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
