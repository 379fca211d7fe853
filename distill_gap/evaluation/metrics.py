"""Classification metrics of the gap report: accuracy, macro-F1, fidelity and KL against the teacher, calibration.

Pure functions: numpy arrays in, floats / JSON-able dicts and lists out; no Prefect, no MLflow, no torch.
Shapes: logits and probabilities are (N, C); truth and predictions are (N,) integer class ids in [0, C).
Bootstrap intervals are in intervals.py, OOD detection in ood.py, stress suites in stress.py.

Inputs a user's data or model can get wrong raise `DistillError` (inputs.py); a bad argument value from the
calling code (temperature <= 0, n_bins < 1) raises `ValueError`.
"""

from __future__ import annotations

import math

import numpy as np

from distill_gap.evaluation.inputs import check_labels, check_logits, check_probs, same_length

ECE_BINS = 15  # the usual choice (Guo et al. 2017; torchmetrics' default n_bins is 15)
# log T search range for temperature scaling: T in [0.05, 20] covers any model a user would deploy
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    from scipy.special import log_softmax

    return log_softmax(logits / temperature, axis=1)


# ---------------------------------------------------------------------------------------------
# 1. Classification and agreement with the teacher


def score(pred: np.ndarray, truth: np.ndarray, num_classes: int, teacher_pred: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1 (scikit-learn) and fidelity (agreement with the teacher's predictions)."""
    from sklearn.metrics import accuracy_score, f1_score

    out = {"n": int(len(truth))}
    if len(truth) == 0:
        return out
    out["accuracy"] = float(accuracy_score(truth, pred))
    out["macro_f1"] = float(f1_score(truth, pred, labels=list(range(num_classes)), average="macro", zero_division=0))
    if teacher_pred is not None:
        out["fidelity"] = float(np.mean(pred == teacher_pred))
    return out


def mean_kl(teacher_logits, model_logits, *, temperature: float = 1.0) -> float:
    """Mean over rows of KL(teacher || model) in nats, on softmax(logits / T).

    Computed in log space (sum p_t (log p_t - log p_m)): equal to scipy.special.rel_entr on the
    probabilities, but finite when a model probability underflows to 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = check_logits(teacher_logits, "teacher_logits")
    m = check_logits(model_logits, "model_logits", t.shape[1])
    same_length(teacher_logits=t, model_logits=m)
    logp, logq = _log_softmax(t, temperature), _log_softmax(m, temperature)
    kl = np.sum(np.exp(logp) * (logp - logq), axis=1)  # (N,)
    return float(np.mean(np.maximum(kl, 0.0)))  # clamp -1e-17 rounding to 0


# ---------------------------------------------------------------------------------------------
# 2. Calibration


def _binned(probs, truth, n_bins: int):
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    p = check_probs(probs)
    y = check_labels(truth, "truth", p.shape[1])
    same_length(probs=p, truth=y)
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
    z = check_logits(val_logits, "val_logits")
    y = check_labels(val_truth, "val_truth", z.shape[1])
    same_length(val_logits=z, val_truth=y)
    true_logit = z[np.arange(len(y)), y]

    def objective(log_t: float) -> float:
        t = math.exp(log_t)
        return float(np.mean(logsumexp(z / t, axis=1) - true_logit / t))

    res = minimize_scalar(objective, bounds=(math.log(lo), math.log(hi)), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))
