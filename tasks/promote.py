"""The promote stage: @challenger, the approver's answer when approval.required, then @champion
(distill_gap.governance.promotion); a no-op for the current champion or a request already carried out."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.governance.promotion import promote, request_approval


@step("promote", cache_policy=NO_CACHE)
def promote_task(client, approval_cfg, governance, name: str, version: int, *, run_id: str,
                 request_id: str | None = None) -> dict:
    """@challenger, the approver's answer when approval_cfg.required, then @champion of `name` (<name>-edge); a
    no-op for the current champion or a request already carried out (`request_id`)."""
    from prefect.logging import get_run_logger

    log = get_run_logger().info
    return promote(client, version, name=name, approval_required=approval_cfg.required, governance=governance,
                   run_id=run_id, log=log, request_id=request_id,
                   approve=lambda summary, digest: request_approval(approval_cfg, name=name, version=version,
                                                                    summary=summary, digest=digest, log=log))
