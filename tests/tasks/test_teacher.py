"""Teacher bootstrap and import through a real MLflow SQLite registry."""

import json
import shutil

import pytest

from flows.config import load_config
from distill_gap.errors import DistillError
from distill_gap.registry.tracking import client_for
from distill_gap.registry.versions import fetch_model
from distill_gap.kd.teacher import bootstrap_teacher, import_teacher
from tasks.teacher import resolve_teacher


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return load_config(root / "configs/tiny.yaml", ["teacher.epochs=1", "data.max_rows=60",
                                                    f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])


def test_bootstrap_registers_pins_and_is_reused(cfg, tmp_path):
    first = bootstrap_teacher(cfg, log=lambda *_: None)
    again = bootstrap_teacher(cfg, log=lambda *_: None)
    assert not first["reused"] and again["reused"] and again["version"] == first["version"] == 1
    client = client_for(cfg.tracking)
    mv = client.get_model_version_by_alias("tiny-teacher", "pinned")
    assert mv.tags["model.digest"] == first["digest"] and mv.tags["labels"] == "negative,neutral,positive"
    ref = resolve_teacher(client_for(cfg.tracking), cfg.teacher_model_name, cfg.teacher, cfg.data.labels, cache_root=tmp_path / "models")
    assert ref.version == 1 and ref.digest == first["digest"]
    changed = cfg.model_copy(update={"seed": 99})
    assert bootstrap_teacher(changed, log=lambda *_: None)["version"] == 2  # new data/settings -> new version


def test_import_refuses_a_teacher_with_another_label_set(cfg, tiny_model_dir, tmp_path):
    bad = tmp_path / "two-labels"
    shutil.copytree(tiny_model_dir, bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["id2label"] = {"0": "neg", "1": "pos", "2": "other"}
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(DistillError, match=r"predicts 3 labels \['neg', 'pos', 'other'\].*data.labels"):
        import_teacher(cfg, bad, license="mit", log=lambda *_: None)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        client_for(cfg.tracking).get_registered_model("tiny-teacher")  # nothing registered


def test_import_refuses_pickle_and_remote_code(cfg, tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(DistillError, match="pickle-based weight files"):
        import_teacher(cfg, pickled, license="mit")
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    conf = json.loads((remote / "config.json").read_text())
    conf["auto_map"] = {"AutoModel": "evil.Model"}
    (remote / "config.json").write_text(json.dumps(conf))
    with pytest.raises(DistillError, match="remote code"):
        import_teacher(cfg, remote, license="mit")


def test_import_registers_and_fetch_verifies_digest(cfg, tiny_model_dir, tmp_path):
    out = import_teacher(cfg, tiny_model_dir, license="apache-2.0", log=lambda *_: None)
    client = client_for(cfg.tracking)
    ref = fetch_model(client, "tiny-teacher", alias="pinned", cache_root=tmp_path / "models")
    assert ref.digest == out["digest"] and (ref.path / "model.safetensors").is_file()
    mv = client.get_model_version("tiny-teacher", "1")
    assert mv.tags["license"] == "apache-2.0"


def test_missing_teacher_names_the_command(cfg, tmp_path):
    with pytest.raises(DistillError, match="distill teacher bootstrap"):
        resolve_teacher(client_for(cfg.tracking), cfg.teacher_model_name, cfg.teacher, cfg.data.labels, cache_root=tmp_path / "models")
