"""Stage: resolve the pinned teacher through the registry (exact version or alias), checked against the labels and
the allowed licences; the run's inputs (teacher version and digest, data digests) recorded before anything uses them."""

from __future__ import annotations

from pathlib import Path

from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.models.loading import check_teacher_labels, config_labels
from distill_gap.ops.transient import retry_if_transient
from distill_gap.registry.versions import check_teacher_license, fetch_model


def resolve_teacher(client, teacher_model_name: str, teacher_cfg, labels: list[str], *,
                    cache_root: str | Path = ".distill/models"):
    """The teacher through the registry only (teacher_cfg.version, else teacher_cfg.alias), its digest verified and
    its label set checked against `labels`."""
    ref = fetch_model(client, teacher_model_name, alias=None if teacher_cfg.version else teacher_cfg.alias,
                      version=teacher_cfg.version, cache_root=cache_root)
    check_teacher_labels(config_labels(ref.path), list(labels), f"teacher {ref.name} v{ref.version}")
    return ref


@step("resolve-teacher", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient)
def resolve_teacher_task(run, teacher_cfg, splits):
    """Resolve the pinned teacher version in the registry and verify its digest and licence; record the inputs."""
    from prefect.logging import get_run_logger

    ref = resolve_teacher(run.client, run.teacher_model_name, teacher_cfg, splits.labels)
    check_teacher_license(ref, run.governance)  # raises before any work for a licence that is not allowed
    run.client.log_dict(run.run_id, {"data": splits.digests(), "teacher": ref.summary()}, "lineage/inputs.json")
    get_run_logger().info("teacher: %s v%d (digest %s)", ref.name, ref.version, ref.digest[:12])
    return ref
