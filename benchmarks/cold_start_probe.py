"""Cold starts of the pipeline's run path: a fresh process, an empty PREFECT_HOME, an empty MLflow store.

One cold start = one new process that does what `distill run` does before its first stage, on nothing:

    the ephemeral Prefect API starts (Prefect 3.8: a uvicorn subprocess that migrates a new SQLite database),
    a flow run is created and reaches Running, the MLflow SQLite store is created (its migrations) and the
    pipeline's MLflow run is started in it (distill_gap.registry.tracking: client_for + pipeline_run), then the
    process exits.

The probe process runs the project's code (the CLI's embedded environment, flows.config.load_config,
distill_gap.ops.prefect_server.tie_ephemeral_server, distill_gap.registry) but not flows.pipeline, whose imports
(torch, transformers, INC, ...) add ~7 s that say nothing about the start.
The parent watches from outside: when the server process appears, when its /api/health first answers 200, what
it listens on, and after the exit that no server process, lock file or temporary file is left behind.

    .venv/bin/python -m benchmarks.cold_start_probe [-n 3]          # check this machine (benchmarks/cold_start.py: 20)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE_CONFIG = ROOT / "configs" / "tiny.yaml"
TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
TIMED_OUT = "Timed out while attempting to connect to ephemeral Prefect API server"
RESULT_PREFIX = "COLD_START_RESULT "
# what a start must not inherit from the calling process: each start finds its own API, store and timeout
_NOT_INHERITED = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_API_DATABASE_CONNECTION_URL",
                  "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", TIMEOUT_VAR)


def configured_timeout() -> int:
    """The ephemeral API's startup timeout a `distill` user gets: the CLI's embedded default (distill_gap.ops.runtime)."""
    from distill_gap.ops.runtime import EMBEDDED_ENV

    return int(EMBEDDED_ENV[TIMEOUT_VAR])


# ---------------------------------------------------------------------------------------------
# the probe: runs in the fresh process


def _probe_flow():
    from prefect import flow

    @flow(name="distill-cold-start", log_prints=True)
    def distill_cold_start(config) -> dict:
        """flows/pipeline.py's first steps (less torch's device and threads): this flow run reads itself back as
        Running, then the MLflow store is created and the pipeline's MLflow run started in it."""
        from prefect import get_client
        from prefect.runtime import flow_run

        from distill_gap.registry.crash_recovery import reap
        from distill_gap.registry.tracking import client_for, pipeline_run

        marks = {"running": time.time()}
        flow_run_id = flow_run.get_id()
        with get_client(sync_client=True) as prefect_client:
            state = prefect_client.read_flow_run(flow_run_id).state
        client = client_for(config.tracking)  # creates the SQLite store: MLflow's migrations
        reap(client, config.tracking)  # as flows/pipeline.py does before its run (nothing to reap in a new store)
        with pipeline_run(client, config, trigger_reason="cold-start", flow_run_id=flow_run_id) as run_id:
            run = client.get_run(run_id)
            marks["mlflow"] = time.time()
        return {"marks": marks, "flow_run_id": str(flow_run_id), "flow_run_state": state.type.value,
                "mlflow_run_id": run_id, "mlflow_run_status": run.info.status,
                "mlflow_run_flow_tag": run.data.tags.get("prefect.flow_run_id")}

    return distill_cold_start


def probe(workdir: Path) -> None:
    """One cold start in this (fresh) process; prints one RESULT_PREFIX + JSON line."""
    marks = {"spawned": float(os.environ.get("DISTILL_COLD_START_T0", time.time())), "python": time.time()}
    sys.path.insert(0, str(ROOT))
    from distill_gap.ops.runtime import apply_embedded_env

    apply_embedded_env({"PREFECT_LOGGING_LEVEL": "WARNING"})  # what flows/cli.py applies at import
    from flows.config import load_config

    from distill_gap.ops.prefect_server import tie_ephemeral_server

    flow = _probe_flow()
    marks["imported"] = time.time()
    tie_ephemeral_server()  # as `distill run` does: the server dies with this process, even on SIGKILL
    cfg = load_config(PROBE_CONFIG, [f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
                                     f"tracking.artifact_location={workdir / 'mlartifacts'}",
                                     "data.train=/nonexistent.csv"])
    out = flow(cfg)
    marks.update(out.pop("marks"))
    marks["returned"] = time.time()
    print(RESULT_PREFIX + json.dumps({"marks": marks, **out, "pid": os.getpid()}), flush=True)
    # the ephemeral server is stopped by Prefect's atexit hook after this returns


# ---------------------------------------------------------------------------------------------
# the parent: one start, watched from outside


class _Watcher(threading.Thread):
    """Polls the probe's process tree for the uvicorn server, then its /api/health, until it answers 200."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop_event = pid, threading.Event()
        self.server_pid: int | None = None
        self.port: int | None = None
        self.server_seen: float | None = None
        self.api_ready: float | None = None
        self.listen: set[str] = set()
        self.server_pids: set[int] = set()

    def run(self) -> None:
        import urllib.request

        import psutil

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
        try:
            parent = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop_event.is_set():
            try:
                for child in parent.children(recursive=True):
                    cmd = child.cmdline()
                    if "uvicorn" in cmd and "prefect.server.api.server:create_app" in cmd:
                        self.server_pids.add(child.pid)
                        if self.server_pid != child.pid:  # first, or a retry on another port (exit code 3)
                            self.server_pid, self.port = child.pid, int(cmd[cmd.index("--port") + 1])
                            self.server_seen = self.server_seen or time.time()
            except psutil.Error:
                pass
            if self.port and self.api_ready is None:
                try:
                    with opener.open(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as resp:
                        if resp.status == 200:
                            self.api_ready = time.time()
                            self._record_listen()
                except OSError:
                    pass
            time.sleep(0.1 if self.api_ready is None else 0.5)

    def _record_listen(self) -> None:
        import psutil

        try:
            for conn in psutil.Process(self.server_pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    self.listen.add(f"{conn.laddr.ip}:{conn.laddr.port}")
        except psutil.Error:
            pass


def _processes_for_home(home: Path) -> list:
    """Live processes started for this PREFECT_HOME (the server, or a probe that did not exit)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "python" not in " ".join(proc.info["cmdline"] or [])[:200]:
                continue
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("PREFECT_HOME") == str(home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _kill(procs) -> None:
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def cold_start(workdir: Path, *, timeout: int | None = None, index: int = 0) -> dict:
    """One cold start in a new process with an empty PREFECT_HOME and MLflow store under `workdir` (created empty)."""
    import psutil

    timeout = timeout or configured_timeout()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=False)
    home, tmp = workdir / "prefect-home", workdir / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(PREFECT_HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    log_path = workdir / "probe.log"
    t0 = time.time()
    env["DISTILL_COLD_START_T0"] = repr(t0)
    # output to a file, not a pipe: a server left behind would hold a pipe open and hang the reader
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cold_start_probe", "--probe", str(workdir)], cwd=workdir,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        watcher = _Watcher(proc.pid)
        watcher.start()
        try:
            rc = proc.wait(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            try:
                _kill([*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)])
            except psutil.NoSuchProcess:
                pass
            proc.wait()
            rc = None
        t_exit = time.time()
        watcher.stop_event.set()
        watcher.join(5)
    output = log_path.read_text(errors="replace")
    result_line = next((line for line in output.splitlines() if line.startswith(RESULT_PREFIX)), None)
    probe_out = json.loads(result_line[len(RESULT_PREFIX):]) if result_line else {}
    marks = probe_out.get("marks", {})

    # left behind: the server process(es) we saw, anything else still running for this PREFECT_HOME
    time.sleep(0.2)
    leftover = []
    for pid in watcher.server_pids:
        try:
            server = psutil.Process(pid)
            if server.status() != psutil.STATUS_ZOMBIE:
                leftover.append(server)
        except psutil.NoSuchProcess:
            pass
    leftover += [p for p in _processes_for_home(home) if p.pid not in {q.pid for q in leftover}]
    leftover_desc = []
    for p in leftover:
        try:
            leftover_desc.append(f"{p.pid} (parent {p.ppid()}) {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            leftover_desc.append(f"{p.pid} (exited while being listed)")
    _kill(leftover)  # never leave them to the next start; the start counts as failed
    from distill_gap.ops.prefect_server import START_LOCK, start_lock_held

    locks = sorted(str(p.relative_to(workdir)) for p in home.rglob("*") if "lock" in p.name.lower()
                   and (p.name != START_LOCK or start_lock_held(p)))
    temp_left = sorted(str(p.relative_to(workdir)) for p in tmp.iterdir())

    def since(t):
        return None if t is None else round(t - t0, 3)

    record = {
        "index": index,
        "rc": rc,
        "api_ready_s": since(watcher.api_ready),
        "server_process_s": since(watcher.server_seen),
        "imported_s": since(marks.get("imported")),
        "flow_running_s": since(marks.get("running")),
        "mlflow_run_s": since(marks.get("mlflow")),
        "returned_s": since(marks.get("returned")),
        "total_s": round(t_exit - t0, 3),
        "server_start_s": (round(watcher.api_ready - watcher.server_seen, 3)
                           if watcher.api_ready and watcher.server_seen else None),
        "server_processes": len(watcher.server_pids),
        "listen": sorted(watcher.listen),
        "flow_run_state": probe_out.get("flow_run_state"),
        "mlflow_run_status": probe_out.get("mlflow_run_status"),
        "mlflow_tag_matches": bool(probe_out) and probe_out.get("mlflow_run_flow_tag") == probe_out.get("flow_run_id"),
        "prefect_db": (home / "prefect.db").is_file(),
        "mlflow_db": (workdir / "mlflow.db").is_file(),
        "timed_out_message": TIMED_OUT in output,
        "leftover_processes": leftover_desc,
        "lock_files": locks,
        "temp_files_left": temp_left,
        "load_average_1min": os.getloadavg()[0],
        "timeout_s": timeout,
        "log": str(log_path),
    }
    record["problems"] = problems(record)
    record["ok"] = not record["problems"]
    if not record["ok"]:
        record["output_tail"] = output[-3000:]
    return record


def problems(r: dict) -> list[str]:
    """What makes a start not count as a start within the timeout, in words (empty: it did)."""
    out = []
    if r["rc"] != 0:
        out.append(f"probe exit code {r['rc']}")
    if r["timed_out_message"]:
        out.append(TIMED_OUT)
    if r["api_ready_s"] is None:
        out.append("the ephemeral API never answered /api/health")
    elif r["api_ready_s"] >= r["timeout_s"]:
        out.append(f"API ready after {r['api_ready_s']:.1f} s >= timeout {r['timeout_s']} s")
    if r["flow_running_s"] is None or r["flow_run_state"] != "RUNNING":
        out.append(f"flow run state read back: {r['flow_run_state']}")
    if r["mlflow_run_status"] != "RUNNING" or not r["mlflow_tag_matches"] or not r["mlflow_db"]:
        out.append(f"MLflow run not started in a new store (status {r['mlflow_run_status']}, "
                   f"tag matches {r['mlflow_tag_matches']}, store {r['mlflow_db']})")
    if not r["prefect_db"]:
        out.append("no prefect.db in the new PREFECT_HOME")
    if any(not a.startswith("127.0.0.1:") for a in r["listen"]) or not r["listen"]:
        out.append(f"server listens on {r['listen']} (loopback only expected)")
    if r["leftover_processes"]:
        out.append(f"left running after exit: {r['leftover_processes']}")
    if r["lock_files"]:
        out.append(f"lock files left in PREFECT_HOME: {r['lock_files']}")
    if r["temp_files_left"]:
        out.append(f"temporary files left: {r['temp_files_left']}")
    return out


def run_cold_starts(n: int, root: Path, *, timeout: int | None = None, log=None) -> list[dict]:
    """`n` cold starts one after another, each in its own new folder under `root`."""
    records = []
    for i in range(n):
        r = cold_start(Path(root) / f"start-{i:02d}", timeout=timeout, index=i)
        records.append(r)
        if log:
            log(f"start {i + 1}/{n}: " + ("ok" if r["ok"] else "FAILED") + f" API {r['api_ready_s']} s, "
                f"Running {r['flow_running_s']} s, MLflow run {r['mlflow_run_s']} s, exit {r['total_s']} s, "
                f"load {r['load_average_1min']:.1f}" + ("" if r["ok"] else f": {r['problems']}"))
    return records


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), without numpy."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(records: list[dict]) -> dict:
    """Flat numbers over the starts: startup = seconds from process spawn to the flow run Running and the MLflow run
    started (both stores created); api_ready = to the first 200 from /api/health."""
    def stats(key: str) -> dict:
        vals = [r[key] for r in records if r[key] is not None]
        if not vals:
            return {"median": None, "p95": None, "max": None}
        return {"median": round(statistics.median(vals), 3), "p95": round(percentile(vals, 0.95), 3),
                "max": round(max(vals), 3)}

    out = {"cold_starts": len(records), "failures": sum(not r["ok"] for r in records)}
    for name, key in (("startup", "mlflow_run_s"), ("api_ready", "api_ready_s"), ("flow_running", "flow_running_s"),
                      ("server_start", "server_start_s"), ("total", "total_s")):
        for stat, v in stats(key).items():
            out[f"{name}_seconds_{stat}"] = v
    out["timeout_seconds"] = records[0]["timeout_s"] if records else configured_timeout()
    out["leftover_processes"] = sum(len(r["leftover_processes"]) for r in records)
    out["timed_out_messages"] = sum(r["timed_out_message"] for r in records)
    return out


def table(records: list[dict]) -> str:
    cols = ("start", "API ready s", "Running s", "MLflow run s", "exit s", "server s", "load", "ok")
    lines = [f"{cols[0]:<6}" + "".join(f"{c:>13}" for c in cols[1:])]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in records:
        lines.append(f"{r['index'] + 1:<6}" + "".join(f"{fmt(r[k]):>13}" for k in (
            "api_ready_s", "flow_running_s", "mlflow_run_s", "total_s", "server_start_s", "load_average_1min"))
            + f"{'yes' if r['ok'] else 'NO':>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=3, help="cold starts one after another (default 3)")
    args = parser.parse_args(argv)
    if args.probe:
        probe(Path(args.probe))
        return 0
    with tempfile.TemporaryDirectory(prefix="distill-cold-start-") as root:
        records = run_cold_starts(args.n, Path(root), log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(records))
    for k, v in summary(records).items():
        print(f"{k:<32} {v}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
