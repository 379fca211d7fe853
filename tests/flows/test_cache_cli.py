"""`distill cache ls|show|verify|gc` through the real CLI on a file store and an MLflow SQLite registry."""

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from flows.cli import app
from distill_gap.softlabels.store import SoftLabelStore
from tests.helpers import fresh_mlflow_db

ROOT = Path(__file__).resolve().parents[2]


def _args(cmd, tmp_path, *extra):
    args = ["cache", *cmd, "--config", str(ROOT / "configs/tiny.yaml"),
            "--set", f"soft_labels.store=file://{tmp_path}/store", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    return args + list(extra)


def _entry(tmp_path, key):
    ids = [f"r{i}" for i in range(10)]
    logits = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    SoftLabelStore(f"file://{tmp_path}/store").write(key, ids, logits, dtype="float16", shard_size=4,
                                                      meta={"teacher": {"name": "tiny-teacher", "version": 1}})


def test_ls_show_verify_and_gc(tmp_path, mlflow_db_template, monkeypatch):
    uri = fresh_mlflow_db(mlflow_db_template, tmp_path)  # the registry gc reads: empty, already migrated
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # they would override --set tracking.uri
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    keys = [f"{c * 64}" for c in "abc"]
    for k in keys:
        _entry(tmp_path, k)
    out = runner.invoke(app, _args(["ls"], tmp_path))
    assert out.exit_code == 0, out.output
    assert all(k[:16] in out.output for k in keys)
    out = runner.invoke(app, _args(["show", keys[0][:10]], tmp_path))
    assert out.exit_code == 0 and '"num_examples": 10' in out.output
    assert runner.invoke(app, _args(["verify", keys[1]], tmp_path)).exit_code == 0
    shard = next((tmp_path / "store" / keys[1] / "shards").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = runner.invoke(app, _args(["verify", keys[1]], tmp_path))
    assert out.exit_code == 1 and shard.name in out.output
    out = runner.invoke(app, _args(["gc", "--keep", "0", "--dry-run"], tmp_path))
    assert out.exit_code == 0 and "would delete 3" in out.output
    assert len(list((tmp_path / "store").iterdir())) == 3
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny-student")
    client.create_model_version("tiny-student", source=str(tmp_path), tags={"soft_labels.key": keys[0]})
    out = runner.invoke(app, _args(["gc", "--keep", "0"], tmp_path))
    assert out.exit_code == 0 and "deleted 2" in out.output, out.output
    assert [p.name for p in (tmp_path / "store").iterdir()] == [keys[0]]  # referenced by tiny-student v1
    out = runner.invoke(app, _args(["show", "0123456789"], tmp_path))
    assert out.exit_code == 2 and "error" in out.output
