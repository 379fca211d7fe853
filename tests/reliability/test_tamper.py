"""Issue 20: tampering tried on purpose against a registered chain (tests/chain.py: real MLflow SQLite registry, real
signatures and Statements, promoted to @challenger by distill_gap.governance.promotion), as an operator with write
access to the registry and the artifact store (or a mistaken hand in the MLflow UI) would. Each case is detected by
`distill verify` with a BROKEN row that names what broke; the chain is restored after each case."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from distill_gap.governance.verify import verify

pytestmark = pytest.mark.reliability


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


@pytest.fixture(scope="module")
def promoted(chain, prefect_api):
    """The chain with x-edge v1 @challenger through promote() (its promote Statement in the pipeline run)."""
    from distill_gap.governance.promotion import promote

    client = chain["client"]
    client.delete_registered_model_alias("x-edge", "champion")  # the chain's fixture set it by hand
    out = promote(client, 1, name="x-edge", approval_required=False, governance=chain["governance"],
                  run_id=chain["run"], log=lambda m: None)
    assert out["challenger"] == 1 and client.get_registered_model("x-edge").aliases == {"challenger": 1}
    return chain


def _broken(chain, uri: str = "models:/x-edge/1") -> dict[str, str]:
    result = verify(chain["client"], uri, key_dir=chain["keys"])
    return {c.link: c.detail for c in result.checks if not c.ok}


@contextlib.contextmanager
def _restored(*paths: Path):
    saved = {p: p.read_bytes() if p.exists() else None for p in paths}
    try:
        yield
    finally:
        for p, data in saved.items():
            if data is None:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(data)


def _statements(chain) -> Path:
    return _local(chain["client"].get_model_version("x-edge", "1").tags["attestation.uri"])


def test_the_untouched_chain_verifies_through_its_alias(promoted):
    assert _broken(promoted, "models:/x-edge@challenger") == {}


@pytest.mark.parametrize("source,target", [("distill", "quantize"), ("soft-labels", "promote"),
                                           ("quantize", "evaluate")])
def test_a_statement_copied_over_another_step_is_broken(promoted, source, target):
    folder = _statements(promoted)
    with _restored(folder / f"{target}.dsse.json"):
        shutil.copy(folder / f"{source}.dsse.json", folder / f"{target}.dsse.json")
        broken = _broken(promoted)
    assert broken[f"attestation {target}"] == (f"{target}.dsse.json holds the signed Statement of step {source!r}: "
                                               "copied or renamed")


def test_deleted_statements_are_missing_steps(promoted):
    folder = _statements(promoted)
    with _restored(folder / "evaluate.dsse.json", folder / "promote.dsse.json"):
        (folder / "evaluate.dsse.json").unlink()
        (folder / "promote.dsse.json").unlink()
        broken = _broken(promoted, "models:/x-edge@challenger")
    assert broken["attestation evaluate"].startswith("missing from ")
    assert broken["@challenger"].startswith("no signed promote Statement moved @challenger to x-edge v1")


def test_a_promote_statement_of_another_version_is_broken(promoted):
    from distill_gap.governance.attestation import promote_statement
    from distill_gap.signing import ensure_key_pair, sign_statement

    path = _statements(promoted) / "promote.dsse.json"
    other = promote_statement(name="x-edge", version=9, digest="9" * 64, action="promote", approver=None,
                              aliases_before={}, aliases_after={"champion": 9}, gates={}, reason="", context={})
    with _restored(path):
        path.write_text(json.dumps(sign_statement(other, ensure_key_pair(promoted["keys"]))))
        broken = _broken(promoted)
    assert broken["attestation promote"] == "it promotes x-edge/9, not x-edge/1"


@pytest.mark.parametrize("tag,value,link,message", [
    ("parent", None, "parent (the student)", "no parent tag: the student's checks cannot run"),
    ("parent", "x-student/7", "parent (the student)", "'x-student/7' names no registry version"),
    ("teacher.version", "99", "teacher version", "'x-teacher/99' names no registry version")])
def test_a_missing_link_is_broken_never_a_traceback(promoted, tag, value, link, message):
    client = promoted["client"]
    before = client.get_model_version("x-edge", "1").tags[tag]
    try:
        if value is None:
            client.delete_model_version_tag("x-edge", "1", tag)
        else:
            client.set_model_version_tag("x-edge", "1", tag, value)
        broken = _broken(promoted)
    finally:
        client.set_model_version_tag("x-edge", "1", tag, before)
    assert broken[link].startswith(message)


def test_forged_data_digests_disagree_with_the_signed_statements(promoted):
    from distill_gap.digest import sha256_json

    client = promoted["client"]
    inputs = _local(client.get_run(promoted["run"]).info.artifact_uri) / "lineage" / "inputs.json"
    forged = {**promoted["splits"], "train": "f" * 64}
    before = client.get_model_version("x-edge", "1").tags["data.digest"]
    with _restored(inputs):
        inputs.write_text(json.dumps({"data": forged}))
        client.set_model_version_tag("x-edge", "1", "data.digest", sha256_json(forged))
        try:
            broken = _broken(promoted)
        finally:
            client.set_model_version_tag("x-edge", "1", "data.digest", before)
    assert broken["data digests"].startswith("3 split digests attested by the evaluate Statement hash to")
    assert broken["lineage/inputs.json"] == "differs from the signed Statements for train"


def test_a_champion_moved_by_hand_is_broken(promoted):
    client = promoted["client"]
    client.set_registered_model_alias("x-edge", "champion", 1)  # the MLflow UI's alias box
    try:
        broken = _broken(promoted, "models:/x-edge@champion")
    finally:
        client.delete_registered_model_alias("x-edge", "champion")
    assert broken["@champion"] == ("x-edge v1 is @champion with insufficient evidence and no waiver: the alias was "
                                   "moved by hand (MLflow UI or client)")


def test_an_edited_edge_folder_with_its_digest_tag_updated_fails_the_signature(promoted):
    from distill_gap.digest import model_digest

    client = promoted["client"]
    mv = client.get_model_version("x-edge", "1")
    folder = _local(mv.source)
    scope = folder / "scope.json"
    with _restored(scope):
        scope.write_text(json.dumps({**json.loads(scope.read_text()), "threshold": 0}))  # everything in scope
        client.set_model_version_tag("x-edge", "1", "model.digest", model_digest(folder))
        try:
            broken = _broken(promoted)
        finally:
            client.set_model_version_tag("x-edge", "1", "model.digest", mv.tags["model.digest"])
    assert "scope.json" in broken["x-edge v1 signature"]


def test_a_statement_signed_by_another_key_is_broken(promoted, tmp_path):
    from distill_gap.signing import ensure_key_pair, sign_statement

    path = _statements(promoted) / "evaluate.dsse.json"
    stmt = json.loads(base64.b64decode(json.loads(path.read_text())["payload"]))
    stmt["predicate"]["results"]["gates"] = {}  # the evidence rewritten, re-signed with the attacker's own key
    with _restored(path):
        path.write_text(json.dumps(sign_statement(stmt, ensure_key_pair(tmp_path / "mallory"))))
        broken = _broken(promoted)
    assert broken["attestation evaluate"].startswith("the statement is signed by unknown key(s)")
    assert "dossier" in broken


def test_lineage_shows_the_attested_data_digests_and_warns_of_a_hand_moved_alias(promoted):
    from typer.testing import CliRunner

    from flows.cli import app
    from distill_gap.governance.lineage import lineage

    client = promoted["client"]
    inputs = _local(client.get_run(promoted["run"]).info.artifact_uri) / "lineage" / "inputs.json"
    with _restored(inputs):
        inputs.write_text(json.dumps({"data": {**promoted["splits"], "train": "f" * 64}}))
        data = lineage(client, "models:/x-edge/1")["chain"][-1]
    assert data["splits"] == promoted["splits"]  # what the evaluate Statement attests, not the forged file
    assert data["problem"].startswith("lineage/inputs.json differs from the signed evaluate Statement for train")
    client.set_registered_model_alias("x-edge", "champion", 1)
    try:
        out = CliRunner().invoke(app, ["lineage", "models:/x-edge@champion", "--tracking-uri",
                                       client._registry_uri])
    finally:
        client.delete_registered_model_alias("x-edge", "champion")
    assert out.exit_code == 0, out.output
    assert "x-edge v1 is @challenger, @champion although its gates are insufficient and no waiver" in out.output
