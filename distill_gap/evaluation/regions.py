"""Scope regions: which values of a slice column (`scope.region_column`, e.g. a medical condition) the edge model
may answer for. Evidence before scope (issue 22).

A row that names a region is in scope only when that region is in the model's scope *and* its text passes the
guard's detector. The scope holds the regions of the training split; a region the model never trained on enters
only when a redistillation's held-out human answers there (the `production` suite) pass the same paired
non-inferiority check as a critical slice: the edge model shown not worse than the teacher by more than
`evaluate.margins.critical_slice` on those rows. Training on a region's production rows does not by itself put it
in scope. The record (scope.json `regions`, the gap report, the dossier) lists every region added and every one
refused, with its evidence and, for thin evidence, the labelled rows that would decide it.
"""

from __future__ import annotations

import numpy as np

from distill_gap.data.splits import MISSING_SLICE, PRODUCTION
from distill_gap.evaluation.noninferiority import check, would_decide


def trained_regions(splits, column: str) -> list[str]:
    """The region values of the training split (rows without one do not make a region)."""
    frame = splits.frames.get("train")
    if frame is None or column not in frame:
        return []
    return sorted({str(v) for v in frame[column] if str(v) != MISSING_SLICE})


def region_record(splits, logits: dict, model: str, *, column: str, label_id: dict[str, int], margin: float,
                  floor: float, seed: int) -> dict:
    """{"column", "trained", "added": [...], "refused": [...]} for `model`: each region of the production suite that
    is not a training region, with its check against the teacher on the suite's rows there (added = "pass")."""
    trained = trained_regions(splits, column)
    record = {"column": column, "trained": trained, "added": [], "refused": [],
              "rule": f"a region outside the training split's enters when its held-out human answers pass the "
                      f"non-inferiority check against the teacher (margin {margin:.0%})"}
    frame = splits.frames.get(PRODUCTION)
    if frame is None or column not in frame or PRODUCTION not in logits.get(model, {}) \
            or PRODUCTION not in logits.get("teacher", {}):
        return record
    truth = frame["label"].map(label_id).to_numpy(dtype=float)
    values = frame[column].astype(str).to_numpy()
    teacher_pred = logits["teacher"][PRODUCTION].argmax(-1)
    model_pred = logits[model][PRODUCTION].argmax(-1)
    known = set(trained)
    for value in sorted(set(values) - known - {MISSING_SLICE}):
        rows = (values == value) & ~np.isnan(truth)
        y = truth[rows].astype(int)
        teacher_ok, model_ok = teacher_pred[rows] == y, model_pred[rows] == y
        result = check(f"region:{column}={value}", teacher_ok, model_ok, margin,
                       teacher_value=float(teacher_ok.mean()) if y.size else None,
                       model_value=float(model_ok.mean()) if y.size else None, floor=floor, seed=seed)
        entry = {"region": value, "evidence": f"{y.size} held-out human answers (production suite)", **result}
        record["added" if result["outcome"] == "pass" else "refused"].append(entry)
    return record


def add_regions(report, logits: dict, splits, scope_cfg, evaluate_cfg, *, seed: int) -> None:
    """report.scope[model]["regions"] for every model with a guard, when scope.region_column is set."""
    column = scope_cfg.region_column
    if column is None:
        return
    label_id = {label: i for i, label in enumerate(splits.labels)}
    for model, entry in report.scope.items():
        if model == "teacher":  # the reference itself: its scope never ships
            continue
        entry["regions"] = region_record(splits, logits, model, column=column, label_id=label_id,
                                         margin=evaluate_cfg.margins.critical_slice,
                                         floor=evaluate_cfg.teacher_floor, seed=seed + 307)


def summary(regions: dict | None) -> str | None:
    """One line for people: how many regions, which were added, which refused and why."""
    if not regions:
        return None
    parts = [f"{len(regions['trained'])} {regions['column']} regions from training"]
    if regions["added"]:
        parts.append("added on evidence: " + ", ".join(r["region"] for r in regions["added"]))
    for r in regions["refused"]:
        need = ", " + would_decide(r["rows_needed"]) if r.get("rows_needed") else ""
        parts.append(f"{r['region']} not added ({r['outcome']} on {r['n']} rows{need})")
    return "; ".join(parts)
