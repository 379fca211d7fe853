"""`distill ui`: the Prefect and MLflow UIs on 127.0.0.1, "ready" once both answer, stopped together.

Each server runs in its own process group (the Prefect server is one process; MLflow is its CLI and one uvicorn
worker, without its job runner), so a stop reaches every process either started. SIGTERM (systemd, `docker stop`,
`kill`), SIGHUP (a closed terminal) and Ctrl-C all stop both: SIGTERM to each group, then SIGKILL to what is left
after a grace period. Output goes to .distill/logs/<server>.log.

The ports default to where the links people click point: MLflow's to tracking.ui_url (Prefect artifacts link there),
Prefect's to PREFECT_UI_URL or 4200 (MLflow descriptions link there for runs on the embedded Prefect); other ports
get a note saying how to match them. Links between MLflow's own pages are relative and work on any port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import typer

from flows.cli_common import app, console, err_console, fail, load_cfg

LOG_DIR = Path(".distill/logs")
GRACE_S = 10.0  # after SIGTERM, how long each server may take to stop before SIGKILL


class _Stop(Exception):
    """Raised in the main thread by a stop signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, _frame) -> None:
    raise _Stop(signum)


def _port_free(port: int) -> bool:
    """Whether a server could listen on the port now (connections in TIME_WAIT do not count, as for the servers)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _die_on_parent_exit() -> None:  # in the child, before exec: a SIGKILLed `distill ui` still stops its servers
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _server_commands(prefect_port: int, mlflow_port: int, tracking_uri: str) -> list[tuple[str, list[str], dict]]:
    """(name, argv, environment) per server."""
    bindir = Path(sys.executable).parent
    prefect_env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(prefect_port)}
    if not (os.environ.get("PREFECT_UI_API_URL") or os.environ.get("PREFECT_SERVER_UI_API_URL")):
        prefect_env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"  # else the UI follows PREFECT_API_URL
    prefect_env.pop("PREFECT_API_URL", None)  # this server serves its own database, wherever runs may be sent
    mlflow_env = {**os.environ}
    mlflow_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no huey job runner (GenAI jobs only)
    return [
        ("prefect-server", [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1",
                            "--port", str(prefect_port)], prefect_env),
        ("mlflow-server", [str(bindir / "mlflow"), "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                           "--port", str(mlflow_port), "--workers", "1"], mlflow_env),
    ]


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every process group, wait up to GRACE_S, SIGKILL to whatever is left, reap."""
    def group_alive(p: subprocess.Popen) -> bool:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True  # the group outlives its leader while any member lives

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (GRACE_S if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            for p in procs:
                p.poll()  # reap the leader, or the group never empties
            if not any(group_alive(p) for p in procs):
                return
            time.sleep(0.1)


def _wait_ready(servers: list[tuple[str, str, subprocess.Popen, Path]], timeout: float) -> None:
    """Wait until every health URL answers 200; exit 1 with the log's name when a server exits or is too slow."""
    pending = list(servers)
    deadline = time.monotonic() + timeout
    while pending:
        for item in list(pending):
            name, url, proc, log = item
            if _answers(url):
                pending.remove(item)
            elif proc.poll() is not None:
                raise _Failed(f"{name} exited with code {proc.returncode} before it answered {url}", log)
        if pending and time.monotonic() > deadline:
            name, url, _, log = pending[0]
            raise _Failed(f"{name} did not answer {url} within {timeout:.0f} s", log)
        if pending:
            time.sleep(0.3)


def _local_port(url: str | None) -> int | None:
    """The port of a URL on this machine (127.0.0.1, localhost), else None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url or "")
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return port if parts.hostname in ("127.0.0.1", "localhost") else None


def _make_state_dir() -> list[Path]:
    """Make LOG_DIR (and the folders above it); return the folders that did not exist yet, deepest first, with
    PREFECT_HOME when Prefect is about to create it there, so that a refusal can leave the working copy as it was."""
    home = os.environ.get("PREFECT_HOME")
    candidates = [LOG_DIR, *LOG_DIR.parents] + ([Path(home)] if home else [])
    made = sorted((p for p in candidates if str(p) != "." and not p.exists()), key=lambda p: -len(p.resolve().parts))
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove each folder that is still empty (deepest first); anything written into one keeps it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def _link_targets(tracking) -> tuple[str, str | None]:
    """Where the links people click were written to point: the MLflow UI of Prefect artifacts (`tracking.ui_url`)
    and the Prefect UI of MLflow descriptions for runs on the embedded Prefect, the history this command serves
    (PREFECT_UI_URL, else `distill ui`'s default port; distill_gap/registry/presentation.py:prefect_link). None for
    the latter when runs go to a Prefect server (PREFECT_API_URL): their links point to that server's UI."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from distill_gap.registry.presentation import DISTILL_UI_PREFECT

    prefect_ui = None if PREFECT_API_URL.value() else (PREFECT_UI_URL.value() or DISTILL_UI_PREFECT)
    return tracking.ui_url.rstrip("/"), prefect_ui


def _link_notes(prefect_port: int, mlflow_port: int, mlflow_ui: str, prefect_ui: str | None) -> list[str]:
    """What to say when a server is started on another port than the links written for it point to. Links between
    MLflow's own pages are relative to its UI and work on any port; these are the ones that leave a UI."""
    notes = []
    if _local_port(mlflow_ui) not in (None, mlflow_port):
        notes.append(f"note: links in Prefect artifacts (gap report, dossier) point to the MLflow UI at {mlflow_ui} "
                     f"(tracking.ui_url): to follow them, start `distill ui --mlflow-port {_local_port(mlflow_ui)}`, "
                     f"or set tracking.ui_url to http://127.0.0.1:{mlflow_port} for the next runs")
    if _local_port(prefect_ui) not in (None, prefect_port):
        notes.append(f"note: \"Prefect flow run\" links in MLflow descriptions point to {prefect_ui}: to follow them, "
                     f"start `distill ui --prefect-port {_local_port(prefect_ui)}`, or set "
                     f"PREFECT_UI_URL=http://127.0.0.1:{prefect_port} for the next runs")
    return notes


def _mlflow_start(mlflow_local: str, experiment: str) -> str:
    """Where a person starts in the MLflow UI: the pipeline's training runs when the experiment exists, else the
    experiment list; in model-training mode either way (presentation.MODEL_TRAINING: the registry in the sidebar)."""
    from mlflow import MlflowClient

    from distill_gap.registry.presentation import mlflow_ui_url

    try:
        found = MlflowClient(tracking_uri=mlflow_local).get_experiment_by_name(experiment)
    except Exception:  # the store answers health checks but not this: the list is still a start
        found = None
    return mlflow_ui_url(mlflow_local, f"experiments/{found.experiment_id}/runs" if found else "experiments")


class _Failed(Exception):
    def __init__(self, problem: str, log: Path):
        super().__init__(problem)
        self.log = log


@app.command()
def ui(prefect_port: Optional[int] = typer.Option(
           None, help="port of the Prefect UI and API (default: the port of PREFECT_UI_URL, else 4200: where "
           "\"Prefect flow run\" links in MLflow point)"),
       mlflow_port: Optional[int] = typer.Option(
           None, help="port of the MLflow UI (default: the port of tracking.ui_url, 5000 unless --config sets it: "
           "where links in Prefect artifacts point)"),
       config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML whose tracking.ui_url and "
                                             "tracking.uri to follow, e.g. configs/demo.yaml"),
       tracking_uri: Optional[str] = typer.Option(None, help="the MLflow store to browse (default: tracking.uri of "
                                                  "--config, else sqlite:///.distill/mlflow.db)"),
       timeout: float = typer.Option(180.0, help="seconds to wait for both servers to answer")):
    """Start the Prefect and MLflow UIs on 127.0.0.1; "ready" once both answer (Ctrl-C, SIGTERM or SIGHUP stop both)."""
    from distill_gap.errors import DistillError
    from distill_gap.registry.presentation import mlflow_ui_url
    from flows.config import TrackingConfig

    made = _make_state_dir()  # first: importing Prefect's settings creates PREFECT_HOME in it
    try:
        tracking = load_cfg(config, None).tracking if config else TrackingConfig()
    except DistillError as err:
        _remove_empty(made)
        fail(err)
    mlflow_ui, prefect_ui = _link_targets(tracking)
    prefect_port = prefect_port or _local_port(prefect_ui) or 4200
    mlflow_port = mlflow_port or _local_port(mlflow_ui) or 5000
    tracking_uri = tracking_uri or tracking.uri
    refusal = next((f"error: port {port} on 127.0.0.1 is in use\n  fix: stop what holds it, or pass {flag} with a "
                    "free port" for flag, port in (("--prefect-port", prefect_port), ("--mlflow-port", mlflow_port))
                    if not _port_free(port)), None)
    if refusal is None and prefect_port == mlflow_port:
        refusal = "error: --prefect-port and --mlflow-port are the same\n  fix: give each server its own port"
    if refusal:  # nothing started, and nothing left behind: the folders this call made go again
        _remove_empty(made)
        err_console.print(refusal)
        raise typer.Exit(2)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    procs: list[subprocess.Popen] = []
    code = 0
    try:
        servers = []
        for (name, argv, env), health in zip(_server_commands(prefect_port, mlflow_port, tracking_uri),
                                             (f"http://127.0.0.1:{prefect_port}/api/health",
                                              f"http://127.0.0.1:{mlflow_port}/health")):
            log = LOG_DIR / f"{name}.log"
            with open(log, "w") as out:
                procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True,
                                              preexec_fn=_die_on_parent_exit))
            servers.append((name, health, procs[-1], log))
        _wait_ready(servers, timeout)
        console.print(f"Prefect UI  http://127.0.0.1:{prefect_port}   (flow runs, gap-report artifacts; "
                      f"history in {os.environ.get('PREFECT_HOME', '~/.prefect')})")
        mlflow_local = f"http://127.0.0.1:{mlflow_port}"
        console.print(f"MLflow UI   {_mlflow_start(mlflow_local, tracking.experiment)}   (runs; {tracking_uri})")
        console.print(f"            registry: {mlflow_ui_url(mlflow_local, 'models')} "
                      "(<name>-teacher/-student/-edge)")
        for note in _link_notes(prefect_port, mlflow_port, mlflow_ui, prefect_ui):
            console.print(note)
        console.print(f"ready: both answer their health checks; logs in {LOG_DIR}/ (Ctrl-C or SIGTERM stops both)")
        sys.stdout.flush()
        while True:
            for name, _, proc, log in servers:
                if proc.poll() is not None:
                    raise _Failed(f"{name} stopped with code {proc.returncode}", log)
            time.sleep(0.5)
    except _Stop as stop:
        console.print(f"stopping both servers ({stop})")
    except _Failed as failed:
        err_console.print(f"error: {failed}\n  fix: read {failed.log} (its last lines say why); both servers stopped")
        code = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the stop
        _stop_all(procs)
    raise typer.Exit(code)
