"""Evaluation statistics: known answers, cross-checks against scikit-learn / scipy, and the errors users see."""

import json
import re

import numpy as np
import pytest
from scipy.special import rel_entr, softmax
from scipy.stats import bootstrap
from sklearn.metrics import accuracy_score, f1_score, recall_score

from distill_gap.errors import DistillError
from distill_gap.evaluation.metrics import (
    LABEL_CHANGING_VARIANTS,
    auroc_drop_interval,
    _confusion_stack,
    _metrics_from_confusion,
    bootstrap_ci,
    bootstrap_metrics,
    ece,
    energy_score,
    fidelity,
    fit_temperature,
    mean_kl,
    msp_score,
    nll,
    ood_detection,
    reliability_bins,
    stress_result,
    stress_variants,
    teacher_agreement,
    threshold_at_tpr,
)

C = 3


def _classifier(n, accuracy, seed=0, num_classes=C):
    """Truth and predictions where each prediction is right with probability `accuracy`."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, num_classes, n)
    wrong = (truth + rng.integers(1, num_classes, n)) % num_classes
    return truth, np.where(rng.random(n) < accuracy, truth, wrong)


def _calibrated(n, seed=0, scale=2.0):
    """Logits z and labels drawn from softmax(z): softmax(z) is perfectly calibrated for them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, C)) * scale
    p = softmax(z, axis=1)
    truth = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, truth


# ---------------------------------------------------------------------------------------------
# bootstrap


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
    ours = bootstrap_ci(truth, pred, "accuracy", num_classes=C, seed=7)
    ref = bootstrap((truth, pred), lambda t, p, axis=-1: np.mean(t == p, axis=axis), paired=True, vectorized=True,
                    n_resamples=1000, method="percentile", rng=np.random.default_rng(7)).confidence_interval
    assert (ours["low"], ours["high"]) == pytest.approx((ref.low, ref.high))


def test_interval_narrows_with_more_rows_and_is_seeded():
    small = bootstrap_ci(*_classifier(100, 0.8, seed=4), "macro_f1", num_classes=C)
    large = bootstrap_ci(*_classifier(2000, 0.8, seed=4), "macro_f1", num_classes=C)
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])
    truth, pred = _classifier(200, 0.8, seed=5)
    assert bootstrap_ci(truth, pred, "macro_f1", seed=1) == bootstrap_ci(truth, pred, "macro_f1", seed=1)
    assert bootstrap_ci(truth, pred, "macro_f1", seed=1) != bootstrap_ci(truth, pred, "macro_f1", seed=2)


def test_95_percent_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    hits = 0
    for seed in range(100):
        ci = bootstrap_ci(*_classifier(200, 0.8, seed=100 + seed), "accuracy", num_classes=C, n_boot=500, seed=seed)
        hits += ci["low"] <= 0.8 <= ci["high"]
    assert 85 <= hits <= 100


def test_small_suites_and_small_classes_get_no_interval():
    truth, pred = np.array([0, 1, 2, 1, 0]), np.array([0, 1, 1, 1, 0])
    assert bootstrap_ci(truth, pred, "accuracy", num_classes=C) == {"value": 0.8, "low": None, "high": None,
                                                                   "note": "n too small"}
    truth, pred = _classifier(200, 0.8, seed=6)
    truth[:195], truth[195:] = np.where(truth[:195] == 2, 0, truth[:195]), 2  # class 2: 5 rows
    recall = bootstrap_ci(truth, pred, "per_class_recall", num_classes=C)
    assert recall[0]["low"] is not None and recall[2]["low"] is None and recall[2]["note"] == "n too small"
    absent = bootstrap_ci(np.array([0, 1] * 10), np.array([0, 1] * 10), "per_class_recall", num_classes=C)[2]
    assert absent == {"value": None, "low": None, "high": None, "note": "n too small", "support": 0}


def test_recall_interval_of_a_class_missing_from_some_resamples():
    truth, pred = np.array([0, 1] * 10 + [2]), np.array([0, 1] * 10 + [2])
    pred[:4] = 2  # class 2: one row (absent from ~37% of resamples), recalls of 0 and 1 below 1
    recall = bootstrap_ci(truth, pred, "per_class_recall", num_classes=C, min_n=1)
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


# ---------------------------------------------------------------------------------------------
# agreement with the teacher


def test_fidelity_and_kl_known_values():
    teacher = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    model = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 4.0], [0.0, 2.0, 0.0]])
    assert fidelity(teacher, model) == 0.5
    expected = rel_entr(softmax(teacher, 1), softmax(model, 1)).sum(axis=1).mean()
    assert mean_kl(teacher, model) == pytest.approx(expected, rel=1e-12)
    expected_t2 = rel_entr(softmax(teacher / 2, 1), softmax(model / 2, 1)).sum(axis=1).mean()
    assert mean_kl(teacher, model, temperature=2.0) == pytest.approx(expected_t2, rel=1e-12)
    assert mean_kl(teacher, teacher) == 0.0
    assert teacher_agreement(teacher, model) == {"fidelity": 0.5, "kl_teacher_model": pytest.approx(expected), "n": 4}


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
    assert nll(over, truth, temperature=t) < nll(over, truth) - 0.1
    assert ece(softmax(over / t, 1), truth) < 0.5 * ece(softmax(over, 1), truth)
    assert 0.2 < fit_temperature(z / 3, truth) < 0.45  # under-confident: T < 1 sharpens
    assert 0.9 < fit_temperature(z, truth) < 1.1


# ---------------------------------------------------------------------------------------------
# OOD detection


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


# ---------------------------------------------------------------------------------------------
# stress suites

TEXTS = ['"I have been taking this medicine for 2 years and my doctor is happy with the results."',
         "This pill gave me terrible headaches, I stopped after a week.",
         "Works great for my anxiety. No side effects so far, would recommend to anyone.",
         "My Doctor switched my MEDICATION and the new drug is much better than the old one"]


def test_stress_variants_are_seeded_same_length_and_differ_from_the_input():
    a, b, other = stress_variants(TEXTS, seed=0), stress_variants(TEXTS, seed=0), stress_variants(TEXTS, seed=1)
    assert a == b and a != other
    assert set(a) == {"typos", "casing", "whitespace", "punctuation", "truncation", "negation", "domain_swap"}
    for name, texts in a.items():
        assert len(texts) == len(TEXTS) and all(isinstance(t, str) for t in texts)
        changed = [t != s for t, s in zip(texts, TEXTS)]
        assert all(changed) if name != "domain_swap" else changed == [True, True, False, True], name
    # a text's variant does not depend on the rest of the batch
    assert stress_variants(TEXTS[1:2], seed=0)["typos"] == a["typos"][1:2]
    assert LABEL_CHANGING_VARIANTS == {"negation"}


def test_stress_variants_content():
    v = stress_variants(TEXTS, seed=3)
    assert v["truncation"][1] == "This pill gave me terrible"  # first half of 11 words
    assert v["negation"][0] == '"I have not been taking this medicine for 2 years and my doctor is happy with the results."'
    assert v["negation"][1] == "I do not think this pill gave me terrible headaches, I stopped after a week."
    assert v["negation"][2].endswith("so far, would not recommend to anyone.")
    assert v["whitespace"][1].split() == TEXTS[1].split()
    assert v["casing"][2].lower() == TEXTS[2].lower()
    for orig, typo in zip(TEXTS, v["typos"]):
        words, typo_words = orig.split(), typo.split()
        assert len(words) == len(typo_words) and 1 <= sum(w != t for w, t in zip(words, typo_words)) <= 3
    swapped = v["domain_swap"][3].split()
    assert swapped[1] in ("Physician", "Doc") and swapped[4] in ("MEDICINE", "DRUG") and "drug" not in swapped
    assert v["domain_swap"][2] == TEXTS[2]


def test_stress_result_flip_rate_and_accuracy_drop():
    truth = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    assert stress_result(truth, truth, truth) == {"n": 8, "clean_accuracy": 1.0, "stressed_accuracy": 1.0,
                                                  "accuracy_drop": 0.0, "flip_rate": 0.0}
    stressed = truth.copy()
    stressed[:2] = [1, 0]
    out = stress_result(truth, stressed, truth)
    assert out["flip_rate"] == 0.25 and out["accuracy_drop"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# errors users can cause

GOOD = np.zeros((4, C))


@pytest.mark.parametrize("call, message", [
    (lambda: fidelity(GOOD, np.zeros((4, 2))), "has 2 classes, expected 3"),
    (lambda: mean_kl(GOOD, np.zeros((5, C))), "row counts differ"),
    (lambda: msp_score(np.zeros((0, C))), "empty"),
    (lambda: msp_score(GOOD, num_classes=2), "has 3 classes, expected 2"),
    (lambda: energy_score(np.array([[0.0, np.nan, 1.0]])), "NaN or inf in 1 of 1 rows"),
    (lambda: msp_score(np.zeros(3)), "2-D"),
    (lambda: bootstrap_ci(np.array([]), np.array([]), "accuracy"), "empty"),
    (lambda: bootstrap_ci(np.array([0, 1]), np.array([0, 1, 1]), "accuracy"), "row counts differ"),
    (lambda: bootstrap_ci(np.array([0, 3]), np.array([0, 1]), "accuracy", num_classes=3), "outside [0, 3)"),
    (lambda: bootstrap_ci(np.array([0.0, np.nan]), np.array([0, 1]), "accuracy"), "NaN"),
    (lambda: bootstrap_ci(np.array([0, 1]), GOOD[:2], "accuracy"), "1-D class ids"),
    (lambda: ece(np.array([[2.0, -1.0]]), np.array([0])), "not probabilities"),
    (lambda: ece(softmax(GOOD, 1), np.array([0, 1])), "row counts differ"),
    (lambda: fit_temperature(np.full((2, C), np.nan), np.array([0, 1])), "NaN"),
    (lambda: fit_temperature(GOOD, np.array([0, 1, 2, 3])), "outside [0, 3)"),
    (lambda: ood_detection(np.array([]), np.array([1.0])), "non-empty"),
    (lambda: threshold_at_tpr(np.array([1.0, np.inf])), "NaN or inf"),
    (lambda: stress_variants([]), "no texts"),
    (lambda: stress_variants(["ok", float("nan")]), "not strings (first at row 1"),
    (lambda: stress_result(np.array([0, 1]), np.array([0]), np.array([0, 1])), "row counts differ"),
])
def test_bad_inputs_raise_distill_error_with_a_fix(call, message):
    with pytest.raises(DistillError, match=re.escape(message)) as err:
        call()
    assert err.value.fix


@pytest.mark.parametrize("call", [
    lambda: bootstrap_ci(np.array([0, 1]), np.array([0, 1]), "auc"),
    lambda: bootstrap_ci(np.array([0, 1]), np.array([0, 1]), "accuracy", alpha=1.5),
    lambda: ece(softmax(GOOD, 1), np.zeros(4, int), n_bins=0),
    lambda: fit_temperature(GOOD, np.zeros(4, int), bounds=(0.0, 2.0)),
    lambda: threshold_at_tpr(np.array([1.0, 2.0]), tpr=0.0),
    lambda: energy_score(GOOD, T=0.0),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
