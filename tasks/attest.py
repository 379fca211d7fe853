"""The attest stage: one step's in-toto Statement signed and logged to the pipeline run
(distill_gap.governance.attestation), retried on a store hiccup."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from distill_gap.governance.attestation import record


@task(name="attest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def attest_task(client, run_id: str, governance, statement: dict | None) -> str | None:
    """Sign one step's in-toto Statement and log it to the pipeline run (attestations/<step>.dsse.json)."""
    return None if statement is None else record(client, run_id, governance, statement)
