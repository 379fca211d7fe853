"""Every gate of the pipeline in one module: thresholds, verdicts with their evidence, and GatesFailed.

Each gate has one of three outcomes (issue 19): pass, fail (harm shown) or insufficient (neither shown: the
evidence is too thin or missing). A failed gate stops the release; an insufficient one registers the version and
moves @challenger only, and @champion then needs a named approver's signed waiver (distill_gap/governance/waiver.py).
The teacher comparison is non-inferiority on the same rows (noninferiority.py): the aggregate accuracy, each
class's recall and each critical slice pass only when the edge model is shown to be no worse than the margin.

The quality gates (edge vs student and teacher, critical slices, calibration, OOD, stress) read a gap report; the
quantization gate reads the quantize stage's result; the release gate (tasks/register.py) adds the registry round
trip and raises GatesFailed. Thresholds are data returned by one function (mlops-stacks style), not literals.
"""

from __future__ import annotations

from distill_gap.edge.guard import NAMES
from distill_gap.errors import DistillError
from distill_gap.evaluation.noninferiority import describe
from distill_gap.outcomes import FAIL, INSUFFICIENT, PASS, by_outcome, gate_outcome

MIN_SLICE_ROWS = 10  # a slice with fewer teacher rows is not flagged in the gap report (gated slices: any size)


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
        ("the teacher itself is not better than always answering one class: retrain it (`distill teacher bootstrap "
         "--force`, more epochs or rows) or import a better one (`distill teacher import`), then run again; "
         if "teacher_vs_majority_class" in failed else "")
        + "read the gap report (Prefect artifact <name>-gap-report, MLflow evaluate run) and change the student, "
        "the quantization, or the evaluate.* thresholds")


def gate_thresholds(evaluate_cfg) -> dict[str, float]:
    """All promotion thresholds in one place (mlops-stacks style): data, not literals in code."""
    m = evaluate_cfg.margins
    return {"edge_accuracy_drop_vs_student": evaluate_cfg.max_edge_drop,
            "edge_argmax_agreement_vs_student": evaluate_cfg.min_edge_agreement,
            "noninferior:accuracy": m.aggregate,  # relative: x the teacher's test accuracy
            "noninferior:recall": m.class_recall,
            "noninferior:slice": m.critical_slice,
            "teacher_vs_majority_class": m.teacher_vs_majority,
            "calibration_ece": evaluate_cfg.max_ece,
            "ood_auroc_vs_teacher": evaluate_cfg.max_ood_auroc_drop,
            "stress_flip_rate_vs_teacher": evaluate_cfg.max_flip_rate_increase}


def _gate(value: float, threshold: float, passed: bool, detail: str, outcome: str | None = None) -> dict:
    outcome = outcome or (PASS if passed else FAIL)
    return {"value": float(value), "threshold": float(threshold), "passed": outcome == PASS, "outcome": outcome,
            "detail": detail}


def check_gate(c: dict) -> dict:
    """The gate of one paired check (distill_gap.evaluation.noninferiority): its outcome, bounds and rows needed."""
    g = _gate(c["drop"] if c["n"] else 0.0, c["margin"], False, describe(c), c["outcome"])
    g.update(rows_needed=c["rows_needed"], inherited=c["inherited"], low=c["low"], high=c["high"], n=c["n"])
    return g


def evaluate_gates(report, edge_model: str, edge_parity: dict, evaluate_cfg, *,
                   quantization: dict | None = None, critical_slices: dict[str, list[str]] | None = None
                   ) -> dict[str, dict]:
    """Each gate with its measured value, threshold, outcome (pass / fail / insufficient) and the evidence in one
    sentence.

    Evidence the config asks for but the report lacks (no paired comparison, no calibration, no stress suite, a
    declared critical slice never compared) is an insufficient gate, never a pass and never silently dropped; an OOD
    gate exists per OOD set the report holds. `quantization` comes from the quantize stage ({"passed", "detail"}).
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
        finite and agree >= limits["edge_argmax_agreement_vs_student"],
        f"{edge_model} on {edge_parity.get('where') or 'held-out validation texts'}")
    gates["edge_outputs_finite"] = _gate(float(finite), 1.0, finite, "no NaN or inf in the edge model's held-out logits")
    # the teacher comparison: non-inferiority on the same test rows, one gate per check (aggregate accuracy, each
    # class's recall, each critical slice); missing evidence is insufficient, never a pass
    checks = report.noninferiority.get(edge_model)
    if checks is None:
        gates["noninferior:accuracy"] = _gate(0.0, 0.0, False, f"no paired comparison of {edge_model} with the "
                                              "teacher on test (missing evidence)", INSUFFICIENT)
    compared = {c["check"] for c in checks or []}
    for column, values in (critical_slices or {}).items():  # declared but never compared: missing evidence
        for value in values:
            if checks is not None and f"slice:{column}={value}" not in compared:
                gates[f"noninferior:slice:{column}={value}"] = _gate(
                    0.0, limits["noninferior:slice"], False, f"critical slice {column}={value} was declared but "
                    "not compared with the teacher: missing evidence", INSUFFICIENT)
    for c in checks or []:
        gates[f"noninferior:{c['check']}"] = check_gate(c)
    # a redistillation: not shown worse than the champion it would replace, on the same checks (missing: insufficient)
    if report.champion:
        name = report.champion["name"]
        if report.champion.get("checks") is None:
            gates["vs_champion"] = _gate(0.0, 0.0, False, f"{edge_model} was not compared with {name}, the champion it "
                                         "would replace: missing evidence", INSUFFICIENT)
        for c in report.champion.get("checks") or []:
            g = check_gate(c)
            g["detail"] = f"vs {name}: {g['detail']}"
            gates[f"vs_champion:{c['check']}"] = g
    # the teacher itself must be shown to beat the majority-class answer: every check above is relative to it
    base = next(iter(report.noninferiority.get("teacher") or []), None)
    gates["teacher_vs_majority_class"] = check_gate(base) if base is not None else _gate(
        0.0, evaluate_cfg.margins.teacher_vs_majority, False, "the teacher was not compared with the majority-class "
        "answer on labelled test rows: missing evidence", INSUFFICIENT)
    if edge_model in report.calibration:
        e = report.calibration[edge_model]["ece_after"]
        gates["calibration_ece"] = _gate(e, limits["calibration_ece"], e <= limits["calibration_ece"],
                                         f"{edge_model} test ECE after temperature scaling "
                                         f"(T={report.calibration[edge_model]['temperature']:.2f})")
    else:
        gates["calibration_ece"] = _gate(0.0, limits["calibration_ece"], False, f"no calibration measured for "
                                         f"{edge_model} (it needs a validation split): missing evidence", INSUFFICIENT)
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
            name = NAMES.get(d, d)
            detail = f"{edge_model} {name} AUROC {a:.3f} vs teacher {ta:.3f} on {suite} (the shipped guard's detector)" \
                if d == det and d != "msp" else f"{edge_model} MSP AUROC {a:.3f} vs teacher {ta:.3f} on {suite}"
            if low is not None:
                detail += f"; drop {drop:+.3f}, 95% interval [{low:+.3f}, {high:+.3f}]" + (
                    " holds no drop: within noise" if noise else "")
            gates[f"ood_auroc_vs_teacher:{suite.removeprefix('ood:')}"] = _gate(drop, limit, not beyond or noise,
                                                                               detail)
    if evaluate_cfg.stress_rows and not any(edge_model in v for v in report.stress.values()):
        gates["stress_flip_rate_vs_teacher"] = _gate(0.0, limits["stress_flip_rate_vs_teacher"], False,
                                                     f"evaluate.stress_rows={evaluate_cfg.stress_rows} asks for stress "
                                                     f"suites, but none was scored for {edge_model}: missing evidence",
                                                     INSUFFICIENT)
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


def verdict_markdown(gates: dict[str, dict], not_evaluated: list[dict] | None = None, *,
                     waiver_hint: str | None = None) -> str:
    failed, thin = list(by_outcome(gates, FAIL)), list(by_outcome(gates, INSUFFICIENT))
    if failed:
        head = f"**Verdict: {len(failed)} gate(s) FAILED: {', '.join(failed)}** (@champion not moved)"
    elif thin:
        head = (f"**Verdict: insufficient evidence for {len(thin)} gate(s): {', '.join(thin)}** (@challenger only: "
                "@champion needs a named approver's signed waiver of these gates"
                + (f": `{waiver_hint}`" if waiver_hint else "") + ")")
    else:
        head = "**Verdict: all gates passed.**"
    label = {PASS: "pass", FAIL: "**FAIL**", INSUFFICIENT: "insufficient"}
    rows = ["| gate | value | threshold | result | evidence |", "|---|---|---|---|---|"]
    rows += [f"| {k} | {g['value']:.3f} | {g['threshold']:.3f} | {label[gate_outcome(g)]} | "
             f"{g.get('detail', '')} |" for k, g in gates.items()]
    inherited = [f"- inherited limitation: {k.removeprefix('noninferior:')}: {g.get('detail', '')}"
                 for k, g in gates.items() if g.get("inherited")]
    missing = [f"- not evaluated: `{m['model']}` on {m['suite']}: {m['reason']}" for m in not_evaluated or []]
    return "\n".join([head, "", *rows, "", *inherited, *missing, ""])
