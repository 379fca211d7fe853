"""Issue 23, runs that can be told apart in the Prefect UI: a flow run named `<config> · <trigger>`, tagged
`config:<name>` and `trigger:<kind>`; its task runs carry no tags (each tag of a task run costs a concurrency-slot
round trip to the API; the flow run is what the runs list filters) (real Prefect API: the session's server; the naming
callable is the pipeline's own, on a flow that does nothing else)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow, task

from distill_gap.ops.run_names import run_tags, tag_flow_run, trigger_kind
from flows.config import load_config
from flows.pipeline import _run_name
from tests.helpers import task_runs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("reason,kind", [("manual", "manual"), ("distill.drift.detected: psi 0.31 on length", "drift"),
                                         ("distill.teacher.changed: pinned v2 > v1", "teacher-change"),
                                         ("test: first run", "test"), ("", "manual"), (" : x", "manual")])
def test_trigger_kind(reason, kind):
    assert trigger_kind(reason) == kind


@task(name="step", task_run_name="step")
def _step() -> str:
    from prefect.runtime import task_run

    return task_run.id


@flow(name="naming-probe", flow_run_name=_run_name)
def _probe(config, trigger_reason: str = "manual") -> tuple[str, str]:
    from prefect.runtime import flow_run

    tag_flow_run(run_tags(config.name, trigger_reason))  # as distill_pipeline does
    return flow_run.get_id(), _step()


@flow(name="naming-probe-file", flow_run_name=_run_name)
def _probe_file(config_path: str, trigger_reason: str = "manual") -> str:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def test_flow_and_task_runs_say_what_ran(prefect_api):
    from prefect.client.orchestration import get_client

    cfg = load_config(ROOT / "configs/tiny.yaml", [])
    flow_run_id, task_run_id = _probe(cfg, trigger_reason="distill.drift.detected: psi 0.4")
    file_run_id = _probe_file("configs/demo.yaml")
    step = next(t for t in task_runs(flow_run_id) if str(t.id) == str(task_run_id))  # once recorded
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        file_run = client.read_flow_run(file_run_id)
    assert run.name == "tiny · drift"
    assert {"config:tiny", "trigger:drift"} <= set(run.tags)
    assert step.name == "step" and not step.tags
    assert file_run.name == "demo · manual"  # a deployment run: named from its config file before it is loaded
