"""The gap report: each model scored on its own, flags per suite and slice, calibration, OOD, stress and scope."""

import numpy as np
import pytest

from distill_gap.evaluation.gap_report import (GapReport, add_calibration_and_ood, add_stress, collect_outputs,
                                               gap_report, load_predictors, report_metrics, scope_record)
from distill_gap.evaluation.scope import add_scope
from flows.config import ScopeConfig
from tests.distill_gap.evaluation.synthetic import (case_fragile_edge, confident_logits, digit_teacher,
                                                    one_hot_logits, three_class_splits, two_site_splits,
                                                    zeros_predictor)


def test_flags_a_slice_loss_hidden_by_the_aggregate():
    truth = np.array([0] * 20 + [1] * 20)
    student = truth.copy()
    student[20:26] = 0  # loses 6 of 20 on slice s2 only
    report = gap_report({"teacher": {"test": one_hot_logits(truth)}, "student": {"test": one_hot_logits(student)}},
                        two_site_splits(), 0.02)
    assert report.metric("test", "student") == 0.85
    assert report.metric("slice:site=s1", "student") == 1.0
    flagged = {(f["suite"], f["model"]) for f in report.flags}
    assert ("slice:site=s2", "student") in flagged and ("slice:site=s1", "student") not in flagged
    assert report.worst_slices("student")[0][0] == "slice:site=s2"
    md = report.markdown()  # the shipped model defaults to the last compressed one
    assert "- site=s2: -30.0 pts (0.700 vs 1.000, n=20)" in md  # the flagged slice, said first
    table = md[md.index("| suite |"):].splitlines()
    assert table[2:5] == ["| test | 40 | 1.000 | 0.850 | -0.150 ⚠ | 0.850 |",  # held-out split, then slices worst first
                          "| site=s2 | 20 | 1.000 | 0.700 | -0.300 ⚠ | 0.700 |",
                          "| site=s1 | 20 | 1.000 | 1.000 | +0.000 | 1.000 |"]


def test_intervals_calibration_ood_and_scope():
    splits, rng = three_class_splits(), np.random.default_rng(0)
    truth = np.arange(60) % 3
    logits = {}
    for m, wrong, scale in (("teacher", 0.1, 4.0), ("student", 0.3, 8.0)):  # the student is over-confident
        logits[m] = {"test": confident_logits(truth, rng, scale, wrong),
                     "validation": confident_logits(truth, rng, scale, wrong),
                     "ood:far": rng.normal(0, 0.3, (60, 3)).astype(np.float32)}  # OOD: flat, low confidence
    report = gap_report(logits, splits, 0.02, bootstrap_samples=200, seed=1)
    ci = report.suites["test"]["student"]["ci"]["accuracy"]
    assert ci["low"] <= report.metric("test", "student") <= ci["high"]
    assert report.suites["slice:site=tiny"]["student"]["ci"]["accuracy"]["note"] == "n too small"
    assert report.suites["test"]["student"]["kl_teacher"] > 0
    assert "validation" not in report.suites and "train" not in report.suites  # they shaped the models
    add_calibration_and_ood(report, logits, splits, bootstrap_samples=50)
    cal = report.calibration["student"]
    assert cal["temperature"] > 1.0 and cal["ece_after"] < cal["ece_before"]  # scaling fixes over-confidence
    assert report.ood["ood:far"]["teacher"]["msp"]["auroc"] > 0.9  # flat OOD logits are easy to detect
    assert "drop_vs_teacher" in report.ood["ood:far"]["student"]["msp"]
    # features: the logits themselves stand in (3 columns); the training sample's are the validation rows'
    features = {m: {**by_split, "train": by_split["validation"]} for m, by_split in logits.items()}
    guards = add_scope(report, logits, features, splits, ScopeConfig(detector="knn", k=3, train_rows=60),
                       bootstrap_samples=50)
    assert set(guards) == set(report.scope) == {"teacher", "student"} and guards["student"].temperature == cal["temperature"]
    assert report.scope["student"]["detector"] == "knn" and report.scope["student"]["tpr"] == 0.95
    assert set(report.ood["ood:far"]["student"]) >= {"msp", "energy", "mahalanobis", "knn", "hist"}
    assert report.ood["ood:far"]["student"]["hist"]["score"] == "knn"
    assert report.ood["ood:far"]["student"]["knn"]["ci"]["low"] is not None
    assert "drop_vs_teacher" in report.ood["ood:far"]["student"]["knn"]  # the OOD gate compares the shipped detector
    from distill_gap.evaluation.gates import evaluate_gates
    from flows.config import EvaluateConfig

    gate = evaluate_gates(report, "student", {"argmax_agreement": 1.0}, EvaluateConfig())["ood_auroc_vs_teacher:far"]
    assert "kNN AUROC" in gate["detail"] and "shipped guard" in gate["detail"]
    gap = report.suites["slice:site=a"]["student"]["ci"]["gap_vs_teacher"]  # paired: the same rows
    acc = {m: report.metric("slice:site=a", m) for m in ("teacher", "student")}
    assert gap["value"] == pytest.approx(acc["student"] - acc["teacher"]) and gap["low"] <= gap["value"] <= gap["high"]
    assert "gap_vs_teacher" not in report.suites["slice:site=tiny"]["student"]["ci"]  # under 10 rows: no interval
    assert "gap_vs_teacher" not in report.suites["test"]["teacher"]["ci"]

    scope = scope_record(report, "student", splits)
    assert scope["model"] == "student" and "knn score >= threshold" in scope["rule"]
    assert scope["data_digests"] == splits.digests() and "tiny" in {s.split("=")[1] for s in scope["slices"]}
    assert scope["ood_sets"]["ood:far"]["auroc"] == report.ood["ood:far"]["student"]["knn"]["auroc"]
    assert scope_record(report, "nobody", splits) is None

    metrics = report_metrics(report)
    assert metrics["student.test.accuracy"] == report.metric("test", "student")
    assert metrics["student.test.ece_after_scaling"] == cal["ece_after"]
    assert metrics["student.ood.far.msp_auroc"] == report.ood["ood:far"]["student"]["msp"]["auroc"]
    assert "student.ood.far.msp_auroc_drop_low" in metrics and "teacher.ood.far.msp_auroc_drop_low" not in metrics
    assert all(isinstance(v, float) for v in metrics.values()) and not any(k.endswith(".n") for k in metrics)


def test_calibration_and_scope_without_a_validation_split_are_reported_missing():
    splits = three_class_splits()
    splits = type(splits)({k: v for k, v in splits.frames.items() if k != "validation"}, splits.labels, ["site"])
    rng = np.random.default_rng(2)
    logits = {"teacher": {"test": confident_logits(np.arange(60) % 3, rng, 3.0)}}
    report = add_calibration_and_ood(gap_report(logits, splits), logits, splits)
    assert report.calibration["teacher"]["temperature"] == 1.0 and "teacher" not in report.scope
    assert report.not_evaluated == [{"model": "teacher", "suite": "calibration/scope",
                                     "reason": "no validation split to fit the temperature and threshold on"}]


def test_stress_suites_measure_flips_and_a_breaking_model_is_reported():
    splits = three_class_splits()
    logits = {m: {s: fn(splits[s]["text"].tolist()) for s in ("test", "validation", "ood:far")}
              for m, fn in (("teacher", digit_teacher), ("edge", case_fragile_edge))}
    report = gap_report(logits, splits)

    def broken(texts):
        raise RuntimeError("tokenizer exploded")

    add_stress(report, {"teacher": digit_teacher, "edge": case_fragile_edge, "broken": broken}, splits,
               ["teacher", "edge", "broken"], rows=40, seed=3)
    assert set(report.stress) == {"typos", "casing", "whitespace", "punctuation", "truncation", "negation",
                                  "domain_swap"}
    assert report.stress["casing"]["edge"]["flip_rate"] > report.stress["casing"]["teacher"]["flip_rate"] + 0.05
    assert report.stress["casing"]["edge"]["n"] == 40
    assert report.not_evaluated == [{"model": "broken", "suite": "stress",
                                     "reason": "RuntimeError: tokenizer exploded"}]
    empty = gap_report(logits, splits)
    assert not add_stress(empty, {"teacher": digit_teacher}, splits, ["teacher"], rows=0, seed=3).stress


def test_a_model_with_the_wrong_number_of_classes_is_not_evaluated_and_the_others_go_on():
    splits = three_class_splits()

    three, two = zeros_predictor(3), zeros_predictor(2)
    logits, features, missing = collect_outputs({"teacher": three, "student": three, "broken": two}, splits,
                                                train_rows=10)
    assert set(logits) == {"teacher", "student"} and set(logits["student"]) == {"validation", "test", "ood:far"}
    assert set(features["student"]) == {"train", "validation", "test", "ood:far"}
    assert features["student"]["train"].shape == (10, 4)  # the seeded training sample the detectors fit on
    assert missing[0]["model"] == "broken" and "3 classes" in missing[0]["reason"]
    report = gap_report(logits, splits, 0.02)
    report.not_evaluated += missing
    assert "**not evaluated**: `broken` on all: " in report.markdown()
    assert "- not evaluated: `broken` on all: " in report.markdown(gates={})  # with gates: in the verdict
    with pytest.raises(Exception, match="3 classes"):  # the teacher is required
        collect_outputs({"teacher": two}, splits)


def test_load_predictors_lists_what_cannot_be_loaded_and_requires_the_teacher(tiny_model_dir, tmp_path):
    predictors, missing = load_predictors({"teacher": tiny_model_dir, "gone": tmp_path / "nothing"},
                                          max_length=32, device="cpu")
    assert set(predictors) == {"teacher"} and predictors["teacher"].predict_logits(["a text", "another"]).shape == (2, 3)
    assert missing[0]["model"] == "gone" and missing[0]["reason"].startswith("could not be loaded: ")
    with pytest.raises(Exception, match="does not exist"):
        load_predictors({"teacher": tmp_path / "nothing"}, max_length=32, device="cpu")


def test_report_dict_holds_every_section_and_the_worst_slices():
    report = GapReport(models=["teacher", "student"], suites={
        "slice:site=a": {"teacher": {"n": 12, "accuracy": 0.9}, "student": {"n": 12, "accuracy": 0.7}},
        "slice:site=b": {"teacher": {"n": 12, "accuracy": 0.8}, "student": {"n": 12, "accuracy": 0.8}},
        "slice:site=c": {"teacher": {"n": 3, "accuracy": 1.0}, "student": {"n": 3, "accuracy": 0.0}}})
    assert [s for s, _ in report.worst_slices("student")] == ["slice:site=a", "slice:site=b"]  # c: under 10 rows
    d = report.to_dict()
    assert set(d) == {"models", "labels", "threshold", "suites", "flags", "calibration", "ood", "stress", "scope",
                      "noninferiority", "champion", "not_evaluated", "worst_slices"}
    assert d["worst_slices"]["student"][0] == ("slice:site=a", pytest.approx(-0.2))


def test_ood_sets_of_unseen_classes_get_accuracy_only_where_labels_are_in_the_set():
    splits = three_class_splits()
    frames = dict(splits.frames)
    mixed = frames["ood:far"].copy()
    mixed.loc[mixed.index[:30], "label"] = None  # e.g. classes the model was never trained on
    frames["ood:far"] = mixed
    frames["ood:unlabelled"] = frames["ood:far"].assign(label=None)
    splits = type(splits)(frames, splits.labels, ["site"])
    truth = np.arange(60) % 3
    logits = {m: {s: np.eye(3, dtype=np.float32)[truth] * 4 for s in ("test", "validation", "ood:far",
                                                                      "ood:unlabelled")}
              for m in ("teacher", "student")}
    report = gap_report(logits, splits, 0.02)
    assert report.suites["ood:far"]["student"]["n"] == 30 and report.metric("ood:far", "student") == 1.0
    assert "ood:unlabelled" not in report.suites  # detection only: add_calibration_and_ood still scores it
    add_calibration_and_ood(report, logits, splits)
    assert "msp" in report.ood["ood:unlabelled"]["student"]


def _slice(n: int, teacher: float, model: float) -> dict:
    return {"teacher": {"n": n, "accuracy": teacher}, **{m: {"n": n, "accuracy": model, "fidelity": 0.9}
                                                        for m in ("student", "edge")}}


def test_markdown_says_the_verdict_then_what_the_shipped_model_loses_in_a_narrow_table():
    suites = {"test": _slice(325, 0.726, 0.720), "slice:c=Pain": _slice(17, 0.765, 0.706),
              "slice:c=Depression": _slice(25, 0.8, 0.72),
              **{f"slice:c=Rare {i}": _slice(2, 1.0, 0.5) for i in range(94)}}  # never flagged, not listed
    flags = [{"suite": s, "model": m, "gap": suites[s][m]["accuracy"] - suites[s]["teacher"]["accuracy"], "n": suites[s][m]["n"]}
             for s in ("slice:c=Depression", "slice:c=Pain") for m in ("student", "edge")]
    report = GapReport(models=["teacher", "student", "edge"], suites=suites, flags=flags,
                       not_evaluated=[{"model": "onnx", "suite": "all", "reason": "onnxruntime missing"}])
    gates = {"noninferior:recall:neu": {"value": 0.0, "threshold": 0.05, "passed": False, "outcome": "insufficient",
                                        "inherited": True, "detail": "the teacher is at 0.05"},
             "calibration_ece": {"value": 0.04, "threshold": 0.05, "passed": True, "detail": "ECE"}}
    md = report.markdown("Gap report: demo", edge="edge", gates=gates, links={"HTML report": "http://ui/#/x.html"})
    verdict, flagged, table, rest = (md.index("**Verdict: insufficient evidence for 1 gate(s)**"),
                                     md.index("**⚠ `edge` (shipped)"), md.index("| suite |"), md.index("[HTML report]"))
    assert verdict == 0 and verdict < flagged < table < rest  # the verdict, the flags, the table, the links
    assert "- undecided `noninferior:recall:neu`: 0.000 vs threshold 0.050 (inherited from the teacher)" in md
    assert "- passed (1): `calibration_ece`" in md and "- not evaluated: `onnx` on all: onnxruntime missing" in md
    assert "- c=Depression: -8.0 pts (0.720 vs 0.800, n=25)" in md and "`student` on" not in md  # the edge's only
    assert md.index("c=Depression: -8.0") < md.index("c=Pain: -5.9")  # worst first
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 and all(line.count(" | ") == 5 for line in rows)  # header + 3 suites, 6 columns
    assert "Rare" not in md and "94 slice(s) under 10 rows" in md
    assert "[HTML report](http://ui/#/x.html)" in md and "every model (student)" in md
