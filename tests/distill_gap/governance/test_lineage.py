"""distill_gap.governance.lineage on a small registered chain (real MLflow SQLite registry, real signatures, signed
Statements and a real soft-label entry): lineage reads edge -> student -> soft labels -> teacher -> data from the
records; verify recomputes every digest and signature and names the link that breaks."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from distill_gap.digest import sha256_json
from distill_gap.errors import DistillError
from distill_gap.governance.lineage import lineage
from distill_gap.governance.verify import verify
from distill_gap.registry.registration import LINEAGE_TAGS
from distill_gap.signing import ensure_key_pair


def test_lineage_reads_the_chain_from_the_records(chain):
    client, digests = chain["client"], chain["digests"]
    info = lineage(client, "models:/x-edge@champion", mlflow_ui="http://mlflow")
    assert set(LINEAGE_TAGS) <= set(client.get_model_version("x-edge", "1").tags)
    roles = [link["role"] for link in info["chain"]]
    assert roles == ["edge", "student", "soft labels", "teacher", "data"]
    edge, student, soft, teacher, data = info["chain"]
    assert (edge["name"], edge["version"], edge["digest"], edge["aliases"]) == ("x-edge", 1, digests["x-edge"],
                                                                                ["champion"])
    assert edge["signed"] and edge["gates_passed"] == "false"
    assert edge["link"] == "http://mlflow/#/models/x-edge/versions/1?workflowType=machine_learning"
    assert (student["name"], student["digest"]) == ("x-student", digests["x-student"])
    assert soft == {"role": "soft labels", "uri": chain["store"].entry_uri(chain["key"]), "key": chain["key"]}
    assert (teacher["name"], teacher["version"], teacher["license"]) == ("x-teacher", 1, "mit")
    assert teacher["recorded_digest"] == digests["x-teacher"] and teacher["aliases_now"] == {"pinned": 1}
    assert data["digest"] == sha256_json(chain["splits"]) and data["splits"] == chain["splits"]
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


def test_lineage_names_a_link_to_a_version_that_does_not_exist(chain):
    client = chain["client"]
    client.set_model_version_tag("x-edge", "1", "teacher.version", "99")
    try:
        with pytest.raises(DistillError, match=r"x-edge v1: its teacher.version tag names 'x-teacher/99', which is "
                                               r"not in the registry"):
            lineage(client, "models:/x-edge/1")
    finally:
        client.set_model_version_tag("x-edge", "1", "teacher.version", "1")
