"""Production rows and feedback answers as extra training rows (distill_gap/kd/production.py), and the data suite
they pass first (distill_gap/data/validation.validate_extra_rows)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from distill_gap.data.validation import DataValidationError, validate_extra_rows
from distill_gap.errors import DistillError
from distill_gap.kd.production import production_rows
from distill_gap.monitoring.drift import sample_digest
from distill_gap.monitoring.feedback import append_feedback

from tests.conftest import LABELS


def _cfg(**kw):
    return SimpleNamespace(**{**dict(production=None, production_digest=None, feedback=False, max_rows=5000,
                                     weight=1.0), **kw})


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t, "condition": "Acne"}) + "\n" for t in texts))
    return str(path)


def _answers(store, rows):
    recs = [{"id": f"r-{i}", "text": t, "answer": a, "answered_by": who, "kind": kind,
             "answered_at": "2026-12-02T10:00:00Z", "edge_version": 1} for i, (t, a, kind, who) in enumerate(rows)]
    append_feedback(store, recs, [f"line {i}" for i in range(len(recs))], labels=LABELS,
                    edge_versions=lambda wanted: [])


def test_production_rows_and_answers_join_without_the_split_texts(tmp_path, review_frame):
    split_texts = set(review_frame["text"])
    test_text = review_frame["text"].iloc[5]
    new = [f"the acne cream burned my skin for {i} days" for i in range(6)]
    sample = _write(tmp_path / "prod.jsonl", new + [test_text, new[0]])  # a test row and a repeat
    store = f"file://{tmp_path}/fb"
    _answers(store, [(new[1], "negative", "human", "nurse.kim"), (new[2], "positive", "teacher", "demo-teacher/1"),
                     ("an answered row that was never in the sample", "neutral", "human", "dr.ruiz")])
    exclude, said = set(split_texts), []
    got = production_rows(_cfg(production=sample, production_digest=sample_digest(sample), feedback=True,
                               weight=2.0), feedback_store=store, labels=LABELS, exclude=exclude, seed=0,
                          log=said.append)
    assert said == ["1 production or feedback rows equal rows of the data splits (or other extra rows) and were left "
                    "out: training on them would leak evaluation rows"]
    assert got.attrs["overlap"] == 1 and test_text not in set(got["text"])  # the test row never trains
    assert len(got) == 7 and got["text"].is_unique and got["id"].str.match(r"^production:[0-9a-f]{16}$").all()
    by_text = got.set_index("text")
    assert by_text.loc[new[1], "label"] == "negative" and by_text.loc[new[2], "label"] == ""  # a person's answer only
    assert by_text.loc["an answered row that was never in the sample", ["label", "source"]].tolist() == \
        ["neutral", "feedback"]
    assert (got["weight"] == 2.0).all() and set(got["text"]) <= exclude  # later sources will not repeat them
    validate_extra_rows("extra rows", got, LABELS)


def test_rows_that_changed_or_are_gone_since_the_drift_event_are_refused(tmp_path):
    sample = _write(tmp_path / "prod.jsonl", ["one new review of a cream", "another new review"])
    digest = sample_digest(sample)
    _write(tmp_path / "prod.jsonl", ["one new review of a cream", "a review written later"])
    with pytest.raises(DistillError, match="changed since the drift event") as err:
        production_rows(_cfg(production=sample, production_digest=digest), feedback_store="", labels=LABELS,
                        exclude=set(), seed=0)
    assert "new drift event" in err.value.fix
    (tmp_path / "prod.jsonl").unlink()
    with pytest.raises(DistillError, match="the production rows this run was started for are gone: production "
                                           "sample .* does not exist"):
        production_rows(_cfg(production=sample, production_digest=digest), feedback_store="", labels=LABELS,
                        exclude=set(), seed=0)


def test_the_cap_keeps_answered_rows_and_nothing_left_is_an_error(tmp_path):
    texts = [f"production review number {i}" for i in range(50)]
    sample = _write(tmp_path / "prod.jsonl", texts)
    store = f"file://{tmp_path}/fb"
    _answers(store, [(texts[i], "negative", "human", "nurse.kim") for i in (3, 30, 47)])
    got = production_rows(_cfg(production=sample, feedback=True, max_rows=10), feedback_store=store, labels=LABELS,
                          exclude=set(), seed=0)
    assert len(got) == 10 and (got["label"] == "negative").sum() == 3
    assert production_rows(_cfg(), feedback_store=store, labels=LABELS, exclude=set(), seed=0) is None
    empty = f"file://{tmp_path}/no-feedback-yet"  # a config that keeps redistill.feedback on before any answer
    assert production_rows(_cfg(feedback=True), feedback_store=empty, labels=LABELS, exclude=set(), seed=0) is None
    with pytest.raises(DistillError, match=r"none is left to learn from \(50 read, 50 equal to rows of the data "
                                           r"splits or other extra rows\)"):
        production_rows(_cfg(production=sample), feedback_store="", labels=LABELS, exclude=set(texts), seed=0)
    with pytest.raises(DistillError, match=r"feedback answers \['negative'\] are not labels of this config"):
        production_rows(_cfg(feedback=True), feedback_store=store, labels=["bad", "good"], exclude=set(), seed=0)


def test_extra_rows_pass_the_data_suite_or_nothing_is_labelled():
    good = pd.DataFrame({"id": ["a", "b"], "text": ["fine", "bad rash"], "label": ["", "negative"]})
    assert validate_extra_rows("extra rows", good, LABELS)["passed"]
    bad = pd.DataFrame({"id": ["a", "a"], "text": ["fine", "  "], "label": ["", "awful"]})
    with pytest.raises(DataValidationError, match="split 'extra rows'") as err:
        validate_extra_rows("extra rows", bad, LABELS)
    failed = {f["expectation"] for f in err.value.report["splits"]["extra rows"]["failed"]}
    assert {"expect_column_values_to_be_unique", "expect_column_values_to_match_regex",
            "expect_column_values_to_be_in_set"} <= failed


def test_answers_are_held_out_seeded_and_become_a_suite_of_the_splits(review_frame):
    from distill_gap.data.splits import MISSING_SLICE, PRODUCTION, Splits
    from distill_gap.kd.production import hold_out_answers

    frame = pd.DataFrame({"id": [f"p{i}" for i in range(10)], "text": [f"row {i}" for i in range(10)],
                          "label": ["negative", "", "positive", "", "neutral", "", "negative", "", "", ""],
                          "source": "production", "weight": 1.0})
    train, held = hold_out_answers(frame, 0.5, seed=3)
    assert len(held) == 2 and (held["label"] != "").all() and len(train) == 8  # round(0.5 * 4 answered)
    assert held.equals(hold_out_answers(frame, 0.5, seed=3)[1]) and not set(held["id"]) & set(train["id"])
    assert len(hold_out_answers(frame, 0.1, seed=3)[1]) == 1 and hold_out_answers(frame, 0.0, seed=3)[1].empty
    splits = Splits(frames={"train": review_frame}, labels=LABELS, slice_columns=["condition"])
    splits.add_suite(PRODUCTION, held)
    assert list(splits[PRODUCTION].columns) == ["id", "text", "label", "condition"]
    assert (splits[PRODUCTION]["condition"] == MISSING_SLICE).all() and PRODUCTION in splits.digests()
    with pytest.raises(DistillError, match="a split named 'production' exists already"):
        splits.add_suite(PRODUCTION, held)


def test_production_rows_carry_their_regions_and_feed_the_guard_with_answers_or_the_teachers_label(tmp_path):
    """Slice columns travel with the rows (the scope's regions are judged on them); ExtraRows.scope_rows labels
    each production row with a person's answer, else the teacher's argmax, and leaves augmentations out."""
    import numpy as np

    from distill_gap.data.splits import MISSING_SLICE
    from distill_gap.kd.augment import ExtraRows

    sample = _write(tmp_path / "prod.jsonl", ["the acne gel dried my skin", "cleared up in a week"])
    store = f"file://{tmp_path}/fb"
    recs = [{"id": "r-1", "text": "the acne gel dried my skin", "answer": "negative", "answered_by": "nurse.kim",
             "kind": "human", "answered_at": "2026-12-02T10:00:00Z", "edge_version": 1},
            {"id": "r-2", "text": "migraines every day since", "answer": "negative", "answered_by": "nurse.kim",
             "kind": "human", "answered_at": "2026-12-02T10:00:00Z", "edge_version": 1, "condition": "Migraine"},
            {"id": "r-3", "text": "no condition named here", "answer": "positive", "answered_by": "nurse.kim",
             "kind": "human", "answered_at": "2026-12-02T10:00:00Z", "edge_version": 1}]
    append_feedback(store, recs, ["l1", "l2", "l3"], labels=LABELS, edge_versions=lambda wanted: [])
    got = production_rows(_cfg(production=sample, feedback=True), feedback_store=store, labels=LABELS,
                          exclude=set(), seed=0, slice_columns=["condition"])
    assert dict(zip(got["text"], got["condition"])) == {
        "the acne gel dried my skin": "Acne", "cleared up in a week": "Acne",  # the sample's column wins
        "migraines every day since": "Migraine", "no condition named here": MISSING_SLICE}
    frame = pd.concat([got, pd.DataFrame({"id": ["t~swap0"], "text": ["an edited copy"], "label": [""],
                                          "source": ["swap"], "weight": [1.0]})], ignore_index=True)
    soft = SimpleNamespace(ids=frame["id"].tolist(), logits=np.eye(3)[[2, 2, 1, 1, 0]] * 4.0)
    rows = ExtraRows(frame=frame, digest="d", soft=soft).scope_rows(LABELS)
    assert "t~swap0" not in set(rows["id"]) and len(rows) == 4
    assert dict(zip(rows["text"], rows["label"])) == {
        "the acne gel dried my skin": "negative", "cleared up in a week": "positive",  # the teacher's argmax
        "migraines every day since": "negative", "no condition named here": "positive"}
