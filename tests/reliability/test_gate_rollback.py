"""Issue 10, item 4: a quality gate that fails after the versions were staged rolls every staged side effect
back (a Prefect transaction; the register task's on_rollback hook): no registry version, no alias, no logged
model, no signature file; the runs say why. Real flow on configs/tiny.yaml, Prefect test harness, MLflow SQLite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.config import load_config
from tests.helpers import ONNX_INT8_ONLY_OVERRIDES, data_overrides, fresh_mlflow_db, import_tiny_teacher, task_runs
from distill_gap.evaluation.gates import GatesFailed
from distill_gap.registry.tracking import client_for

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_api, tiny_model_dir, tiny_data, mlflow_db_template):

    tmp = tmp_path_factory.mktemp("rollback")
    old = os.getcwd()
    os.chdir(tmp)
    base = [f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp)}", f"tracking.artifact_location={tmp}/mlartifacts",
            f"soft_labels.store=file://{tmp}/soft-labels", f"governance.key_dir={tmp}/keys",
            "evaluate.bootstrap_samples=0", "evaluate.stress_rows=0", *ONNX_INT8_ONLY_OVERRIDES,
            *data_overrides(tiny_data)]
    import_tiny_teacher(load_config(ROOT / "configs/tiny.yaml", base), tiny_model_dir)  # faults, not quality
    yield tmp, base
    os.chdir(old)


def _task_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client

    runs = task_runs(flow_run_id)
    with get_client(sync_client=True) as c:
        flow = c.read_flow_run(flow_run_id)
    return {"flow": flow.state.type.value, **{t.name: t.state.type.value for t in runs}}  # task runs are named by step


def test_a_gate_failing_after_staging_rolls_back_every_side_effect(workspace):
    from flows.pipeline import distill_pipeline

    tmp, base = workspace
    # the default gates, nothing opened: the tiny student never predicts "negative", and 16 test rows are enough to
    # show that its recall there is worse than the teacher's by more than the 5-point margin (a true failure)
    cfg = load_config(ROOT / "configs/tiny.yaml", base)
    client = client_for(cfg.tracking)
    registry_before = sorted((m.name, tuple(sorted(m.aliases.items()))) for m in client.search_registered_models())

    with pytest.raises(GatesFailed) as err:
        distill_pipeline(cfg, trigger_reason="test: gate rollback")
    message = str(err.value)
    assert "noninferior:recall:negative" in message and "rolled back" in message and "fix:" in message
    assert "one-sided 95% bounds [+0.7" in message  # the drop is shown, not merely possible

    # the registry is exactly as before: no student or edge model, version or alias
    assert sorted((m.name, tuple(sorted(m.aliases.items()))) for m in client.search_registered_models()) == registry_before
    assert not client.search_model_versions(f"name='{cfg.edge_model_name}'")
    assert not client.search_model_versions(f"name='{cfg.student_model_name}'")

    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    run = client.search_runs([exp], filter_string="tags.distill.stage = 'pipeline'")[0]
    assert run.info.status == "FAILED" and run.data.tags["gates.passed"] == "false"
    stages = {r.data.tags["distill.stage"]: r for r in client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    # the release gate is its own stage run, after the register stage that staged the versions
    assert stages["release"].info.status == "FAILED" and stages["register"].info.status == "FINISHED"
    assert stages["evaluate"].info.status == "FINISHED"

    # staging happened (the register task completed, the release gate after it failed) and was undone:
    states = _task_states(run.data.tags["prefect.flow_run_id"])
    assert states["register"] == "COMPLETED" and states["release-gate"] == "FAILED" and states["flow"] == "FAILED"
    assert "promote" not in states
    register_id = stages["register"].info.run_id
    assert not client.search_logged_models([exp], filter_string=f"source_run_id = '{register_id}'")
    assert not client.list_artifacts(register_id, "signatures")
    models_dir = Path(tmp) / "mlartifacts" / exp / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())  # the logged models' files are gone too
    # the evidence stays: the evaluation and the attestations of the steps that ran; no dossier of a version that
    # does not exist
    assert client.list_artifacts(run.info.run_id, "attestations")
    assert not client.list_artifacts(register_id, "dossier")
