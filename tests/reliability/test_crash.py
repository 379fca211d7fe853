"""Issue 10, item 1: SIGKILL and SIGTERM during soft-label generation, distillation and registration, then run
again. `distill run` is a real subprocess with an MLflow SQLite store; failpoints (distill_gap/ops/failpoints.py)
hold it at the exact place, the test signals the process.

The six drills run one after the other on one workspace (config, MLflow store, soft-label folder, PREFECT_HOME),
then a run that completes. The soft-label drills run on the default ephemeral Prefect API (a server the process
starts, SQLite in PREFECT_HOME): the SIGKILL drill shows that the server dies with its process, and the SIGTERM drill
after it marks the killed run Crashed on that server. The other runs talk to the session's Prefect server
(PREFECT_API_URL), as a deployment does: a server start of their own would cost ~20 s each and show nothing new.
(One sequence, not two lanes at the same time: seven `distill run` processes instead of eight, and the distill and
register drills start from complete soft labels; on `make test`'s two busy cores a second lane only takes its
core from the other pytest worker.)

Every run is forked from one interpreter that imported flows.pipeline, torch, transformers and Great Expectations
once (tests/forkserver.py): each is still its own process running `flows.cli:main` (the installed command's entry
point) with its own environment, killed by a real signal at the failpoint, but skips ~15 CPU-seconds of imports.
(The installed `distill run` in a fresh interpreter runs in tests/infra/test_production_stack.py.)

After each kill the next run starts from the work already done: completed soft-label shards are reused, never
duplicated or truncated; every killed run ends Crashed in Prefect and FAILED or KILLED in MLflow, never RUNNING
(SIGTERM: in the process; SIGKILL: marked by the next run); no registry version of a killed run survives; no
API server outlives its process."""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.forkserver import ForkServer
from tests.helpers import drill_workspace

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
BIN = Path(sys.executable).parent

# (failpoint to hold at, signal, Prefect API), run after run on one workspace, then a run that completes.
# "own": the run starts its own ephemeral API server; "session": PREFECT_API_URL names the session's server.
DRILLS = [
    ("soft-labels.shard-written@2", signal.SIGKILL, "own"),
    ("soft-labels.shard-written@1", signal.SIGTERM, "own"),  # marks the SIGKILLed run Crashed on that server
    ("distill.epoch-end@1", signal.SIGKILL, "session"),
    ("distill.epoch-end@1", signal.SIGTERM, "session"),
    ("register.student-registered", signal.SIGKILL, "session"),
    ("register.student-registered", signal.SIGTERM, "session"),
]
SOFT_LABEL_DRILLS = 2  # the first two: killed while the soft labels were being written
STARTED_OWN_SERVER = "Starting temporary server"  # Prefect's log line when it starts an ephemeral API server
PRELOAD = ["flows.cli", "flows.pipeline", "torch", "transformers.modeling_utils", "transformers.models.bert.modeling_bert",
           "optimum.exporters.onnx", "great_expectations"]  # not onnxruntime: it starts a thread (tests/forkserver.py)


@pytest.fixture(scope="module")
def drills(tmp_path_factory, tiny_model_dir, tiny_data, mlflow_db_template, prefect_api_url) -> dict:
    """The six drills and the final run on one workspace: each run's rc/log/servers, the soft-label store after each
    drill."""
    ws = drill_workspace(tmp_path_factory.mktemp("crash"), "crash", tiny_model_dir, data=tiny_data,
                         mlflow_db=mlflow_db_template)
    ws["env"]["DISTILL_FAILPOINT_DIR"] = str(ws["tmp"] / "failpoints")
    ws["api_url"] = prefect_api_url
    results, shard_files = [], []
    ws["forks"] = ForkServer(PRELOAD, env=ws["env"], log=ws["tmp"] / "forkserver.log")
    try:
        for i, (failpoint, sig, api) in enumerate(DRILLS):
            results.append(_run(ws, _name(i), failpoint, sig, api))
            shard_files.append(_shards(ws))
        final = _run(ws, "final")
    finally:
        ws["forks"].close()
    return {"ws": ws, "results": results, "shard_files": shard_files, "final": final}


def _name(i: int) -> str:
    failpoint, sig, _ = DRILLS[i]
    return f"drill{i}-{failpoint.split('@')[0]}-{sig.name}"


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


def _run(ws, name: str, failpoint: str | None = None, sig: int | None = None, api: str = "session") -> dict:
    """Start `distill run` (`flows.cli:main` forked from the preloaded interpreter); with a failpoint, wait until it
    holds there, then send `sig`. Returns rc and log."""
    tmp, log = ws["tmp"], ws["tmp"] / f"{name}.log"
    env = dict(ws["env"])
    if api == "session":
        env["PREFECT_API_URL"] = ws["api_url"]
    if failpoint:
        env["DISTILL_FAILPOINTS"] = failpoint
    marker = Path(env["DISTILL_FAILPOINT_DIR"]) / (failpoint or "none").split("@")[0]
    marker.unlink(missing_ok=True)
    args = [str(BIN / "distill"), "run", "--config", str(ws["config"]), "--reason", f"test: {name}"]
    proc = ws["forks"].start(args, entry="flows.cli:main", env=env, cwd=tmp, log=log)
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
    home, grace = Path(env["PREFECT_HOME"]), time.monotonic() + 0.5  # the kernel delivers the parent-death signal
    while (servers := _servers(home)) and time.monotonic() < grace:
        time.sleep(0.05)
    return {"rc": rc, "log": log.read_text(), "servers": servers}


def _state(ws) -> dict:
    """The MLflow runs, versions and aliases, and the Prefect state of every flow run they name: read from the
    session's API, or, for the runs on their own ephemeral servers (gone with their processes), from the SQLite
    database those servers kept in PREFECT_HOME."""
    import sqlite3

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.config import load_config

    cfg = load_config(ws["config"])
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = [{"id": r.info.run_id, "status": r.info.status, "stage": r.data.tags.get("distill.stage"),
             "parent": r.data.tags.get("mlflow.parentRunId"), "flow_run": r.data.tags.get("prefect.flow_run_id"),
             "reason": r.data.tags.get("trigger.reason"), "crash": r.data.tags.get("distill.crash")}
            for r in client.search_runs([exp], max_results=1000)]
    versions = {n: sorted((int(v.version), v.run_id, dict(v.tags)) for v in client.search_model_versions(f"name='{n}'"))
                for n in (cfg.student_model_name, cfg.edge_model_name)}
    aliases = {m.name: dict(m.aliases) for m in client.search_registered_models()}

    ids = sorted({r["flow_run"] for r in runs if r["flow_run"]})
    with temporary_settings({PREFECT_API_URL: ws["api_url"]}), get_client(sync_client=True) as c:
        flows = {str(r.id): {"state": r.state.type.value, "name": r.state.name, "message": r.state.message or ""}
                 for r in c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))}
    own, own_db = [], ws["tmp"] / "prefect-home" / "prefect.db"
    if own_db.exists():  # a lane whose runs all used the session's server has none
        with contextlib.closing(sqlite3.connect(own_db)) as db:
            own = db.execute("SELECT fr.id, fr.state_type, fr.state_name, s.message FROM flow_run fr "
                             "LEFT JOIN flow_run_state s ON s.id = fr.state_id").fetchall()
    for flow_id, state_type, name, message in own:
        assert flow_id not in flows, f"flow run {flow_id} on two Prefect APIs"
        flows[flow_id] = {"state": state_type, "name": name, "message": message or ""}
    return {"flows": flows, "runs": runs, "versions": versions, "aliases": aliases}


def _shards(ws) -> dict[str, tuple[int, int]]:
    """Every file of the soft-label store: path -> (inode, size)."""
    root = ws["tmp"] / "soft-labels"
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()}


def _check_runs(drills: dict, which: range) -> None:
    """Each drill in `which` killed as intended, on the API it should use, its server gone with it; the final run
    completed on the session's API."""
    for i in which:
        (failpoint, sig, api), r = DRILLS[i], drills["results"][i]
        if sig == signal.SIGKILL:
            assert r["rc"] == -signal.SIGKILL, (failpoint, r["log"][-3000:])
        else:  # one clear message, not a traceback
            assert r["rc"] == 128 + signal.SIGTERM, r["log"][-3000:]
            assert "stopped: signal 15" in r["log"] and "Traceback" not in r["log"].split("stopped:")[1]
        assert not r["servers"], f"an ephemeral API server outlived its process: {r['servers']}"
        # the drill ran where it should: its own ephemeral server, or the session's (no server started)
        assert (STARTED_OWN_SERVER in r["log"]) == (api == "own"), (api, r["log"][-3000:])
    final = drills["final"]
    assert final["rc"] == 0, final["log"][-4000:]
    assert not final["servers"] and STARTED_OWN_SERVER not in final["log"]


def test_killed_soft_label_runs_resume_from_the_stored_shards(drills):
    _check_runs(drills, range(SOFT_LABEL_DRILLS))
    ws, results, shard_files = drills["ws"], drills["results"], drills["shard_files"]
    # completed work reused: each run after a soft-label kill went on from the shards already stored
    assert "(2 shards reused)" not in results[0]["log"]
    reused = [int(m) for m in re.findall(r"\((\d+) shards? reused\)", results[1]["log"] + results[2]["log"])]
    assert reused and reused[0] >= 1, results[1]["log"][-3000:]

    # stored shards are never rewritten or removed by a later run
    for before, after in zip(shard_files, shard_files[1:] + [_shards(ws)]):
        for path, (inode, size) in before.items():
            if path.endswith(".npz") or "shard" in path:
                assert after.get(path) == (inode, size), f"{path} was rewritten or removed after a crash"
    store = _shards(ws)
    manifests = [p for p in store if p.endswith("manifest.json")]
    assert len(manifests) == 1, store
    assert not [p for p in store if p.endswith((".tmp", ".partial"))], store
    from typer.testing import CliRunner

    from flows.cli import app

    verify = CliRunner().invoke(app, ["cache", "verify", manifests[0].split("/")[0], "--config", str(ws["config"])])
    assert verify.exit_code == 0, verify.output  # every shard's digest, no truncated shard


def test_every_killed_run_ends_crashed_and_leaves_no_registry_version(drills):
    """Every killed run: Prefect Crashed, MLflow FAILED or KILLED; no stage run left RUNNING; the registry holds
    the final run's versions only (a killed registration left nothing behind)."""
    _check_runs(drills, range(len(DRILLS)))
    state = _state(drills["ws"])
    pipelines = sorted((r for r in state["runs"] if r["stage"] == "pipeline"), key=lambda r: r["reason"])
    assert len(pipelines) == len(DRILLS) + 1
    by_reason = {r["reason"]: r for r in pipelines}
    for i, (failpoint, sig, _) in enumerate(DRILLS):
        run = by_reason[f"test: {_name(i)}"]
        flow = state["flows"][run["flow_run"]]
        assert flow["name"] == "Crashed", (failpoint, sig.name, flow)
        assert run["status"] == ("KILLED" if sig == signal.SIGKILL else "FAILED"), (failpoint, sig.name, run)
        if sig == signal.SIGKILL:
            assert "died during the" in (run["crash"] or "") and "died during the" in flow["message"]
    assert by_reason["test: final"]["status"] == "FINISHED"
    assert state["flows"][by_reason["test: final"]["flow_run"]]["state"] == "COMPLETED"
    assert not [r for r in state["runs"] if r["status"] == "RUNNING"]

    final_run = by_reason["test: final"]["id"]
    final_stages = {r["id"] for r in state["runs"] if r["parent"] == final_run}
    for name, versions in state["versions"].items():
        assert len(versions) == 1 and versions[0][1] in final_stages, (name, versions)
    edge_version = state["versions"]["crash-edge"][0][0]
    assert state["aliases"]["crash-edge"] == {"challenger": edge_version, "champion": edge_version}
