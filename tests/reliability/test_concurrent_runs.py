"""Issue 10, item 2: two pipeline runs at once on the same config, with the embedded defaults: each `distill run`
starts its own ephemeral Prefect API on the same SQLite database (one PREFECT_HOME) and writes to the same MLflow
SQLite store and soft-label folder. Both finish (or one fails with one clear message); no MLflow metric is lost;
SQLite lock contention shows up as log lines at most, never as a failure.

Both processes are forked at the same moment from one interpreter that imported flows.pipeline, torch, transformers
and Great Expectations once (tests/forkserver.py): each runs `flows.cli:main` with its own pid and log, starts its own
API server and does all its work at the same time as the other; only the ~15 CPU-seconds of imports are shared.
(tests/infra/test_production_stack.py runs the installed command in a fresh interpreter.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.forkserver import ForkServer
from tests.helpers import drill_workspace

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
BIN = Path(sys.executable).parent
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b.*:")  # the last line of a traceback
PRELOAD = ["flows.cli", "flows.pipeline", "torch", "transformers.modeling_utils", "transformers.models.bert.modeling_bert",
           "optimum.exporters.onnx", "great_expectations"]  # not onnxruntime: it starts a thread (tests/forkserver.py)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir, tiny_data, mlflow_db_template):
    return drill_workspace(tmp_path_factory.mktemp("concurrent"), "twin", tiny_model_dir, data=tiny_data,
                           mlflow_db=mlflow_db_template)


def _mlflow_state(ws) -> dict:
    """The MLflow runs (with each metric's history length), versions and aliases, read after both processes exited."""
    from mlflow import MlflowClient

    from flows.config import load_config

    cfg = load_config(ws["config"])
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = {}
    for r in client.search_runs([exp], max_results=1000):
        runs[r.info.run_id] = {"status": r.info.status, "stage": r.data.tags.get("distill.stage"),
                               "parent": r.data.tags.get("mlflow.parentRunId"),
                               "reason": r.data.tags.get("trigger.reason"),
                               "metrics": {k: len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}}
    versions = {n: sorted((int(v.version), v.run_id) for v in client.search_model_versions(f"name='{n}'"))
                for n in (cfg.student_model_name, cfg.edge_model_name)}
    aliases = {m.name: dict(m.aliases) for m in client.search_registered_models()}
    return {"runs": runs, "versions": versions, "aliases": aliases}


def test_two_runs_at_once_both_finish_and_lose_nothing(ws):
    tmp = ws["tmp"]
    forks = ForkServer(PRELOAD, env=ws["env"], log=tmp / "forkserver.log")
    try:
        procs = {name: forks.start([str(BIN / "distill"), "run", "--config", str(ws["config"]), "--reason", name],
                                   entry="flows.cli:main", env=ws["env"], cwd=tmp, log=tmp / f"{name}.log")
                 for name in ("twin-a", "twin-b")}
        rcs = {name: p.wait(timeout=900) for name, p in procs.items()}
    finally:
        forks.close()
    logs = {name: (tmp / f"{name}.log").read_text() for name in procs}
    finished = [n for n, rc in rcs.items() if rc == 0]
    for name, rc in rcs.items():  # a run that does not finish fails with one clear message, not a traceback
        assert rc in (0, 2), f"{name} exited {rc}:\n{logs[name][-4000:]}"
        # SQLite lock contention may be logged (the issue allows "lock errors only as logs"); any other exception
        # in a log is a defect. Before the ephemeral server's start-up lock, the two servers' migrations raced on
        # the fresh prefect.db ("index ... already exists", an ERROR traceback and a restart on another port).
        raised = [line for line in logs[name].splitlines() if EXCEPTION_LINE.match(line)]
        assert all("database is locked" in line for line in raised), (name, raised)
        assert "Application startup failed" not in logs[name], logs[name][-4000:]
        if rc == 2:
            assert "error:" in logs[name] and "fix:" in logs[name]
            assert "Traceback" not in logs[name].rsplit("error:", 1)[1]
    assert finished, logs

    state = _mlflow_state(ws)
    pipelines = {r["reason"]: (rid, r) for rid, r in state["runs"].items() if r["stage"] == "pipeline"}
    assert set(pipelines) == {"twin-a", "twin-b"}
    reference = None
    for name in finished:
        rid, run = pipelines[name]
        assert run["status"] == "FINISHED"
        stages = {r["stage"]: r for r in state["runs"].values() if r["parent"] == rid}
        assert set(stages) >= {"validate", "soft-labels", "distill", "quantize", "evaluate", "register"}
        assert all(s["status"] == "FINISHED" for s in stages.values())
        # no lost metric: both runs logged the same metrics, each with its full history (one point per epoch)
        logged = {(stage, k): n for stage, s in stages.items() for k, n in s["metrics"].items()}
        assert logged, stages
        assert reference is None or logged == reference, (name, set(logged) ^ set(reference or {}))
        reference = logged
    assert not [r for r in state["runs"].values() if r["status"] == "RUNNING"]
    for name in set(rcs) - set(finished):
        assert pipelines[name][1]["status"] == "FAILED"

    # each finished run registered its own versions; one champion; one soft-label entry, computed once
    for model, versions in state["versions"].items():
        assert [v for v, _ in versions] == list(range(1, len(finished) + 1)), (model, versions)
        assert len({run for _, run in versions}) == len(finished)
    assert state["aliases"]["twin-edge"]["champion"] in [v for v, _ in state["versions"]["twin-edge"]]
    manifests = list((tmp / "soft-labels").rglob("manifest.json"))
    assert len(manifests) == 1
    # lock contention, if any, was absorbed: it may be logged, never fatal
    for name in finished:
        assert "Finished in state Completed()" in logs[name]
