"""Issue 19: a version whose evidence is insufficient becomes @challenger only; @champion needs a named approver's
waiver, signed with their own key, of exactly its insufficient gates. Real MLflow on SQLite, the session's Prefect
API (the promotion lock), real EC keys and DSSE envelopes; the `distill approve` command end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill_gap.errors import DistillError
from flows.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
THIN = "noninferior:recall:negative,noninferior:slice:condition=Depression"


@pytest.fixture()
def registry(tmp_path, tiny_model_dir, mlflow_db_template, prefect_api):
    """wv-edge v1 with insufficient evidence for two gates; approvers alice (a key in the config) and bob (a name)."""
    from distill_gap.digest import model_digest
    from distill_gap.governance.waiver import create_approver_key
    from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
    from distill_gap.registry.versions import create_version
    from tests.helpers import fresh_mlflow_db, log_model_dir

    base = load_config(ROOT / "configs/tiny.yaml", ["name=wv", f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp_path)}",
                                                    f"tracking.artifact_location={tmp_path}/artifacts",
                                                    f"governance.key_dir={tmp_path}/keys"])
    alice = create_approver_key(base.governance, "alice")
    create_approver_key(base.governance, "mallory")  # a real key pair that the config does not list
    config = tmp_path / "wv.yaml"
    import yaml

    raw = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    raw.update(name="wv", tracking={"uri": base.tracking.uri, "artifact_location": f"{tmp_path}/artifacts"},
               governance={"key_dir": f"{tmp_path}/keys"},
               approval={"approvers": ["bob", {"name": "alice", "public_key": str(alice.public_path)}]})
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    client = client_for(cfg.tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name="register") as run_id:
        source = log_model_dir(client, run_id, tiny_model_dir, "edge")
        create_version(client, cfg.edge_model_name, source=source, run_id=run_id, governance=cfg.governance,
                       tags={"gates.passed": "false", "gates.outcome": "insufficient", "gates.insufficient": THIN,
                             "model.digest": model_digest(tiny_model_dir)},
                       description="Verdict: insufficient evidence")
    return {"cfg": cfg, "client": client, "config": config, "tmp": tmp_path}


def _state(client, name):
    model = client.get_registered_model(name)
    return {"aliases": dict(model.aliases),
            "tags": {str(v.version): dict(v.tags) for v in client.search_model_versions(f"name='{name}'")}}


def test_insufficient_evidence_is_challenger_and_a_signed_waiver_makes_champion(registry):
    from distill_gap.governance.promotion import promote
    from distill_gap.governance.promotion import waive_and_promote
    from distill_gap.signing import verify_statement

    cfg, client = registry["cfg"], registry["client"]
    name = cfg.edge_model_name
    logs = []
    out = promote(client, 1, name=name, approval_required=False, governance=cfg.governance,
                  run_id=client.get_model_version(name, "1").run_id, log=logs.append)
    assert out["champion"] is None and out["challenger"] == 1 and "waiver" in out["reason"]
    assert _state(client, name)["aliases"] == {"challenger": 1}
    assert "distill approve models:/wv-edge/1 --approver <name> --waive " + THIN in logs[-1]

    result = waive_and_promote(client, cfg, name=name, version=1, approver="alice", waived=THIN.split(","),
                               reason="negative recall within 5 points on the 2026 audit set", log=logs.append)
    assert result["champion"] == 1 and _state(client, name)["aliases"] == {"challenger": 1, "champion": 1}
    tags = _state(client, name)["tags"]["1"]
    assert tags["promotion.approver"] == "alice" and tags["promotion.waiver"] == THIN
    assert tags["promotion.comment"].startswith("waiver of noninferior:recall:negative")
    # the promote Statement carries the waiver, which verifies with alice's configured key
    import base64
    import json

    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=tags["promotion.attestation.uri"],
                                                dst_path=str(registry["tmp"] / "promote"),
                                                tracking_uri=cfg.tracking.uri)
    stmt = json.loads(base64.b64decode(json.loads(Path(local).read_text())["payload"]))
    waiver = stmt["predicate"]["approver"]["waiver"]
    alice_pem = Path(cfg.approval.approvers[1].public_key).read_text()
    assert verify_statement(waiver, [alice_pem])["predicate"]["parameters"]["waived"] == THIN.split(",")


@pytest.mark.parametrize("case", ["wrong key", "not an approver", "approver without key", "unknown gate",
                                  "one gate left", "no reason", "expired review"])
def test_a_bad_waiver_says_why_and_changes_nothing(registry, case):
    from distill_gap.governance.promotion import waive_and_promote

    cfg, client = registry["cfg"], registry["client"]
    name = cfg.edge_model_name
    before = _state(client, name)
    kwargs = dict(name=name, version=1, approver="alice", waived=THIN.split(","), reason="acceptable")
    expected = {"wrong key": "not signed by alice's configured key", "not an approver": "'carol' is not an approver",
                "approver without key": "'bob' is not an approver with a signing key",
                "unknown gate": "calibration_ece: not an insufficient-evidence gate",
                "one gate left": "leaves noninferior:slice:condition=Depression unwaived",
                "no reason": "a waiver needs a reason",
                "expired review": r"wv-edge v1's review was due 2026-01-01: an expired review cannot be promoted"}[case]
    if case == "wrong key":  # mallory's own key pair, presented as alice's
        kwargs["key_dir_override"] = Path(cfg.governance.key_dir) / "approvers" / "mallory"
    elif case == "not an approver":
        kwargs["approver"] = "carol"
        from distill_gap.governance.waiver import create_approver_key
        create_approver_key(cfg.governance, "carol")
    elif case == "approver without key":
        kwargs["approver"] = "bob"
        from distill_gap.governance.waiver import create_approver_key
        create_approver_key(cfg.governance, "bob")
    elif case == "unknown gate":
        kwargs["waived"] = [*THIN.split(","), "calibration_ece"]
    elif case == "one gate left":
        kwargs["waived"] = THIN.split(",")[:1]
    elif case == "expired review":
        client.set_model_version_tag(name, "1", "review.due", "2026-01-01")
        before = _state(client, name)
    else:
        kwargs["reason"] = "  "
    with pytest.raises(DistillError, match=expected):
        waive_and_promote(client, cfg, **kwargs)
    assert _state(client, name) == before  # nothing promoted, nothing tagged


def test_distill_approve_waives_from_the_command_line(registry, prefect_api_url):
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "DISTILL_PROGRESS": "0"}
    args = [str(BIN / "distill"), "approve", "models:/wv-edge/1", "--approver", "alice", "--config",
            str(registry["config"])]
    refused = subprocess.run([*args, "--waive", "noninferior:recall:negative", "--reason", "ok"], env=env,
                             capture_output=True, text=True, timeout=240)
    assert refused.returncode == 2 and "unwaived" in refused.stderr and "Traceback" not in refused.stderr
    done = subprocess.run([*args, "--waive", THIN, "--reason", "audit set agrees"], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "waived by alice" in done.stdout and "@champion -> v1" in done.stdout
    assert registry["client"].get_registered_model("wv-edge").aliases == {"challenger": 1, "champion": 1}


def test_verify_checks_the_waiver_and_names_a_swapped_one(registry):
    """`distill verify`'s waiver link: the logged waiver is the one in the signed promote Statement, signed by the
    approver's key, over this version; a waiver swapped for one signed by another key, or edited tags, break it."""
    import json

    from distill_gap.governance.verify import _download
    from distill_gap.governance.promotion import waive_and_promote
    from distill_gap.governance.waiver import sign_waiver, verify_recorded_waiver
    from distill_gap.registry.tracking import experiment_id, mlflow_run

    cfg, client, tmp = registry["cfg"], registry["client"], registry["tmp"]
    name = cfg.edge_model_name
    waive_and_promote(client, cfg, name=name, version=1, approver="alice", waived=THIN.split(","), reason="ok",
                      log=lambda *_: None)
    trusted = [(Path(cfg.governance.key_dir) / "signing-key.pub.pem").read_text()]

    def check(sub):
        mv = client.get_model_version(name, "1")
        (tmp / sub).mkdir()
        return verify_recorded_waiver(client, mv, trusted=trusted, download=_download, tmp=tmp / sub)

    [(link, ok, detail)] = check("good")
    assert link == "waiver" and ok and "signed by approver alice" in detail
    # mallory signs a waiver of her own and puts it where the tag points
    forged = sign_waiver(cfg.governance, approver="alice", name=name, version=1, waived=THIN.split(","),
                         reason="ok", digest=client.get_model_version(name, "1").tags["model.digest"],
                         key_dir_override=Path(cfg.governance.key_dir) / "approvers" / "mallory")
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name="forge") as run_id:
        (tmp / "forged.dsse.json").write_text(json.dumps(forged))
        client.log_artifact(run_id, str(tmp / "forged.dsse.json"), "waiver")
        uri = f"{client.get_run(run_id).info.artifact_uri}/waiver/forged.dsse.json"
    good_uri = client.get_model_version(name, "1").tags["promotion.waiver.uri"]
    client.set_model_version_tag(name, "1", "promotion.waiver.uri", uri)
    [(_, ok, detail)] = check("forged")
    assert not ok and "not the one in the signed promote Statement" in detail
    client.set_model_version_tag(name, "1", "promotion.waiver.uri", good_uri)
    client.set_model_version_tag(name, "1", "promotion.waiver", "noninferior:recall:negative")  # edited tag
    [(_, ok, detail)] = check("edited")
    assert not ok and "differ from the version" in detail
