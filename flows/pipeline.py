"""The distill-pipeline flow: validate -> soft labels -> distill -> quantize -> evaluate -> register -> promote.

The flow composes tasks and nothing else (STYLE.md); each stage lives in tasks/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.transactions import transaction

from flows.config import PipelineConfig
from distill_gap.governance.attestation import (ATTESTATION_DIR, distill_statement, evaluate_statement, export_statement,
                          quantize_statement, soft_labels_statement)
from tasks.data import load_data
from distill_gap.digest import model_digest, tokenizer_digest
from tasks.distill import distill_task
from distill_gap.evaluation.gates import evaluate_gates, quantization_gate
from tasks.evaluate import evaluate_task, publish_report_task
from tasks.quantize import quantize_edge
from distill_gap.registry.pyfunc import log_split_inputs
from tasks.promote import promote_task
from distill_gap.ops.crash_recovery import reap
from tasks.register import (attest_task, check_teacher_license, client_for, register_task, release_task, stage_run,
                            start_pipeline_run)
from distill_gap.ops.runtime import configure_threads, select_device
from tasks.soft_labels import soft_labels_stage
from tasks.teacher import resolve_teacher_task
from tasks.validate import validate_data

WORK_ROOT = Path(".distill/work")


@flow(name="distill-pipeline", log_prints=True)
def distill_pipeline(config: PipelineConfig, trigger_reason: str = "manual") -> dict:
    """Distill the pinned teacher into a student and an INT8 edge model, evaluate each, register, promote."""
    cfg = config
    configure_threads(cfg.runtime.threads)
    device = select_device(cfg.runtime.device)
    client = client_for(cfg.tracking)
    reap(client, cfg.tracking)  # runs whose process was killed (SIGKILL) are marked KILLED/Crashed, not left RUNNING
    run_id = start_pipeline_run(client, cfg, trigger_reason=trigger_reason, flow_run_id=flow_run.get_id())
    ctx = {"mlflow_run_id": run_id, "prefect_flow_run_id": str(flow_run.get_id())}
    workdir = WORK_ROOT / run_id
    try:
        with stage_run(client, run_id, "validate"):
            splits = load_data(cfg.data, cfg.seed)
            validate_data(splits.frames, splits.labels, splits.slice_columns)
        log_split_inputs(client, run_id, splits, sources=cfg.data.model_dump(include={"train", "validation", "test"}))
        teacher = resolve_teacher_task(cfg)
        license_override = check_teacher_license(teacher, cfg.governance)
        client.log_dict(run_id, {"data": splits.digests(), "teacher": teacher.summary()}, "lineage/inputs.json")
        train = splits["train"]
        sl = cfg.soft_labels
        with stage_run(client, run_id, "soft-labels"):
            soft = soft_labels_stage(
                sl.store, teacher_dir=teacher.path, teacher_digest=teacher.digest,
                tokenizer_digest=tokenizer_digest(teacher.path), data_digest=splits.digests()["train"],
                ids=train["id"].tolist(), texts=train["text"].tolist(), labels=splits.labels,
                max_length=cfg.runtime.max_length, batch_size=sl.batch_size, shard_size=sl.shard_size, dtype=sl.dtype,
                top_k=sl.top_k, device=device, engine=sl.engine, task_runner=sl.task_runner,
                dask_address=sl.dask_address, dask_workers=sl.dask_workers, threads=cfg.runtime.threads,
                retry_delays=sl.retry_delays,
                teacher_meta={"name": teacher.name, "version": teacher.version})
        attest_task(client, run_id, cfg.governance, soft_labels_statement(cfg, soft, teacher, splits, ctx))
        with stage_run(client, run_id, "distill") as rid:
            student = distill_task(teacher.path, splits, soft, cfg.distill, workdir,
                                   critical_slices=cfg.data.critical_slices, max_length=cfg.runtime.max_length,
                                   seed=cfg.seed, device=device, client=client, run_id=rid)
        attest_task(client, run_id, cfg.governance, distill_statement(cfg, student, soft, teacher, splits, ctx))
        with stage_run(client, run_id, "quantize") as rid:
            edge = quantize_edge(cfg, splits, student.path, workdir / "edge", client=client, run_id=rid)
        attest_task(client, run_id, cfg.governance, quantize_statement(cfg, edge, student, splits, ctx))
        attest_task(client, run_id, cfg.governance, export_statement(cfg, edge, student, ctx))
        models = {"teacher": teacher.path, "student": student.path}
        if student.baseline is not None:
            models["student-hard"] = student.baseline.path  # what distillation bought, in the same report
        for art in edge.artifacts.values():
            if art["report_name"] not in models:
                models[art["report_name"]] = edge.path / art["path"]
        with stage_run(client, run_id, "evaluate") as rid:
            report = evaluate_task(models, splits, cfg.evaluate, cfg.drift, seed=cfg.seed,
                                   max_length=cfg.runtime.max_length, device=device, edge_model=edge.report_name,
                                   edge_folder=edge.path, client=client, run_id=rid)
            gates = evaluate_gates(report, edge.report_name, edge.artifacts[edge.primary]["parity"], cfg.evaluate,
                                   quantization=quantization_gate(edge, cfg.quantize),
                                   critical_slices=cfg.data.critical_slices)
            publish_report_task(report, gates, cfg.name, client=client, run_id=rid)
        attest_task(client, run_id, cfg.governance, evaluate_statement(
            cfg, report, gates, model_digest(edge.path), {m: model_digest(p) for m, p in models.items()}, splits, ctx))
        # the release: versions are staged, then the last gate; a gate that fails rolls the staging back
        # (register_task's on_rollback), so no version or alias exists for a model that failed a gate
        with transaction(), stage_run(client, run_id, "register") as rid:
            registered = register_task(
                client, rid, cfg, teacher=teacher, data_digest=splits.digest(), soft=soft, student=student, edge=edge,
                report=report, gates=gates, example_texts=splits["test"]["text"].head(3).tolist(),
                attestation_uri=f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ATTESTATION_DIR}",
                trigger_reason=trigger_reason, license_override=license_override)
            release_task(client, cfg, registered, gates, run_id=run_id, cache_root=workdir / "release")
        promotion = promote_task(client, cfg, registered["edge"]["version"], run_id=run_id,
                                 request_id=f"pipeline-run:{run_id}")  # a retried promote step acts once
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # what is kept is in MLflow (and the soft-label store)
    client.set_terminated(run_id, "FINISHED")
    registered["edge"]["champion"] = promotion["champion"] == registered["edge"]["version"]
    return {"run_id": run_id, "teacher": teacher.summary(), "soft_labels": {"key": soft.key, "uri": soft.uri, "hit": soft.hit},
            "student": student.summary(),
            "edge": {"primary": edge.primary, "quantized": edge.quantized, "reason": edge.reason,
                     "errors": edge.errors, "report_name": edge.report_name},
            "sizes": report.sizes, "report": report.to_dict(), "gates": gates, "registered": registered,
            "promotion": promotion, "tracking_uri": client._registry_uri}


@flow(name="distill-pipeline-from-file", log_prints=True)
def distill_pipeline_from_file(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
                               trigger_reason: str = "manual") -> dict:
    """Deployment entry point: load a YAML config (+ overrides) and run distill-pipeline as a subflow."""
    from flows.config import load_config

    return distill_pipeline(load_config(config_path, overrides or []), trigger_reason=trigger_reason)
