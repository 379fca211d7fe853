"""The attest stage: one step's in-toto Statement signed and logged to the pipeline run
(distill_gap.governance.attestation), retried on a store hiccup. Each stage task attests its own step."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from distill_gap.governance.attestation import record


def _run_name() -> str:
    """attest-<step> in the Prefect UI, so that the five attest task runs of a pipeline run can be told apart."""
    from prefect.runtime import task_run

    statement = task_run.parameters.get("statement") or {}
    return f"attest-{statement.get('predicate', {}).get('step', 'nothing')}"


@task(name="attest", task_run_name=_run_name, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def attest_task(run, statement: dict | None) -> str | None:
    """Sign one step's in-toto Statement and log it to the pipeline run (attestations/<step>.dsse.json)."""
    return None if statement is None else record(run.client, run.run_id, run.governance, statement)
