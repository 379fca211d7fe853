"""OOD detection: the score convention, AUROC and FPR against scikit-learn, the paired drop interval, the scope
threshold, and the errors users see."""

import re

import numpy as np
import pytest

from distill_gap.errors import DistillError
from distill_gap.evaluation.ood import auroc_drop_interval, energy_score, msp_score, ood_detection, threshold_at_tpr

C = 3
GOOD = np.zeros((4, C))


def test_scores_follow_the_higher_is_in_distribution_convention():
    peaked, flat = np.array([[8.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 1.0]])
    assert msp_score(flat)[0] == pytest.approx(1 / 3) and msp_score(peaked)[0] > 0.99
    assert energy_score(peaked)[0] > energy_score(flat)[0]
    assert energy_score(flat)[0] == pytest.approx(1 + np.log(3))
    assert energy_score(flat, T=2.0)[0] == pytest.approx(2 * (0.5 + np.log(3)))


def test_ood_detection_separable_identical_and_hand_computed():
    separable = ood_detection(np.linspace(1, 2, 50), np.linspace(-2, 0, 30))
    assert separable == {"auroc": 1.0, "fpr_at_tpr": 0.0, "tpr": 0.95, "n_in": 50, "n_out": 30}
    rng = np.random.default_rng(12)
    same = ood_detection(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(same["auroc"] - 0.5) < 0.03 and abs(same["fpr_at_tpr"] - 0.95) < 0.03
    # 20 in-distribution scores 1..20; reaching 95% TPR needs threshold 2, which admits the OOD scores 5 and 3
    out = ood_detection(np.arange(1, 21), np.array([0.5, 3.0, 5.0, 1.5]))
    assert out["fpr_at_tpr"] == 0.5
    assert out["auroc"] == pytest.approx((20 + 17.5 + 15.5 + 19) / 80)  # ties count one half


def test_auroc_drop_interval_is_paired_and_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    t_in, t_out = rng.normal(1, 1, 80).round(1), rng.normal(0, 1, 30).round(1)  # rounded: ties are averaged
    m_in, m_out = t_in + rng.normal(0, 0.5, 80), t_out + rng.normal(0.3, 0.5, 30)  # worse separation
    y = np.r_[np.ones(80), np.zeros(30)]
    expected = roc_auc_score(y, np.r_[t_in, t_out]) - roc_auc_score(y, np.r_[m_in, m_out])
    d = auroc_drop_interval(t_in, t_out, m_in, m_out, n_boot=500, seed=1)
    assert d["value"] == pytest.approx(expected) and d["low"] <= d["value"] <= d["high"]
    assert d == auroc_drop_interval(t_in, t_out, m_in, m_out, n_boot=500, seed=1)  # seeded
    # the same model against itself: no drop on any resample, so the paired interval is exactly [0, 0]
    assert auroc_drop_interval(t_in, t_out, t_in, t_out, n_boot=200) == {"value": 0.0, "low": 0.0, "high": 0.0}
    # paired: a model whose scores are the reference's plus a shift per row-group moves AUROC by the same
    # amount on every resample; unpaired intervals of each AUROC would both be ~0.1 wide
    wide = auroc_drop_interval(t_in, t_out, t_in + 0.0, t_out + 0.4, n_boot=500)
    assert wide["low"] > 0 and wide["high"] - wide["low"] < 0.1
    # too few rows on a side: the point drop, no interval
    small = auroc_drop_interval(t_in, t_out[:5], m_in, m_out[:5])
    assert small["low"] is None and small["note"] == "n too small"


def test_threshold_keeps_the_requested_share_in_scope():
    scores = np.arange(100.0)
    assert threshold_at_tpr(scores, 0.95) == 5.0  # keeps 5..99: exactly 95 rows
    rng = np.random.default_rng(13)
    s = rng.normal(size=777)
    thr = threshold_at_tpr(s, 0.95)
    assert np.mean(s >= thr) >= 0.95 and np.mean(s > thr) < 0.95  # the highest threshold that keeps 95%
    assert threshold_at_tpr(s, 1.0) == s.min()


@pytest.mark.parametrize("call, message", [
    (lambda: msp_score(np.zeros((0, C))), "empty"),
    (lambda: msp_score(GOOD, num_classes=2), "has 3 classes, expected 2"),
    (lambda: energy_score(np.array([[0.0, np.nan, 1.0]])), "NaN or inf in 1 of 1 rows"),
    (lambda: msp_score(np.zeros(3)), "2-D"),
    (lambda: ood_detection(np.array([]), np.array([1.0])), "non-empty"),
    (lambda: threshold_at_tpr(np.array([1.0, np.inf])), "NaN or inf"),
    (lambda: auroc_drop_interval(np.ones(20), np.ones(20), np.ones(19), np.ones(20)), "row counts differ"),
])
def test_bad_inputs_raise_distill_error_with_a_fix(call, message):
    with pytest.raises(DistillError, match=re.escape(message)) as err:
        call()
    assert err.value.fix


@pytest.mark.parametrize("call", [
    lambda: threshold_at_tpr(np.array([1.0, 2.0]), tpr=0.0),
    lambda: energy_score(GOOD, T=0.0),
    lambda: ood_detection(np.array([1.0]), np.array([0.0]), tpr=1.5),
    lambda: auroc_drop_interval(np.ones(20), np.ones(20), np.ones(20), np.ones(20), alpha=0.0),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
