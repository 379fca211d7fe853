"""Redistillation end to end with real parts: `prefect server` on 127.0.0.1 (SQLite in a temporary folder), the
work pool, the deployments of prefect.yaml and the automations of deployments/ applied by `distill deploy`, and
a process worker. A drifted production sample starts exactly one distill-pipeline run, which completes on a tiny
config and records the trigger on its model versions; moving the teacher's alias starts one run; an undrifted
sample starts none.

Each deployment runs through the worker at least once (drift-monitor, teacher-watch, and the distill-pipeline
runs the automations start); the undrifted sample and the second delivery of the drifted one run drift-monitor in
this process, on the same server (a worker's flow run is a new process: ~15 s of imports each). The teacher is
imported, not trained, and the champion the monitors start from is registered, not produced by a first pipeline run
(~30 s): the test is about triggers, not the teacher or that first run. The runs the triggers start are whole
pipeline runs through the worker, and each must end as the new champion."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import _free_port
from tests.helpers import (ONNX_INT8_ONLY, OPEN_GATES, OPEN_TOLERABLE_LOSS, drain_prefect_services, fresh_mlflow_db,
                           import_tiny_teacher, wait_http)

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory, review_frame, tiny_data, mlflow_db_template):
    """Server + pool + deployments + automations + worker; a tiny config whose gates let a champion exist."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE, temporary_settings

    tmp = tmp_path_factory.mktemp("triggers")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}/prefect.db",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "INFO", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
           "DISTILL_KEY_DIR": str(tmp / "keys"), "DISTILL_PROGRESS": "0",
           "PREFECT_WORKER_QUERY_SECONDS": "1"}  # the worker polls every second (default 10): each run starts sooner
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    logs = tmp / "logs"
    logs.mkdir()
    procs = [subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)]
    old_env = {k: os.environ.get(k) for k in env}
    settings = contextlib.ExitStack()
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", procs[0], logs / "server.log", 120)
        os.environ.update(env)  # this process talks to the same server and stores
        # ... and so do its Prefect clients: Prefect read its settings when it was first imported (under `-n 2`,
        # while the whole suite was collected), so the environment alone would leave them without an API URL and
        # the first in-process flow would start an ephemeral server of its own, whose events never reach this
        # server's automations. Ephemeral mode off: a client that is not pointed here fails instead.
        settings.enter_context(temporary_settings(updates={
            PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: env["PREFECT_HOME"],
            PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}))
        config = tmp / "tiny.yaml"
        raw = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
        raw["data"].update(tiny_data)  # tiny.yaml's rows (64 per split), from CSV files: no 215k-row read per run
        raw["soft_labels"]["store"] = f"file://{tmp}/soft-labels"
        fresh_mlflow_db(mlflow_db_template, tmp)  # the store MLFLOW_TRACKING_URI names, already migrated
        raw["tracking"] = {"uri": f"sqlite:///{tmp}/mlflow.db", "artifact_location": str(tmp / "mlartifacts")}
        raw["governance"] = {"key_dir": str(tmp / "keys")}
        # gates loose enough that the tiny model becomes champion: this test is about triggers, not quality
        # three pipeline runs: trimmed to ONNX Runtime INT8 only, no intervals or stress suites
        raw["evaluate"] = {**OPEN_GATES, "bootstrap_samples": 0, "stress_rows": 0}
        raw["quantize"].update(require_int8=False, tolerable_loss=OPEN_TOLERABLE_LOSS, **ONNX_INT8_ONLY)
        raw["drift"] = {"sample_size": 200, "min_rows": 50}
        raw["runtime"]["threads"] = 1  # tiny models gain nothing from a second thread; the other pytest worker has it
        config.write_text(yaml.safe_dump(raw))
        deployed = subprocess.run([str(BIN / "distill"), "deploy"], env=env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=180)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        procs.append(subprocess.Popen([str(BIN / "distill"), "worker"], env=env, cwd=ROOT,
                                      stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        yield {"tmp": tmp, "config": config, "env": env, "logs": logs}
    finally:
        drain_prefect_services()  # while the server is up: this process's clients of it go with it
        settings.close()
        for p in procs:
            with pytest.MonkeyPatch.context():
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:  # uvicorn waits for idle keep-alive connections (~15 s here): nothing to save in a test server
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pipeline_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["distill-pipeline"])))


def _run(deployment: str, parameters: dict, timeout: float = 240):
    """Run a deployment through the worker and wait for its final state."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=timeout)
    assert run.state.is_final(), f"{deployment} still {run.state.name} after {timeout} s"
    return run


def _wait_for_pipeline_runs(n: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _pipeline_runs()
        if len(runs) >= n and all(r.state.is_final() for r in runs):
            return runs
        time.sleep(0.5)
    runs = _pipeline_runs()
    raise AssertionError(f"expected {n} finished distill-pipeline runs, found {[(r.name, r.state.name) for r in runs]}")


def _event_ids(name: str, n: int, timeout: float = 30) -> set[str]:
    """The ids of the `name` events this server has stored, once there are `n` (the event persister writes them in
    batches, every few seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as c:
            ids = {str(e.id) for e in c.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50).events}
        if len(ids) >= n or time.monotonic() > deadline:
            assert len(ids) == n, f"{len(ids)} {name} events on the server, expected {n}"
            return ids
        time.sleep(0.5)


def _production(path: Path, frame, *, drifted: bool) -> str:
    """Production rows: the reviews cleaned as the pipeline reads them (raw, their `&#039;` alone shifts the digit
    share past its threshold: drift), or drifted: each cut to three words in capitals."""
    from distill_gap.data.splits import _clean_review

    rows = frame.sample(n=len(frame), random_state=1)
    with path.open("w") as f:
        for i, r in enumerate(rows.itertuples()):
            text = _clean_review(str(r.text))
            text = " ".join(text.split()[:3]).upper() if drifted else text
            f.write(json.dumps({"text": text, "condition": r.condition, "timestamp": 1_790_000_000 + i}) + "\n")
    return str(path)


def _register_champion(cfg, model_dir, tiny_data: dict, folder: Path) -> str:
    """The starting point of the monitors: an edge folder of `model_dir` (its fp32 artifact) with the scope guard
    and the reference profile the evaluate stage ships (guard fitted on the training texts, reference on validation
    + test), registered as <name>-edge v1 @champion, distilled from teacher v1. Returns its version."""
    import pandas as pd

    from distill_gap.digest import model_digest
    from distill_gap.edge.folder import write_reference
    from distill_gap.edge.serving import load_edge
    from distill_gap.monitoring.drift import reference_profile
    from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
    from distill_gap.registry.versions import create_version
    from tests.conftest import LABELS
    from tests.helpers import add_scope_guard, log_model_dir

    edge = folder / "edge"
    shutil.copytree(model_dir, edge / "fp32")
    (edge / "edge.json").write_text(json.dumps({
        "format": 1, "primary": "fp32", "labels": LABELS, "max_length": cfg.runtime.max_length, "quantized": False,
        "artifacts": {"fp32": {"path": "fp32", "runtime": "transformers", "ok": True}}}))
    guard = add_scope_guard(edge, pd.read_csv(tiny_data["train"])["text"].tolist())
    texts = [t for split in ("validation", "test") for t in pd.read_csv(tiny_data[split])["text"].tolist()]
    logits, features = load_edge(edge).predict_outputs(texts)
    write_reference(edge, reference_profile(texts, logits, LABELS, scope_scores=guard.score(logits, features),
                                            scope_threshold=guard.threshold, sample_size=cfg.drift.sample_size,
                                            seed=cfg.seed))
    client = client_for(cfg.tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name="champion") as run_id:
        mv = create_version(client, cfg.edge_model_name, source=log_model_dir(client, run_id, edge, "edge"),
                            run_id=run_id, governance=cfg.governance,
                            tags={"model.digest": model_digest(edge), "teacher.name": cfg.teacher_model_name,
                                  "teacher.version": "1", "gates.passed": "true", "trigger.reason": "initial"})
    client.set_registered_model_alias(cfg.edge_model_name, "champion", mv.version)
    return mv.version


def test_drift_and_teacher_change_each_start_one_pipeline_run(stack, review_frame, tiny_model_dir, tiny_data):
    from flows.config import load_config
    from flows.monitor import drift_monitor
    from distill_gap.monitoring.drift import sample_digest
    from distill_gap.monitoring.events import DRIFT_DETECTED
    from distill_gap.registry.tracking import client_for
    from distill_gap.registry.versions import fetch_model
    from distill_gap.kd.teacher import import_teacher
    from tests.helpers import spread_classifier

    cfg = load_config(stack["config"])
    client = client_for(cfg.tracking)
    # the starting point, in this process: the pinned teacher and a champion to monitor, whose logits and features
    # vary by text (the untrained tiny model's hardly do)
    import_tiny_teacher(cfg, tiny_model_dir)
    model = spread_classifier(tiny_model_dir, review_frame["text"].tolist()[:96], stack["tmp"] / "champion-model")
    assert int(_register_champion(cfg, model, tiny_data, stack["tmp"] / "champion")) == 1
    monitor = {"config_path": str(stack["config"]), "overrides": []}

    # 1. an undrifted sample (drift-monitor in this process): a report, no drift, no event, no run
    calm = drift_monitor(**monitor, production=_production(stack["tmp"] / "calm.jsonl", review_frame, drifted=False),
                         return_state=True)
    assert calm.is_completed(), calm.message
    assert not calm.result()["drifted"], calm.result()["reasons"]
    # 2. a drifted sample, seen twice (one burst: through the worker, then in this process): exactly one
    # distill-pipeline run, reason recorded
    drifted = _production(stack["tmp"] / "drifted.jsonl", review_frame, drifted=True)
    assert _run("drift-monitor/drift-monitor", {**monitor, "production": drifted}).state.is_completed()
    again = drift_monitor(**monitor, production=drifted, return_state=True)
    assert again.is_completed() and again.result()["event_id"]
    # both deliveries were sent before the run they started was even picked up: a second run would exist by the
    # time the first is final, and the wait below would wait for it too
    runs = _wait_for_pipeline_runs(1, 300)
    assert again.result()["event_id"] in _event_ids(DRIFT_DETECTED, 2)  # both reached this server's automations
    assert len(runs) == 1 and runs[0].state.is_completed(), [(r.name, r.state.name) for r in runs]
    assert runs[0].parameters["trigger_reason"].startswith("distill.drift.detected")
    # the event carried its rows and their digest, and the run learned from them (teacher-labelled, own key)
    assert runs[0].parameters["production"] == drifted
    assert runs[0].parameters["production_digest"] == sample_digest(drifted)
    edge = client.get_model_version_by_alias(cfg.edge_model_name, "champion")
    assert edge.tags["trigger.reason"].startswith("distill.drift.detected"), edge.tags["trigger.reason"]
    assert int(edge.tags["extra.rows"]) > 50 and edge.tags["extra.key"], edge.tags
    # ... and was judged beside the champion it would replace (v1, an fp32 edge folder), on every suite
    from distill_gap.registry.presentation import stage_run_id

    pipeline_run = client.get_run(edge.run_id).data.tags["mlflow.parentRunId"]
    report = json.loads(Path(client.download_artifacts(stage_run_id(client, pipeline_run, "evaluate"),
                                                       "evaluation/gap_report.json", str(stack["tmp"]))).read_text())
    assert report["champion"]["name"] == "champion-v1" and "champion-v1" in report["suites"]["test"]
    assert "vs_champion:accuracy" in report["gates"]

    # 3. the teacher's alias moves: teacher-watch starts one run
    teacher_dir = fetch_model(client, cfg.teacher_model_name, version=1, cache_root=stack["tmp"] / "models").path
    import_teacher(cfg, teacher_dir, license="apache-2.0", pin=True, log=lambda *_: None)
    assert _run("teacher-watch/teacher-watch", monitor).state.is_completed()
    runs = _wait_for_pipeline_runs(2, 300)
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    newest = max(runs, key=lambda r: r.created)
    assert newest.parameters["trigger_reason"].startswith("distill.teacher.changed")
    assert newest.parameters["production"] == ""  # a teacher change names no production rows
    edge = client.get_model_version_by_alias(cfg.edge_model_name, "champion")
    assert edge.tags["teacher.version"] == "2" and edge.tags["trigger.reason"].startswith("distill.teacher.changed")
    # both teachers in its lineage: the champion it was made to replace came from teacher v1
    assert edge.tags["replaces.teacher"] == f"{cfg.teacher_model_name}/1" and edge.tags["replaces.version"] == "2"
    from distill_gap.governance.lineage import lineage

    tnode = next(n for n in lineage(client, f"models:/{cfg.edge_model_name}/{edge.version}")["chain"]
                 if n["role"] == "teacher")
    assert tnode["version"] == 2 and tnode["replaces"] == {"version": 2, "teacher": f"{cfg.teacher_model_name}/1"}
