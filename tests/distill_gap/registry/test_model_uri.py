"""distill_gap.registry.model_uri: registry model URIs parsed, opened on exactly the store named, and resolved to an
edge folder (a local folder as is; a registered version downloaded and digest-verified) on a real SQLite store."""

from __future__ import annotations

import json

import pytest

from distill_gap.digest import model_digest
from distill_gap.edge.folder import EDGE_FILE
from distill_gap.errors import DistillError
from distill_gap.registry.model_uri import parse_model_uri, registry_client, resolve_edge
from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
from distill_gap.registry.versions import create_version
from flows.config import GovernanceConfig
from tests.helpers import log_model_dir


@pytest.fixture(scope="module")
def edge_folder(tmp_path_factory):
    """A folder with an edge.json (resolve_edge checks no more than that it is one)."""
    folder = tmp_path_factory.mktemp("edge") / "edge"
    folder.mkdir()
    (folder / EDGE_FILE).write_text(json.dumps({"format": 1, "primary": "fp32", "labels": ["a", "b"],
                                                "artifacts": {"fp32": {"path": "fp32", "runtime": "transformers"}}}))
    (folder / "fp32").mkdir()
    (folder / "fp32" / "model.safetensors").write_bytes(b"\1" * 256)
    return folder


def test_parse_model_uri():
    assert parse_model_uri("models:/x-edge@champion") == ("x-edge", "champion", None)
    assert parse_model_uri("models:/x-edge/3") == ("x-edge", None, 3)
    forms = r"(?s)not a registry model URI.*models:/<name>@<alias>.*models:/<name>/<version>"
    for bad in ("models:/x-edge", "models:/x-edge/0", "models:/x-edge@", "models:x-edge@champion", "runs:/abc/edge",
                "models:/x-edge/3/extra"):
        with pytest.raises(DistillError, match=forms):
            parse_model_uri(bad)


def test_resolve_edge_uses_a_local_folder_as_is(edge_folder, tmp_path):
    assert resolve_edge(edge_folder, "sqlite:///unused.db") == edge_folder
    with pytest.raises(DistillError, match="is not an edge model folder"):
        resolve_edge(tmp_path, "sqlite:///unused.db")
    with pytest.raises(DistillError, match="neither a registry model URI nor an existing folder"):
        resolve_edge(tmp_path / "missing", "sqlite:///unused.db")


def test_a_missing_sqlite_store_is_an_error_never_created(tmp_path):
    with pytest.raises(DistillError, match="no MLflow store at sqlite:///") as err:
        registry_client(f"sqlite:///{tmp_path}/nothing.db")
    assert "--tracking-uri" in err.value.fix and not (tmp_path / "nothing.db").exists()


def test_resolve_edge_fetches_a_registered_version_by_alias_or_number(mlflow_tracking, edge_folder, tmp_path):
    client = client_for(mlflow_tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, mlflow_tracking), run_name="x-register") as run_id:
        source = log_model_dir(client, run_id, edge_folder, "edge")
        mv = create_version(client, "x-edge", source=source, run_id=run_id, governance=GovernanceConfig(),
                            tags={"model.digest": model_digest(edge_folder)})
    client.set_registered_model_alias("x-edge", "champion", mv.version)
    said = []
    folder = resolve_edge("models:/x-edge@champion", mlflow_tracking.uri, cache_root=tmp_path, log=said.append)
    assert folder == tmp_path / model_digest(edge_folder) and (folder / EDGE_FILE).is_file()
    assert said == [f"x-edge v1 (@champion): digest {model_digest(edge_folder)[:12]} verified"]
    assert resolve_edge("models:/x-edge/1", mlflow_tracking.uri, cache_root=tmp_path) == folder
    with pytest.raises(DistillError, match="has no alias '@staging'") as err:
        resolve_edge("models:/x-edge@staging", mlflow_tracking.uri, cache_root=tmp_path)
    assert err.value.fix == "'x-edge' has versions 1; aliases: @champion -> v1"  # what there is, so a typo shows
