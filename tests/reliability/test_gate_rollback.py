"""Issue 10, item 4: a quality gate that fails after the versions were staged rolls every staged side effect
back (a Prefect transaction; the register task's on_rollback hook): no registry version, no alias, no logged
model, no signature file; the runs say why. Real flow on configs/tiny.yaml, Prefect test harness, MLflow SQLite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.config import load_config
from tests.helpers import data_overrides, fresh_mlflow_db, import_tiny_teacher
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
            "evaluate.bootstrap_samples=0", "evaluate.stress_rows=0", "quantize.candidates=[static]",
            "quantize.max_trials=1", "quantize.onnx=false", "quantize.onnx_int8=false", *data_overrides(tiny_data)]
    import_tiny_teacher(load_config(ROOT / "configs/tiny.yaml", base), tiny_model_dir)  # faults, not quality
    yield tmp, base
    os.chdir(old)


def _task_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        flow = c.read_flow_run(flow_run_id)
    return {"flow": flow.state.type.value, **{t.name.rsplit("-", 1)[0]: t.state.type.value for t in runs}}


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


def test_default_margins_on_64_rows_are_insufficient_then_a_named_approver_waives_them(workspace, prefect_api_url):
    """Issue 19 end to end: a critical slice is declared that the test rows do not hold, so its non-inferiority
    gate has no evidence: the run registers the version as @challenger only (insufficient, not failed); `distill
    approve` with the approver's own key makes it @champion; `distill verify` covers the waiver. The aggregate
    keeps its default margin; class recall is opened (the tiny student never predicts "negative": that real
    failure is what the default margin gives, see the gate rollback above) and so are the other gates."""
    import json
    import subprocess
    import sys

    from flows.pipeline import distill_pipeline
    from distill_gap.governance.waiver import create_approver_key
    from tests.helpers import OPEN_GATES

    tmp, base = workspace
    opened = [f"evaluate.{k}={v}" for k, v in OPEN_GATES.items() if k != "margins"]
    key = create_approver_key(load_config(ROOT / "configs/tiny.yaml", base).governance, "rita")
    approvers = json.dumps([{"name": "rita", "public_key": str(key.public_path)}])
    overrides = [*base, *opened, "quantize.tolerable_loss=0.5", f"approval.approvers={approvers}",
                 "evaluate.margins.class_recall=1.0", 'data.critical_slices={"condition": ["Not In These Rows"]}']
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    result = distill_pipeline(cfg, trigger_reason="test: insufficient evidence")
    edge = result["registered"]["edge"]
    thin = [k for k, g in result["gates"].items() if g["outcome"] == "insufficient"]
    assert thin == ["noninferior:slice:condition=Not In These Rows"], result["gates"]
    assert result["gates"]["noninferior:accuracy"]["outcome"] == "pass"  # the default aggregate margin
    assert not [k for k, g in result["gates"].items() if g["outcome"] == "fail"]
    assert not edge["champion"] and result["promotion"]["challenger"] == edge["version"]
    client = client_for(cfg.tracking)
    assert client.get_registered_model(cfg.edge_model_name).aliases == {"challenger": edge["version"]}
    tags = client.get_model_version(cfg.edge_model_name, str(edge["version"])).tags
    assert tags["gates.outcome"] == "insufficient" and tags["gates.insufficient"] == ",".join(thin)

    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    config = tmp / "waiver.yaml"
    import yaml

    raw = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    raw.update(name=cfg.name, tracking=cfg.tracking.model_dump(), governance=cfg.governance.model_dump(mode="json"),
               approval={"approvers": [{"name": "rita", "public_key": str(key.public_path)}]})
    config.write_text(yaml.safe_dump(raw))
    uri = f"models:/{cfg.edge_model_name}/{edge['version']}"
    done = subprocess.run([str(Path(sys.executable).parent / "distill"), "approve", uri, "--approver", "rita",
                           "--waive", ",".join(thin), "--reason", "pilot on 64 rows; audit set in 30 days",
                           "--config", str(config)], env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert client.get_registered_model(cfg.edge_model_name).aliases["champion"] == edge["version"]
    verified = subprocess.run([str(Path(sys.executable).parent / "distill"), "verify", uri, "--tracking-uri",
                               cfg.tracking.uri, "--key-dir", cfg.governance.key_dir], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "waiver" in verified.stdout and "signed by approver rita" in verified.stdout
    assert "dossier" in verified.stdout  # the published dossier agrees with the signed records

    # the dossier, compiled afresh: signed JSON over the edge digest, and the HTML page
    page = tmp / "dossier.html"
    shown = subprocess.run([str(Path(sys.executable).parent / "distill"), "dossier", uri, "--tracking-uri",
                            cfg.tracking.uri, "--html", str(page), "--json", "--key-dir", cfg.governance.key_dir],
                           env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    from distill_gap.signing import subject_digests, verify_statement

    stmt = verify_statement(json.loads(shown.stdout),
                            [(Path(cfg.governance.key_dir) / "signing-key.pub.pem").read_text()])
    assert subject_digests(stmt) == {uri.removeprefix("models:/"): edge["digest"]}
    d = stmt["predicate"]
    mv = client.get_model_version(cfg.edge_model_name, str(edge["version"]))
    assert d["governance"]["waiver"] == {"gates": thin, "approver": "rita", "reason": "pilot on 64 rows; audit set in "
                                         "30 days", "record": mv.tags["promotion.waiver.uri"]}
    assert d["status"]["aliases"] == ["challenger", "champion"] and d["evidence"]["outcome"] == "insufficient"
    assert [s["step"] for s in d["lineage"]["steps"]][:3] == ["soft-labels", "distill", "quantize"]
    assert not d["lineage"]["problems"] and d["scope"]["shipped"]
    assert "Waived by <b>rita</b>" in page.read_text()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:  # the Prefect UI links to the page in the MLflow UI
        links = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{cfg.name}-dossier"])))
        validation = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"{cfg.name}-data-validation"])))
    assert links and "/artifactPath/dossier/dossier.html" in links[0].data  # Prefect keeps links as markdown
    assert validation  # one history per config: the key carries the config's name (issue 23)
    # the model card ships inside the signed edge folder
    import mlflow

    from distill_gap.registry.versions import version_folder

    mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp / "edge-dl"),
                                        tracking_uri=cfg.tracking.uri)
    card = (version_folder(tmp / "edge-dl", mv.source) / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == f"{mv.tags['teacher.name']}/{mv.tags['teacher.version']}"
    assert front["base_model_relation"] == ("quantized" if mv.tags["edge.quantized"] == "true" else "finetune")
