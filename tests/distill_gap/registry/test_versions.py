"""distill_gap.registry.versions on a real MLflow SQLite registry with real signatures: versions created with their
lineage and owner tags in one call, resolved by alias or number, fetched digest-verified (a changed stored file is
refused and named), staged writes removed again, and the teacher licence check."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from distill_gap.digest import model_digest
from distill_gap.errors import DistillError
from distill_gap.registry.registration import LINEAGE_TAGS
from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
from distill_gap.registry.versions import (ModelRef, Staged, check_teacher_license, create_version, fetch_model,
                                           resolve_version, sign_and_log, unstage, version_folder)
from flows.config import GovernanceConfig
from tests.helpers import log_model_dir


def _model_folder(path: Path, seed: bytes) -> Path:
    """A model folder as model_digest sees one: weights, config and tokenizer files."""
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(seed * 512)
    (path / "config.json").write_text('{"id2label": {"0": "negative", "1": "positive"}}')
    (path / "vocab.txt").write_text("[PAD]\n[UNK]\nfine\n")
    return path


@pytest.fixture(scope="module")
def registry(mlflow_tracking, tmp_path_factory):
    """x-edge v1 (@champion) and v2, both signed, registered with every lineage tag; the local key in a temp folder."""
    tmp = tmp_path_factory.mktemp("versions")
    governance = GovernanceConfig(owner="team-nlp", review_days=30, key_dir=str(tmp / "keys"))
    folders = [_model_folder(tmp / f"edge-{i}", bytes([i])) for i in (1, 2)]
    client = client_for(mlflow_tracking)
    lineage = {k: f"{k}-value" for k in LINEAGE_TAGS}
    staged = Staged()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DISTILL_KEY_DIR", raising=False)  # the key of `governance`, for the whole module
        with mlflow_run(client, experiment_id=experiment_id(client, mlflow_tracking), run_name="x-register") as run_id:
            for i, folder in enumerate(folders):
                signed = sign_and_log(client, run_id, folder, f"edge-{i + 1}", governance, staged)
                source = log_model_dir(client, run_id, folder, f"edge-{i + 1}")
                create_version(client, "x-edge", source=source, run_id=run_id, governance=governance, staged=staged,
                               description=f"edge {i + 1}",
                               tags={**lineage, **signed, "model.digest": model_digest(folder), "parent": "x/1"})
        client.set_registered_model_alias("x-edge", "champion", 1)
        yield {"client": client, "run_id": run_id, "folders": folders, "governance": governance, "staged": staged,
               "tmp": tmp, "experiment_id": experiment_id(client, mlflow_tracking)}


def test_a_version_is_created_with_its_lineage_owner_and_signature(registry):
    client = registry["client"]
    mv = client.get_model_version("x-edge", "2")
    assert set(LINEAGE_TAGS) <= set(mv.tags)
    assert mv.tags["parent"] == "x/1" and mv.tags["model.digest"] == model_digest(registry["folders"][1])
    assert mv.tags["owner"] == "team-nlp" and mv.tags["review.cadence_days"] == "30" and mv.tags["review.due"]
    assert mv.tags["signature.uri"].endswith("/signatures/edge-2.sig") and mv.tags["signing.keyid"]
    assert mv.tags["signing.public_key"] == (Path(registry["tmp"]) / "keys/signing-key.pub.pem").read_text()
    assert client.get_registered_model("x-edge").tags == {"owner": "team-nlp", "review.cadence_days": "30"}
    assert registry["staged"].versions == [("x-edge", "1"), ("x-edge", "2")]
    assert registry["staged"].models == ["x-edge"]  # created by this step, so its rollback may delete it
    assert registry["staged"].describe() == "x-edge v1, x-edge v2"


def test_resolve_by_alias_or_number_and_a_missing_one_names_the_fix(registry):
    client = registry["client"]
    assert resolve_version(client, "x-edge", alias="champion").version == 1
    assert resolve_version(client, "x-edge", version=2).version == 2
    with pytest.raises(DistillError, match="registered model 'x-edge' has no alias '@pinned'") as err:
        resolve_version(client, "x-edge", alias="pinned")
    assert err.value.fix == "'x-edge' has versions 1, 2; aliases: @champion -> v1"
    with pytest.raises(DistillError, match="has no version 9"):
        resolve_version(client, "x-edge", version=9)
    with pytest.raises(DistillError, match="'x-edg' has no version 1") as err:
        resolve_version(client, "x-edg", version=1)
    assert err.value.fix.startswith("no model named 'x-edg' is registered there; run `distill run --config")


def test_fetch_verifies_the_digest_and_reuses_the_cache(registry, tmp_path):
    client, folder = registry["client"], registry["folders"][0]
    ref = fetch_model(client, "x-edge", alias="champion", cache_root=tmp_path)
    assert isinstance(ref, ModelRef) and (ref.version, ref.alias, ref.run_id) == (1, "champion", registry["run_id"])
    assert ref.path == tmp_path / ref.digest and model_digest(ref.path) == model_digest(folder)
    assert (ref.path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert ref.summary()["path"] == str(ref.path) and ref.tags["parent"] == "x/1"
    stamp = (ref.path / "config.json").stat().st_mtime_ns
    assert fetch_model(client, "x-edge", version=1, cache_root=tmp_path).path == ref.path
    assert (ref.path / "config.json").stat().st_mtime_ns == stamp  # verified in the cache, not downloaded again


def test_a_changed_stored_file_is_refused_and_named(registry, tmp_path):
    client = registry["client"]
    mv = client.get_model_version("x-edge", "2")
    stored = Path(unquote(urlparse(mv.source).path)) / "config.json"
    original = stored.read_bytes()
    stored.write_text('{"id2label": {"0": "positive", "1": "negative"}}')
    try:
        with pytest.raises(DistillError, match=r"downloaded files have digest .*registry says") as err:
            fetch_model(client, "x-edge", version=2, cache_root=tmp_path)
        assert "config.json: digest differs from the signature" in err.value.problem  # from the folder's signature
        assert str(tmp_path) not in err.value.problem  # the stored folder is named, not the temporary download
        assert not list(tmp_path.iterdir())  # nothing unverified is left in the cache
    finally:
        stored.write_bytes(original)
    assert fetch_model(client, "x-edge", version=2, cache_root=tmp_path).version == 2


def test_a_version_without_a_digest_is_never_fetched(registry, tmp_path):
    client = registry["client"]
    with mlflow_run(client, experiment_id=registry["experiment_id"], run_name="nodigest") as run_id:
        source = log_model_dir(client, run_id, registry["folders"][0], "edge")
        mv = create_version(client, "x-nodigest", source=source, run_id=run_id, tags={},
                            governance=registry["governance"])
    with pytest.raises(DistillError, match="has no model.digest tag"):
        fetch_model(client, "x-nodigest", version=int(mv.version), cache_root=tmp_path)


def test_unstage_removes_what_a_step_wrote_and_tolerates_what_is_gone(registry):
    client, governance = registry["client"], registry["governance"]
    staged = Staged()
    with mlflow_run(client, experiment_id=registry["experiment_id"], run_name="x-staged") as run_id:
        signed = sign_and_log(client, run_id, registry["folders"][0], "student", governance, staged)
        source = log_model_dir(client, run_id, registry["folders"][0], "student")
        create_version(client, "x-staged", source=source, run_id=run_id, governance=governance, staged=staged,
                       tags={**signed, "model.digest": model_digest(registry["folders"][0])})
    assert staged.artifacts == [(run_id, "signatures/student.sig")]
    said = []
    removed = unstage(client, staged, said.append)
    assert removed == ["x-staged v1", "registered model x-staged", f"signatures/student.sig of run {run_id}"]
    assert not client.search_registered_models("name = 'x-staged'")
    assert [a.path for a in client.list_artifacts(run_id, "signatures")] == []
    again = unstage(client, staged, said.append)  # a second rollback (the task's hook after the step's own)
    assert not said and not [r for r in again if "x-staged" in r]  # nothing to remove, nothing to complain about


def test_version_folder_finds_the_model_in_a_pyfunc_or_a_plain_source(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors:\n  python_function:\n    artifacts:\n      model:\n"
                                      "        path: artifacts/folder\n")
    assert version_folder(tmp_path, "models:/m-123") == tmp_path / "artifacts/folder"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert version_folder(plain, "file:///store/1/abc/artifacts/edge/") == plain / "edge"


def test_teacher_licence_allow_list_and_recorded_override(tmp_path):
    teacher = ModelRef("x-teacher", 3, "d" * 64, tmp_path, None, tags={"license": "CC-BY-NC-4.0"})
    with pytest.raises(DistillError, match="licence 'CC-BY-NC-4.0', which is not in governance.allowed_licenses"):
        check_teacher_license(teacher, GovernanceConfig())
    assert check_teacher_license(teacher, GovernanceConfig(allowed_licenses=["cc-by-nc-4.0"])) is None
    reason = "research prototype, legal review LR-12"
    assert check_teacher_license(teacher, GovernanceConfig(license_override_reason=reason)) == reason
    with pytest.raises(DistillError, match="no licence tag"):
        check_teacher_license(ModelRef("x-teacher", 4, "d" * 64, tmp_path, None), GovernanceConfig())
