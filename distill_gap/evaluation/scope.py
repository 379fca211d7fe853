"""The scope guard, fitted and measured: each OOD detector (MSP, energy, Mahalanobis, kNN) scored per model on its
own logits and features, AUROC and FPR at 95% TPR with intervals per OOD set, and the guard that ships.

Fitting uses a sample of the training split (the rows the model learnt from; never an OOD set), the threshold
comes from validation, and the AUROCs compare test (in-distribution) with each OOD set. Scoring itself is
distill_gap/edge/guard.py (numpy only), so the guard measured here is the guard that runs on the device.
"""

from __future__ import annotations

import numpy as np

from distill_gap.edge.guard import (DETECTORS, FEATURE_DETECTORS, TEXT_DETECTORS, ScopeGuard, normalise,
                                    stats_from_bytes, word_buckets)
from distill_gap.errors import DistillError
from distill_gap.evaluation.ood import auroc_drop_interval, auroc_interval, ood_detection, threshold_at_tpr

MIN_ROWS_PER_CLASS = 2  # a class mean needs rows; fewer is a clear error, never a silent guard
NEAR_CHANCE = 0.6  # an AUROC below this (or an interval holding 0.5) is reported as near chance, in words
_FIX_FIT = ("give the training split more rows of every class, or set scope.detector to msp or energy "
            "(confidence scores, no features needed)")
LEXICON_SMOOTHING = 1.0  # add-one: an unseen word counts as one more word type seen once less than once


def fit_lexicon(texts) -> dict[str, np.ndarray]:
    """The lexical detector's statistics from training texts: the sorted word buckets seen, their smoothed
    log-probabilities, and the log-probability of a word never seen (add-one over the seen types + one unseen)."""
    counts: dict[int, int] = {}
    for text in texts:
        for b in word_buckets(text).tolist():
            counts[b] = counts.get(b, 0) + 1
    if not counts:
        raise DistillError("cannot fit the lexical scope guard: the training sample has no words",
                           "check data.text_column names the text, or set scope.detector to mahalanobis")
    buckets = np.array(sorted(counts), dtype=np.int64)
    c = np.array([counts[b] for b in buckets.tolist()], dtype=np.float64)
    total = c.sum() + LEXICON_SMOOTHING * (len(c) + 1)
    return {"lexicon_buckets": buckets, "lexicon_logp": np.log((c + LEXICON_SMOOTHING) / total),
            "lexicon_unseen": np.array([np.log(LEXICON_SMOOTHING / total)])}


def fit_stats(detector: str, features: np.ndarray, labels: np.ndarray, num_classes: int, *, bank_size: int = 2000,
              seed: int = 0, texts=None) -> dict[str, np.ndarray]:
    """Reference statistics of a detector from training features (N, D), label ids (N,) and texts.

    mahalanobis: class means (C, D) and the precision of the shared, class-centred covariance (Ledoit-Wolf
    shrinkage: well defined also when N < D). knn: up to `bank_size` unit-normalised training features (seeded
    sample). lexical: fit_lexicon(texts); mahalanobis+lexical: both. Raises DistillError when the inputs cannot
    support the detector.
    """
    from sklearn.covariance import LedoitWolf

    if detector == "lexical":
        return fit_lexicon(texts)
    if detector == "mahalanobis+lexical":
        return {**fit_stats("mahalanobis", features, labels, num_classes), **fit_lexicon(texts)}
    if detector not in FEATURE_DETECTORS:
        return {}
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(y) or len(f) == 0:
        raise DistillError(f"cannot fit the {detector} scope guard: features of shape {f.shape} for {len(y)} labels",
                           _FIX_FIT)
    if not np.isfinite(f).all():
        raise DistillError(f"cannot fit the {detector} scope guard: the training features hold non-finite values",
                           "the model is damaged or diverged; retrain it")
    if detector == "knn":
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(f), size=min(bank_size, len(f)), replace=False))
        return {"bank": normalise(f[keep])}
    counts = np.bincount(y.astype(int), minlength=num_classes)
    thin = [c for c in range(num_classes) if counts[c] < MIN_ROWS_PER_CLASS]
    if thin:
        raise DistillError(f"cannot fit the mahalanobis scope guard: class ids {thin} have fewer than "
                           f"{MIN_ROWS_PER_CLASS} training rows ({counts.tolist()} per class)", _FIX_FIT)
    means = np.stack([f[y == c].mean(axis=0) for c in range(num_classes)])
    centred = f - means[y.astype(int)]
    cov = LedoitWolf(assume_centered=True).fit(centred)
    if not np.isfinite(cov.precision_).all():
        raise DistillError("cannot fit the mahalanobis scope guard: the shared covariance is singular", _FIX_FIT)
    return {"means": means, "precision": cov.precision_}


def fit_guard(detector: str, *, train_features, train_labels, num_classes: int, val_logits, val_features,
              tpr: float, temperature: float, k: int = 10, bank_size: int = 2000, seed: int = 0, train_texts=None,
              val_texts=None) -> ScopeGuard:
    """The guard for one artifact: statistics from training features (and texts), threshold at `tpr` of
    validation scores; a combined guard standardises each component on validation first.

    The statistics are stored in fp16, so the threshold is computed with the statistics read back at that
    precision: the guard scores on the device exactly as it was fitted.
    """
    if detector not in DETECTORS:
        raise DistillError(f"unknown scope detector {detector!r}", f"use one of {list(DETECTORS)}")
    if detector in FEATURE_DETECTORS and (train_features is None or val_features is None):
        raise DistillError(f"the {detector} scope guard needs the model's pooled features and this artifact "
                           "returns only logits", "set scope.detector to msp or energy, or export the model again")
    if detector in TEXT_DETECTORS and (train_texts is None or val_texts is None):
        raise DistillError(f"the {detector} scope guard reads the rows' text, and no texts were given",
                           "pass the training and validation texts")
    stats = fit_stats(detector, train_features, train_labels, num_classes, bank_size=bank_size, seed=seed,
                      texts=train_texts) if detector in (*FEATURE_DETECTORS, *TEXT_DETECTORS) else {}
    guard = ScopeGuard(detector=detector, threshold=0.0, tpr=tpr, temperature=temperature, stats=stats, k=k)
    guard.stats = as_stored(guard)
    if detector == "mahalanobis+lexical":
        parts = {p: guard.part(p, features=val_features, texts=val_texts) for p in ("mahalanobis", "lexical")}
        guard.standardise = {p: [float(v.mean()), float(max(v.std(), 1e-6))] for p, v in parts.items()}
    guard.threshold = threshold_at_tpr(guard.score(val_logits, val_features, val_texts), tpr)
    return guard


def as_stored(guard: ScopeGuard) -> dict[str, np.ndarray]:
    """The guard's statistics as they read back from scope_stats.npz (fp16 after scaling)."""
    return stats_from_bytes(*guard.stats_bytes()) if guard.stats else {}


def _hist(s_in: np.ndarray, s_out: np.ndarray, bins: int = 20) -> dict:
    lo, hi = float(min(s_in.min(), s_out.min())), float(max(s_in.max(), s_out.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return {"edges": edges.tolist(), "in": np.histogram(s_in, edges)[0].tolist(),
            "out": np.histogram(s_out, edges)[0].tolist()}


def near_chance_note(result: dict) -> str | None:
    """Words for a detector that does not separate the OOD set from test, or None."""
    ci = result.get("ci") or {}
    holds_half = ci.get("low") is not None and ci["low"] <= 0.5 <= ci["high"]
    if result["auroc"] < NEAR_CHANCE or holds_half:
        words = "below chance (these rows score as MORE in scope than test rows)" if result["auroc"] < 0.4 \
            else "near chance"
        return (f"{words}: AUROC {result['auroc']:.2f}"
                + (f" (95% interval {ci['low']:.2f}-{ci['high']:.2f})" if ci.get("low") is not None else "")
                + ": this detector does not tell these rows from test rows")
    return None


def evaluate_detectors(logits: dict, features: dict, train: dict, *, num_classes: int, temperatures: dict,
                       tpr: float = 0.95, detectors=DETECTORS, k: int = 10, bank_size: int = 2000,
                       bootstrap_samples: int = 0, seed: int = 0, texts: dict | None = None) -> tuple[dict, dict,
                                                                                                   list[dict]]:
    """Every detector, per model, per OOD set.

    logits[model][split] (N, C); features[model][split] (N, D) or missing; train[model] = (features, label ids)
    of the training sample; texts[split] the rows' texts, "train" the training sample's (the same for every
    model; without them the lexical detectors are not evaluated). Returns (results, guards, not_evaluated):
    results[ood_suite][model][detector] = {"auroc", "fpr_at_tpr", "tpr", "n_in", "n_out", "ci", "hist", "note"?};
    guards[model][detector] = ScopeGuard fitted on that model's own features; not_evaluated lists detectors that
    could not be fitted, with why.
    """
    results: dict = {}
    guards: dict = {}
    missing: list[dict] = []
    texts = texts or {}
    for m, by_split in logits.items():
        if "validation" not in by_split or "test" not in by_split:
            continue
        feats = features.get(m) or {}
        for det in detectors:
            train_f, train_y = train.get(m, (None, None))
            try:
                guard = fit_guard(det, train_features=train_f, train_labels=train_y, num_classes=num_classes,
                                  val_logits=by_split["validation"], val_features=feats.get("validation"), tpr=tpr,
                                  temperature=temperatures.get(m, 1.0), k=k, bank_size=bank_size, seed=seed,
                                  train_texts=texts.get("train"), val_texts=texts.get("validation"))
            except DistillError as err:
                missing.append({"model": m, "suite": f"scope/{det}", "reason": err.problem})
                continue
            guards.setdefault(m, {})[det] = guard
            s_in = guard.score(by_split["test"], feats.get("test"), texts.get("test"))
            for suite in [s for s in by_split if s.startswith("ood:")]:
                if not len(by_split[suite]):
                    continue
                s_out = guard.score(by_split[suite], feats.get(suite), texts.get(suite))
                r = ood_detection(s_in, s_out, tpr=tpr)
                r["fpr_at_threshold"] = float(np.mean(guard.in_scope(s_out)))  # what ships: the validation threshold
                r["tpr_at_threshold"] = float(np.mean(guard.in_scope(s_in)))
                if bootstrap_samples:
                    r["ci"] = auroc_interval(s_in, s_out, n_boot=bootstrap_samples, seed=seed)
                r["hist"] = _hist(s_in, s_out)
                note = near_chance_note(r)
                if note:
                    r["note"] = note
                results.setdefault(suite, {}).setdefault(m, {})[det] = r
    return results, guards, missing


def split_texts(splits, names, sample=None) -> dict[str, list[str]]:
    """texts[split] for the lexical detectors: each named split's texts (those the splits hold), and the training
    sample's under "train"."""
    out = {s: splits[s]["text"].tolist() for s in names if s in splits.frames}
    if sample is not None:
        out["train"] = sample["text"].tolist()
    return out


def add_scope(report, logits: dict, features: dict, splits, scope_cfg, *, bootstrap_samples: int = 0,
              seed: int = 0) -> dict[str, ScopeGuard]:
    """Every detector in the gap report (report.ood[suite][model][detector], the shipped detector's score
    histogram under "hist") and each model's guard of `scope_cfg.detector` (report.scope[model]); returns
    model -> that guard, fitted on the model's own features. The evaluate stage ships the edge model's.

    `features[model]["train"]` holds the features of train_sample(splits, scope_cfg.train_rows, seed).
    """
    from distill_gap.evaluation.gap_report import train_sample

    label_id = {label: i for i, label in enumerate(splits.labels)}
    sample = train_sample(splits, scope_cfg.train_rows, seed)
    train_y = sample["label"].map(label_id).to_numpy()
    train = {m: (f.get("train"), train_y) for m, f in features.items() if f.get("train") is not None}
    temperatures = {m: c["temperature"] for m, c in report.calibration.items()}
    texts = split_texts(splits, {s for by_split in logits.values() for s in by_split}, sample)
    results, guards, missing = evaluate_detectors(
        logits, features, train, num_classes=len(splits.labels), temperatures=temperatures, tpr=scope_cfg.tpr,
        k=scope_cfg.k, bank_size=scope_cfg.bank_size, bootstrap_samples=bootstrap_samples, seed=seed, texts=texts)
    report.not_evaluated += missing
    shipped = scope_cfg.detector
    for suite, by_model in results.items():
        for m, by_det in by_model.items():
            entry = report.ood.setdefault(suite, {}).setdefault(m, {})
            for det, r in by_det.items():
                entry.setdefault(det, {}).update({k: v for k, v in r.items() if k != "hist"})
            if shipped in by_det:
                entry["hist"] = {**by_det[shipped]["hist"], "score": shipped}
    chosen = {m: by_det[shipped] for m, by_det in guards.items() if shipped in by_det}
    # the OOD gate's evidence: each model's drop against the teacher (MSP's: add_calibration_and_ood has it already)
    if bootstrap_samples and "teacher" in chosen and shipped != "msp":
        _drop_intervals(report, logits, features, chosen, shipped, bootstrap_samples=bootstrap_samples, seed=seed,
                        texts=texts)
    n_extra = 0 if splits.scope_rows is None else int(sample["id"].isin(splits.scope_rows["id"]).sum())
    extra = f", {n_extra} of them production rows" if n_extra else ""
    for m, g in chosen.items():
        report.scope[m] = {"detector": g.detector, "threshold": g.threshold, "tpr": g.tpr,
                           "temperature": g.temperature, **({"k": g.k} if g.detector == "knn" else {}),
                           "fitted_on": f"train sample ({len(sample)} rows{extra}) + validation "
                                        f"({len(splits['validation'])} rows)",
                           "ood_in_scope": {suite: results[suite][m][shipped]["fpr_at_threshold"]
                                            for suite in results if shipped in results[suite].get(m, {})}}
    return chosen


def _drop_intervals(report, logits: dict, features: dict, guards: dict[str, ScopeGuard], detector: str, *,
                    bootstrap_samples: int, seed: int, texts: dict) -> None:
    """report.ood[suite][model][detector]["drop_vs_teacher"]: the paired bootstrap interval of the AUROC drop of
    each model's own guard against the teacher's, on the same rows (the OOD gate reads it)."""
    def scores(m: str, split: str):
        return guards[m].score(logits[m][split], (features.get(m) or {}).get(split), texts.get(split))

    test = {m: scores(m, "test") for m in guards}  # in-distribution scores, shared by every OOD set
    for suite, by_model in report.ood.items():
        if detector not in by_model.get("teacher", {}) or suite not in logits["teacher"]:
            continue
        ref_out = scores("teacher", suite)
        for m in guards:
            if m != "teacher" and detector in by_model.get(m, {}) and suite in logits[m]:
                by_model[m][detector]["drop_vs_teacher"] = auroc_drop_interval(
                    test["teacher"], ref_out, test[m], scores(m, suite), n_boot=bootstrap_samples, seed=seed)
