"""Non-inferiority on the same rows (issue 19): three outcomes, missing evidence never passes, and the rows that
would decide an undecided check."""

import numpy as np
import pytest

from distill_gap.evaluation.noninferiority import compare, describe, outcome, paired_drop, rows_needed
from flows.config import MarginsConfig


def _pair(n: int, teacher_only: int, model_only: int, both: float = 0.7):
    """Boolean (teacher_ok, model_ok) over n rows with exactly these disagreements, the rest agreeing."""
    t = np.zeros(n, bool)
    m = np.zeros(n, bool)
    t[:teacher_only] = True
    m[teacher_only:teacher_only + model_only] = True
    agree = np.arange(teacher_only + model_only, n)
    right = agree[: int(len(agree) * both)]
    t[right] = m[right] = True
    return t, m


def test_a_model_that_agrees_on_many_rows_passes_and_on_five_rows_does_not():
    t, m = _pair(1000, 0, 0)
    assert outcome(paired_drop(t, m), 0.03) == "pass"
    few = paired_drop(*_pair(5, 0, 0))
    assert few["drop"] == 0 and few["high"] > 0.03  # no disagreement seen, but five rows prove little
    assert outcome(few, 0.03) == "insufficient"
    assert rows_needed(few, 0.03) > 5


def test_a_drop_shown_beyond_the_margin_fails_and_one_inside_it_passes():
    worse = paired_drop(*_pair(400, 90, 10))  # drop 0.20
    assert worse["drop"] == pytest.approx(0.2) and worse["low"] > 0.05
    assert outcome(worse, 0.05) == "fail"
    better = paired_drop(*_pair(400, 10, 30))  # the model is better
    assert better["high"] < 0 and outcome(better, 0.0) == "pass"


def test_rows_needed_decides_the_check_at_the_observed_rates():
    t, m = _pair(60, 6, 2)  # drop 0.067, margin 0.10: undecided on 60 rows (bounds ~[-0.01, 0.15])
    r = paired_drop(t, m)
    assert outcome(r, 0.10) == "insufficient"
    need = rows_needed(r, 0.10)
    reps = -(-need // 60) + 1  # the same rates on at least `need` rows
    bigger = paired_drop(np.tile(t, reps), np.tile(m, reps))
    assert bigger["drop"] == pytest.approx(r["drop"]) and outcome(bigger, 0.10) == "pass"


def test_missing_evidence_is_insufficient_and_said_in_words():
    truth = np.array([0, 1, 2, 0, 1, 2] * 20)
    preds = {"teacher": truth.copy(), "edge": truth.copy()}
    checks = compare(truth, preds, ["a", "b", "c"], margins=MarginsConfig(),
                     slices={"site=x": np.zeros(len(truth), bool)})["edge"]
    missing = next(c for c in checks if c["check"] == "slice:site=x")
    assert missing["outcome"] == "insufficient" and missing["n"] == 0 and missing["rows_needed"] is None
    assert "missing evidence" in describe(missing)
    assert {c["check"] for c in checks} == {"accuracy", "recall:a", "recall:b", "recall:c", "slice:site=x"}


def test_a_class_the_teacher_never_gets_right_is_an_inherited_limitation():
    truth = np.array([0, 1, 2] * 50)
    teacher = np.where(truth == 1, 0, truth)  # the teacher never predicts class 1
    checks = {c["check"]: c for c in compare(truth, {"teacher": teacher, "edge": teacher.copy()}, ["neg", "neu", "pos"],
                                             margins=MarginsConfig(), floor=0.5)["edge"]}
    assert checks["recall:neu"]["inherited"] and checks["recall:neu"]["teacher"] == 0.0
    assert not checks["recall:neg"]["inherited"]
    assert "inherited limitation" in describe(checks["recall:neu"])


def test_the_aggregate_margin_is_relative_to_the_teachers_accuracy():
    truth = np.array([0, 1] * 100)
    teacher = truth.copy()
    teacher[:50] = 1 - teacher[:50]  # teacher accuracy 0.75
    acc = compare(truth, {"teacher": teacher, "edge": teacher.copy()}, ["a", "b"],
                  margins=MarginsConfig(aggregate=0.04))["edge"][0]
    assert acc["check"] == "accuracy" and acc["margin"] == pytest.approx(0.03)


def test_bad_arrays_and_margins_are_refused():
    from distill_gap.errors import DistillError
    from flows.config import load_config

    with pytest.raises(ValueError, match="1-D arrays of one length"):
        paired_drop([True, False], [True])
    with pytest.raises(DistillError, match=r"evaluate.margins.aggregate"):
        load_config("configs/demo.yaml", ["evaluate.margins.aggregate=1.5"])


def test_a_teacher_that_collapsed_onto_one_class_is_not_shown_to_beat_the_majority_answer():
    """The teacher against always answering the training split's most frequent class, on the same rows: a teacher
    that answers that class everywhere is exactly the constant (undecidable: insufficient, and more rows will not
    decide it), one stuck on a rarer class is shown worse (fail), a teacher that learned something passes."""
    from distill_gap.evaluation.noninferiority import BASELINE_CHECK, baseline_check

    rng = np.random.default_rng(0)
    truth = rng.choice(3, size=400, p=[0.2, 0.2, 0.6])
    collapsed = baseline_check(truth, np.full(400, 2), 2, "positive", 0.0)
    assert collapsed["check"] == BASELINE_CHECK and collapsed["drop"] == 0 and collapsed["outcome"] == "insufficient"
    assert collapsed["rows_needed"] is None and "more rows alone will not decide it" in describe(collapsed)
    assert "always answering 'positive'" in describe(collapsed)
    stuck = baseline_check(truth, np.zeros(400, dtype=int), 2, "positive", 0.0)
    assert stuck["outcome"] == "fail" and stuck["model"] < stuck["teacher"]
    learned = np.where(rng.random(400) < 0.8, truth, rng.choice(3, size=400))
    good = baseline_check(truth, learned, 2, "positive", 0.0)
    assert good["outcome"] == "pass" and good["high"] < 0 and good["model"] > 0.8
    assert baseline_check(truth, np.full(400, 2), 2, "positive", 1.0)["outcome"] == "pass"  # opened by config
