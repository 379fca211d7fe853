"""Fitting and measuring the scope detectors on features with a known shift: the feature detectors separate it,
MSP need not, the threshold keeps 95% of validation, intervals bracket the AUROC, and a detector that cannot be
fitted is listed with why."""

from __future__ import annotations

import numpy as np
import pytest

from distill_gap.errors import DistillError
from distill_gap.evaluation.scope import evaluate_detectors, fit_guard


def _data(seed=0):
    rng = np.random.default_rng(seed)
    means, w = rng.normal(size=(3, 16)) * 3, rng.normal(size=(16, 3))

    def draw(n, shift=0.0):
        y = rng.integers(0, 3, n)
        return means[y] + rng.normal(size=(n, 16)) + shift, y

    (tr, tr_y), (va, _), (te, _), (far, _) = draw(300), draw(120), draw(120), draw(80, shift=8.0)
    logits = {"m": {"validation": va @ w, "test": te @ w, "ood:far": far @ w}}
    feats = {"m": {"validation": va, "test": te, "ood:far": far}}
    return logits, feats, {"m": (tr, tr_y)}


def test_feature_detectors_separate_a_feature_space_shift_with_intervals():
    logits, feats, train = _data()
    results, guards, missing = evaluate_detectors(logits, feats, train, num_classes=3, temperatures={"m": 1.5},
                                                  bootstrap_samples=200)
    assert not missing and set(guards["m"]) == {"msp", "energy", "mahalanobis", "knn"}
    for det in ("mahalanobis", "knn"):
        r = results["ood:far"]["m"][det]
        assert r["auroc"] > 0.99 and r["fpr_at_tpr"] < 0.05 and r["fpr_at_threshold"] < 0.05
        assert r["ci"]["low"] <= r["auroc"] <= r["ci"]["high"] and "note" not in r
        assert sum(r["hist"]["in"]) == 120 and sum(r["hist"]["out"]) == 80
    guard = guards["m"]["knn"]
    kept = guard.in_scope(guard.score(logits["m"]["validation"], feats["m"]["validation"])).mean()
    assert kept >= 0.95 and guard.temperature == 1.5


def test_near_chance_is_said_in_words():
    logits, feats, train = _data()
    feats["m"]["ood:same"], logits["m"]["ood:same"] = feats["m"]["test"][::-1], logits["m"]["test"][::-1]
    results, _, _ = evaluate_detectors(logits, feats, train, num_classes=3, temperatures={},
                                       detectors=("knn",), bootstrap_samples=100)
    assert "near chance" in results["ood:same"]["m"]["knn"]["note"]


def test_a_detector_that_cannot_be_fitted_is_listed_not_guessed():
    logits, feats, train = _data()
    tr, y = train["m"]
    results, guards, missing = evaluate_detectors(logits, feats, {"m": (tr[:3], np.array([0, 0, 1]))},
                                                  num_classes=3, temperatures={})
    assert "mahalanobis" not in guards["m"] and "knn" in guards["m"]
    assert missing == [{"model": "m", "suite": "scope/mahalanobis",
                        "reason": "cannot fit the mahalanobis scope guard: class ids [1, 2] have fewer than 2 "
                                  "training rows ([2, 1, 0] per class)"}]
    with pytest.raises(DistillError, match="needs the model's pooled features"):
        fit_guard("knn", train_features=None, train_labels=None, num_classes=3, val_logits=logits["m"]["validation"],
                  val_features=None, tpr=0.95, temperature=1.0)
