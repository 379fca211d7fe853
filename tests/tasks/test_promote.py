"""Promotion through the real promote-edge flow: a real Prefect API (test harness), MLflow on SQLite, real
signed attestations. Failed gates never move @champion; approval is asked in a paused run and asked again on
an unacceptable answer; a timeout promotes nothing; a second promotion changes nothing; rollback is recorded."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from flows.config import load_config
from distill_gap.errors import DistillError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """tiny-edge v1 and v3 passed their gates, v2 failed them; a signing key pair in a temporary folder."""
    from distill_gap.digest import model_digest
    from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
    from distill_gap.registry.versions import create_version
    from tests.helpers import log_model_dir

    tmp = tmp_path_factory.mktemp("promote")
    old_key_dir = os.environ.get("DISTILL_KEY_DIR")
    os.environ["DISTILL_KEY_DIR"] = str(tmp / "keys")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                                                   f"tracking.artifact_location={tmp}/artifacts"])
    client = client_for(cfg.tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name="register") as run_id:
        source = log_model_dir(client, run_id, tiny_model_dir, "edge")
        for passed in ("true", "false", "true"):
            create_version(client, cfg.edge_model_name, source=source, run_id=run_id, governance=cfg.governance,
                           tags={"gates.passed": passed, "model.digest": model_digest(tiny_model_dir)},
                           description="test accuracy 0.7; Verdict: " + ("all gates passed" if passed == "true" else "FAILED"))
    yield cfg, client
    if old_key_dir is None:
        os.environ.pop("DISTILL_KEY_DIR", None)
    else:
        os.environ["DISTILL_KEY_DIR"] = old_key_dir


def _config(cfg, **approval):
    return cfg.model_copy(update={"approval": cfg.approval.model_copy(update=approval)})


def _registry_state(client, name):
    """Everything promotion could change: aliases, and every version's tags and update time."""
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name='{name}'")
    return {"aliases": dict(model.aliases), "tags": dict(model.tags),
            "versions": {v.version: (dict(v.tags), v.last_updated_timestamp) for v in versions}}


def _paused_run(pause_key: str, timeout: float = 60):
    """Wait for the promote-edge flow run to be paused under `pause_key`; return its id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            for r in runs:
                if r.state.state_details.pause_key == pause_key:
                    time.sleep(0.5)  # the form's schema is saved just after the state is set
                    return str(r.id)
            time.sleep(0.3)
    raise AssertionError(f"no flow run paused under {pause_key}")


def _attestation(client, uri: str, tmp_path) -> dict:
    import mlflow

    from distill_gap.signing import verify_statement

    path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path),
                                               tracking_uri=client._tracking_client.tracking_uri)
    pub = (Path(os.environ["DISTILL_KEY_DIR"]) / "signing-key.pub.pem").read_text()
    return verify_statement(json.loads(Path(path).read_text()), [pub])


def test_failed_gates_never_move_champion(registry, prefect_api):
    from flows.promote import promote_edge

    cfg, client = registry
    before = _registry_state(client, cfg.edge_model_name)
    state = promote_edge(cfg, version=2, return_state=True)
    result = state.result()
    assert not result["changed"] and result["reason"] == "gates failed"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:  # what the Prefect UI's run list says
        assert prefect.read_flow_run(state.state_details.flow_run_id).name == f"{cfg.name} · promote v2"
    assert _registry_state(client, cfg.edge_model_name) == before  # no alias, no tag


def test_approval_timeout_promotes_nothing(registry, prefect_api):
    from flows.promote import promote_edge

    cfg, client = registry
    champion_before = client.get_registered_model(cfg.edge_model_name).aliases.get("champion")
    with pytest.raises(DistillError, match="no approval for tiny-edge v1 within approval.timeout_seconds=2"):
        promote_edge(_config(cfg, required=True, timeout_seconds=2, poll_seconds=1), version=1)
    assert client.get_registered_model(cfg.edge_model_name).aliases.get("champion") == champion_before
    assert "promotion.approver" not in client.get_model_version(cfg.edge_model_name, "1").tags


def test_approval_asks_again_then_promotes_once(registry, prefect_api, tmp_path):
    from flows.promote import promote_edge
    from distill_gap.governance.promotion import answer_run

    cfg, client = registry
    strict = _config(cfg, required=True, approvers=["dana"], timeout_seconds=120, poll_seconds=1)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(promote_edge(strict, version=1)))
    worker.start()
    try:
        run_id = _paused_run("approval-1-1")
        # invalid input: refused by the API against the form's schema; the run keeps waiting
        with pytest.raises(DistillError, match="answer refused"):
            answer_run(run_id, {"approver": "dana", "decision": "maybe"})
        # a valid form from someone who is not an approver: the run asks again
        answer_run(run_id, {"approver": "eve", "decision": "approve", "comment": ""})
        assert _paused_run("approval-1-2") == run_id
        assert client.get_registered_model(cfg.edge_model_name).aliases.get("champion") is None
        answer_run(run_id, {"approver": "dana", "decision": "approve", "comment": "reviewed the gap report"})
    finally:
        worker.join(timeout=120)
    assert outcome["changed"] and outcome["champion"] == 1
    mv = client.get_model_version(cfg.edge_model_name, "1")
    assert client.get_registered_model(cfg.edge_model_name).aliases["champion"] == 1
    assert mv.tags["promotion.approver"] == "dana" and mv.tags["promotion.comment"] == "reviewed the gap report"
    stmt = _attestation(client, mv.tags["promotion.attestation.uri"], tmp_path)  # signed, with the approver
    assert stmt["predicate"]["step"] == "promote" and stmt["predicate"]["approver"]["approver"] == "dana"
    assert stmt["predicate"]["results"]["aliases_after"]["champion"] == 1

    # the same promotion again (a second run, a redelivered event): the registry does not change
    before = _registry_state(client, cfg.edge_model_name)
    again = promote_edge(strict, version=1)
    assert not again["changed"] and again["reason"] == "already champion"
    assert _registry_state(client, cfg.edge_model_name) == before


def test_rollback_records_who_and_why(registry, prefect_api, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.promote import promote_edge

    cfg, client = registry
    assert promote_edge(cfg, version=3)["champion"] == 3
    args = ["rollback", cfg.edge_model_name, "--tracking-uri", cfg.tracking.uri, "--reason", "false alarms on device"]
    result = CliRunner().invoke(app, [*args, "--to", "2"])
    assert result.exit_code == 2 and "did not pass its gates" in result.output
    result = CliRunner().invoke(app, [*args, "--to", "1", "--by", "oncall-kim"])
    assert result.exit_code == 0, result.output
    assert client.get_registered_model(cfg.edge_model_name).aliases["champion"] == 1
    mv = client.get_model_version(cfg.edge_model_name, "1")
    assert mv.tags["rollback.by"] == "oncall-kim" and mv.tags["rollback.reason"] == "false alarms on device"
    assert mv.tags["rollback.from"] == "3"
    stmt = _attestation(client, mv.tags["rollback.attestation.uri"], tmp_path)
    assert stmt["predicate"]["parameters"]["action"] == "rollback"


def test_an_approver_with_a_key_must_sign_and_verify_checks_the_signature(registry, prefect_api, tmp_path):
    """Issue 19: the approver is not a name anyone can type. An approver listed with a public key answers with their
    signed decision (`distill approve <flow run id>` signs it); an unsigned answer or one signed by another key is
    refused and asked again; the promote Statement carries the signature, which verify_recorded_approval checks."""
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.promote import promote_edge
    from distill_gap.governance.promotion import answer_run
    from distill_gap.governance.waiver import create_approver_key, sign_approval, verify_recorded_approval

    cfg, client = registry
    sig = create_approver_key(cfg.governance, "sig")
    mallory = create_approver_key(cfg.governance, "mallory")
    approvers = [{"name": "sig", "public_key": str(sig.public_path)}]
    strict = cfg.model_copy(update={"approval": cfg.approval.model_validate(
        {"required": True, "approvers": approvers, "timeout_seconds": 120, "poll_seconds": 1})})
    version = 3  # passed its gates; not @champion after the rollback above (nor when this test runs alone)
    digest = client.get_model_version(cfg.edge_model_name, str(version)).tags["model.digest"]
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(promote_edge(strict, version=version)))
    worker.start()
    try:
        run_id = _paused_run(f"approval-{version}-1")
        answer_run(run_id, {"approver": "sig", "decision": "approve", "comment": "ok"})  # unsigned: asked again
        forged = sign_approval(cfg.governance, approver="sig", key_dir_override=mallory.private_path.parent,
                               name=cfg.edge_model_name, version=version, digest=digest, decision="approve",
                               comment="ok")
        assert _paused_run(f"approval-{version}-2") == run_id
        answer_run(run_id, {"approver": "sig", "decision": "approve", "comment": "ok",
                            "signature": json.dumps(forged)})  # another key: asked again
        assert _paused_run(f"approval-{version}-3") == run_id
        config = tmp_path / "approve.yaml"
        config.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs/tiny.yaml").read_text()),
                                          "tracking": cfg.tracking.model_dump(), "approval": {"approvers": approvers},
                                          "governance": cfg.governance.model_dump(mode="json")}))
        done = CliRunner().invoke(app, ["approve", run_id, "--approver", "sig", "--decision", "approve", "--comment",
                                        "gap report read", "--config", str(config)])
        assert done.exit_code == 0 and "(signed)" in done.output, done.output
    finally:
        worker.join(timeout=120)
    assert outcome["champion"] == version
    mv = client.get_model_version(cfg.edge_model_name, str(version))
    approver = _attestation(client, mv.tags["promotion.attestation.uri"], tmp_path)["predicate"]["approver"]
    assert approver["approver"] == "sig" and approver["public_key"] == sig.public_path.read_text()
    assert verify_recorded_approval(approver, tags=mv.tags, name=mv.name, version=version) == [
        ("approval", True, f"signed by approver sig (key {sig.keyid[:16]})")]
    tampered = {**approver, "public_key": mallory.public_path.read_text()}
    assert not verify_recorded_approval(tampered, tags=mv.tags, name=mv.name, version=version)[0][1]
