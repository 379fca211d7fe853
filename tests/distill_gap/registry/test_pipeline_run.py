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


def test_links_in_mlflow_are_relative_links_from_prefect_follow_tracking_ui_url(cfg, tmp_path):
    """Issue 23: the gap report and dossier links written into MLflow's own pages are relative to its UI (they work on
    any `distill ui --mlflow-port`); the one a Prefect artifact carries is absolute, at tracking.ui_url."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"ui_url": "http://mlflow.example:5011/"})})
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}):  # the embedded Prefect
        with open_pipeline_run(cfg, trigger_reason="manual", flow_run_id="fr-1", work_root=tmp_path) as run:
            with run.stage("evaluate") as evaluate_run:
                pass
    exp = run.client.get_run(run.run_id).info.experiment_id
    assert run.prefect_ui == ""  # the embedded Prefect's UI is wherever `distill ui` is started: not known now
    assert run.links(evaluate_run=evaluate_run) == {
        "Gap report": f"#/experiments/{exp}/runs/{evaluate_run}/artifactPath/evaluation/gap_report.html"
        "?workflowType=machine_learning",
        "Prefect flow run (`distill ui` on its default port 4200)": "http://127.0.0.1:4200/runs/flow-run/fr-1"}
    assert run.mlflow_url(evaluate_run, "evaluation/gap_report.html") == (
        f"http://mlflow.example:5011/#/experiments/{exp}/runs/{evaluate_run}/artifactPath/evaluation/gap_report.html"
        "?workflowType=machine_learning")
    # a Prefect UI known when the run starts (PREFECT_UI_URL, or a server's PREFECT_API_URL) is linked as it is
    with temporary_settings(updates={PREFECT_UI_URL: "http://127.0.0.1:4311/"}):
        with open_pipeline_run(cfg, trigger_reason="manual", flow_run_id="fr-2", work_root=tmp_path) as run:
            pass
    assert run.links()["Prefect flow run"] == "http://127.0.0.1:4311/runs/flow-run/fr-2"
