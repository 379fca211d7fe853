"""Non-inferiority on the same rows: is a compressed model shown to be no worse than the teacher? (issue 19)

The burden of proof sits with the compressed model. For the aggregate accuracy, each class's recall and each
critical slice, the teacher and the model are compared row by row on the same test rows: `teacher_only` rows the
teacher gets right and the model wrong, `model_only` the reverse. The drop is (teacher_only - model_only) / n, and
its one-sided 95% bounds come from the posterior of the three cell probabilities (teacher only, model only, both
or neither) under a Jeffreys Dirichlet(1/2, 1/2, 1/2) prior: with many rows it matches the paired bootstrap of the
difference; with few rows or no disagreement at all it stays wide (the paired bootstrap would collapse to [0, 0] and
pass a check on five rows). Three outcomes against a margin:

- pass: the upper bound of the drop is below the margin (shown not worse by more than the margin);
- fail: the lower bound is above the margin (shown worse by more than the margin);
- insufficient: neither; `rows_needed` is the number of labelled rows that would decide it at the observed drop
  and disagreement rate (a normal-approximation power calculation; at least one disagreeing row is assumed when
  none was seen). Missing evidence (no rows) is insufficient, never a pass.

Pure numpy; results are JSON-able dicts.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05  # one-sided: the 95% upper (lower) bound of the drop
Z = 1.6448536269514722  # standard normal quantile at 1 - ALPHA
DRAWS = 20_000  # posterior draws per check: bounds stable to ~0.001
OUTCOMES = ("pass", "fail", "insufficient")


def paired_drop(teacher_ok, model_ok, *, seed: int = 0) -> dict:
    """{"n", "drop", "low", "high", "teacher_only", "model_only"} for two boolean arrays over the same rows."""
    t, m = np.asarray(teacher_ok, dtype=bool), np.asarray(model_ok, dtype=bool)
    if t.shape != m.shape or t.ndim != 1:
        raise ValueError(f"teacher_ok and model_ok must be 1-D arrays of one length, got {t.shape} and {m.shape}")
    n = int(t.size)
    b, c = int(np.sum(t & ~m)), int(np.sum(~t & m))
    if n == 0:
        return {"n": 0, "drop": None, "low": None, "high": None, "teacher_only": 0, "model_only": 0}
    p = np.random.default_rng(seed).dirichlet([b + 0.5, c + 0.5, n - b - c + 0.5], size=DRAWS)
    low, high = np.quantile(p[:, 0] - p[:, 1], [ALPHA, 1 - ALPHA])
    return {"n": n, "drop": (b - c) / n, "low": float(low), "high": float(high), "teacher_only": b, "model_only": c}


def outcome(result: dict, margin: float) -> str:
    """pass / fail / insufficient for a paired_drop result against `margin` (no rows: insufficient)."""
    if not result["n"]:
        return "insufficient"
    if result["high"] < margin:
        return "pass"
    if result["low"] > margin:
        return "fail"
    return "insufficient"


def rows_needed(result: dict, margin: float) -> int | None:
    """Labelled rows that would decide an insufficient check at the observed drop and disagreement rate; None when
    the observed drop sits on the margin (no number of rows decides it) or there are no rows to estimate from."""
    n = result["n"]
    if not n:
        return None
    d = result["drop"]
    rate = max((result["teacher_only"] + result["model_only"]) / n, 1 / n)  # at least one disagreeing row
    variance = max(rate - d * d, 1e-12)  # per-row variance of the paired difference
    gap = abs(margin - d)
    if gap < 1e-9:
        return None
    return max(int(math.ceil(Z * Z * variance / (gap * gap))), n + 1)


def check(name: str, teacher_ok, model_ok, margin: float, *, teacher_value: float | None,
          model_value: float | None, floor: float, seed: int) -> dict:
    """One check: the paired drop, its outcome against `margin`, the rows that would decide it, and whether the
    teacher itself is below `floor` there (an inherited limitation)."""
    r = paired_drop(teacher_ok, model_ok, seed=seed)
    out = outcome(r, margin)
    return {"check": name, "margin": float(margin), **r, "outcome": out,
            "rows_needed": rows_needed(r, margin) if out == "insufficient" else None,
            "teacher": teacher_value, "model": model_value,
            "inherited": teacher_value is not None and teacher_value < floor}


def compare(truth: np.ndarray, preds: dict[str, np.ndarray], labels: list[str], *, margins,
            slices: dict[str, np.ndarray] | None = None, floor: float = 0.5, seed: int = 0) -> dict[str, list[dict]]:
    """Every compressed model against preds["teacher"] on the same rows: aggregate accuracy (margin:
    margins.aggregate x the teacher's accuracy), each class's recall (margins.class_recall) and each critical
    slice's accuracy (margins.critical_slice; `slices` maps "column=value" to a boolean row mask, an empty mask is
    missing evidence). Returns model -> list of check dicts."""
    truth = np.asarray(truth)
    teacher_ok = preds["teacher"] == truth
    out: dict[str, list[dict]] = {}
    for model, pred in preds.items():
        if model == "teacher":
            continue
        ok = pred == truth
        t_acc = float(teacher_ok.mean()) if truth.size else None
        checks = [check("accuracy", teacher_ok, ok, margins.aggregate * (t_acc or 0.0), teacher_value=t_acc,
                        model_value=float(ok.mean()) if truth.size else None, floor=floor, seed=seed)]
        for k, label in enumerate(labels):
            rows = truth == k
            checks.append(check(f"recall:{label}", teacher_ok[rows], ok[rows], margins.class_recall,
                                teacher_value=float(teacher_ok[rows].mean()) if rows.any() else None,
                                model_value=float(ok[rows].mean()) if rows.any() else None, floor=floor,
                                seed=seed + 1 + k))
        for j, (name, rows) in enumerate((slices or {}).items()):
            checks.append(check(f"slice:{name}", teacher_ok[rows], ok[rows], margins.critical_slice,
                                teacher_value=float(teacher_ok[rows].mean()) if rows.any() else None,
                                model_value=float(ok[rows].mean()) if rows.any() else None, floor=floor,
                                seed=seed + 1 + len(labels) + j))
        out[model] = checks
    return out


BASELINE_CHECK = "accuracy vs majority class"  # the teacher's own check, under report.noninferiority["teacher"]


def baseline_check(truth: np.ndarray, teacher_pred: np.ndarray, majority: int, majority_label: str, margin: float,
                   *, seed: int = 0) -> dict:
    """Is the teacher shown to beat predicting the training split's most frequent class on every row? The same
    paired check with the constant predictor in the teacher's place: drop = baseline accuracy - teacher accuracy;
    pass when its upper one-sided 95% bound is below `margin` (0: the teacher is shown better than the constant).
    A teacher that collapsed onto one class passes every check against it: this is what stops it."""
    truth = np.asarray(truth)
    base_ok, teacher_ok = truth == majority, np.asarray(teacher_pred) == truth
    c = check(BASELINE_CHECK, base_ok, teacher_ok, margin, floor=0.0, seed=seed,
              teacher_value=float(base_ok.mean()) if truth.size else None,
              model_value=float(teacher_ok.mean()) if truth.size else None)
    return {**c, "baseline": majority_label}


def would_decide(rows: int, what: str = "it") -> str:
    """How every report says it: the labelled rows that would decide an insufficient check (thousands separated)."""
    return f"about {rows:,} labelled rows would decide {what}"


def describe(c: dict) -> str:
    """One sentence of evidence for a check: drop, bounds, rows, and what would decide it."""
    if not c["n"]:
        return f"{c['check']}: no rows to compare on (missing evidence)"
    if c["check"] == BASELINE_CHECK:
        text = (f"teacher accuracy {c['model']:.3f} vs {c['teacher']:.3f} for always answering "
                f"'{c['baseline']}' (the training split's most frequent class) on {c['n']} test rows: difference "
                f"{-c['drop']:+.3f}, one-sided 95% bounds [{-c['high']:+.3f}, {-c['low']:+.3f}]")
        if c["outcome"] == "insufficient":
            text += ("; not shown to beat it: " + (would_decide(c["rows_needed"])
                                                   if c["rows_needed"] else "more rows alone will not decide it"))
        return text
    text = (f"{c['check']}: drop {c['drop']:+.3f} vs the teacher on {c['n']} rows (one-sided 95% bounds "
            f"[{c['low']:+.3f}, {c['high']:+.3f}], margin {c['margin']:.3f}; {c['teacher_only']} rows only the "
            f"teacher gets right, {c['model_only']} only the model)")
    if c["outcome"] == "insufficient":
        text += ("; " + would_decide(c["rows_needed"]) if c["rows_needed"] else
                 "; the observed drop sits on the margin: more rows alone will not decide it")
    if c["inherited"]:
        text += f"; the teacher itself is at {c['teacher']:.2f} here (inherited limitation)"
    return text


def accuracy_goal(reference_val: np.ndarray, candidate_val: np.ndarray, label_ids: np.ndarray, *,
                  tolerable_loss: float, reference_sample: np.ndarray | None = None,
                  candidate_sample: np.ndarray | None = None, min_agreement: float = 0.95) -> dict:
    """The INT8 accuracy goal on enough rows that one row cannot flip it (issue 19): on the labelled validation rows
    the artifact must not be SHOWN to lose more than `tolerable_loss` (relative) of the fp32 student's accuracy (the
    lower one-sided 95% bound of the paired drop stays at or below it), and on the unlabelled sample (training
    texts) its argmax must agree with the fp32 student on at least `min_agreement` of the rows.

    Returns {"accuracy", "baseline", "goal", "drop", "low", "high", "n", "agreement", "agreement_n", "met_goal",
    "why"} (why: None when met)."""
    label_ids = np.asarray(label_ids)
    ref_ok, cand_ok = reference_val.argmax(-1) == label_ids, candidate_val.argmax(-1) == label_ids
    baseline = float(ref_ok.mean()) if len(label_ids) else 0.0
    margin = baseline * tolerable_loss
    drop = paired_drop(ref_ok, cand_ok)
    shown_worse = bool(drop["n"]) and drop["low"] > margin
    agreement = n_sample = None
    if reference_sample is not None and candidate_sample is not None and len(reference_sample):
        n_sample = int(len(reference_sample))
        agreement = float(np.mean(reference_sample.argmax(-1) == candidate_sample.argmax(-1)))
    why = []
    if shown_worse:
        why.append(f"validation accuracy {float(cand_ok.mean()):.4f} is shown to lose more than "
                   f"{tolerable_loss:.1%} of the fp32 student's {baseline:.4f} (paired drop {drop['drop']:+.4f}, "
                   f"one-sided 95% lower bound {drop['low']:+.4f} > {margin:.4f}, {drop['n']} rows)")
    if agreement is not None and agreement < min_agreement:
        why.append(f"argmax agreement with the fp32 student on {n_sample} unlabelled training texts "
                   f"{agreement:.3f} < {min_agreement:.3f}")
    return {"accuracy": float(cand_ok.mean()) if len(label_ids) else 0.0, "baseline": baseline,
            "goal": baseline - margin, "drop": drop["drop"], "low": drop["low"], "high": drop["high"],
            "n": drop["n"], "agreement": agreement, "agreement_n": n_sample, "met_goal": not why,
            "why": "; ".join(why) or None}


def add_noninferiority(report, logits: dict[str, dict[str, np.ndarray]], splits, evaluate_cfg, *,
                       critical_slices: dict[str, list[str]] | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """report.noninferiority: every compressed model against the teacher on the labelled test rows, with the
    margins and teacher floor of `evaluate_cfg` and a check per declared critical slice (a declared slice without
    rows is missing evidence: insufficient)."""
    if "test" not in logits.get("teacher", {}):
        return report.noninferiority
    label_id = {label: i for i, label in enumerate(splits.labels)}
    test = splits["test"]
    truth = test["label"].map(label_id).to_numpy(dtype=float)
    known = ~np.isnan(truth)
    preds = {m: by_split["test"].argmax(-1)[known] for m, by_split in logits.items() if "test" in by_split}
    slices = {f"{column}={value}": (test[column] == value).to_numpy()[known] if column in test else
              np.zeros(int(known.sum()), dtype=bool)
              for column, values in (critical_slices or {}).items() for value in values}
    report.noninferiority = compare(truth[known].astype(int), preds, list(splits.labels),
                                    margins=evaluate_cfg.margins, slices=slices, floor=evaluate_cfg.teacher_floor,
                                    seed=seed)
    _production_checks(report, logits, splits, evaluate_cfg, label_id, seed=seed + 53)
    majority = _majority_class(splits, label_id)
    if majority is not None:
        report.noninferiority["teacher"] = [baseline_check(
            truth[known].astype(int), preds["teacher"], majority, splits.labels[majority],
            evaluate_cfg.margins.teacher_vs_majority, seed=seed + 97)]
    return report.noninferiority


def add_champion_comparison(report, logits, splits, evaluate_cfg, *, champion: str, edge_model: str,
                            critical_slices: dict[str, list[str]] | None = None, seed: int = 0) -> dict:
    """report.champion: `edge_model` against the `champion` it would replace (a redistillation), with the checks and
    margins of the teacher comparison (aggregate, each class's recall, each critical slice, the production suite)
    and the champion in the teacher's place: the new model must not be shown worse than the one it replaces."""
    from types import SimpleNamespace

    if champion not in logits or edge_model not in logits:
        report.champion = {"name": champion, "checks": None}  # missing evidence: the gate says so
        return report.champion
    pair = SimpleNamespace(noninferiority={})
    add_noninferiority(pair, {"teacher": logits[champion], edge_model: logits[edge_model]}, splits, evaluate_cfg,
                       critical_slices=critical_slices, seed=seed + 211)
    report.champion = {"name": champion, "checks": pair.noninferiority.get(edge_model)}
    return report.champion


def _production_checks(report, logits, splits, evaluate_cfg, label_id: dict[str, int], *, seed: int) -> None:
    """Redistill's held-out human answers (the PRODUCTION suite): each compressed model against the teacher there,
    with the critical-slice margin. A model without predictions on it gets no check (and the gate names that)."""
    from distill_gap.data.splits import PRODUCTION

    frame = splits.frames.get(PRODUCTION)
    if frame is None or PRODUCTION not in logits.get("teacher", {}):
        return
    truth = frame["label"].map(label_id).to_numpy(dtype=float)
    known = ~np.isnan(truth)
    truth = truth[known].astype(int)
    teacher_ok = logits["teacher"][PRODUCTION].argmax(-1)[known] == truth
    for model, checks in report.noninferiority.items():
        if PRODUCTION in logits.get(model, {}):
            ok = logits[model][PRODUCTION].argmax(-1)[known] == truth
            checks.append(check(f"suite:{PRODUCTION}", teacher_ok, ok, evaluate_cfg.margins.critical_slice,
                                teacher_value=float(teacher_ok.mean()) if truth.size else None,
                                model_value=float(ok.mean()) if truth.size else None,
                                floor=evaluate_cfg.teacher_floor, seed=seed))


def _majority_class(splits, label_id: dict[str, int]) -> int | None:
    """The training split's most frequent class (ties: the first in label order); None without labelled rows."""
    frame = splits.frames.get("train")
    counts = frame["label"].map(label_id).value_counts() if frame is not None else None
    if counts is None or counts.empty:
        return None
    top = counts.max()
    return int(min(k for k, v in counts.items() if v == top))
