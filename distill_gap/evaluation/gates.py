"""Every gate of the pipeline in one module: thresholds, verdicts with their evidence, and GatesFailed.

The quality gates (edge vs student and teacher, critical slices, calibration, OOD, stress) read a gap report; the
quantization gate reads the quantize stage's result; the release gate (tasks/register.py) adds the registry round
trip and raises GatesFailed. Thresholds are data returned by one function (mlops-stacks style), not literals.
"""

from __future__ import annotations

from distill_gap.errors import DistillError

MIN_SLICE_ROWS = 10  # a critical slice with fewer teacher rows is reported, not gated


class GatesFailed(DistillError):
    """The release gate refused the staged versions (the transaction rolls them back)."""


def failed_evidence(failed: dict[str, dict]) -> str:
    """The failed gates in one line: name, measured value, threshold and evidence of each."""
    return "; ".join(f"{k} {g['value']:.3f} (threshold {g['threshold']:.3f}): {g.get('detail', '')}"
                     for k, g in failed.items())


def gates_failed(edge_name: str, failed: dict[str, dict]) -> GatesFailed:
    """The error a release with failed gates stops with: what failed, that nothing was registered, where to look."""
    return GatesFailed(
        f"{edge_name}: gates failed ({failed_evidence(failed)}); the staged versions were rolled back, "
        "nothing is registered",
        "read the gap report (Prefect artifact <name>-gap-report, MLflow evaluate run) and change the student, "
        "the quantization, or the evaluate.* thresholds")


def gate_thresholds(evaluate_cfg) -> dict[str, float]:
    """All promotion thresholds in one place (mlops-stacks style): data, not literals in code."""
    return {"edge_accuracy_drop_vs_student": evaluate_cfg.max_edge_drop,
            "edge_argmax_agreement_vs_student": evaluate_cfg.min_edge_agreement,
            "retention_vs_teacher": evaluate_cfg.min_retention,
            "critical_slices": evaluate_cfg.max_critical_slice_drop,
            "calibration_ece": evaluate_cfg.max_ece,
            "ood_auroc_vs_teacher": evaluate_cfg.max_ood_auroc_drop,
            "stress_flip_rate_vs_teacher": evaluate_cfg.max_flip_rate_increase}


def _gate(value: float, threshold: float, passed: bool, detail: str) -> dict:
    return {"value": float(value), "threshold": float(threshold), "passed": bool(passed), "detail": detail}


def evaluate_gates(report, edge_model: str, edge_parity: dict, evaluate_cfg, *,
                   quantization: dict | None = None, critical_slices: dict[str, list[str]] | None = None
                   ) -> dict[str, dict]:
    """Each gate with its measured value, threshold, verdict and the evidence in one sentence.

    Gates whose evidence the report does not hold (no OOD set, no stress suite, no validation split) are not
    added; `quantization` comes from the quantize stage ({"passed", "detail"}).
    """
    limits = gate_thresholds(evaluate_cfg)
    gates: dict[str, dict] = {}
    if edge_model not in report.suites.get("test", {}) or "accuracy" not in report.suites["test"][edge_model]:
        gates["edge_evaluated"] = _gate(0.0, 1.0, False, f"{edge_model} could not be evaluated on test: " + "; ".join(
            x["reason"] for x in report.not_evaluated if x["model"] == edge_model))
        return gates
    student, edge, teacher = (report.metric("test", m) for m in ("student", edge_model, "teacher"))
    drop = student - edge
    gates["edge_accuracy_drop_vs_student"] = _gate(drop, limits["edge_accuracy_drop_vs_student"],
                                                   drop <= limits["edge_accuracy_drop_vs_student"] + 1e-12,
                                                   f"{edge_model} test accuracy {edge:.3f} vs fp32 student {student:.3f}")
    agree, finite = edge_parity["argmax_agreement"], bool(edge_parity.get("finite", True))
    gates["edge_argmax_agreement_vs_student"] = _gate(
        agree, limits["edge_argmax_agreement_vs_student"],
        finite and agree >= limits["edge_argmax_agreement_vs_student"], f"{edge_model} on held-out validation texts")
    gates["edge_outputs_finite"] = _gate(float(finite), 1.0, finite, "no NaN or inf in the edge model's held-out logits")
    retention = edge / teacher if teacher else 0.0
    gates["retention_vs_teacher"] = _gate(retention, limits["retention_vs_teacher"],
                                          retention >= limits["retention_vs_teacher"] - 1e-12,
                                          f"{edge_model} test accuracy {edge:.3f} / teacher {teacher:.3f}")
    # critical slices: fail when the loss is beyond the threshold AND the model's whole 95% interval lies below
    # the teacher's accuracy (a loss the interval cannot explain); too-small slices are reported, not gated
    losses, checked = [], 0
    for column, values in (critical_slices or {}).items():
        for value in values:
            by_model = report.suites.get(f"slice:{column}={value}", {})
            t, e = by_model.get("teacher", {}), by_model.get(edge_model, {})
            if "accuracy" not in e or t.get("n", 0) < MIN_SLICE_ROWS:
                continue
            checked += 1
            gap = t["accuracy"] - e["accuracy"]
            high = ((e.get("ci") or {}).get("accuracy") or {}).get("high")
            if gap > limits["critical_slices"] and (high is None or high < t["accuracy"]):
                losses.append(f"{column}={value} {-gap:+.3f} (n={e['n']})")
    if critical_slices:
        worst = max([0.0] + [report.metric(f"slice:{c}={v}", "teacher") - report.metric(f"slice:{c}={v}", edge_model)
                             for c, vs in critical_slices.items() for v in vs
                             if report.metric(f"slice:{c}={v}", edge_model) is not None])
        gates["critical_slices"] = _gate(worst, limits["critical_slices"], not losses,
                                         ("losses beyond the interval: " + ", ".join(losses)) if losses else
                                         f"{checked} critical slice(s) checked, none loses beyond "
                                         f"{limits['critical_slices']:.0%} with its interval")
    if edge_model in report.calibration:
        e = report.calibration[edge_model]["ece_after"]
        gates["calibration_ece"] = _gate(e, limits["calibration_ece"], e <= limits["calibration_ece"],
                                         f"{edge_model} test ECE after temperature scaling "
                                         f"(T={report.calibration[edge_model]['temperature']:.2f})")
    # OOD: fail when the AUROC drop is beyond the threshold AND its paired 95% interval excludes no drop (a loss
    # the rows cannot explain), like the critical slices; without an interval (bootstrap_samples=0, < 10 rows on
    # a side) the point drop alone decides. A 0.03 AUROC step is within noise on a few dozen OOD rows.
    # The detector compared is the one that ships (report.scope: evaluation parity for the guard), else MSP.
    det = (report.scope.get(edge_model) or {}).get("detector", "msp")
    for suite, by_model in report.ood.items():
        if edge_model in by_model and "teacher" in by_model:
            d = det if det in by_model[edge_model] and det in by_model["teacher"] else "msp"
            a, ta = by_model[edge_model][d]["auroc"], by_model["teacher"][d]["auroc"]
            drop, limit = ta - a, limits["ood_auroc_vs_teacher"]
            ci = by_model[edge_model][d].get("drop_vs_teacher") or {}
            low, high = ci.get("low"), ci.get("high")
            beyond = drop > limit + 1e-12
            noise = beyond and low is not None and low <= 0
            name = {"msp": "MSP", "energy": "energy", "mahalanobis": "Mahalanobis", "knn": "kNN"}.get(d, d)
            detail = f"{edge_model} {name} AUROC {a:.3f} vs teacher {ta:.3f} on {suite} (the shipped guard's detector)" \
                if d == det and d != "msp" else f"{edge_model} MSP AUROC {a:.3f} vs teacher {ta:.3f} on {suite}"
            if low is not None:
                detail += f"; drop {drop:+.3f}, 95% interval [{low:+.3f}, {high:+.3f}]" + (
                    " holds no drop: within noise" if noise else "")
            gates[f"ood_auroc_vs_teacher:{suite.removeprefix('ood:')}"] = _gate(drop, limit, not beyond or noise,
                                                                               detail)
    if report.stress:
        worst_variant, worst_excess = None, -1.0
        for variant, by_model in report.stress.items():
            if edge_model in by_model and "teacher" in by_model:
                excess = by_model[edge_model]["flip_rate"] - by_model["teacher"]["flip_rate"]
                if excess > worst_excess:
                    worst_variant, worst_excess = variant, excess
        if worst_variant is not None:
            gates["stress_flip_rate_vs_teacher"] = _gate(
                worst_excess, limits["stress_flip_rate_vs_teacher"],
                worst_excess <= limits["stress_flip_rate_vs_teacher"] + 1e-12,
                f"worst variant {worst_variant}: {edge_model} flips "
                f"{report.stress[worst_variant][edge_model]['flip_rate']:.3f} vs teacher "
                f"{report.stress[worst_variant]['teacher']['flip_rate']:.3f}")
    if quantization is not None:
        gates["quantization"] = _gate(float(quantization["passed"]), 1.0, quantization["passed"], quantization["detail"])
    return gates


def quantization_gate(edge, require_int8: bool) -> dict:
    """{"passed", "detail"}: the primary is INT8 and passed its checks (or fp32 is allowed by require_int8=false,
    quantize.require_int8 in the config)."""
    if edge.quantized:
        return {"passed": edge.primary_ok, "detail": edge.reason}
    if edge.primary == "fp32" and not require_int8:
        return {"passed": True, "detail": edge.reason + " (allowed: quantize.require_int8=false)"}
    return {"passed": False, "detail": edge.reason}


def verdict_markdown(gates: dict[str, dict], not_evaluated: list[dict] | None = None) -> str:
    failed = [k for k, g in gates.items() if not g["passed"]]
    head = ("**Verdict: all gates passed.**" if not failed else
            f"**Verdict: {len(failed)} gate(s) FAILED: {', '.join(failed)}** (@champion not moved)")
    rows = ["| gate | value | threshold | result | evidence |", "|---|---|---|---|---|"]
    rows += [f"| {k} | {g['value']:.3f} | {g['threshold']:.3f} | {'pass' if g['passed'] else '**FAIL**'} | "
             f"{g.get('detail', '')} |" for k, g in gates.items()]
    missing = [f"- not evaluated: `{m['model']}` on {m['suite']}: {m['reason']}" for m in not_evaluated or []]
    return "\n".join([head, "", *rows, "", *missing, ""])
