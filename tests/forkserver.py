"""A fork server for drills that start many short-lived processes: one Python process imports the heavy modules once
(torch, transformers, Great Expectations, Prefect, MLflow, flows.pipeline: ~15 CPU-seconds on 2 cores), then forks
each process a test asks for. A child is a real process with its own pid, environment, working directory and log:
it runs the same entry point as the installed command (`flows.cli:main` for `distill`) or a script as __main__, and
dies of the real SIGKILL or SIGTERM a test sends it. It only skips the imports.

The server forks from a single Python thread (checked before each fork; modules that start native threads at import,
onnxruntime and neural_compressor, must not be preloaded: a child of theirs hangs at exit) and rebuilds Prefect's settings from the child's
environment, so PREFECT_API_URL (the session's API, or none: an ephemeral server of its own) is the child's.

    server = ForkServer(["flows.cli", "flows.pipeline"], env=..., log=path)    # ready once the imports are done
    proc = server.start(["distill", "run", ...], entry="flows.cli:main", env=..., cwd=..., log=path)
    proc.pid, proc.poll(), proc.send_signal(signal.SIGKILL), proc.wait(timeout=120)   # as subprocess.Popen
    server.close()

Server side: `python -m tests.forkserver MODULE...` reads one JSON request per line on stdin and answers one JSON line.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ForkedProcess:
    """A child of the fork server, with the part of subprocess.Popen's interface the drills use."""

    def __init__(self, server: "ForkServer", pid: int, args: list[str]):
        self.server, self.pid, self.args, self.returncode = server, pid, args, None

    def poll(self) -> int | None:
        return self.wait(timeout=0, _raise=False)

    def wait(self, timeout: float | None = None, _raise: bool = True) -> int | None:
        if self.returncode is None:
            limit = 24 * 3600 if timeout is None else timeout
            self.returncode = self.server._ask({"op": "wait", "pid": self.pid, "timeout": limit}, limit)["returncode"]
            if self.returncode is None and _raise:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The client: starts the server process and asks it for children."""

    def __init__(self, preload: list[str], *, env: dict, log: Path, timeout: float = 300):
        self.log = Path(log)
        with self.log.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver", *preload], cwd=ROOT, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.children: list[ForkedProcess] = []
        self._ask(None, timeout)  # the imports are done

    def start(self, args: list[str], *, entry: str, env: dict, cwd: Path, log: Path) -> ForkedProcess:
        """Fork a child that runs `entry` ("module:function", or a script path run as __main__) with sys.argv = args,
        environment `env` (replaces the server's), working directory `cwd`, stdout and stderr to `log`."""
        pid = self._ask({"op": "start", "args": [str(a) for a in args], "entry": str(entry), "env": env,
                         "cwd": str(cwd), "log": str(log)}, 60)["pid"]
        self.children.append(ForkedProcess(self, pid, list(args)))
        return self.children[-1]

    def close(self) -> None:
        """Kill children still running, then stop the server (it exits at the end of its input)."""
        for child in self.children:
            if child.returncode is None and self.proc.poll() is None:
                child.kill()
                child.wait(timeout=30)
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _ask(self, request: dict | None, timeout: float) -> dict:
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"fork server gave no answer to {request and request['op']} (exit "
                                 f"{self.proc.poll()}):\n{self.log.read_text()[-3000:]}")
        answer = json.loads(line)
        assert "error" not in answer, f"fork server: {answer['error']}"
        return answer


# ---------------------------------------------------------------------------------------------------- server side


def _child(request: dict) -> None:
    """In the forked child: become the requested process, run its entry point, exit as it exits (never returns)."""
    import importlib
    import runpy

    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, to in ((0, null), (1, log), (2, log)):
        os.dup2(to, fd)
    os.close(log)
    os.close(null)
    import prefect.context

    prefect.context.refresh_global_settings_context()  # PREFECT_API_URL and the rest from this child's environment
    sys.argv = request["args"]
    entry = request["entry"]
    if entry.endswith(".py"):
        runpy.run_path(entry, run_name="__main__")
        sys.exit(0)
    module, _, function = entry.partition(":")
    sys.modules["__main__"].__spec__ = None  # click names the program after sys.argv[0], as for the console script
    sys.exit(getattr(importlib.import_module(module), function)())  # as the console script does


def _wait(pid: int, timeout: float, done: dict[int, int]) -> int | None:
    deadline = time.monotonic() + timeout
    while pid not in done:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            done[pid] = os.waitstatus_to_exitcode(status)
        elif time.monotonic() >= deadline:
            return None
        else:
            time.sleep(0.05)
    return done[pid]


def serve(preload: list[str]) -> None:
    import gc
    import importlib
    import threading

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the imports print goes to the log, never into the replies
    sys.path[0] = str(ROOT)  # `-m` put the working directory there: children chdir
    for name in preload:
        importlib.import_module(name)
    gc.freeze()  # the children's collections and their exit leave the shared heap alone: no copy-on-write of it
    replies.write(json.dumps({"ready": os.getpid()}) + "\n")
    done: dict[int, int] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            if threading.active_count() != 1:  # a lock held by another thread would stay held in the child
                replies.write(json.dumps({"error": f"{threading.active_count()} threads: cannot fork safely"}) + "\n")
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                replies.close()
                _child(request)
            answer = {"pid": pid}
        else:
            answer = {"returncode": _wait(request["pid"], request["timeout"], done)}
        replies.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    serve(sys.argv[1:])
