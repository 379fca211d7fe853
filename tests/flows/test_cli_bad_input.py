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
