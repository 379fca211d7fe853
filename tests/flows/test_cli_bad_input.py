"""Issue 20, bad input on the command line: a bad version or a name with markup characters gets one plain line and
exit 2, and nothing starts (real CLI in-process, real MLflow SQLite store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("version,message", [("99", "registered model 'tiny-edge' has no version 99"),
                                             ("0", "--version 0: versions are numbered from 1"),
                                             ("-3", "--version -3: versions are numbered from 1")])
def test_promote_a_version_that_does_not_exist(tmp_path, mlflow_db_template, version, message):
    import shutil

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    out = CliRunner().invoke(app, ["promote", "--config", str(ROOT / "configs/tiny.yaml"), "--version", version,
                                   "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert out.exit_code == 2, out.output
    assert out.output.startswith(f"error: {message}") and "Traceback" not in out.output
    assert len([line for line in out.output.splitlines() if line.strip()]) == 2  # the problem and the fix


def test_user_text_is_never_read_as_markup(tmp_path):
    odd = tmp_path / "a[/]b[bold]c"
    out = CliRunner().invoke(app, ["verify", "models:/x[/]-edge/1", "--tracking-uri", f"sqlite:///{odd}/m.db",
                                   "--key-dir", str(odd)])
    assert out.exit_code == 2, out.output
    assert "a[/]b[bold]c" in out.output and "Traceback" not in out.output


@pytest.fixture()
def one_version_store(tmp_path, mlflow_db_template):
    """A store where 'tiny-edge' has version 1 only, @champion on it, and a local key pair."""
    import shutil

    from mlflow import MlflowClient

    from distill_gap.signing import ensure_key_pair

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny-edge")
    client.create_model_version("tiny-edge", source=str(tmp_path))
    client.set_registered_model_alias("tiny-edge", "champion", "1")
    ensure_key_pair(tmp_path / "keys")
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n')
    return {"uri": uri, "keys": str(tmp_path / "keys"), "rows": str(tmp_path / "rows.jsonl"), "tmp": tmp_path}


@pytest.mark.parametrize("command,message", [
    (["verify", "models:/tiny-edge/99"], "registered model 'tiny-edge' has no version 99"),
    (["verify", "models:/tiny-edge@staging"], "registered model 'tiny-edge' has no alias '@staging'"),
    (["lineage", "models:/tiny-edge/99"], "registered model 'tiny-edge' has no version 99"),
    (["lineage", "models:/tiny-edg/1"], "registered model 'tiny-edg' has no version 1"),
    (["dossier", "models:/tiny-edge/99"], "registered model 'tiny-edge' has no version 99"),
    (["rollback", "tiny-edge", "--to", "99", "--reason", "r"], "tiny-edge has no version 99"),
    (["rollback", "tiny-edge", "--to", "0", "--reason", "r"], "tiny-edge has no version 0"),
    (["predict", "--model", "models:/tiny-edge/99"], "registered model 'tiny-edge' has no version 99"),
    (["predict", "--model", "models:/tiny-edg@champion"], "registered model 'tiny-edg' has no alias '@champion'"),
], ids=lambda c: "-".join(c[:2]) if isinstance(c, list) else None)
def test_every_command_names_a_bad_version_in_one_line(one_version_store, command, message):
    """Issue 20: a bad version or name in verify, lineage, dossier, rollback or predict gets the problem and the fix
    (what the model does have), exit 2, no traceback, and changes nothing."""
    from mlflow import MlflowClient

    s = one_version_store
    extra = ["--tracking-uri", s["uri"]]
    if command[0] in ("verify", "rollback", "predict"):
        extra += ["--key-dir", s["keys"]]
    if command[0] == "predict":
        extra += ["--input", s["rows"], "--registry-timeout", "5"]
    out = CliRunner().invoke(app, command + extra, env={"DISTILL_MODEL_CACHE": str(s["tmp"] / "cache")})
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert lines[0].startswith(f"error: {message}") and "Traceback" not in out.output, out.output
    assert len(lines) == 2 and lines[1].lstrip().startswith("fix:"), out.output
    if "tiny-edge" in message:
        assert "'tiny-edge' has versions 1; aliases: @champion -> v1" in lines[1] or command[0] == "rollback"
    client = MlflowClient(tracking_uri=s["uri"], registry_uri=s["uri"])
    assert [int(v.version) for v in client.search_model_versions("name='tiny-edge'")] == [1]
    assert {a: str(v) for a, v in client.get_registered_model("tiny-edge").aliases.items()} == {"champion": "1"}


@pytest.mark.integration
@pytest.mark.parametrize("target,message", [
    ("3f2a4c1e-0000-4000-8000-000000000000", "no flow run 3f2a4c1e-0000-4000-8000-000000000000 on the Prefect API"),
    ("not-a-run-id", "'not-a-run-id' is not a flow run id")])
def test_approve_names_a_flow_run_that_does_not_exist(prefect_api, target, message):
    """Issue 20: answering a paused promotion that is not there is one line and exit 2 (was exit 1, no output)."""
    out = CliRunner().invoke(app, ["approve", target, "--approver", "rita", "--decision", "approve",
                                   "--config", str(ROOT / "configs/tiny.yaml")])
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert lines[0].startswith(f"error: {message}") and lines[1].lstrip().startswith("fix:"), out.output


def test_approve_names_a_version_that_does_not_exist(one_version_store):
    """A waiver for a version the model does not have: one line, exit 2, nothing promoted."""
    from mlflow import MlflowClient

    s = one_version_store
    out = CliRunner().invoke(app, ["approve", "models:/tiny-edge/99", "--approver", "rita", "--waive", "x",
                                   "--reason", "r", "--config", str(ROOT / "configs/tiny.yaml"),
                                   "--set", f"tracking.uri={s['uri']}", "--set", f"governance.key_dir={s['keys']}"])
    assert out.exit_code == 2 and out.output.startswith("error: tiny-edge has no version 99"), out.output
    client = MlflowClient(tracking_uri=s["uri"], registry_uri=s["uri"])
    assert {a: str(v) for a, v in client.get_registered_model("tiny-edge").aliases.items()} == {"champion": "1"}
