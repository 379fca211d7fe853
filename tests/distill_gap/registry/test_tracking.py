"""distill_gap.registry.tracking on a real MLflow SQLite store: the one run lifecycle (FINISHED, FAILED on any
exception, nested stage runs), the pipeline run, the store URI and the code version."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from distill_gap.ops.liveness import HOST, PID, STARTED
from distill_gap.registry.tracking import (client_for, code_version, experiment_id, mlflow_run, pipeline_run,
                                           tracking_uri, use_store)
from flows.config import TrackingConfig, load_config

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def store(mlflow_tracking):
    """(client, experiment id, tracking config) on this module's SQLite store."""
    client = client_for(mlflow_tracking)
    return client, experiment_id(client, mlflow_tracking), mlflow_tracking


def _status(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_a_run_is_running_inside_and_finished_after(store):
    client, eid, _ = store
    with mlflow_run(client, experiment_id=eid, run_name="x-promote", tags={"distill.stage": "promote"}) as run_id:
        assert _status(client, run_id) == "RUNNING"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "x-promote"
    assert run.data.tags["distill.stage"] == "promote"


@pytest.mark.parametrize("error", [ValueError("a stage failed"), KeyboardInterrupt(), SystemExit(143)])
def test_any_exception_ends_the_run_failed_and_propagates(store, error):
    client, eid, _ = store
    seen = {}
    with pytest.raises(type(error)):
        with mlflow_run(client, experiment_id=eid, run_name="x-fails") as run_id:
            seen["run_id"] = run_id
            raise error
    assert _status(client, seen["run_id"]) == "FAILED"


def test_a_returning_body_finishes_the_run(store):
    client, eid, _ = store

    def body() -> str:
        with mlflow_run(client, experiment_id=eid, run_name="x-return") as run_id:
            return run_id

    assert _status(client, body()) == "FINISHED"


def test_stage_runs_carry_the_parent_and_a_failure_ends_both_failed(store):
    client, eid, _ = store
    parent_tags = {"distill.stage": "pipeline", "config.digest": "c" * 64, "trigger.reason": "test",
                   "model.name": "x", "not.inherited": "1"}
    with mlflow_run(client, experiment_id=eid, run_name="x-pipeline", tags=parent_tags) as parent:
        with mlflow_run(client, parent_run_id=parent, run_name="x-validate", tags={"distill.stage": "validate"}) as ok:
            pass
        with pytest.raises(RuntimeError):
            with mlflow_run(client, parent_run_id=parent, run_name="x-distill",
                            tags={"distill.stage": "distill", "trigger.reason": "own"}) as failed:
                raise RuntimeError("distill stage failed")
        assert _status(client, parent) == "RUNNING"  # the parent decides for itself
    stage = client.get_run(ok)
    assert stage.info.status == "FINISHED" and stage.info.experiment_id == eid
    assert stage.data.tags["mlflow.parentRunId"] == parent and stage.data.tags["distill.stage"] == "validate"
    assert {k: stage.data.tags[k] for k in ("config.digest", "trigger.reason", "model.name")} == \
        {"config.digest": "c" * 64, "trigger.reason": "test", "model.name": "x"}
    assert "not.inherited" not in stage.data.tags
    other = client.get_run(failed)
    assert other.info.status == "FAILED" and other.data.tags["trigger.reason"] == "own"  # its own tags win
    children = client.search_runs([eid], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_id for r in children} == {ok, failed}


def test_a_run_needs_an_experiment_or_a_parent(store):
    client, _, _ = store
    with pytest.raises(ValueError, match="experiment_id or a parent_run_id"):
        with mlflow_run(client, run_name="nowhere"):
            pass


def test_pipeline_run_logs_the_config_and_the_process(store):
    client, _, tracking = store
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"tracking.uri={tracking.uri}",
                                                   f"tracking.artifact_location={tracking.artifact_location}"])
    with pipeline_run(client, cfg, trigger_reason="teacher changed", flow_run_id="f-1") as run_id:
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING"
    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-pipeline"
    assert tags["distill.stage"] == "pipeline" and tags["config.digest"] == cfg.digest()
    assert tags["trigger.reason"] == "teacher changed" and tags["prefect.flow_run_id"] == "f-1"
    assert tags[PID] == str(os.getpid()) and HOST in tags and STARTED in tags  # what crash recovery reads
    assert params["seed"] == str(cfg.seed) and params["distill.temperature"] == str(cfg.distill.temperature)
    assert [f.path for f in client.list_artifacts(run_id, "config")] == ["config/config.json"]
    with pytest.raises(ZeroDivisionError):
        with pipeline_run(client, cfg, trigger_reason="manual", flow_run_id=None) as failed:
            1 / 0
    assert _status(client, failed) == "FAILED"


def test_tracking_uri_prefers_the_environment_and_creates_the_sqlite_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/new/folder/mlflow.db"
    assert tracking_uri(TrackingConfig(uri=uri)) == uri and (tmp_path / "new" / "folder").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(TrackingConfig(uri=uri)) == "http://127.0.0.1:5000"


def test_use_store_leaves_the_users_variables_as_they_were(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///elsewhere.db")
    saved = mlflow.get_tracking_uri()
    try:
        use_store(f"sqlite:///{tmp_path}/m.db")
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/m.db"
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///elsewhere.db"
    finally:
        mlflow.set_tracking_uri(saved)


def test_code_version_is_the_checkouts_commit():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert code_version().removesuffix("+dirty") == head


def test_the_experiment_opens_as_model_training_in_the_mlflow_ui(store):
    """MLflow 3 shows an experiment without mlflow.experimentKind in its GenAI mode (Traces, no registry link)."""
    client, eid, tracking = store
    assert client.get_experiment(eid).tags["mlflow.experimentKind"] == "custom_model_development"
    client.delete_experiment_tag(eid, "mlflow.experimentKind")  # made before the tag, or by hand
    assert experiment_id(client, tracking) == eid
    assert client.get_experiment(eid).tags["mlflow.experimentKind"] == "custom_model_development"
