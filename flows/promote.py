"""The promote-edge flow: promote one <name>-edge version (challenger, approval, champion), idempotently."""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from tasks.promote import promote_task
from tasks.register import client_for, experiment_id


@flow(name="promote-edge", log_prints=True)
def promote_edge(config: PipelineConfig, version: int, reason: str = "manual", request_id: str | None = None) -> dict:
    """Promote <name>-edge `version` when its gates passed; a second run for the same version, or a second delivery
    of the same request (`request_id`: the triggering event's id, `{{ event.id }}` in an automation), changes
    nothing."""
    client = client_for(config.tracking)
    run = client.create_run(experiment_id(client, config.tracking), run_name=f"{config.name}-promote",
                            tags={"distill.stage": "promote", "trigger.reason": reason, "model.name": config.name})
    try:
        result = promote_task(client, config, version, run_id=run.info.run_id, request_id=request_id)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return result
