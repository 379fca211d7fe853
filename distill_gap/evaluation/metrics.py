"""Evaluation statistics for the gap report: bootstrap intervals, teacher agreement, calibration, OOD, stress.

Pure functions: numpy arrays in, floats / JSON-able dicts and lists out; no Prefect, no MLflow, no torch.
Shapes: logits and probabilities are (N, C); truth and predictions are (N,) integer class ids in [0, C).

Score convention for OOD: every score here is "higher = more in-distribution" (MSP, negative energy), so
a row stays in scope when `score >= threshold` and AUROC takes in-distribution as the positive class.

Inputs a user's data or model can get wrong (empty suite, NaN logits, wrong label set, mismatched lengths)
raise `DistillError`; a bad argument value from the calling code (unknown metric, alpha outside (0, 1))
raises `ValueError`.
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from typing import Sequence

import numpy as np

from distill_gap.errors import DistillError

BOOTSTRAP_METRICS = ("accuracy", "macro_f1", "per_class_recall")
# Below this many rows (or, for per-class recall, rows of that class) an interval is noise: one row moves
# accuracy by > 10 points. Same value as tasks.evaluate.MIN_SLICE_ROWS.
MIN_BOOTSTRAP_ROWS = 10
# Resampled rows held in memory at once (n_boot x n int64 indices): bounds memory on a 50k-row test split
BOOTSTRAP_BATCH_CELLS = 2_000_000
ECE_BINS = 15  # the usual choice (Guo et al. 2017; torchmetrics' default n_bins is 15)
# log T search range for temperature scaling: T in [0.05, 20] covers any model a user would deploy
TEMPERATURE_BOUNDS = (0.05, 20.0)


# ---------------------------------------------------------------------------------------------
# Input checks (one place, so that every public function fails the same way)


def _logits(x, name: str, num_classes: int | None = None) -> np.ndarray:
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


def _labels(x, name: str, num_classes: int | None = None) -> np.ndarray:
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


def _scores(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0:
        raise DistillError(f"{name} must be a non-empty 1-D array of scores, got shape {a.shape}",
                           "score each row with msp_score or energy_score first")
    if not np.isfinite(a).all():
        raise DistillError(f"{name} has NaN or inf scores", "check the model's logits for NaN before scoring")
    return a


def _same_length(**arrays) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise DistillError(f"row counts differ: {lengths}", "pass arrays for the same rows of the same suite")
    return next(iter(lengths.values()))


def _probs(x, name: str = "probs") -> np.ndarray:
    a = _logits(x, name)
    if a.min() < 0 or a.max() > 1 or not np.allclose(a.sum(axis=1), 1.0, atol=1e-3):
        raise DistillError(f"{name} are not probabilities (each row in [0, 1], summing to 1)",
                           "these look like logits: apply scipy.special.softmax(logits, axis=1) first")
    return a


def _log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    from scipy.special import log_softmax

    return log_softmax(logits / temperature, axis=1)


# ---------------------------------------------------------------------------------------------
# 1. Bootstrap intervals


def _confusion_stack(cells: np.ndarray, num_classes: int) -> np.ndarray:
    """(B, n) cell ids truth * C + pred -> (B, C, C) confusion matrices (rows = truth), with one bincount."""
    b, k = cells.shape[0], num_classes * num_classes
    offset = (np.arange(b, dtype=np.int64 if b * k >= 2**31 else np.int32) * k)[:, None]
    return np.bincount((cells + offset).ravel(), minlength=b * k).reshape(b, num_classes, num_classes)


def _metrics_from_confusion(cm: np.ndarray, metrics: Sequence[str]) -> np.ndarray:
    """(B, C, C) -> (K, B): the metrics in order, per-class recall expanding to C rows (NaN: class absent)."""
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)  # (B, C)
    support = cm.sum(axis=2)  # true rows per class
    predicted = cm.sum(axis=1)
    rows = []
    for m in metrics:
        if m == "accuracy":
            rows.append(tp.sum(axis=1) / cm.sum(axis=(1, 2)))
        elif m == "macro_f1":
            # sklearn: F1 = 2tp / (support + predicted), zero_division=0, averaged over all classes
            denom = support + predicted
            f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
            rows.append(f1.mean(axis=1))
        else:  # per_class_recall: NaN where a resample holds no row of the class
            rows.extend(np.divide(tp, support, out=np.full_like(tp, np.nan), where=support > 0).T)
    return np.stack(rows)


def _check_bootstrap_args(alpha: float, n_boot: int) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _interval(value, low, high, *, n: int, min_n: int) -> dict:
    if n < min_n or low is None or not (math.isfinite(low) and math.isfinite(high)):
        return {"value": value, "low": None, "high": None, "note": "n too small"}
    return {"value": value, "low": float(low), "high": float(high)}


def bootstrap_metrics(truth, pred, *, num_classes: int | None = None, metrics: Sequence[str] = BOOTSTRAP_METRICS,
                      n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                      min_n: int = MIN_BOOTSTRAP_ROWS) -> dict:
    """Point estimates and percentile bootstrap intervals of several metrics from ONE set of resamples.

    Rows are resampled as (truth, pred) pairs (scipy.stats.bootstrap, method='percentile', vectorised);
    each resample's metrics come from its confusion matrix. The same seed and row count give the
    same resampled rows, so models scored on one suite share resamples.

    Returns metric -> {"value", "low", "high"} (plus "note": "n too small" and None bounds under `min_n`
    rows); "per_class_recall" is a list over classes of the same dicts with "support", where `min_n`
    applies to the rows of that class and "value" is None for a class absent from the suite.
    """
    from scipy.stats import DegenerateDataWarning, bootstrap

    unknown = [m for m in metrics if m not in BOOTSTRAP_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {BOOTSTRAP_METRICS}, got {list(metrics)}")
    _check_bootstrap_args(alpha, n_boot)
    t0, p0 = _labels(truth, "truth"), _labels(pred, "pred")
    n = _same_length(truth=t0, pred=p0)
    c = num_classes if num_classes is not None else int(max(t0.max(), p0.max())) + 1
    t, p = _labels(t0, "truth", c), _labels(p0, "pred", c)

    # 1. point estimates from the observed confusion matrix: the same formulas scikit-learn uses
    # (accuracy_score; f1_score(labels=range(C), average="macro", zero_division=0); recall_score per class),
    # checked against it in the tests, at a tenth of its input-validation cost
    cells = (t * c + p).astype(np.int16 if c * c <= 2**15 else np.int64)
    observed = _metrics_from_confusion(_confusion_stack(cells[None, :], c), metrics)[:, 0]  # (K,)
    support = np.bincount(t, minlength=c)

    # 2. bootstrap distribution (K, n_boot) of all requested metrics at once. Each row is one cell id
    # truth * C + pred, so resampling that single sample resamples (truth, pred) pairs together (what
    # paired=True does) with one small-int gather instead of two int64 ones: 3x faster at 500 rows.
    ci = None
    if n >= max(min_n, 2):
        def statistic(x, axis=-1):
            return _metrics_from_confusion(_confusion_stack(np.atleast_2d(x), c), metrics)

        with warnings.catch_warnings():  # NaN recall rows warn in scipy; their interval is recomputed below
            warnings.simplefilter("ignore", DegenerateDataWarning)
            res = bootstrap((cells,), statistic, n_resamples=n_boot, vectorized=True, confidence_level=1 - alpha,
                            method="percentile", batch=max(1, BOOTSTRAP_BATCH_CELLS // n),
                            rng=np.random.default_rng(seed))
        ci = np.stack([np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)], 1)
        # a class absent from some resamples: percentiles over the resamples that hold it (none: stays NaN)
        dist = res.bootstrap_distribution.reshape(-1, n_boot)
        redo = np.isnan(ci).any(axis=1) & ~np.isnan(dist).all(axis=1)
        if redo.any():
            ci[redo] = np.nanquantile(dist[redo], [alpha / 2, 1 - alpha / 2], axis=1).T

    # 3. JSON-able result, rows in the order the statistic stacked them
    out: dict[str, object] = {}
    k = 0
    for m in metrics:
        if m == "per_class_recall":
            out[m] = []
            for cls in range(c):
                low, high = ci[k] if ci is not None else (None, None)
                value = float(observed[k]) if support[cls] else None
                out[m].append({**_interval(value, low, high, n=int(support[cls]), min_n=min_n),
                               "support": int(support[cls])})
                k += 1
        else:
            low, high = ci[k] if ci is not None else (None, None)
            out[m] = _interval(float(observed[k]), low, high, n=n, min_n=min_n)
            k += 1
    return out


def bootstrap_ci(truth, pred, metric: str, *, num_classes: int | None = None, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, min_n: int = MIN_BOOTSTRAP_ROWS):
    """Point estimate and (1 - alpha) percentile bootstrap interval of one metric over paired (truth, pred) rows.

    metric: "accuracy", "macro_f1" (all `num_classes` classes, zero_division=0) or "per_class_recall".
    Returns {"value", "low", "high"}, or {"value", "low": None, "high": None, "note": "n too small"} under
    `min_n` rows; per-class recall gives a list of such dicts, one per class. Pass `num_classes`
    (len(data.labels)): inferred from the largest id seen, a suite missing the last class would change macro-F1.
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"metric must be one of {BOOTSTRAP_METRICS}, got {metric!r}")
    return bootstrap_metrics(truth, pred, num_classes=num_classes, metrics=(metric,), n_boot=n_boot, seed=seed,
                             alpha=alpha, min_n=min_n)[metric]


# ---------------------------------------------------------------------------------------------
# 2. Agreement with the teacher


def fidelity(teacher_logits, model_logits) -> float:
    """Fraction of rows where the model's argmax equals the teacher's."""
    t = _logits(teacher_logits, "teacher_logits")
    m = _logits(model_logits, "model_logits", t.shape[1])
    _same_length(teacher_logits=t, model_logits=m)
    return float(np.mean(t.argmax(1) == m.argmax(1)))


def mean_kl(teacher_logits, model_logits, *, temperature: float = 1.0) -> float:
    """Mean over rows of KL(teacher || model) in nats, on softmax(logits / T).

    Computed in log space (sum p_t (log p_t - log p_m)): equal to scipy.special.rel_entr on the
    probabilities, but finite when a model probability underflows to 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = _logits(teacher_logits, "teacher_logits")
    m = _logits(model_logits, "model_logits", t.shape[1])
    _same_length(teacher_logits=t, model_logits=m)
    logp, logq = _log_softmax(t, temperature), _log_softmax(m, temperature)
    kl = np.sum(np.exp(logp) * (logp - logq), axis=1)  # (N,)
    return float(np.mean(np.maximum(kl, 0.0)))  # clamp -1e-17 rounding to 0


def teacher_agreement(teacher_logits, model_logits, *, temperature: float = 1.0) -> dict:
    """Per-suite {"fidelity", "kl_teacher_model", "n"} for the gap report."""
    return {"fidelity": fidelity(teacher_logits, model_logits),
            "kl_teacher_model": mean_kl(teacher_logits, model_logits, temperature=temperature),
            "n": int(len(np.asarray(teacher_logits)))}


# ---------------------------------------------------------------------------------------------
# 3. Calibration


def _binned(probs, truth, n_bins: int):
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    p = _probs(probs)
    y = _labels(truth, "truth", p.shape[1])
    _same_length(probs=p, truth=y)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # equal-width bins [b_i, b_{i+1}); confidence 1.0 goes to the last bin (torchmetrics' bucketize rule)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return edges, count, conf_sum, acc_sum


def ece(probs, truth, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error: sum over equal-width confidence bins of |acc - conf| * share."""
    _, count, conf_sum, acc_sum = _binned(probs, truth, n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / count.sum())


def reliability_bins(probs, truth, n_bins: int = ECE_BINS) -> list[dict]:
    """Per bin {"low", "high", "count", "confidence", "accuracy"} for a reliability diagram (None when empty)."""
    edges, count, conf_sum, acc_sum = _binned(probs, truth, n_bins)
    return [{"low": float(edges[i]), "high": float(edges[i + 1]), "count": int(count[i]),
             "confidence": float(conf_sum[i] / count[i]) if count[i] else None,
             "accuracy": float(acc_sum[i] / count[i]) if count[i] else None}
            for i in range(n_bins)]


def nll(logits, truth, *, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _logits(logits, "logits")
    y = _labels(truth, "truth", z.shape[1])
    _same_length(logits=z, truth=y)
    return float(-np.mean(_log_softmax(z, temperature)[np.arange(len(y)), y]))


def fit_temperature(val_logits, val_truth, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Temperature T > 0 minimising validation NLL of softmax(logits / T) (Guo et al. 2017); T > 1 softens.

    Fit on validation rows only, then apply the same T to test and OOD logits. Searched on log T (bounded),
    so the optimiser never proposes T <= 0.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    z = _logits(val_logits, "val_logits")
    y = _labels(val_truth, "val_truth", z.shape[1])
    _same_length(val_logits=z, val_truth=y)
    true_logit = z[np.arange(len(y)), y]

    def objective(log_t: float) -> float:
        t = math.exp(log_t)
        return float(np.mean(logsumexp(z / t, axis=1) - true_logit / t))

    res = minimize_scalar(objective, bounds=(math.log(lo), math.log(hi)), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))


# ---------------------------------------------------------------------------------------------
# 4. OOD detection (higher score = more in-distribution)


def msp_score(logits, *, num_classes: int | None = None) -> np.ndarray:
    """Maximum softmax probability per row, (N,) in [1/C, 1]; higher = more in-distribution."""
    from scipy.special import softmax

    return softmax(_logits(logits, "logits", num_classes), axis=1).max(axis=1)


def energy_score(logits, T: float = 1.0, *, num_classes: int | None = None) -> np.ndarray:
    """Negative energy T * logsumexp(logits / T) per row, (N,) (Liu et al. 2020); higher = more in-distribution."""
    from scipy.special import logsumexp

    if not T > 0:
        raise ValueError(f"T must be > 0, got {T}")
    return T * logsumexp(_logits(logits, "logits", num_classes) / T, axis=1)


def ood_detection(in_scores, out_scores, *, tpr: float = 0.95) -> dict:
    """AUROC (in-distribution = positive class) and FPR of OOD rows at the first threshold reaching `tpr`.

    Returns {"auroc", "fpr_at_tpr", "tpr", "n_in", "n_out"}; fpr_at_tpr at tpr=0.95 is the usual FPR95.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)  # keep the exact point reaching `tpr`
    # tpr_curve is non-decreasing: the first point reaching `tpr` has the lowest FPR among those that do
    at = int(np.searchsorted(tpr_curve, tpr - 1e-12, side="left"))
    return {"auroc": float(roc_auc_score(y, s)), "fpr_at_tpr": float(fpr[at]), "tpr": float(tpr),
            "n_in": int(len(s_in)), "n_out": int(len(s_out))}


def _auroc_last_axis(s_in: np.ndarray, s_out: np.ndarray) -> np.ndarray:
    """AUROC (in = positive) along the last axis by the Mann-Whitney rank sum, ties averaged: what
    roc_auc_score returns, for any leading batch shape."""
    from scipy.stats import rankdata

    n_in, n_out = s_in.shape[-1], s_out.shape[-1]
    ranks = rankdata(np.concatenate([s_in, s_out], axis=-1), axis=-1)
    return (ranks[..., :n_in].sum(axis=-1) - n_in * (n_in + 1) / 2) / (n_in * n_out)


def auroc_drop_interval(ref_in, ref_out, model_in, model_out, *, n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05, min_n: int = MIN_BOOTSTRAP_ROWS) -> dict:
    """The OOD AUROC drop of a model against a reference (reference AUROC minus the model's) on the SAME rows,
    with a paired percentile bootstrap interval: in- and out-of-distribution rows are resampled independently
    (scipy.stats.bootstrap, two samples), each row keeping both models' scores, so the interval holds the noise
    of which rows the suite happens to contain and not the two models' shared difficulty.

    Returns {"value", "low", "high"} ("note": "n too small" and None bounds under `min_n` rows on either side).
    """
    from scipy.stats import bootstrap

    _check_bootstrap_args(alpha, n_boot)
    r_in, m_in = _scores(ref_in, "ref_in"), _scores(model_in, "model_in")
    r_out, m_out = _scores(ref_out, "ref_out"), _scores(model_out, "model_out")
    n_in, n_out = _same_length(ref_in=r_in, model_in=m_in), _same_length(ref_out=r_out, model_out=m_out)
    ins, outs = np.stack([r_in, m_in]), np.stack([r_out, m_out])  # (2, n): row j keeps both models' scores
    value = float(np.subtract(*_auroc_last_axis(ins, outs)))
    if min(n_in, n_out) < max(min_n, 2):
        return _interval(value, None, None, n=min(n_in, n_out), min_n=min_n)

    def statistic(a, b, axis=-1):  # a: (2, B, n_in), b: (2, B, n_out) -> (B,)
        auc = _auroc_last_axis(a, b)
        return auc[0] - auc[1]

    res = bootstrap((ins, outs), statistic, n_resamples=n_boot, vectorized=True, paired=False, axis=-1,
                    confidence_level=1 - alpha, method="percentile",
                    batch=max(1, BOOTSTRAP_BATCH_CELLS // (2 * (n_in + n_out))), rng=np.random.default_rng(seed))
    return _interval(value, res.confidence_interval.low, res.confidence_interval.high, n=min(n_in, n_out),
                     min_n=min_n)


def threshold_at_tpr(in_scores, tpr: float = 0.95) -> float:
    """The highest score threshold keeping at least `tpr` of in-distribution rows in scope (`score >= t`).

    Fit on validation scores; at deployment a row scoring below it is out of scope.
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s = np.sort(_scores(in_scores, "in_scores"))
    keep = math.ceil(tpr * len(s) - 1e-9)  # rows that must stay in scope
    return float(s[len(s) - keep])


# ---------------------------------------------------------------------------------------------
# 5. Stress suites

TYPO_RATE = 0.10  # share of words given one character swap or drop (at least one word per text)
PUNCT_RATE = 0.10  # share of words followed by inserted punctuation (at least one)
AUXILIARIES = frozenset(
    "am is are was were be been do does did have has had can could will would shall should may might must".split())
# Drug-review domain words and stand-ins with the same meaning (all lower case; case is restored per word)
DOMAIN_SYNONYMS = {
    "medicine": ("medication", "drug"), "medicines": ("medications", "drugs"),
    "medication": ("medicine", "drug"), "medications": ("medicines", "drugs"),
    "drug": ("medication", "medicine"), "drugs": ("medications", "medicines"),
    "med": ("medicine",), "meds": ("medicines", "medications"),
    "pill": ("tablet", "capsule"), "pills": ("tablets", "capsules"),
    "tablet": ("pill",), "tablets": ("pills",), "capsule": ("pill",), "capsules": ("pills",),
    "doctor": ("physician", "doc"), "doctors": ("physicians",), "doc": ("doctor",),
    "physician": ("doctor",), "dose": ("dosage",), "doses": ("dosages",), "dosage": ("dose",),
    "prescription": ("script",), "prescribed": ("given",), "pharmacist": ("chemist",),
    "symptoms": ("complaints",), "treatment": ("therapy",),
}
_DOMAIN_RE = re.compile(r"\b(" + "|".join(sorted(DOMAIN_SYNONYMS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
# Variants that may change the true label: score them by flip rate (sensitivity), not by accuracy on the old label.
LABEL_CHANGING_VARIANTS = frozenset({"negation"})
_PUNCT = ".,!?;:"


def _rng(seed: int, variant: str, text: str) -> np.random.Generator:
    # seeded per text, so a text's variant does not depend on which other texts share the batch
    return np.random.default_rng([seed, zlib.crc32(variant.encode()), zlib.crc32(text.encode())])


def _pick(rng: np.random.Generator, candidates: list[int], rate: float) -> list[int]:
    if not candidates:
        return []
    k = max(1, int(round(rate * len(candidates))))
    return sorted(rng.choice(candidates, size=min(k, len(candidates)), replace=False).tolist())


def _typos(text: str, rng) -> str:
    parts = re.split(r"(\s+)", text)
    words = [i for i, w in enumerate(parts) if sum(ch.isalpha() for ch in w) >= 2]
    for i in _pick(rng, words, TYPO_RATE):
        w = parts[i]
        letters = [j for j, ch in enumerate(w) if ch.isalpha()]
        swaps = [j for j in letters[:-1] if w[j + 1].isalpha() and w[j] != w[j + 1]]
        if swaps and rng.random() < 0.5:
            j = swaps[rng.integers(len(swaps))]
            parts[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        else:
            j = letters[rng.integers(len(letters))]
            parts[i] = w[:j] + w[j + 1:]
    return "".join(parts)


def _casing(text: str, rng) -> str:
    parts = re.split(r"(\s+)", text)
    out = [w.upper() if rng.random() < 0.5 else w.lower() for w in parts]
    if out == parts:  # guarantee a change where the text has letters
        for i, w in enumerate(parts):
            if any(ch.isalpha() for ch in w):
                out[i] = w.lower() if w != w.lower() else w.upper()
                break
    return "".join(out)


def _whitespace(text: str, rng) -> str:
    runs = [" ", "  ", "   ", "\t", " \n ", "\n"]
    parts = re.split(r"\s+", text.strip())
    out = parts[0]
    for w in parts[1:]:
        out += runs[rng.integers(len(runs))] + w
    return " " * int(rng.integers(1, 3)) + out + " " * int(rng.integers(1, 3))


def _punctuation(text: str, rng) -> str:
    parts = re.split(r"(\s+)", text)
    # drop half of the existing punctuation marks, then add marks after ~10% of the words
    parts = ["".join(ch for ch in w if ch not in _PUNCT or rng.random() < 0.5) for w in parts]
    words = [i for i, w in enumerate(parts) if w and not w.isspace()]
    marks = [".", ",", "!", "?", "...", "!!", ";"]
    for i in _pick(rng, words, PUNCT_RATE):
        parts[i] += marks[rng.integers(len(marks))]
    return "".join(parts)


def _truncation(text: str, rng) -> str:
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)])


def _negation(text: str, rng) -> str:
    words = text.split(" ")
    norm = [re.sub(r"[^a-z']", "", w.lower()) for w in words]
    for i, w in enumerate(norm):
        if w in AUXILIARIES and (i + 1 == len(norm) or norm[i + 1] not in ("not", "never")):
            return " ".join(words[: i + 1] + ["not"] + words[i + 1:])
    first = words[0] if words else ""
    keep_case = first in ("I",) or first.startswith("I'") or first.isupper()
    body = text if keep_case or not text else text[0].lower() + text[1:]
    return "I do not think " + body


def _domain_swap(text: str, rng) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        options = DOMAIN_SYNONYMS[word.lower()]
        new = options[rng.integers(len(options))]
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _DOMAIN_RE.sub(swap, text)


STRESS_VARIANTS = {"typos": _typos, "casing": _casing, "whitespace": _whitespace, "punctuation": _punctuation,
                   "truncation": _truncation, "negation": _negation, "domain_swap": _domain_swap}


def stress_variants(texts: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """variant name -> perturbed texts (same length and order), deterministic for a seed.

    typos, casing, whitespace, punctuation and domain_swap keep the label; truncation keeps the first half of
    the words; negation ("not" after the first auxiliary verb, else an "I do not think " prefix) may flip it
    (see LABEL_CHANGING_VARIANTS). A text without a domain word comes back unchanged from domain_swap.
    """
    texts = list(texts)
    if not texts:
        raise DistillError("no texts to perturb (0 rows)", "skip empty suites before building stress variants")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DistillError(f"{len(bad)} texts are not strings (first at row {bad[0]}: {texts[bad[0]]!r})",
                           "drop or fill missing texts (NaN) in the suite before building stress variants")
    return {name: [fn(t, _rng(seed, name, t)) for t in texts] for name, fn in STRESS_VARIANTS.items()}


def stress_result(clean_pred, stressed_pred, truth) -> dict:
    """{"n", "clean_accuracy", "stressed_accuracy", "accuracy_drop" (clean - stressed), "flip_rate"}."""
    c, s, y = _labels(clean_pred, "clean_pred"), _labels(stressed_pred, "stressed_pred"), _labels(truth, "truth")
    n = _same_length(clean_pred=c, stressed_pred=s, truth=y)
    clean_acc, stressed_acc = float(np.mean(c == y)), float(np.mean(s == y))
    return {"n": n, "clean_accuracy": clean_acc, "stressed_accuracy": stressed_acc,
            "accuracy_drop": clean_acc - stressed_acc, "flip_rate": float(np.mean(c != s))}
