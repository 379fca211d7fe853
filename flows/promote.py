"""The promote-edge flow: promote one <name>-edge version (challenger, approval, champion), idempotently."""

from __future__ import annotations

from prefect import flow

from distill_gap.ops.run_names import config_name_of
from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
from flows.config import PipelineConfig
from tasks.promote import promote_task


def _run_name() -> str:
    """`demo · promote v3`, in the Prefect UI's run lists."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"{config_name_of(p.get('config'))} · promote v{p.get('version', '?')}"


@flow(name="promote-edge", flow_run_name=_run_name, log_prints=True)
def promote_edge(config: PipelineConfig, version: int, reason: str = "manual", request_id: str | None = None) -> dict:
    """Promote <name>-edge `version` when its gates passed; a second run for the same version, or a second delivery
    of the same request (`request_id`: the triggering event's id, `{{ event.id }}` in an automation), changes
    nothing."""
    client = client_for(config.tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, config.tracking), run_name=f"{config.name}-promote",
                    tags={"distill.stage": "promote", "trigger.reason": reason, "model.name": config.name}) as run_id:
        return promote_task(client, config.approval, config.governance, config.edge_model_name, version,
                            run_id=run_id, request_id=request_id)
