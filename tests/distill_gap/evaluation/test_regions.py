"""Scope regions (distill_gap/evaluation/regions.py): a region outside the training split enters the scope only when
its held-out human answers pass the paired non-inferiority check against the teacher; thin evidence is refused with
the rows that would decide it; the guard's reference sample includes a redistillation's production rows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from distill_gap.data.splits import MISSING_SLICE, PRODUCTION, Splits
from distill_gap.evaluation.gap_report import train_sample
from distill_gap.edge.guard import ScopeGuard
from distill_gap.evaluation.regions import add_regions, region_record, summary

from tests.conftest import LABELS


def _splits(production: pd.DataFrame) -> Splits:
    train = pd.DataFrame({"id": ["t1", "t2", "t3"], "text": ["a", "b", "c"], "label": LABELS,
                          "condition": ["Pain", "Depression", MISSING_SLICE]})
    splits = Splits(frames={"train": train}, labels=LABELS, slice_columns=["condition"])
    splits.add_suite(PRODUCTION, production)
    return splits


def _production(n_big: int, n_thin: int, wrong_big: int) -> tuple[pd.DataFrame, dict]:
    """n_big answered Acne rows (the model wrong on `wrong_big` the teacher gets right), n_thin Migraine rows (the
    model wrong on one), and two rows of a training region; logits of teacher and model on them."""
    conditions = ["Acne"] * n_big + ["Migraine"] * n_thin + ["Pain"] * 2
    y = np.arange(len(conditions)) % 3
    frame = pd.DataFrame({"id": [f"p{i}" for i in range(len(y))], "text": [f"row {i}" for i in range(len(y))],
                          "label": [LABELS[k] for k in y], "condition": conditions})
    teacher = np.eye(3)[y] * 5.0
    model = teacher.copy()
    for i in [*range(wrong_big), n_big]:  # wrong where the teacher is right
        model[i] = np.eye(3)[(y[i] + 1) % 3] * 5.0
    return frame, {"teacher": {PRODUCTION: teacher}, "edge": {PRODUCTION: model}}


def test_a_region_enters_only_on_passing_evidence_and_thin_evidence_says_how_much_more():
    frame, logits = _production(n_big=400, n_thin=6, wrong_big=0)
    splits = _splits(frame)
    record = region_record(splits, logits, "edge", column="condition", label_id={k: i for i, k in enumerate(LABELS)},
                           margin=0.03, floor=0.5, seed=0)
    assert record["trained"] == ["Depression", "Pain"]  # rows without a value make no region
    assert [r["region"] for r in record["added"]] == ["Acne"]
    added = record["added"][0]
    assert added["outcome"] == "pass" and added["n"] == 400 and added["high"] < 0.03
    assert added["evidence"] == "400 held-out human answers (production suite)"
    (refused,) = record["refused"]
    assert refused["region"] == "Migraine" and refused["outcome"] == "insufficient" and refused["n"] == 6
    assert refused["rows_needed"] > 6
    guard = ScopeGuard("msp", threshold=0.0, tpr=0.95, info={"regions": record})  # the guard applies the record
    assert guard.outside_regions([{"condition": c} for c in ("Depression", "Pain", "Acne", "Migraine")])[:3] == \
        [None] * 3 and guard.outside_regions([{"condition": "Migraine"}])[0] is not None
    line = summary(record)
    assert line.startswith("2 condition regions from training; added on evidence: Acne; Migraine not added "
                           "(insufficient on 6 rows, about ") and line.endswith("labelled rows would decide it)")


def test_a_region_where_the_model_is_shown_worse_fails_and_stays_out():
    frame, logits = _production(n_big=200, n_thin=0, wrong_big=40)
    record = region_record(_splits(frame), logits, "edge", column="condition",
                           label_id={k: i for i, k in enumerate(LABELS)}, margin=0.03, floor=0.5, seed=0)
    assert not record["added"] and record["refused"][0]["outcome"] == "fail"  # 20 points worse than the teacher


def test_regions_are_recorded_per_shipped_model_and_never_for_the_teacher():
    frame, logits = _production(n_big=400, n_thin=0, wrong_big=0)
    report = SimpleNamespace(scope={"teacher": {}, "edge": {}})
    cfg = SimpleNamespace(margins=SimpleNamespace(critical_slice=0.03), teacher_floor=0.5)
    add_regions(report, logits, _splits(frame), SimpleNamespace(region_column="condition"), cfg, seed=0)
    assert "regions" not in report.scope["teacher"] and report.scope["edge"]["regions"]["added"]
    report = SimpleNamespace(scope={"edge": {}})
    add_regions(report, logits, _splits(frame), SimpleNamespace(region_column=None), cfg, seed=0)
    assert report.scope == {"edge": {}}  # no region column: the guard's detector alone


def test_the_guards_reference_sample_includes_production_rows():
    frame, _ = _production(n_big=4, n_thin=0, wrong_big=0)
    splits = _splits(frame)
    assert len(train_sample(splits, 4000, 0)) == 3
    splits.scope_rows = pd.DataFrame({"id": ["production:1", "production:2"], "text": ["x", "y"],
                                      "label": ["negative", "positive"]})
    sample = train_sample(splits, 4000, 0)
    assert len(sample) == 5 and set(sample["id"]) >= {"production:1", "production:2"}
