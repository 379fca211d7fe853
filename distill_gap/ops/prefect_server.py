"""The ephemeral Prefect API server dies with the process that started it, even on SIGKILL.

Without PREFECT_API_URL, Prefect starts a temporary API server (uvicorn, a child process on a SQLite database in
PREFECT_HOME) and stops it at exit. A SIGKILL (or the OOM killer) skips that, and the server lives on, orphaned,
holding its port and the database. On Linux, `tie_ephemeral_server()` registers Prefect's server singleton
before Prefect creates it, with the child started under PR_SET_PDEATHSIG=SIGKILL: the kernel kills the server
when the `distill` process dies, however it dies. Prefect's own clients find and use this instance.

Two `distill` processes on one PREFECT_HOME start two servers on one SQLite database, and each runs the database
migrations at start-up. On a fresh database they raced ("index ... already exists"): one server failed its
start-up with an ERROR traceback and Prefect retried it on another port. The tied server holds an exclusive lock
on PREFECT_HOME/.distill-server-start.lock from launch until /health answers, so migrations run one at a time;
the kernel releases the lock if the holder dies.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
START_LOCK = ".distill-server-start.lock"  # in PREFECT_HOME; an flock file: harmless once nobody holds it


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def tie_ephemeral_server() -> bool:
    """Make the ephemeral server (if this process will start one) die with this process. Returns True if armed.

    Call it from the main thread, before the first Prefect client: the death signal follows the thread that
    started the child.
    """
    from prefect.settings import PREFECT_API_URL

    if sys.platform != "linux" or PREFECT_API_URL.value():
        return False
    from prefect.server.api.server import SubprocessASGIServer

    current = SubprocessASGIServer._instances.get(None)
    if current is not None:
        return getattr(current, "tied", False)
    tied = type("TiedSubprocessASGIServer", (SubprocessASGIServer,),
                {"_run_uvicorn_command": _uvicorn, "start": _start_one_at_a_time, "tied": True})
    server = object.__new__(tied)
    server.__init__(None)
    SubprocessASGIServer._instances[None] = server  # what SubprocessASGIServer() returns from now on
    return True


def _start_one_at_a_time(self, timeout=None) -> None:
    """Prefect's start, under an exclusive lock per PREFECT_HOME (migrations on one SQLite file, one at a time)."""
    from pathlib import Path

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if self.running:
        return
    home = Path(get_current_settings().home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / START_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process's server starts; freed at its exit too
        try:
            SubprocessASGIServer.start(self, timeout)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start_lock_held(path) -> bool:
    """Whether a process holds the start-up lock file at `path` now (a left-over file alone blocks nothing)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _uvicorn(self) -> subprocess.Popen:
    """Prefect's own `_run_uvicorn_command` (prefect 3.8), started with the parent-death signal."""
    import prefect
    from prefect.settings import get_current_settings

    return subprocess.Popen(
        args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
              "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
              "--log-level", "error", "--lifespan", "on"],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
             **get_current_settings().to_environment_variables(exclude_unset=True)},
        preexec_fn=_die_with_parent,
    )
