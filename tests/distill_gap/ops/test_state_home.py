"""Issue 23: the embedded Prefect's history lives in the project's state folder unless the user chose a home or a
server (environment or active profile); `distill ui` refuses a busy port in one line, before starting anything."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from distill_gap.ops.runtime import project_prefect_home


def test_default_is_the_projects_state_folder(tmp_path):
    env = {"PREFECT_PROFILES_PATH": str(tmp_path / "missing.toml")}
    assert project_prefect_home(env, cwd="/proj") == "/proj/.distill/prefect"


def test_the_users_choice_wins(tmp_path):
    none = str(tmp_path / "missing.toml")
    assert project_prefect_home({"PREFECT_HOME": "/h", "PREFECT_PROFILES_PATH": none}, cwd="/proj") is None
    assert project_prefect_home({"PREFECT_API_URL": "http://x/api", "PREFECT_PROFILES_PATH": none}, cwd="/p") is None


def test_a_profile_that_names_a_server_wins(tmp_path):
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect:4200/api"\n'
                        '[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n')
    assert project_prefect_home({"PREFECT_PROFILES_PATH": str(profiles)}, cwd="/p") is None
    assert project_prefect_home({"PREFECT_PROFILES_PATH": str(profiles), "PREFECT_PROFILE": "local"},
                                cwd="/p") == "/p/.distill/prefect"
    profiles.write_text("not toml [")  # Prefect itself would reject it; the default stays
    assert project_prefect_home({"PREFECT_PROFILES_PATH": str(profiles)}, cwd="/p") == "/p/.distill/prefect"


def test_ui_refuses_a_busy_port_in_one_line(tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = CliRunner().invoke(app, ["ui", "--prefect-port", str(port), "--mlflow-port", "1"])
    assert out.exit_code == 2, out.output
    assert out.output.splitlines()[0] == f"error: port {port} on 127.0.0.1 is in use"
    assert "Traceback" not in out.output and not (tmp_path / ".distill").exists()  # nothing started
