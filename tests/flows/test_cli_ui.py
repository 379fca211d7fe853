"""Issue 23, `distill ui` for real: both servers on free ports other than the defaults, "ready" only once both answer,
the Prefect UI pointed at its own API, the embedded history in the project's state folder, MLflow without its job
runner, and SIGTERM stopping every process it started and freeing both ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from flows.cli_ui import _port_free  # the same check the command makes before it starts anything

pytestmark = [pytest.mark.slow]
BINDIR = Path(sys.executable).parent


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def test_ui_is_ready_on_any_port_and_sigterm_stops_every_child(tmp_path):
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_UI_URL")}
    env["PREFECT_PROFILES_PATH"] = str(tmp_path / "no-profiles.toml")  # the user's own profile must not decide
    out = tmp_path / "out.txt"
    with open(out, "w") as sink:
        proc = subprocess.Popen([str(BINDIR / "distill"), "ui", "--prefect-port", str(prefect_port),
                                 "--mlflow-port", str(mlflow_port), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
                                cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        # 1. "ready" comes, and only once both health checks answer (checked right after it is printed)
        deadline = time.monotonic() + 240
        while "ready: both answer" not in out.read_text():  # not "ready" alone: tmp_path's name holds it
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        assert _get(f"http://127.0.0.1:{prefect_port}/api/health") == (200, "true")
        assert _get(f"http://127.0.0.1:{mlflow_port}/health")[0] == 200
        printed = out.read_text()
        assert f"http://127.0.0.1:{prefect_port}" in printed and f"http://127.0.0.1:{mlflow_port}" in printed
        # in model-training mode (MLflow 3.17 opens a fresh browser in GenAI mode: no registry in the sidebar); a new
        # store has no experiment yet: the experiment list
        assert f"MLflow UI   http://127.0.0.1:{mlflow_port}/#/experiments?workflowType=machine_learning" in printed
        assert f"registry: http://127.0.0.1:{mlflow_port}/#/models?workflowType=machine_learning" in printed
        # ports other than the ones the links were written for: how to match them (issue 23), and no library noise
        assert "start `distill ui --mlflow-port 5000`" in printed and "start `distill ui --prefect-port 4200`" in printed
        assert "Warning" not in printed, printed
        # 2. the browser's UI is told to call this server's API, not the default port's
        settings = json.loads(_get(f"http://127.0.0.1:{prefect_port}/ui-settings")[1])
        assert settings["api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        # 3. the embedded Prefect's history lives in the project's state folder, the logs beside it
        assert (tmp_path / ".distill/prefect/prefect.db").exists()
        assert {p.name for p in (tmp_path / ".distill/logs").iterdir()} == {"prefect-server.log", "mlflow-server.log"}
        # 4. one MLflow worker, no job runner: the Prefect server, the MLflow CLI and its one uvicorn process
        children = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in children]
        assert len(children) == 3, commands
        assert not any("huey" in c or "_job_runner" in c for c in commands), commands
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # 5. SIGTERM: a clean exit, every child gone, both ports free again
    assert code == 0, out.read_text()
    assert "stopping both servers (SIGTERM)" in out.read_text()
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [" ".join(c.cmdline()) for c in alive]
    assert _port_free(prefect_port) and _port_free(mlflow_port)
