"""Fitting and measuring the scope detectors on features with a known shift: the feature detectors separate it,
MSP need not, the threshold keeps 95% of validation, intervals bracket the AUROC, and a detector that cannot be
fitted is listed with why. The lexical detectors read the rows' words: a shift in vocabulary that the features do
not show is caught by the combined guard."""

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


def _texts(seed=0, ood_words="code", sizes=None):
    """Texts drawn from a 'review' vocabulary (train, validation, test) and another one (ood:far), 5-15 words each."""
    rng = np.random.default_rng(seed)
    pools = {"review": [f"dose{i}" for i in range(150)], "code": [f"def{i}" for i in range(150)]}

    def draw(n, pool):
        return [" ".join(rng.choice(pools[pool], size=rng.integers(5, 16))) for _ in range(n)]

    sizes = sizes or {"train": 300, "validation": 120, "test": 120, "ood:far": 80}
    return {s: draw(n, ood_words if s.startswith("ood:") else "review") for s, n in sizes.items()}


def test_feature_detectors_separate_a_feature_space_shift_with_intervals():
    logits, feats, train = _data()
    results, guards, missing = evaluate_detectors(logits, feats, train, num_classes=3, temperatures={"m": 1.5},
                                                  bootstrap_samples=200, texts=_texts())
    assert not missing and set(guards["m"]) == {"msp", "energy", "mahalanobis", "knn", "lexical",
                                                "mahalanobis+lexical"}
    for det in ("mahalanobis", "knn", "mahalanobis+lexical"):
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
                                                  num_classes=3, temperatures={},
                                                  detectors=("msp", "knn", "mahalanobis", "lexical"))
    assert "mahalanobis" not in guards["m"] and "knn" in guards["m"]
    assert missing == [{"model": "m", "suite": "scope/mahalanobis",
                        "reason": "cannot fit the mahalanobis scope guard: class ids [1, 2] have fewer than 2 "
                                  "training rows ([2, 1, 0] per class)"},
                       {"model": "m", "suite": "scope/lexical",
                        "reason": "the lexical scope guard reads the rows' text, and no texts were given"}]
    with pytest.raises(DistillError, match="needs the model's pooled features"):
        fit_guard("knn", train_features=None, train_labels=None, num_classes=3, val_logits=logits["m"]["validation"],
                  val_features=None, tpr=0.95, temperature=1.0)


def test_a_vocabulary_shift_the_features_miss_is_caught_by_the_combined_guard():
    """OOD rows whose features look like test rows but whose words are another vocabulary (code in a review
    model): Mahalanobis alone is near chance, the lexical score and the combined guard separate them."""
    logits, feats, train = _data()
    feats["m"]["ood:far"], logits["m"]["ood:far"] = feats["m"]["test"][:80], logits["m"]["test"][:80]
    results, guards, _ = evaluate_detectors(logits, feats, train, num_classes=3, temperatures={},
                                            detectors=("mahalanobis", "lexical", "mahalanobis+lexical"),
                                            texts=_texts())
    far = results["ood:far"]["m"]
    assert far["mahalanobis"]["auroc"] < 0.7 and "note" in far["mahalanobis"]
    assert far["lexical"]["auroc"] > 0.99 and far["mahalanobis+lexical"]["auroc"] > 0.99
    combined = guards["m"]["mahalanobis+lexical"]
    assert set(combined.standardise) == {"mahalanobis", "lexical"} and combined.standardise["lexical"][1] > 0
    val = combined.score(logits["m"]["validation"], feats["m"]["validation"], _texts()["validation"])
    assert combined.in_scope(val).mean() >= 0.95 and abs(val.mean()) < 1e-6  # each part standardised on validation
    assert far["mahalanobis+lexical"]["fpr_at_threshold"] < 0.05


def test_the_lexical_guard_scores_unseen_words_and_empty_texts_as_out_of_scope():
    from distill_gap.evaluation.scope import fit_lexicon

    stats = fit_lexicon(["the dose helped", "the dose made me sleepy", "helped a lot"])
    assert list(stats["lexicon_buckets"]) == sorted(stats["lexicon_buckets"])
    guard = fit_guard("lexical", train_features=None, train_labels=None, num_classes=3, val_logits=np.zeros((2, 3)),
                      val_features=None, tpr=0.95, temperature=1.0, train_texts=["the dose helped", "it helped"],
                      val_texts=["the dose", "helped"])
    s = guard.score(np.zeros((4, 3)), None, ["The DOSE helped!", "import numpy as np", "", "\u836f\u7269"])
    assert s[0] > s[1] and s[1] == s[2] == s[3] == float(guard.stats["lexicon_unseen"][0])
    assert guard.in_scope(s).tolist() == [True, False, False, False]
    with pytest.raises(DistillError, match="reads the rows' text"):
        guard.score(np.zeros((1, 3)), None)
    with pytest.raises(DistillError, match="has no words"):
        fit_lexicon(["", "  !? "])
