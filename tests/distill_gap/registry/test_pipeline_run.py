"""distill_gap.registry.pipeline_run on a real MLflow SQLite store: the run the stages receive, its nested stage
runs, and what is left after it (FINISHED or FAILED, no scratch folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_gap.registry.pipeline_run import open_pipeline_run
from flows.config import load_config

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture()
def cfg(mlflow_tracking):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"tracking.uri={mlflow_tracking.uri}",
                                                        f"tracking.artifact_location={mlflow_tracking.artifact_location}"])


def test_stages_record_nested_runs_and_the_scratch_folder_goes(cfg, tmp_path):
    with open_pipeline_run(cfg, trigger_reason="drift", flow_run_id="fr-1", work_root=tmp_path) as run:
        assert (run.name, run.edge_model_name, run.device) == ("tiny", "tiny-edge", "cpu")
        assert run.context == {"mlflow_run_id": run.run_id, "prefect_flow_run_id": "fr-1"}
        assert run.config_digest == cfg.digest() and run.governance == cfg.governance
        run.workdir.mkdir(parents=True)
        (run.workdir / "scratch.bin").write_bytes(b"x")
        with run.stage("distill") as stage_run_id:
            pass
    client = run.client
    stage = client.get_run(stage_run_id)
    assert stage.data.tags["mlflow.parentRunId"] == run.run_id and stage.data.tags["distill.stage"] == "distill"
    assert stage.info.run_name == "tiny-distill" and stage.info.status == "FINISHED"
    pipeline = client.get_run(run.run_id)
    assert pipeline.info.status == "FINISHED" and pipeline.data.tags["trigger.reason"] == "drift"
    assert not run.workdir.exists()


def test_a_failing_stage_fails_its_run_and_the_pipeline_run(cfg, tmp_path):
    with pytest.raises(RuntimeError, match="quantize broke"):
        with open_pipeline_run(cfg, trigger_reason="manual", flow_run_id=None, work_root=tmp_path) as run:
            run.workdir.mkdir(parents=True)
            with run.stage("quantize") as stage_run_id:
                raise RuntimeError("quantize broke")
    assert run.client.get_run(stage_run_id).info.status == "FAILED"
    assert run.client.get_run(run.run_id).info.status == "FAILED"
    assert not run.workdir.exists()
