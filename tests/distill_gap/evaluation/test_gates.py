"""Gates: each verdict with its value, threshold and evidence; intervals that excuse noise; the verdict text."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from distill_gap.data.splits import Splits
from distill_gap.errors import DistillError
from distill_gap.evaluation.gap_report import add_calibration_and_ood, add_stress, collect_outputs, gap_report
from distill_gap.evaluation.gates import (GatesFailed, evaluate_gates, failed_evidence, gate_thresholds, gates_failed,
                                          quantization_gate, verdict_markdown)
from distill_gap.evaluation.noninferiority import add_noninferiority
from distill_gap.outcomes import overall_outcome
from flows.config import EvaluateConfig
from tests.distill_gap.evaluation.synthetic import (case_fragile_edge, confident_logits, digit_teacher,
                                                    one_hot_logits, three_class_splits, two_site_splits,
                                                    zeros_predictor)


def test_thresholds_are_the_evaluate_config():
    cfg = EvaluateConfig(max_edge_drop=0.04, max_ood_auroc_drop=0.2)
    limits = gate_thresholds(cfg)
    assert limits["edge_accuracy_drop_vs_student"] == 0.04 and limits["ood_auroc_vs_teacher"] == 0.2
    assert limits["noninferior:recall"] == cfg.margins.class_recall == 0.05 and len(limits) == 9
    assert limits["teacher_vs_majority_class"] == cfg.margins.teacher_vs_majority == 0.0


def _report(truth, edge, splits, *, critical_slices=None, cfg=None, **logits_extra):
    logits = {"teacher": {"test": one_hot_logits(truth)}, "student": {"test": one_hot_logits(truth)},
              "student-int8": {"test": one_hot_logits(edge)}}
    report = gap_report(logits, splits, 0.02)
    add_noninferiority(report, logits, splits, cfg or EvaluateConfig(), critical_slices=critical_slices)
    return report


def test_gates_pass_fail_or_lack_evidence():
    truth = np.array([0] * 20 + [1] * 20)
    edge = truth.copy()
    edge[:2] = 1
    report = _report(truth, edge, two_site_splits())
    gates = evaluate_gates(report, "student-int8", {"argmax_agreement": 0.99}, EvaluateConfig(max_edge_drop=0.01))
    assert not gates["edge_accuracy_drop_vs_student"]["passed"]
    assert gates["edge_accuracy_drop_vs_student"]["outcome"] == "fail"
    assert gates["edge_accuracy_drop_vs_student"]["value"] == pytest.approx(0.05)
    assert "test accuracy 0.950 vs fp32 student 1.000" in gates["edge_accuracy_drop_vs_student"]["detail"]
    assert gates["edge_argmax_agreement_vs_student"]["outcome"] == "pass"
    # 40 rows cannot show a 3% (relative) margin: insufficient, with the rows that would decide it
    accuracy = gates["noninferior:accuracy"]
    assert accuracy["outcome"] == "insufficient" and not accuracy["passed"] and accuracy["rows_needed"] > 40
    assert "labelled rows would decide it" in accuracy["detail"]
    # no validation split: calibration cannot be measured, which is missing evidence, not a pass
    assert gates["calibration_ece"]["outcome"] == "insufficient" and "missing evidence" in gates["calibration_ece"]["detail"]
    assert gates["stress_flip_rate_vs_teacher"]["outcome"] == "insufficient"  # stress_rows=200 asked, none scored
    assert overall_outcome(gates) == "fail"
    loose = EvaluateConfig(max_edge_drop=0.05, stress_rows=0,
                           margins={"aggregate": 0.5, "class_recall": 0.5, "critical_slice": 0.5})
    gates = evaluate_gates(_report(truth, edge, two_site_splits(), cfg=loose), "student-int8",
                           {"argmax_agreement": 0.99}, loose)
    assert {k: g["outcome"] for k, g in gates.items() if g["outcome"] != "pass"} == {"calibration_ece": "insufficient"}
    assert "quantization" not in gates and not any(k.startswith("noninferior:slice") for k in gates)


def test_stress_gate_with_evidence_and_critical_slices_of_any_size():
    splits = three_class_splits()
    # real predictors over texts: the teacher ignores noise, the edge model breaks on any upper-case letter
    logits = {m: {s: fn(splits[s]["text"].tolist()) for s in ("test", "validation", "ood:far")}
              for m, fn in (("teacher", digit_teacher), ("student", digit_teacher), ("edge", case_fragile_edge))}
    report = gap_report(logits, splits, 0.02)  # no intervals: the clean texts lose nothing on any slice
    add_calibration_and_ood(report, logits, splits)
    add_stress(report, {"teacher": digit_teacher, "student": digit_teacher, "edge": case_fragile_edge}, splits,
               ["teacher", "student", "edge"], rows=40, seed=3)
    add_noninferiority(report, logits, splits, EvaluateConfig(), critical_slices={"site": ["a", "b", "tiny"]})
    gates = evaluate_gates(report, "edge", {"argmax_agreement": 1.0}, EvaluateConfig(),
                           critical_slices={"site": ["a", "b", "tiny"]})
    stress = gates["stress_flip_rate_vs_teacher"]
    assert stress["outcome"] == "fail" and "casing" in stress["detail"] and stress["value"] > 0.05
    # every declared slice is a gate: no slice is too small to count, and a small one lacks evidence
    assert {"noninferior:slice:site=a", "noninferior:slice:site=b", "noninferior:slice:site=tiny"} <= set(gates)
    assert gates["noninferior:slice:site=tiny"]["outcome"] == "insufficient"
    assert "calibration_ece" in gates and "ood_auroc_vs_teacher:far" in gates


def test_a_declared_critical_slice_never_compared_is_missing_evidence():
    truth = np.array([0] * 20 + [1] * 20)
    report = _report(truth, truth.copy(), two_site_splits())  # compared without the declared slice
    gates = evaluate_gates(report, "student-int8", {"argmax_agreement": 1.0}, EvaluateConfig(),
                           critical_slices={"site": ["a"]})
    gate = gates["noninferior:slice:site=a"]
    assert gate["outcome"] == "insufficient" and "declared but not compared" in gate["detail"]


def test_critical_slice_gate_fails_a_loss_shown_beyond_the_margin():
    splits = three_class_splits(n=120)
    truth = np.arange(120) % 3
    edge = truth.copy()
    site_b = (splits["test"]["site"] == "b").to_numpy()
    edge[np.flatnonzero(site_b)[::2]] = (truth[site_b][::2] + 1) % 3  # half of slice b wrong
    logits = {"teacher": {"test": np.eye(3)[truth] * 5}, "student": {"test": np.eye(3)[truth] * 5},
              "edge": {"test": np.eye(3)[edge] * 5}}
    report = gap_report(logits, splits, 0.02)
    add_noninferiority(report, logits, splits, EvaluateConfig(), critical_slices={"site": ["a", "b"]})
    gates = evaluate_gates(report, "edge", {"argmax_agreement": 1.0}, EvaluateConfig(),
                           critical_slices={"site": ["a", "b"]})
    gate = gates["noninferior:slice:site=b"]
    assert gate["outcome"] == "fail" and gate["value"] == pytest.approx(0.5, abs=0.05) and gate["low"] > 0.03
    assert gate["detail"].startswith("slice:site=b: drop +0.5")
    assert gates["noninferior:slice:site=a"]["outcome"] != "fail"


def test_an_edge_model_that_was_not_evaluated_fails_one_gate_with_the_reason():
    splits = three_class_splits()

    three, two = zeros_predictor(3), zeros_predictor(2)
    logits, _, missing = collect_outputs({"teacher": three, "student": three, "broken": two}, splits)
    report = gap_report(logits, splits, 0.02)
    report.not_evaluated += missing
    gates = evaluate_gates(report, "broken", {"argmax_agreement": 1.0}, EvaluateConfig())
    assert list(gates) == ["edge_evaluated"]
    assert not gates["edge_evaluated"]["passed"] and "3 classes" in gates["edge_evaluated"]["detail"]


def test_ood_gate_fails_a_drop_beyond_noise_and_passes_one_within_it():
    """The OOD AUROC gate fails only a drop beyond the threshold that its paired 95% interval confirms; a dozen
    OOD rows cannot tell a 0.09 step from noise (the CI failure on the tiny config: 0.038 on 64 rows)."""

    def run(n_ood, noise, shift, bootstrap_samples, seed=0):
        splits = three_class_splits()
        rng = np.random.default_rng(seed)
        frames = dict(splits.frames)
        frames["ood:far"] = pd.concat([frames["ood:far"]] * (n_ood // 60 + 1)).head(n_ood).reset_index(drop=True)
        frames["ood:far"]["id"] = [f"oo{i}" for i in range(n_ood)]
        splits = Splits(frames, splits.labels, ["site"])
        test = confident_logits(np.arange(60) % 3, rng, 2.0, 0.1)
        ood = (rng.normal(0, 1, (n_ood, 3)) * 1.5).astype(np.float32)
        edge_ood = ood + rng.normal(0, noise, ood.shape).astype(np.float32)  # a noisier copy of the teacher
        edge_ood[np.arange(n_ood), ood.argmax(1)] += shift  # and/or more confident on OOD rows
        logits = {"teacher": {"test": test, "validation": test, "ood:far": ood},
                  "student": {"test": test, "validation": test, "ood:far": ood},
                  "edge": {"test": test, "validation": test, "ood:far": edge_ood}}
        report = gap_report(logits, splits, 0.02)
        add_calibration_and_ood(report, logits, splits, bootstrap_samples=bootstrap_samples, seed=3)
        gate = evaluate_gates(report, "edge", {"argmax_agreement": 1.0}, EvaluateConfig())["ood_auroc_vs_teacher:far"]
        return gate, report.ood["ood:far"]["edge"]["msp"]

    gate, msp = run(12, 1.0, 0.0, 1000)  # 0.086 lower on 12 OOD rows: beyond 0.03, but the interval holds 0
    assert gate["value"] > 0.03 and msp["drop_vs_teacher"]["low"] <= 0 < msp["drop_vs_teacher"]["high"]
    assert gate["passed"] and "within noise" in gate["detail"]
    gate, _ = run(12, 1.0, 0.0, 0)  # no interval: the point drop alone decides
    assert not gate["passed"] and "interval" not in gate["detail"]
    gate, msp = run(600, 0.0, 1.0, 1000)  # a large, confirmed drop on 600 rows fails
    assert gate["value"] > 0.1 and msp["drop_vs_teacher"]["low"] > 0.03
    assert not gate["passed"] and "95% interval" in gate["detail"] and "noise" not in gate["detail"]


def test_quantization_gate_needs_a_checked_int8_primary_unless_fp32_is_allowed():
    def edge(primary, quantized, ok, reason):
        return SimpleNamespace(primary=primary, quantized=quantized, primary_ok=ok, reason=reason)

    assert quantization_gate(edge("int8", True, True, "INT8 via INC"), True) == \
        {"passed": True, "detail": "INT8 via INC"}
    assert quantization_gate(edge("int8", True, False, "agreement 0.80 < 0.95"), True) == \
        {"passed": False, "detail": "agreement 0.80 < 0.95"}
    fp32 = edge("fp32", False, True, "not quantized: no INT8 artifact was requested")
    assert not quantization_gate(fp32, True)["passed"]
    allowed = quantization_gate(fp32, False)
    assert allowed["passed"] and allowed["detail"].endswith("(allowed: quantize.require_int8=false)")
    truth = np.array([0] * 20 + [1] * 20)
    report = gap_report({m: {"test": one_hot_logits(truth)} for m in ("teacher", "student", "e")}, two_site_splits())
    gates = evaluate_gates(report, "e", {"argmax_agreement": 1.0}, EvaluateConfig(),
                           quantization=quantization_gate(fp32, True))
    assert gates["quantization"] == {"value": 0.0, "threshold": 1.0, "passed": False, "outcome": "fail",
                                     "detail": "not quantized: no INT8 artifact was requested"}


def test_verdict_markdown_names_the_failed_gates_and_what_was_not_evaluated():
    gates = {"retention_vs_teacher": {"value": 0.99, "threshold": 0.97, "passed": True, "detail": "e 0.9 / t 0.91"},
             "calibration_ece": {"value": 0.08, "threshold": 0.05, "passed": False, "detail": "ECE after T=1.2"}}
    md = verdict_markdown(gates, [{"model": "student-onnx", "suite": "all", "reason": "could not be loaded: x"}])
    lines = md.splitlines()
    assert lines[0] == "**Verdict: 1 gate(s) FAILED: calibration_ece** (@champion not moved)"
    assert "| retention_vs_teacher | 0.990 | 0.970 | pass | e 0.9 / t 0.91 |" in lines
    assert "| calibration_ece | 0.080 | 0.050 | **FAIL** | ECE after T=1.2 |" in lines
    assert "- not evaluated: `student-onnx` on all: could not be loaded: x" in lines
    gates["calibration_ece"]["passed"] = True
    assert verdict_markdown(gates).startswith("**Verdict: all gates passed.**\n")
    gates["noninferior:recall:negative"] = {"value": 0.108, "threshold": 0.05, "passed": False,
                                            "outcome": "insufficient", "inherited": False,
                                            "detail": "about 134 labelled rows would decide it"}
    gates["noninferior:recall:neutral"] = {"value": 0.0, "threshold": 0.05, "passed": True, "outcome": "pass",
                                           "inherited": True, "detail": "the teacher itself is at 0.00 here"}
    md = verdict_markdown(gates, waiver_hint="distill approve models:/x/1 ...").splitlines()
    assert md[0].startswith("**Verdict: insufficient evidence for 1 gate(s): noninferior:recall:negative** "
                            "(@challenger only") and "`distill approve models:/x/1 ...`" in md[0]
    assert "| noninferior:recall:negative | 0.108 | 0.050 | insufficient | about 134 labelled rows would decide it |" in md
    assert "- inherited limitation: recall:neutral: the teacher itself is at 0.00 here" in md


def test_gates_failed_names_each_failed_gate_its_value_threshold_and_evidence():
    failed = {"calibration_ece": {"value": 0.08, "threshold": 0.05, "passed": False, "detail": "ECE after T=1.2"},
              "registry_roundtrip": {"value": 0.0, "threshold": 1.0, "passed": False, "detail": "digest differs"}}
    err = gates_failed("demo-edge", failed)
    assert isinstance(err, GatesFailed) and isinstance(err, DistillError)  # one message, no traceback, in the CLI
    assert err.problem == ("demo-edge: gates failed (calibration_ece 0.080 (threshold 0.050): ECE after T=1.2; "
                           "registry_roundtrip 0.000 (threshold 1.000): digest differs); the staged versions were "
                           "rolled back, nothing is registered")
    assert "gap report" in err.fix
    assert failed_evidence(failed) in str(err)


def test_the_agreement_gate_reads_the_larger_unlabelled_sample_where_it_was_measured():
    from tasks.evaluate import edge_parity

    val_only = {"parity": {"argmax_agreement": 0.953, "n": 64, "finite": True}, "validation": None}
    assert edge_parity(val_only) == val_only["parity"]
    sampled = {"parity": {"argmax_agreement": 0.938, "n": 64, "finite": True},  # 4 rows of 64
               "validation": {"agreement": 0.991, "agreement_n": 336}}
    truth = np.array([0] * 20 + [1] * 20)
    report = gap_report({m: {"test": one_hot_logits(truth)} for m in ("teacher", "student", "e")}, two_site_splits())
    gate = evaluate_gates(report, "e", edge_parity(sampled), EvaluateConfig())["edge_argmax_agreement_vs_student"]
    assert gate["outcome"] == "pass" and gate["value"] == pytest.approx(0.991)
    assert "336 unlabelled training texts" in gate["detail"]


def test_the_teacher_must_beat_the_majority_answer_and_missing_evidence_is_insufficient():
    """The gate reads the teacher's own check (report.noninferiority["teacher"], against always answering the
    training split's most frequent class); a report without it has no evidence that the teacher learned anything:
    insufficient, never a pass."""
    truth = np.array([0] * 20 + [1] * 20)
    report = _report(truth, truth, two_site_splits())
    assert [c["check"] for c in report.noninferiority["teacher"]] == ["accuracy vs majority class"]
    gates = evaluate_gates(report, "student-int8", {"argmax_agreement": 1.0}, EvaluateConfig())
    assert gates["teacher_vs_majority_class"]["outcome"] == "pass"  # a perfect teacher on 40 rows of two classes
    del report.noninferiority["teacher"]
    g = evaluate_gates(report, "student-int8", {"argmax_agreement": 1.0}, EvaluateConfig())["teacher_vs_majority_class"]
    assert g["outcome"] == "insufficient" and "missing evidence" in g["detail"]


def test_a_redistillation_is_gated_against_the_champion_it_would_replace():
    """report.champion: the edge model against the champion in the teacher's place, same checks and margins; a loss
    shown beyond the margin fails, and a champion that could not be compared is missing evidence."""
    from distill_gap.evaluation.noninferiority import add_champion_comparison

    truth = np.array([0] * 200 + [1] * 200)
    worse = truth.copy()
    worse[:60] = 1  # 15 points below the champion on class 0
    logits = {"teacher": {"test": one_hot_logits(truth)}, "student": {"test": one_hot_logits(truth)},
              "student-int8": {"test": one_hot_logits(worse)}, "champion-v3": {"test": one_hot_logits(truth)}}
    test = pd.DataFrame({"id": [str(i) for i in range(400)], "text": "x", "label": ["a" if t == 0 else "b" for t in truth],
                         "site": "s"})
    splits = Splits({"train": test, "test": test}, ["a", "b"], ["site"])
    report = gap_report(logits, splits, 0.02)
    add_noninferiority(report, logits, splits, EvaluateConfig())
    add_champion_comparison(report, logits, splits, EvaluateConfig(), champion="champion-v3",
                            edge_model="student-int8")
    gates = evaluate_gates(report, "student-int8", {"argmax_agreement": 1.0}, EvaluateConfig())
    assert gates["vs_champion:accuracy"]["outcome"] == "fail" and gates["vs_champion:recall:a"]["outcome"] == "fail"
    assert gates["vs_champion:accuracy"]["detail"].startswith("vs champion-v3: ")
    assert report.to_dict()["champion"]["name"] == "champion-v3"
    add_champion_comparison(report, {k: v for k, v in logits.items() if k != "champion-v3"}, splits,
                            EvaluateConfig(), champion="champion-v3", edge_model="student-int8")
    g = evaluate_gates(report, "student-int8", {"argmax_agreement": 1.0}, EvaluateConfig())["vs_champion"]
    assert g["outcome"] == "insufficient" and "missing evidence" in g["detail"]
