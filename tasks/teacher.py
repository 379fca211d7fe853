"""Stage: resolve the pinned teacher through the registry (exact version or alias), checked against the labels."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distill_gap.ops.transient import retry_if_transient


def resolve_teacher(cfg, cache_root: str | Path = ".distill/models"):
    """The teacher through the registry only (exact version, or the alias), checked against the label set."""
    from distill_gap.models.loading import check_teacher_labels, config_labels
    from distill_gap.registry.tracking import client_for
    from distill_gap.registry.versions import fetch_model

    client = client_for(cfg.tracking)
    ref = fetch_model(client, cfg.teacher_model_name, alias=None if cfg.teacher.version else cfg.teacher.alias,
                      version=cfg.teacher.version, cache_root=cache_root)
    check_teacher_labels(config_labels(ref.path), list(cfg.data.labels), f"teacher {ref.name} v{ref.version}")
    return ref


@task(name="resolve-teacher", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_if_transient)
def resolve_teacher_task(cfg):
    """Resolve the pinned teacher version in the registry and verify its digest."""
    from prefect.logging import get_run_logger

    ref = resolve_teacher(cfg)
    get_run_logger().info("teacher: %s v%d (digest %s)", ref.name, ref.version, ref.digest[:12])
    return ref
