"""distill_gap.governance.lineage on a small registered chain (real MLflow SQLite registry, real signatures, signed
Statements and a real soft-label entry): lineage reads edge -> student -> soft labels -> teacher -> data from the
records; verify recomputes every digest and signature and names the link that breaks."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from distill_gap.digest import model_digest, sha256_json
from distill_gap.errors import DistillError
from distill_gap.governance.attestation import ATTESTATION_DIR, record, statement
from distill_gap.governance.lineage import lineage, verify
from distill_gap.registry.registration import LINEAGE_TAGS
from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
from distill_gap.registry.versions import create_version, sign_and_log
from distill_gap.signing import ensure_key_pair
from distill_gap.softlabels.store import SoftLabelStore
from flows.config import GovernanceConfig
from tests.helpers import log_model_dir

SPLITS = {"train": "1" * 64, "validation": "2" * 64, "test": "3" * 64}  # the split digests of the pipeline run
KEY = "ab" * 32  # the soft-label cache key


def _model_folder(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(bytes([seed]) * 512)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    return path


@pytest.fixture(scope="module")
def chain(mlflow_tracking, tmp_path_factory):
    """x-teacher v1 -> soft labels -> x-student v1 -> x-edge v1, as the pipeline registers them."""
    tmp = tmp_path_factory.mktemp("lineage")
    gov = GovernanceConfig(key_dir=str(tmp / "keys"))
    teacher, student, edge = (_model_folder(tmp / n, i) for i, n in enumerate(("teacher", "student", "edge")))
    store = SoftLabelStore(f"file://{tmp}/soft-labels")
    manifest = store.write(KEY, ["r1", "r2", "r3"], np.arange(9, dtype=np.float32).reshape(3, 3), shard_size=2,
                           meta={})
    client = client_for(mlflow_tracking)
    eid = experiment_id(client, mlflow_tracking)
    digests = {name: model_digest(folder) for name, folder in
               (("x-teacher", teacher), ("x-student", student), ("x-edge", edge))}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DISTILL_KEY_DIR", raising=False)
        with mlflow_run(client, experiment_id=eid, run_name="x-teacher-import") as rid:
            signed = sign_and_log(client, rid, teacher, "teacher", gov)
            create_version(client, "x-teacher", source=log_model_dir(client, rid, teacher, "teacher"), run_id=rid,
                           governance=gov, tags={**signed, "model.digest": digests["x-teacher"], "license": "mit"})
        client.set_registered_model_alias("x-teacher", "pinned", 1)
        with mlflow_run(client, experiment_id=eid, run_name="x-pipeline", tags={"distill.stage": "pipeline"}) as run:
            client.log_dict(run, {"data": SPLITS}, "lineage/inputs.json")
            soft = {f"soft-labels/{KEY}": sha256_json(manifest)}
            for step, subjects, inputs in (
                    ("soft-labels", soft, {"x-teacher/1": digests["x-teacher"]}),
                    ("distill", {"x-student": digests["x-student"]}, {"x-teacher/1": digests["x-teacher"], **soft}),
                    ("quantize", {"edge/int8": digests["x-edge"]}, {"x-student": digests["x-student"]}),
                    ("evaluate", {"x-edge": digests["x-edge"]}, {"data/test": SPLITS["test"]})):
                record(client, run, gov, statement(step, subjects, technique="test", parameters={}, inputs=inputs))
            with mlflow_run(client, parent_run_id=run, run_name="x-register",
                            tags={"distill.stage": "register"}) as rid:
                lineage_tags = {"teacher.name": "x-teacher", "teacher.version": "1",
                                "teacher.digest": digests["x-teacher"], "data.digest": sha256_json(SPLITS),
                                "soft_labels.uri": store.entry_uri(KEY), "soft_labels.key": KEY,
                                "config.digest": "c" * 64, "code.version": "test", "gates.passed": "true",
                                "gates.outcome": "pass",
                                "attestation.uri": f"{client.get_run(run).info.artifact_uri}/{ATTESTATION_DIR}"}
                for name, folder, parent in (("x-student", student, "x-teacher/1"), ("x-edge", edge, "x-student/1")):
                    signed = sign_and_log(client, rid, folder, name, gov)
                    create_version(client, name, source=log_model_dir(client, rid, folder, name), run_id=rid,
                                   governance=gov, tags={**lineage_tags, **signed, "parent": parent,
                                                         "model.digest": digests[name], "edge.primary": "int8"})
        client.set_registered_model_alias("x-edge", "champion", 1)
        yield {"client": client, "run": run, "digests": digests, "keys": tmp / "keys", "tmp": tmp,
               "store": store}


def test_lineage_reads_the_chain_from_the_records(chain):
    client, digests = chain["client"], chain["digests"]
    info = lineage(client, "models:/x-edge@champion", mlflow_ui="http://mlflow")
    assert set(LINEAGE_TAGS) <= set(client.get_model_version("x-edge", "1").tags)
    roles = [link["role"] for link in info["chain"]]
    assert roles == ["edge", "student", "soft labels", "teacher", "data"]
    edge, student, soft, teacher, data = info["chain"]
    assert (edge["name"], edge["version"], edge["digest"], edge["aliases"]) == ("x-edge", 1, digests["x-edge"],
                                                                                ["champion"])
    assert edge["signed"] and edge["gates_passed"] == "true"
    assert edge["link"] == "http://mlflow/#/models/x-edge/versions/1"
    assert (student["name"], student["digest"]) == ("x-student", digests["x-student"])
    assert soft == {"role": "soft labels", "uri": chain["store"].entry_uri(KEY), "key": KEY}
    assert (teacher["name"], teacher["version"], teacher["license"]) == ("x-teacher", 1, "mit")
    assert teacher["recorded_digest"] == digests["x-teacher"] and teacher["aliases_now"] == {"pinned": 1}
    assert data["digest"] == sha256_json(SPLITS) and data["splits"] == SPLITS
    assert info["pipeline_run"]["run_id"] == chain["run"]  # the stage run's parent


def test_lineage_refuses_a_version_without_lineage(chain):
    with pytest.raises(DistillError, match=r"x-teacher v1 has no lineage tags"):
        lineage(chain["client"], "models:/x-teacher/1")


def test_verify_checks_every_link(chain):
    result = verify(chain["client"], "models:/x-edge/1", key_dir=chain["keys"])
    checks = {c.link: c for c in result.checks}
    assert result.ok, [c for c in result.checks if not c.ok]
    for name in ("x-edge", "x-student", "x-teacher"):
        assert checks[f"{name} v1 digest"].ok and checks[f"{name} v1 signature"].ok
    for step in ("soft-labels", "distill", "quantize", "evaluate"):
        assert checks[f"attestation {step}"].ok
    assert {"teacher digest recorded", "distill input teacher", "soft labels shards", "soft labels manifest",
            "data digests"} <= set(checks)
    assert result.key_source == f"local key {chain['keys'] / 'signing-key.pub.pem'}"


def test_verify_with_another_key_breaks_every_signature(chain, tmp_path):
    other = ensure_key_pair(tmp_path / "other")
    result = verify(chain["client"], "models:/x-edge/1", public_keys=[str(other.public_path)])
    broken = {c.link for c in result.checks if not c.ok}
    assert not result.ok
    assert {"x-edge v1 signature", "x-student v1 signature", "x-teacher v1 signature",
            "attestation soft-labels", "attestation evaluate"} <= broken
    assert "x-edge v1 digest" not in broken  # the files themselves are intact


def test_verify_names_a_changed_stored_file(chain):
    client = chain["client"]
    stored = Path(unquote(urlparse(client.get_model_version("x-student", "1").source).path)) / "config.json"
    original = stored.read_bytes()
    stored.write_text('{"seed": 99}')
    try:
        result = verify(client, "models:/x-edge/1", key_dir=chain["keys"])
    finally:
        stored.write_bytes(original)
    broken = {c.link: c.detail for c in result.checks if not c.ok}
    assert set(broken) == {"x-student v1 digest", "x-student v1 signature"}
    assert "config.json: digest differs from the signature" in broken["x-student v1 signature"]
