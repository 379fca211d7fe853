"""The production shape of the stack, on loopback and without Docker: a real PostgreSQL server (Debian's package, a
temporary data directory, databases made by infra/postgres-init.sh) behind both `mlflow server` (artifacts on S3)
and `prefect server`, a moto S3 server for MLflow artifacts and soft labels. `distill run` on configs/tiny.yaml
reaches them through the standard environment variables alone; everything is read back through the servers and
in the two databases."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distill_gap.registry.registration import LINEAGE_TAGS
from tests.conftest import _free_port
from tests.helpers import ONNX_INT8_ONLY_OVERRIDES, OPEN_GATE_OVERRIDES, data_overrides, import_tiny_teacher, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ROOT / "configs/tiny.yaml"
ARTIFACTS, SOFT = "mlflow-artifacts", "distill-soft-labels"  # the buckets of infra/.env.example
# test-only passwords for the roles infra/postgres-init.sh creates (the compose stack reads them from infra/.env)
PASSWORDS = {"POSTGRES_PASSWORD": "pg-test", "PREFECT_DB_PASSWORD": "prefect-test", "MLFLOW_DB_PASSWORD": "mlflow-test"}


def _pg_bindir() -> Path | None:
    """Debian's PostgreSQL server binaries (initdb, pg_ctl, psql of one version); None when not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def _as_postgres(cmd: list) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the `postgres` OS user."""
    return (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + [str(c) for c in cmd]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 (password auth over TCP) with the prefect and mlflow databases."""
    bindir = _pg_bindir()
    if bindir is None:
        if os.environ.get("CI"):  # CI machines have Debian's postgresql package: a skip there would hide a failure
            pytest.fail("PostgreSQL server binaries not found (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    # mkdtemp under /tmp, not pytest's tmp_path: pytest's base folder is 0700 root, unreadable by `postgres`
    root = Path(tempfile.mkdtemp(prefix="distill-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    (root / "pwfile").write_text(PASSWORDS["POSTGRES_PASSWORD"])
    port, data = _free_port(), root / "data"
    subprocess.run(_as_postgres([bindir / "initdb", "-D", data, "-U", "postgres", "--pwfile", root / "pwfile",
                                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
                                 "--no-sync"]), check=True, capture_output=True)
    # fsync off: a throwaway test cluster; the socket sits in the data folder's parent (no /run/postgresql needed)
    subprocess.run(_as_postgres([bindir / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-w", "-t", "60", "-o",
                                 f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"]),
                   check=True, capture_output=True)
    try:
        env = {**os.environ, **PASSWORDS, "PGHOST": "127.0.0.1", "PGPORT": str(port), "POSTGRES_USER": "postgres",
               "PGPASSWORD": PASSWORDS["POSTGRES_PASSWORD"], "PATH": f"{bindir}:{os.environ['PATH']}"}
        made = subprocess.run(["sh", ROOT / "infra/postgres-init.sh"], env=env, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        def url(role: str, driver: str = "") -> str:  # each service logs in as its own role, to its own database
            return f"postgresql{driver}://{role}:{PASSWORDS[f'{role.upper()}_DB_PASSWORD']}@127.0.0.1:{port}/{role}"

        yield {"port": port, "url": url}
    finally:
        subprocess.run(_as_postgres([bindir / "pg_ctl", "-D", data, "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _query(port: int, db: str, sql: str) -> list[tuple]:
    """Read a service's own tables as the superuser: proof that it stores in PostgreSQL."""
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, dbname=db, user="postgres",
                         password=PASSWORDS["POSTGRES_PASSWORD"]) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def stack(postgres, s3_endpoint, tmp_path_factory):
    """mlflow server and prefect server on PostgreSQL, started side by side; yields the client-side environment."""
    import boto3

    tmp = tmp_path_factory.mktemp("production")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in (ARTIFACTS, SOFT):
        s3.create_bucket(Bucket=bucket)
    aws = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    mlflow_port, prefect_port = _free_port(), _free_port()
    servers = {
        # --no-serve-artifacts: clients read and write s3://mlflow-artifacts themselves (as infra/docker-compose.yml)
        "mlflow": ([BIN / "mlflow", "server", "--backend-store-uri", postgres["url"]("mlflow"),
                    "--default-artifact-root", f"s3://{ARTIFACTS}", "--no-serve-artifacts", "--workers", "1",
                    "--host", "127.0.0.1", "--port", mlflow_port],
                   {**aws, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as `distill ui`: no job runner (3 processes)
                   f"http://127.0.0.1:{mlflow_port}/health"),
        "prefect": ([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", prefect_port],
                    {"PREFECT_API_DATABASE_CONNECTION_URL": postgres["url"]("prefect", "+asyncpg"),
                     "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     "PREFECT_UI_ENABLED": "false"},
                    f"http://127.0.0.1:{prefect_port}/api/health"),
    }
    procs, logs = {}, contextlib.ExitStack()
    try:
        for name, (cmd, extra, _) in servers.items():
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
            log = logs.enter_context(open(tmp / f"{name}.log", "w"))
            procs[name] = subprocess.Popen([str(c) for c in cmd], env={**env, **extra}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        import mlflow, torch, transformers  # noqa: F401,E401  (imported while the servers migrate their databases)

        for name, (_, _, health) in servers.items():
            wait_http(health, procs[name], tmp / f"{name}.log", 180)
        # what a user of the compose stack exports, and nothing else (plus where this test keeps its signing key)
        client_env = {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                      "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", **aws,
                      "AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
                      "DISTILL_KEY_DIR": str(tmp / "keys")}
        yield {"tmp": tmp, "env": client_env, "pg_port": postgres["port"], "s3": s3}
    finally:
        for p in procs.values():  # the whole process group: uvicorn workers included
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:  # uvicorn waits for idle keep-alive connections (~13 s here): nothing to save in a test server
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        logs.close()


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _distill(stack, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """The `distill` command in a fresh process: Prefect reads PREFECT_API_URL when it is imported, so only a new
    process shows that the environment variables alone are enough."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING", "PREFECT_API"))}
    return subprocess.run([str(BIN / "distill"), *map(str, args)], env={**env, **stack["env"]}, cwd=stack["tmp"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(stack, tiny_model_dir, tiny_data):
    """Import the tiny teacher into the MLflow server (its artifacts go to S3 like any version's), then
    `distill run` once on tiny.yaml's rows read from CSV files; returns the timings. (Bootstrapping a teacher, ~30 s
    of training, is tests/tasks/test_teacher.py's subject, not this test's.)"""
    from flows.config import load_config

    store = [f"soft_labels.store=s3://{SOFT}/labels", *data_overrides(tiny_data)]
    started = time.monotonic()
    with _environ(stack["env"]), contextlib.chdir(stack["tmp"]):  # .distill/ work folders land in tmp
        import_tiny_teacher(load_config(TINY, store), tiny_model_dir)
    imported = time.monotonic()
    # no bootstrap intervals or stress suites, ONNX Runtime INT8 only (as tests/flows/test_triggers.py):
    # this test is about where things are stored, not about the intervals or the toolchains
    trimmed = ["evaluate.bootstrap_samples=0", "evaluate.stress_rows=0", *ONNX_INT8_ONLY_OVERRIDES,
               *OPEN_GATE_OVERRIDES,  # stores, not quality
               "runtime.threads=1"]  # tiny models gain nothing from a second thread; the other pytest worker has it
    out = _distill(stack, "run", "--config", TINY, *(a for o in [*store, *trimmed] for a in ("--set", o)),
                   "--reason", "test: production stack")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return {"stdout": out.stdout, "teacher_s": imported - started, "run_s": time.monotonic() - imported}


def _mlflow(stack):
    from mlflow import MlflowClient

    uri = stack["env"]["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _keys(stack, bucket: str, prefix: str = "") -> list[str]:
    pages = stack["s3"].get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_soft_labels_and_artifacts_are_on_s3(stack, pipeline):
    print(f"teacher import {pipeline['teacher_s']:.1f} s, distill run {pipeline['run_s']:.1f} s")
    manifests = [k for k in _keys(stack, SOFT, "labels/") if k.endswith("manifest.json")]
    assert len(manifests) == 1, manifests
    manifest = json.loads(stack["s3"].get_object(Bucket=SOFT, Key=manifests[0])["Body"].read())
    assert {s["name"] for s in manifest["shards"]} and manifest["num_examples"] > 0
    for shard in manifest["shards"]:
        assert f"labels/{manifest['key']}/shards/{shard['name']}" in _keys(stack, SOFT, f"labels/{manifest['key']}/")
    # every run and logged model of the experiment stores its files in the artifacts bucket, none on local disk
    client = _mlflow(stack)
    exp = client.get_experiment_by_name("distill-gap")
    assert exp.artifact_location.startswith(f"s3://{ARTIFACTS}/")
    stored = _keys(stack, ARTIFACTS)
    assert any(k.endswith("attestations/soft-labels.dsse.json") for k in stored), stored[:20]
    assert any(k.endswith("signatures/edge.sig") for k in stored)
    assert any(k.endswith("/MLmodel") for k in stored)
    assert not (stack["tmp"] / "mlruns").exists() and not (stack["tmp"] / ".distill/mlartifacts").exists()


def test_registry_and_lineage_read_back_through_the_mlflow_server(stack, pipeline):
    client = _mlflow(stack)
    teacher = client.get_model_version_by_alias("tiny-teacher", "pinned")
    student = client.search_model_versions("name='tiny-student'")
    edge = client.search_model_versions("name='tiny-edge'")
    assert len(student) == 1 and len(edge) == 1
    for mv in (student[0], edge[0]):
        assert set(LINEAGE_TAGS) <= set(mv.tags), set(LINEAGE_TAGS) - set(mv.tags)
        assert mv.tags["teacher.version"] == teacher.version and mv.tags["teacher.name"] == "tiny-teacher"
        assert mv.tags["signature.uri"].startswith(f"s3://{ARTIFACTS}/")
        assert mv.tags["soft_labels.uri"].startswith(f"s3://{SOFT}/labels/")
        assert mv.tags["attestation.uri"].startswith(f"s3://{ARTIFACTS}/")
        assert mv.tags["trigger.reason"] == "test: production stack"
    assert edge[0].tags["parent"] == f"tiny-student/{student[0].version}"

    # the commands, with nothing but the environment (MLflow reads it at each call, so in-process is enough):
    # lineage down to the teacher version ...
    from typer.testing import CliRunner

    from flows.cli import app

    uri = f"models:/tiny-edge/{edge[0].version}"
    with contextlib.chdir(stack["tmp"]):
        out = CliRunner().invoke(app, ["lineage", uri], env=stack["env"])
        assert out.exit_code == 0, out.output
        assert f"tiny-teacher v{teacher.version}" in out.output and edge[0].tags["soft_labels.key"][:16] in out.output
        # ... and verify: every file downloaded afresh from S3, re-hashed, every signature checked
        out = CliRunner().invoke(app, ["verify", uri], env=stack["env"])
        assert out.exit_code == 0, out.output


def test_prefect_server_ran_the_flow(stack, pipeline):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["env"]["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["distill-pipeline"])))
    assert len(runs) == 1 and runs[0].state.is_completed(), [(r.name, r.state) for r in runs]
    # the MLflow pipeline run names the Prefect flow run that made it
    client = _mlflow(stack)
    [run] = client.search_runs([client.get_experiment_by_name("distill-gap").experiment_id],
                               filter_string="tags.distill.stage = 'pipeline'")
    assert run.data.tags["prefect.flow_run_id"] == str(runs[0].id) and run.info.status == "FINISHED"


def test_both_servers_store_in_postgresql(stack, pipeline):
    port = stack["pg_port"]
    assert _query(port, "prefect", "SELECT count(*) FROM flow_run")[0][0] >= 1
    assert _query(port, "prefect", "SELECT count(*) FROM task_run WHERE name LIKE 'label-shard-%'")[0][0] >= 1
    models = {name for (name,) in _query(port, "mlflow", "SELECT name FROM registered_models")}
    assert {"tiny-teacher", "tiny-student", "tiny-edge"} <= models
    tags = dict(_query(port, "mlflow", "SELECT key, value FROM model_version_tags WHERE name = 'tiny-edge'"))
    assert set(LINEAGE_TAGS) <= set(tags)
