"""OOD detection for the gap report: MSP and energy scores, AUROC and FPR at a TPR, the paired interval of an
AUROC drop against the teacher, and the scope threshold an edge model ships with.

Score convention: every score here is "higher = more in-distribution" (MSP, negative energy), so a row stays in
scope when `score >= threshold` and AUROC takes in-distribution as the positive class.
"""

from __future__ import annotations

import math

import numpy as np

from distill_gap.evaluation.gates import MIN_SLICE_ROWS
from distill_gap.evaluation.inputs import check_logits, check_scores, same_length
from distill_gap.evaluation.intervals import BOOTSTRAP_BATCH_CELLS, check_bootstrap_args, interval


def msp_score(logits, *, num_classes: int | None = None) -> np.ndarray:
    """Maximum softmax probability per row, (N,) in [1/C, 1]; higher = more in-distribution."""
    from scipy.special import softmax

    return softmax(check_logits(logits, "logits", num_classes), axis=1).max(axis=1)


def energy_score(logits, T: float = 1.0, *, num_classes: int | None = None) -> np.ndarray:
    """Negative energy T * logsumexp(logits / T) per row, (N,) (Liu et al. 2020); higher = more in-distribution."""
    from scipy.special import logsumexp

    if not T > 0:
        raise ValueError(f"T must be > 0, got {T}")
    return T * logsumexp(check_logits(logits, "logits", num_classes) / T, axis=1)


def ood_detection(in_scores, out_scores, *, tpr: float = 0.95) -> dict:
    """AUROC (in-distribution = positive class) and FPR of OOD rows at the first threshold reaching `tpr`.

    Returns {"auroc", "fpr_at_tpr", "tpr", "n_in", "n_out"}; fpr_at_tpr at tpr=0.95 is the usual FPR95.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s_in, s_out = check_scores(in_scores, "in_scores"), check_scores(out_scores, "out_scores")
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
                        alpha: float = 0.05, min_n: int = MIN_SLICE_ROWS) -> dict:
    """The OOD AUROC drop of a model against a reference (reference AUROC minus the model's) on the SAME rows,
    with a paired percentile bootstrap interval: in- and out-of-distribution rows are resampled independently
    (scipy.stats.bootstrap, two samples), each row keeping both models' scores, so the interval holds the noise
    of which rows the suite happens to contain and not the two models' shared difficulty.

    Returns {"value", "low", "high"} ("note": "n too small" and None bounds under `min_n` rows on either side).
    """
    from scipy.stats import bootstrap

    check_bootstrap_args(alpha, n_boot)
    r_in, m_in = check_scores(ref_in, "ref_in"), check_scores(model_in, "model_in")
    r_out, m_out = check_scores(ref_out, "ref_out"), check_scores(model_out, "model_out")
    n_in, n_out = same_length(ref_in=r_in, model_in=m_in), same_length(ref_out=r_out, model_out=m_out)
    ins, outs = np.stack([r_in, m_in]), np.stack([r_out, m_out])  # (2, n): row j keeps both models' scores
    value = float(np.subtract(*_auroc_last_axis(ins, outs)))
    if min(n_in, n_out) < max(min_n, 2):
        return interval(value, None, None, n=min(n_in, n_out), min_n=min_n)

    def statistic(a, b, axis=-1):  # a: (2, B, n_in), b: (2, B, n_out) -> (B,)
        auc = _auroc_last_axis(a, b)
        return auc[0] - auc[1]

    res = bootstrap((ins, outs), statistic, n_resamples=n_boot, vectorized=True, paired=False, axis=-1,
                    confidence_level=1 - alpha, method="percentile",
                    batch=max(1, BOOTSTRAP_BATCH_CELLS // (2 * (n_in + n_out))), rng=np.random.default_rng(seed))
    return interval(value, res.confidence_interval.low, res.confidence_interval.high, n=min(n_in, n_out),
                     min_n=min_n)


def auroc_interval(in_scores, out_scores, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                   min_n: int = MIN_SLICE_ROWS) -> dict:
    """AUROC (in = positive) with a percentile bootstrap interval: in- and out-of-distribution rows resampled
    independently (scipy.stats.bootstrap, two samples). Returns {"value", "low", "high"} ("note": "n too small"
    and None bounds under `min_n` rows on either side)."""
    from scipy.stats import bootstrap

    check_bootstrap_args(alpha, n_boot)
    s_in, s_out = check_scores(in_scores, "in_scores"), check_scores(out_scores, "out_scores")
    value = float(_auroc_last_axis(s_in, s_out))
    if min(len(s_in), len(s_out)) < max(min_n, 2):
        return interval(value, None, None, n=min(len(s_in), len(s_out)), min_n=min_n)
    res = bootstrap((s_in, s_out), lambda a, b, axis=-1: _auroc_last_axis(a, b), n_resamples=n_boot,
                    vectorized=True, paired=False, axis=-1, confidence_level=1 - alpha, method="percentile",
                    batch=max(1, BOOTSTRAP_BATCH_CELLS // (len(s_in) + len(s_out))), rng=np.random.default_rng(seed))
    return interval(value, res.confidence_interval.low, res.confidence_interval.high,
                    n=min(len(s_in), len(s_out)), min_n=min_n)


def threshold_at_tpr(in_scores, tpr: float = 0.95) -> float:
    """The highest score threshold keeping at least `tpr` of in-distribution rows in scope (`score >= t`).

    Fit on validation scores; at deployment a row scoring below it is out of scope.
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s = np.sort(check_scores(in_scores, "in_scores"))
    keep = math.ceil(tpr * len(s) - 1e-9)  # rows that must stay in scope
    return float(s[len(s) - keep])
