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
from flows.config import EvaluateConfig
from tests.distill_gap.evaluation.synthetic import (case_fragile_edge, confident_logits, digit_teacher,
                                                    one_hot_logits, three_class_splits, two_site_splits,
                                                    zeros_predictor)


def test_thresholds_are_the_evaluate_config():
    cfg = EvaluateConfig(max_edge_drop=0.04, max_ood_auroc_drop=0.2)
    limits = gate_thresholds(cfg)
    assert limits["edge_accuracy_drop_vs_student"] == 0.04 and limits["ood_auroc_vs_teacher"] == 0.2
    assert limits["retention_vs_teacher"] == cfg.min_retention and len(limits) == 7


def test_gates_pass_and_fail_on_thresholds():
    truth = np.array([0] * 20 + [1] * 20)
    edge = truth.copy()
    edge[:2] = 1
    report = gap_report({"teacher": {"test": one_hot_logits(truth)}, "student": {"test": one_hot_logits(truth)},
                         "student-int8": {"test": one_hot_logits(edge)}}, two_site_splits(), 0.02)
    gates = evaluate_gates(report, "student-int8", {"argmax_agreement": 0.99}, EvaluateConfig(max_edge_drop=0.01))
    assert not gates["edge_accuracy_drop_vs_student"]["passed"]
    assert gates["edge_accuracy_drop_vs_student"]["value"] == pytest.approx(0.05)
    assert "test accuracy 0.950 vs fp32 student 1.000" in gates["edge_accuracy_drop_vs_student"]["detail"]
    assert gates["edge_argmax_agreement_vs_student"]["passed"]
    gates = evaluate_gates(report, "student-int8", {"argmax_agreement": 0.99},
                           EvaluateConfig(max_edge_drop=0.05, min_retention=0.9))
    assert all(g["passed"] for g in gates.values())
    assert "critical_slices" not in gates and "quantization" not in gates  # no evidence asked for: no gate


def test_stress_and_critical_slice_gates_with_evidence():
    splits = three_class_splits()
    # real predictors over texts: the teacher ignores noise, the edge model breaks on any upper-case letter
    logits = {m: {s: fn(splits[s]["text"].tolist()) for s in ("test", "validation", "ood:far")}
              for m, fn in (("teacher", digit_teacher), ("student", digit_teacher), ("edge", case_fragile_edge))}
    report = gap_report(logits, splits, 0.02)  # no intervals: the clean texts lose nothing on any slice
    add_calibration_and_ood(report, logits, splits)
    add_stress(report, {"teacher": digit_teacher, "student": digit_teacher, "edge": case_fragile_edge}, splits,
               ["teacher", "student", "edge"], rows=40, seed=3)
    gates = evaluate_gates(report, "edge", {"argmax_agreement": 1.0}, EvaluateConfig(),
                           critical_slices={"site": ["a", "b", "tiny"]})
    stress = gates["stress_flip_rate_vs_teacher"]
    assert not stress["passed"] and "casing" in stress["detail"] and stress["value"] > 0.05
    assert gates["critical_slices"]["passed"]  # the tiny slice is reported, not gated
    assert "2 critical slice(s) checked" in gates["critical_slices"]["detail"]
    assert "calibration_ece" in gates and "ood_auroc_vs_teacher:far" in gates


def test_critical_slice_gate_fails_a_loss_its_interval_confirms():
    splits = three_class_splits(n=120)
    truth = np.arange(120) % 3
    edge = truth.copy()
    site_b = (splits["test"]["site"] == "b").to_numpy()
    edge[np.flatnonzero(site_b)[::2]] = (truth[site_b][::2] + 1) % 3  # half of slice b wrong
    logits = {"teacher": {"test": np.eye(3)[truth] * 5}, "student": {"test": np.eye(3)[truth] * 5},
              "edge": {"test": np.eye(3)[edge] * 5}}
    report = gap_report(logits, splits, 0.02, bootstrap_samples=200)
    gate = evaluate_gates(report, "edge", {"argmax_agreement": 1.0}, EvaluateConfig(),
                          critical_slices={"site": ["a", "b"]})["critical_slices"]
    assert not gate["passed"] and gate["value"] == pytest.approx(0.5, abs=0.05)
    assert gate["detail"].startswith("losses beyond the interval: site=b -0.5")


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
    assert gates["quantization"] == {"value": 0.0, "threshold": 1.0, "passed": False,
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
