"""Issue 10, item 1: SIGKILL and SIGTERM during soft-label generation, distillation and registration, then run
again. `distill run` is a real subprocess on the default ephemeral Prefect API (SQLite in PREFECT_HOME) and an
MLflow SQLite store; failpoints (distill_gap/ops/failpoints.py) hold it at the exact place, the test signals the process.

After each kill the next run starts from the work already done: completed soft-label shards are reused, never
duplicated or truncated; every killed run ends Crashed in Prefect and FAILED or KILLED in MLflow, never RUNNING
(SIGTERM: in the process; SIGKILL: marked by the next run); no registry version of a killed run survives; no
API server outlives its process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import drill_workspace

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# (failpoint to hold at, signal): run after run on one workspace, then a run that completes
DRILLS = [
    ("soft-labels.shard-written@2", signal.SIGKILL),
    ("soft-labels.shard-written@1", signal.SIGTERM),
    ("distill.epoch-end@1", signal.SIGKILL),
    ("distill.epoch-end@1", signal.SIGTERM),
    ("register.student-registered", signal.SIGKILL),
    ("register.student-registered", signal.SIGTERM),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    """A workspace: config, PREFECT_HOME, MLflow SQLite store, soft-label folder, signing keys, a pinned teacher."""
    ws = drill_workspace(tmp_path_factory.mktemp("crash"), "crash", tiny_model_dir)
    ws["env"]["DISTILL_FAILPOINT_DIR"] = str(ws["tmp"] / "failpoints")
    return ws


def _servers(prefect_home: Path) -> list[psutil.Process]:
    """Ephemeral Prefect API servers started for this PREFECT_HOME that are still alive."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(p.info["cmdline"] or []) \
                    and p.environ().get("PREFECT_HOME") == str(prefect_home):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _run(ws, name: str, failpoint: str | None = None, sig: int | None = None) -> dict:
    """Start `distill run`; with a failpoint, wait until it holds there, then send `sig`. Returns rc and log."""
    tmp, log = ws["tmp"], ws["tmp"] / f"{name}.log"
    env = dict(ws["env"])
    if failpoint:
        env["DISTILL_FAILPOINTS"] = failpoint
    marker = Path(env["DISTILL_FAILPOINT_DIR"]) / (failpoint or "none").split("@")[0]
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([str(BIN / "distill"), "run", "--config", str(ws["config"]), "--reason", f"test: {name}"],
                            env=env, cwd=tmp, stdout=log.open("w"), stderr=subprocess.STDOUT)
    if failpoint:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"{name} exited ({proc.returncode}) before {failpoint}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{name} never reached {failpoint}:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        assert int(marker.read_text()) == proc.pid
        proc.send_signal(sig)
        time.sleep(0.5)
        marker.unlink()  # releases a hold in a worker thread: the shard in hand finishes, as without the hold
    rc = proc.wait(timeout=120 if failpoint else 420)
    time.sleep(0.5)  # the kernel delivers the parent-death signal to the server
    return {"rc": rc, "log": log.read_text(), "servers": _servers(Path(env["PREFECT_HOME"]))}


def _state(ws) -> dict:
    """Prefect flow-run states (through the same ephemeral API) and the MLflow runs, read in a fresh process."""
    code = """
import json, sys
from prefect.client.orchestration import get_client
from distill_gap.registry.tracking import client_for
from flows.config import load_config
cfg = load_config(sys.argv[1])
with get_client(sync_client=True) as c:
    flows = {str(r.id): {"state": r.state.type.value, "name": r.state.name, "message": r.state.message or ""}
             for r in c.read_flow_runs()}
client = client_for(cfg.tracking)
exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
runs = [{"id": r.info.run_id, "status": r.info.status, "stage": r.data.tags.get("distill.stage"),
         "parent": r.data.tags.get("mlflow.parentRunId"), "flow_run": r.data.tags.get("prefect.flow_run_id"),
         "reason": r.data.tags.get("trigger.reason"), "crash": r.data.tags.get("distill.crash")}
        for r in client.search_runs([exp], max_results=1000)]
versions = {n: sorted((int(v.version), v.run_id, dict(v.tags)) for v in client.search_model_versions(f"name='{n}'"))
            for n in (cfg.student_model_name, cfg.edge_model_name)}
aliases = {m.name: dict(m.aliases) for m in client.search_registered_models()}
print("STATE" + json.dumps({"flows": flows, "runs": runs, "versions": versions, "aliases": aliases}))
"""
    out = subprocess.run([sys.executable, "-c", code, str(ws["config"])], env=ws["env"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.split("STATE", 1)[1])


def _shards(ws) -> dict[str, tuple[int, int]]:
    """Every file of the soft-label store: path -> (inode, size)."""
    root = ws["tmp"] / "soft-labels"
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_runs_resume_and_are_never_left_running(ws):
    results, shard_files = [], []
    for i, (failpoint, sig) in enumerate(DRILLS):
        r = _run(ws, f"drill{i}-{failpoint.split('@')[0]}-{sig.name}", failpoint, sig)
        results.append(r)
        if sig == signal.SIGKILL:
            assert r["rc"] == -signal.SIGKILL
        else:  # one clear message, not a traceback
            assert r["rc"] == 128 + signal.SIGTERM, r["log"][-3000:]
            assert "stopped: signal 15" in r["log"] and "Traceback" not in r["log"].split("stopped:")[1]
        assert not r["servers"], f"an ephemeral API server outlived its process: {r['servers']}"
        shard_files.append(_shards(ws))
    final = _run(ws, "final")
    assert final["rc"] == 0, final["log"][-4000:]
    assert not final["servers"]

    # completed work reused: each run after a soft-label kill went on from the shards already stored
    assert "(2 shards reused)" not in results[0]["log"]
    reused = [int(m) for m in re.findall(r"\((\d+) shards? reused\)", results[1]["log"] + results[2]["log"])]
    assert reused and reused[0] >= 1, results[1]["log"][-3000:]
    for before, after in zip(shard_files, shard_files[1:] + [_shards(ws)]):
        for path, (inode, size) in before.items():
            if path.endswith(".npz") or "shard" in path:
                assert after.get(path) == (inode, size), f"{path} was rewritten or removed after a crash"
    store = _shards(ws)
    manifests = [p for p in store if p.endswith("manifest.json")]
    assert len(manifests) == 1, store
    assert not [p for p in store if p.endswith((".tmp", ".partial"))], store
    verify = subprocess.run([str(BIN / "distill"), "cache", "verify", manifests[0].split("/")[0], "--config",
                             str(ws["config"])], env=ws["env"], cwd=ws["tmp"], capture_output=True, text=True,
                            timeout=240)
    assert verify.returncode == 0, verify.stdout + verify.stderr  # every shard's digest, no truncated shard

    # every killed run: Prefect Crashed, MLflow FAILED or KILLED; no stage run left RUNNING
    state = _state(ws)
    pipelines = sorted((r for r in state["runs"] if r["stage"] == "pipeline"), key=lambda r: r["reason"])
    assert len(pipelines) == len(DRILLS) + 1
    by_reason = {r["reason"]: r for r in pipelines}
    for i, (failpoint, sig) in enumerate(DRILLS):
        run = by_reason[f"test: drill{i}-{failpoint.split('@')[0]}-{sig.name}"]
        flow = state["flows"][run["flow_run"]]
        assert flow["name"] == "Crashed", (failpoint, sig.name, flow)
        assert run["status"] == ("KILLED" if sig == signal.SIGKILL else "FAILED"), (failpoint, sig.name, run)
        if sig == signal.SIGKILL:
            assert "died during the" in (run["crash"] or "") and "died during the" in flow["message"]
    assert by_reason["test: final"]["status"] == "FINISHED"
    assert state["flows"][by_reason["test: final"]["flow_run"]]["state"] == "COMPLETED"
    assert not [r for r in state["runs"] if r["status"] == "RUNNING"]

    # the registry holds the final run's versions only: a killed registration left nothing behind
    final_run = by_reason["test: final"]["id"]
    final_stages = {r["id"] for r in state["runs"] if r["parent"] == final_run}
    for name, versions in state["versions"].items():
        assert len(versions) == 1 and versions[0][1] in final_stages, (name, versions)
    edge_version = state["versions"]["crash-edge"][0][0]
    assert state["aliases"]["crash-edge"] == {"challenger": edge_version, "champion": edge_version}
