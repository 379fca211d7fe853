"""The quantize stage: every edge artifact of the distilled student (INC INT8 by accuracy-aware autotune, fp32
ONNX, ONNX Runtime INT8), each checked against the fp32 student and for batch independence (a row alone vs in a
batch), in one edge folder with edge.json naming the primary. The toolchains live in distill_gap/edge/
(inc_quantization, onnx_export); this module runs them as Prefect tasks, picks the primary and records the result.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.edge.checks import artifact_check, batch_independence, logit_parity
from distill_gap.edge.folder import EDGE_ARTIFACTS, EDGE_FILE, INT8_ARTIFACTS, EdgeBuild
from distill_gap.edge.inc_quantization import Int8Result, autotune_int8
from distill_gap.edge.onnx_export import OnnxResult, export_onnx, quantize_onnx_int8
from distill_gap.errors import DistillError
from distill_gap.evaluation.noninferiority import accuracy_goal
from distill_gap.governance.attestation import export_statement, quantize_statement
from distill_gap.inference.predictor import load_predictor
from tasks.attest import attest_task

# held-out rows each predicted alone and in one batch of 32 (checks.batch_independence) for every artifact
_BATCH_CHECK_ROWS, _BATCH_CHECK_SIZE = 16, 32


def primary_order(qcfg) -> list[str]:
    """The INT8 artifacts in the order the primary is chosen among those that pass (quantize.primary)."""
    return (qcfg.primary if qcfg.primary != "auto" else "onnx-int8,int8").split(",")


def quantize_samples(train, qcfg, *, seed: int, agreement_seed: int | None = None) -> tuple[list[str], list[str]]:
    """(calibration texts, agreement texts): seeded samples of the training split, disjoint; the agreement sample
    is used unlabelled (`agreement_seed`, default `seed`, re-draws it alone)."""
    calib_rows = train.sample(min(qcfg.calibration_samples, len(train)), random_state=seed)
    rest = train.drop(index=calib_rows.index)
    agree = rest.sample(min(qcfg.agreement_samples, len(rest)), random_state=seed if agreement_seed is None
                        else agreement_seed)
    return calib_rows["text"].tolist(), agree["text"].tolist()


def quantize_stage(student_dir, out_dir, *, calibration_texts: list[str], val_texts: list[str], val_label_ids,
                   qcfg, max_length: int, batch_size: int = 32, seed: int = 13, min_agreement: float = 0.95,
                   agreement_texts: list[str] | None = None, log=print) -> EdgeBuild:
    """Build every edge artifact (Prefect tasks), check each against the fp32 student, pick the primary.

    The fp32 student's validation logits (and its logits on `agreement_texts`, unlabelled training texts) are
    computed once here: every artifact's parity and accuracy goal (noninferiority.accuracy_goal: not shown to lose more than
    qcfg.tolerable_loss on validation, paired; argmax agreement on the unlabelled sample) uses them. Every artifact is also checked for batch independence (qcfg.max_batch_prob_diff): one that fails cannot
    be primary. A stage that cannot build its artifact (an architecture torch.export or optimum cannot handle) is
    recorded with its error and the others go on; with no INT8 artifact at all the edge model is the fp32 student,
    marked as not quantized.
    """
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    student = load_predictor(student_dir, runtime="transformers", max_length=max_length)
    labels = student.labels
    reference = student.predict_logits(val_texts, batch_size=batch_size)  # (N, C) the fp32 student, once
    agreement_texts = list(agreement_texts or [])
    reference_sample = student.predict_logits(agreement_texts, batch_size=batch_size) if agreement_texts else None
    del student
    label_ids = np.asarray(val_label_ids)
    artifacts: dict[str, dict] = {}
    errors: list[dict] = []
    tuning = None

    def batch_check(predictor) -> dict:
        return batch_independence(predictor, val_texts, limit=qcfg.max_batch_prob_diff, rows=_BATCH_CHECK_ROWS,
                                  batch_size=_BATCH_CHECK_SIZE)

    def goal(predictor) -> dict:
        return accuracy_goal(reference, predictor.predict_logits(val_texts, batch_size=batch_size), label_ids,
                             tolerable_loss=qcfg.tolerable_loss, reference_sample=reference_sample,
                             candidate_sample=None if reference_sample is None else
                             predictor.predict_logits(agreement_texts, batch_size=batch_size),
                             min_agreement=min_agreement)

    def record(name: str, result: Int8Result | OnnxResult, with_goal: bool, **extra) -> None:
        runtime, report_name = EDGE_ARTIFACTS[name]
        predictor = load_predictor(result.path, runtime=runtime, max_length=max_length)
        batch = batch_check(predictor)
        validation = goal(predictor) if with_goal else None
        ok, why = artifact_check(result.parity, validation, min_agreement, batch)
        artifacts[name] = {"path": name, "runtime": runtime, "report_name": report_name,
                           "size_bytes": result.size_bytes, "digest": result.digest, "parity": result.parity,
                           "validation": validation, "batch_independence": batch, "ok": ok, "check": why,
                           "seconds": round(result.seconds, 1), **extra}
        log(f"{name}: {result.size_bytes / 1e6:.1f} MB, argmax agreement {result.parity['argmax_agreement']:.3f}, "
            f"max |logit diff| {result.parity['max_abs_logit_diff']}, batch max |prob diff| "
            f"{batch['max_abs_prob_diff']}; {'ok' if ok else 'FAILS: ' + why}")

    def failed(err: DistillError) -> None:
        errors.append({"stage": str(err.problem).split(":")[0], "problem": err.problem, "fix": err.fix})
        log(f"not built: {err.problem} (fix: {err.fix})")

    # 1. INC INT8: accuracy-aware autotune over the configured candidates
    if qcfg.inc:
        try:
            int8 = autotune_task(student_dir, calibration_texts, val_texts, label_ids, val_texts, out / "int8",
                                 tolerable_loss=qcfg.tolerable_loss, max_trials=qcfg.max_trials,
                                 candidates=list(qcfg.candidates), max_length=max_length, batch_size=batch_size,
                                 seed=seed, reference=reference)
            tuning = int8.tuning.to_dict()
            record("int8", int8, True, candidate=int8.approach)
        except DistillError as err:
            failed(err)
    # 2. fp32 ONNX, and ONNX Runtime INT8 from it
    onnx = None
    if qcfg.onnx or qcfg.onnx_int8:
        try:
            onnx = export_onnx_task(student_dir, out / "onnx", heldout_texts=val_texts, max_length=max_length,
                                    reference=reference)
            record("onnx", onnx, False)
        except DistillError as err:
            failed(err)
    if onnx is not None and qcfg.onnx_int8:
        try:
            oq = quantize_onnx_task(onnx.path, out / "onnx-int8", heldout_texts=val_texts,
                                    calibration_texts=calibration_texts, max_length=max_length,
                                    embedding_bits=qcfg.onnx_embedding_bits, reference=reference)
            record("onnx-int8", oq, True)
        except DistillError as err:
            failed(err)
    if not qcfg.onnx and "onnx" in artifacts:  # exported only as the source of the ONNX INT8 model
        shutil.rmtree(out / "onnx", ignore_errors=True)
        del artifacts["onnx"]
    # 3. the primary. auto: ONNX INT8 first. Measured on the demo (benchmarks/RESULTS.md, 2-core AVX2 CPU): 1.93x
    # the fp32 student at batch 32 vs 1.58x for compiled INC INT8, 11.2 vs 17.9 MB, 273 vs 751 MB RSS, 0.3 s load
    # vs 23 s compile
    built = [a for a in primary_order(qcfg) if a in artifacts]
    passing = [a for a in built if artifacts[a]["ok"]]
    if passing:
        primary = passing[0]
        reason = f"{primary}: {artifacts[primary]['check']}"
    elif built:
        primary = built[0]
        reason = ("no INT8 artifact passed its checks (" + "; ".join(f"{a}: {artifacts[a]['check']}" for a in built) +
                  f"); {primary} kept for the record")
    else:
        primary = "fp32"
        artifacts["fp32"] = _fp32_artifact(student_dir, out / "fp32", reference, max_length, batch_check)
        reason = ("not quantized: " + "; ".join(e["problem"] for e in errors)) if errors else \
            "not quantized: no INT8 artifact was requested"
        log(f"edge model is the fp32 student, NOT quantized ({reason})")
    build = EdgeBuild(path=out, primary=primary, quantized=primary in INT8_ARTIFACTS, artifacts=artifacts,
                      tuning=tuning, errors=errors, reason=reason, labels=labels, max_length=max_length)
    build.write()  # edge.json, then the folder's digest (once)
    return build


def _fp32_artifact(student_dir, out: Path, reference: np.ndarray, max_length: int, batch_check) -> dict:
    """The fp32 student copied in as the edge model when no INT8 artifact was built, with its batch check."""
    from distill_gap.digest import folder_bytes, model_digest

    shutil.copytree(student_dir, out)
    parity = logit_parity(reference, reference)
    batch = batch_check(load_predictor(out, runtime="transformers", max_length=max_length))
    ok, why = artifact_check(parity, None, 0.0, batch)
    return {"path": out.name, "runtime": "transformers", "report_name": "student", "size_bytes": folder_bytes(out),
            "digest": model_digest(out), "parity": parity, "validation": None, "batch_independence": batch,
            "ok": ok, "check": "the fp32 student itself; batch-independent" if ok else why}


def tuning_markdown(edge: EdgeBuild) -> str:
    """The quantize stage for the Prefect UI: every autotune trial and every artifact with its checks."""
    lines = [f"## Quantization: primary `{edge.primary}` ({'INT8' if edge.quantized else 'NOT quantized'})", "",
             edge.reason, ""]
    t = edge.tuning
    if t:
        lines += [f"INC autotune on {t['metric']}: fp32 student {t['baseline']:.4f}, goal >= {t['goal']:.4f} "
                  f"(tolerable loss {t['tolerable_loss']:.1%}, max {t['max_trials']} trials). {t['reason']}.", "",
                  "| trial | candidate | accuracy | relative loss | goal met | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['index']} | {r['name']} | {r['metric']:.4f} | {r['relative_loss']:+.2%} | "
                  f"{'yes' if r['met_goal'] else 'no'} | {r['seconds']} |" for r in t["trials"]]
        lines.append("")
    lines += ["| artifact | runtime | size MB | argmax agreement | max abs logit diff | batch max abs prob diff | "
              "check |", "|---|---|---|---|---|---|---|"]
    for name, a in edge.artifacts.items():
        p, b = a["parity"], a.get("batch_independence") or {}
        diff = "NaN/inf" if p["max_abs_logit_diff"] is None else f"{p['max_abs_logit_diff']:.4f}"
        batch = "-" if not b else "NaN/inf" if b["max_abs_prob_diff"] is None else f"{b['max_abs_prob_diff']:.1e}"
        lines.append(f"| {name}{' (primary)' if name == edge.primary else ''} | {a['runtime']} | "
                     f"{a['size_bytes'] / 1e6:.1f} | {p['argmax_agreement']:.3f} | {diff} | {batch} | "
                     f"{'ok' if a['ok'] else 'FAIL'}: {a['check']} |")
    for e in edge.errors:
        lines.append(f"\n**not built**: {e['problem']} (fix: {e['fix']})")
    return "\n".join(lines) + "\n"


def quantize_edge(quantize_cfg, splits, student_dir, out_dir, *, name: str, max_length: int,
                  min_edge_agreement: float, seed: int, client=None, run_id: str | None = None,
                  log=print) -> EdgeBuild:
    """The pipeline's quantize step: seeded calibration sample, validation goal, edge folder, records.

    `quantize_cfg` is the config's quantize section. Logs the trials and edge.json to MLflow run `run_id` and a
    markdown artifact to the Prefect UI.
    """
    import tempfile

    from prefect.artifacts import create_markdown_artifact

    train, val = splits["train"], splits["validation"]
    calib, agree = quantize_samples(train, quantize_cfg, seed=seed)
    label_id = {label: i for i, label in enumerate(splits.labels)}
    edge = quantize_stage(student_dir, out_dir, calibration_texts=calib, val_texts=val["text"].tolist(),
                          val_label_ids=val["label"].map(label_id).to_numpy(), qcfg=quantize_cfg,
                          max_length=max_length, seed=seed, min_agreement=min_edge_agreement, agreement_texts=agree,
                          log=log)
    md = tuning_markdown(edge)
    create_markdown_artifact(key=f"{name}-quantization", markdown=md,
                             description=f"INC autotune trials and edge artifacts of {name}")
    if client is not None:
        for t in (edge.tuning or {}).get("trials", []):
            client.log_metric(run_id, "quantize.trial_accuracy", t["metric"], step=t["index"])
        for artifact, a in edge.artifacts.items():
            client.log_metric(run_id, f"edge.{artifact}.size_bytes", a["size_bytes"])
            client.log_metric(run_id, f"edge.{artifact}.argmax_agreement", a["parity"]["argmax_agreement"])
            if (a.get("batch_independence") or {}).get("max_abs_prob_diff") is not None:
                client.log_metric(run_id, f"edge.{artifact}.batch_max_abs_prob_diff",
                                  a["batch_independence"]["max_abs_prob_diff"])
        client.set_tag(run_id, "edge.primary", edge.primary)
        client.set_tag(run_id, "edge.quantized", str(edge.quantized).lower())
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "quantization.md").write_text(md)
            shutil.copy2(edge.path / EDGE_FILE, Path(tmp) / EDGE_FILE)
            client.log_artifacts(run_id, tmp, "quantization")
    return edge


@step("quantize", cache_policy=NO_CACHE)
def quantize_task(run, quantize_cfg, *, student, splits, max_length: int, min_edge_agreement: float,
                  seed: int) -> EdgeBuild:
    """The run's `quantize` stage: the edge folder built and recorded, then the quantize and export steps attested
    (never retried: a failure is deterministic)."""
    from prefect.logging import get_run_logger

    with run.stage("quantize") as stage_run_id:
        edge = quantize_edge(quantize_cfg, splits, student.path, run.workdir / "edge", name=run.name,
                             max_length=max_length, min_edge_agreement=min_edge_agreement, seed=seed,
                             client=run.client, run_id=stage_run_id, log=get_run_logger().info)
    attest_task(run, quantize_statement(quantize_cfg, min_edge_agreement=min_edge_agreement,
                                        student_model_name=run.student_model_name, edge=edge, student=student,
                                        splits=splits, context=run.context))
    attest_task(run, export_statement(max_length=max_length, min_edge_agreement=min_edge_agreement,
                                      student_model_name=run.student_model_name, edge=edge, student=student,
                                      context=run.context))
    return edge


@step("quantize-int8", cache_policy=NO_CACHE)
def autotune_task(student_dir, calibration_texts, val_texts, val_label_ids, heldout_texts, out_dir, **kwargs):
    """INC accuracy-aware autotune (never retried: a failure is deterministic)."""
    from prefect.logging import get_run_logger

    return autotune_int8(student_dir, calibration_texts, val_texts, val_label_ids, heldout_texts, out_dir,
                         log=get_run_logger().info, **kwargs)


@step("export-onnx", cache_policy=NO_CACHE)
def export_onnx_task(student_dir, out_dir, **kwargs) -> OnnxResult:
    """Export the fp32 student to ONNX and measure ONNX Runtime parity (never retried: deterministic)."""
    return export_onnx(student_dir, out_dir, **kwargs)


@step("quantize-onnx-int8", cache_policy=NO_CACHE)
def quantize_onnx_task(onnx_dir, out_dir, **kwargs) -> OnnxResult:
    """ONNX Runtime INT8 of the fp32 ONNX student (never retried: deterministic)."""
    return quantize_onnx_int8(onnx_dir, out_dir, **kwargs)
