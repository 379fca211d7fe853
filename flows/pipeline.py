"""The distill-pipeline flow: validate -> soft labels -> distill -> quantize -> evaluate -> register -> promote.

The flow composes the stages of tasks/ and nothing else (STYLE.md). Each stage receives the pipeline run
(distill_gap/registry/pipeline_run.py: where it records, names, governance, device) and its own config section,
opens its nested MLflow run and attests its step.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.transactions import transaction

from distill_gap.ops.run_names import config_name_of, flow_run_name, run_tags, tag_flow_run
from distill_gap.registry.pipeline_run import open_pipeline_run
from flows.config import PipelineConfig, load_config
from tasks.distill import distill_task
from tasks.evaluate import evaluate_task
from tasks.promote import promote_task
from tasks.quantize import quantize_task
from tasks.register import register_task, release_task
from tasks.soft_labels import soft_labels
from tasks.sweep import sweep
from tasks.teacher import resolve_teacher_task
from tasks.validate import validate_data


def _run_name() -> str:
    """`demo · manual`, `demo · drift`: the config and the trigger, in the Prefect UI's run lists."""
    p = flow_run.parameters
    name = config_name_of(p["config"]) if "config" in p else Path(p.get("config_path", "?")).stem
    return flow_run_name(name, p.get("trigger_reason", "manual"))


@flow(name="distill-pipeline", flow_run_name=_run_name, log_prints=True)
def distill_pipeline(config: PipelineConfig, trigger_reason: str = "manual") -> dict:
    """Distill the pinned teacher into a student and an INT8 edge model, evaluate each, register, promote."""
    cfg, rt = config, config.runtime
    # config:<name>, trigger:<kind> on the flow run only: Prefect acquires a tag concurrency slot on the API for every
    # tag of every task run (a round trip per task: 1-2 s of a tiny run's ~11 s), and the runs list filters flow runs
    tag_flow_run(run_tags(cfg.name, trigger_reason), log=print)
    with open_pipeline_run(cfg, trigger_reason=trigger_reason, flow_run_id=flow_run.get_id()) as run:
        splits = validate_data(run, cfg.data, cfg.seed)
        teacher = resolve_teacher_task(run, cfg.teacher, splits)
        soft = soft_labels(run, cfg.soft_labels, teacher=teacher, splits=splits, max_length=rt.max_length,
                           augment=cfg.distill.augment, redistill=cfg.redistill, feedback_store=cfg.feedback.store,
                           seed=cfg.seed)
        # the smallest student of a ladder that holds against the teacher, with the quantize section it was judged with
        student, quantize = (sweep(run, cfg.sweep, cfg.distill, cfg.evaluate, cfg.quantize, drift_cfg=cfg.drift,
                                   scope_cfg=cfg.scope, teacher=teacher, soft=soft, splits=splits,
                                   critical_slices=cfg.data.critical_slices, max_length=rt.max_length, seed=cfg.seed)
                             if cfg.sweep.enabled else
                             (distill_task(run, cfg.distill, teacher, soft, splits, max_length=rt.max_length,
                                           critical_slices=cfg.data.critical_slices, seed=cfg.seed), cfg.quantize))
        edge = quantize_task(run, quantize, student=student, splits=splits, max_length=rt.max_length,
                             min_edge_agreement=cfg.evaluate.min_edge_agreement, seed=cfg.seed)
        report, gates, edge = evaluate_task(run, cfg.evaluate, cfg.drift, cfg.scope, teacher=teacher, student=student,
                                            edge=edge, splits=splits, critical_slices=cfg.data.critical_slices,
                                            require_int8=quantize.require_int8, max_length=rt.max_length,
                                            seed=cfg.seed, against_champion=cfg.redistill.active)
        # the release: versions are staged, then the last gate; a gate that fails rolls the staging back
        # (register_task's on_rollback), so no version or alias exists for a model that failed a gate
        with transaction():
            registered = register_task(run, teacher=teacher, splits=splits, soft=soft, student=student, edge=edge,
                                       report=report, gates=gates)
            release_task(run, registered, gates)
        promotion = promote_task(run.client, cfg.approval, cfg.governance, run.edge_model_name,
                                 registered["edge"]["version"], run_id=run.run_id,
                                 request_id=f"pipeline-run:{run.run_id}")  # a retried promote step acts once
    registered["edge"]["champion"] = promotion["champion"] == registered["edge"]["version"]
    return {"run_id": run.run_id, "teacher": teacher.summary(),
            "soft_labels": {"key": soft.key, "uri": soft.uri, "hit": soft.hit}, "student": student.summary(),
            "edge": {"primary": edge.primary, "quantized": edge.quantized, "reason": edge.reason,
                     "errors": edge.errors, "report_name": edge.report_name},
            "sizes": report.sizes, "report": report.to_dict(), "gates": gates, "registered": registered,
            "promotion": promotion, "tracking_uri": run.client._registry_uri}


@flow(name="distill-pipeline-from-file", flow_run_name=_run_name, log_prints=True)
def distill_pipeline_from_file(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
                               trigger_reason: str = "manual", production: str = "",
                               production_digest: str = "") -> dict:
    """Deployment entry point: load a YAML config (+ overrides) and run distill-pipeline as a subflow. A drift event
    passes its production rows and their digest: the run learns from them (redistill.production)."""
    return distill_pipeline(load_config(config_path, [*(overrides or []), *production_overrides(production,
                                                                                              production_digest)]),
                            trigger_reason=trigger_reason)


def production_overrides(production: str, production_digest: str = "") -> list[str]:
    """--set overrides that point redistill at a drift event's rows (none without rows); values as JSON, so that
    a folder YAML would read as a date (2026-12-02) or a digest it would read as a number stays text."""
    if not production:
        return []
    return [f"redistill.production={json.dumps(production)}",
            f"redistill.production_digest={json.dumps(production_digest or None)}"]
