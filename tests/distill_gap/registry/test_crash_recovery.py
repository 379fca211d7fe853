"""distill_gap.registry.crash_recovery on a real MLflow SQLite store: a pipeline run left RUNNING by a process that is
gone (a real pid, killed) is reaped to KILLED with its stage runs and its half-done registration; runs of a live
process or of another host are left alone. (The whole drill, SIGKILL mid-pipeline: tests/reliability/test_crash.py.)"""

from __future__ import annotations

import subprocess

import psutil
import pytest

from distill_gap.ops.liveness import HOST, PID, STARTED, process_alive, process_tags
from distill_gap.registry.crash_recovery import reap
from distill_gap.registry.tracking import client_for, experiment_id
from distill_gap.registry.versions import create_version
from flows.config import GovernanceConfig
from tests.helpers import log_model_dir


@pytest.fixture(scope="module")
def dead_process_tags() -> dict:
    """The process tags of a process of this host that has since been killed (its pid is free again)."""
    proc = subprocess.Popen(["sleep", "60"])
    tags = {**process_tags(), PID: str(proc.pid), STARTED: f"{psutil.Process(proc.pid).create_time():.3f}"}
    proc.kill()
    proc.wait()
    return tags


def _pipeline_run(client, eid: str, name: str, tags: dict) -> str:
    """A pipeline run as its process leaves it when killed: RUNNING, with that process's tags."""
    return client.create_run(eid, run_name=f"{name}-pipeline", tags={"distill.stage": "pipeline", **tags}).info.run_id


def _stage_run(client, eid: str, parent: str, stage: str, status: str | None) -> str:
    run_id = client.create_run(eid, run_name=stage, tags={"mlflow.parentRunId": parent,
                                                          "distill.stage": stage}).info.run_id
    if status:
        client.set_terminated(run_id, status)
    return run_id


def test_process_alive_tells_this_process_a_dead_one_and_another_host(dead_process_tags):
    assert process_alive(process_tags()) is True
    assert process_alive(dead_process_tags) is False
    assert process_alive({**process_tags(), STARTED: "1.000"}) is False  # the pid was reused by another process
    assert process_alive({**process_tags(), HOST: "another-host"}) is None


def test_a_run_of_a_dead_process_is_reaped_to_killed(mlflow_tracking, dead_process_tags, tmp_path):
    client = client_for(mlflow_tracking)
    eid = experiment_id(client, mlflow_tracking)
    dead = _pipeline_run(client, eid, "dead", dead_process_tags)
    validate = _stage_run(client, eid, dead, "validate", "FINISHED")
    register = _stage_run(client, eid, dead, "register", None)  # where the process died
    folder = tmp_path / "edge"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    source = log_model_dir(client, register, folder, "edge")
    half_done = create_version(client, "dead-edge", source=source, run_id=register, tags={},
                               governance=GovernanceConfig())
    promoted = create_version(client, "dead-edge", source=source, run_id=register, tags={},
                              governance=GovernanceConfig())
    client.set_registered_model_alias("dead-edge", "champion", promoted.version)  # an alias: never deleted
    alive = _pipeline_run(client, eid, "alive", process_tags())
    elsewhere = _pipeline_run(client, eid, "elsewhere", {**dead_process_tags, HOST: "another-host"})

    said = []
    found = reap(client, mlflow_tracking, log=said.append)

    assert [f["mlflow_run_id"] for f in found] == [dead]
    assert found[0]["stage"] == "register" and found[0]["removed"] == [f"dead-edge v{half_done.version}"]
    assert found[0]["prefect_state"] is None  # no Prefect flow run recorded: nothing to mark there
    run = client.get_run(dead)
    assert run.info.status == "KILLED"
    assert run.data.tags["distill.crash"] == (f"process {dead_process_tags[PID]} on {dead_process_tags[HOST]} died "
                                              "during the register stage (killed: SIGKILL, OOM or power loss); "
                                              "marked by the next run")
    assert client.get_run(register).info.status == "KILLED"
    assert client.get_run(validate).info.status == "FINISHED"  # a stage that had ended keeps its status
    assert [v.version for v in client.search_model_versions("name = 'dead-edge'")] == [promoted.version]
    assert client.get_run(alive).info.status == "RUNNING" and client.get_run(elsewhere).info.status == "RUNNING"
    assert len(said) == 1 and said[0].startswith(f"recovered crashed run {dead}")
    assert reap(client, mlflow_tracking, log=said.append) == []  # reaped once


def test_a_store_without_the_experiment_has_nothing_to_reap(mlflow_tracking):
    client = client_for(mlflow_tracking)
    assert reap(client, mlflow_tracking.model_copy(update={"experiment": "never-created"})) == []
