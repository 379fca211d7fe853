"""Issue 10, reliability item 5: the S3 endpoint goes down while the soft labels are being written.

The tiny pipeline (configs/tiny.yaml) runs in-process against a real Prefect API (test harness), MLflow
on SQLite and moto's S3 server on 127.0.0.1 -- reached through a TCP proxy (tests/reliability/_tcp_proxy.py)
that really goes away: its listening socket is closed and open connections are reset, so botocore sees
refused and reset connections, as with a MinIO that restarts or dies. The outage starts in the middle of
the second soft-label shard PUT (shard 0 is stored; half of shard 1's body has reached the server), so it
falls in the middle of the stage's writes, never before the run.

* down 4 s: the shard task's retries ride it out, the run finishes, the cache entry verifies and holds
  nothing extra; the retries are in the run's logs.
* down for good: the run fails within a bounded time with one DistillError naming the endpoint and the
  fix; no manifest, only whole shards (reused, digest for digest, once the endpoint is back), no
  registry version, the MLflow run FAILED.

The retries wait 2 s, then 6 s (`soft_labels.retry_delays`; the default is [5, 15]): the same three attempts
against an outage shorter than the schedule (ridden out) and one longer (given up on), in less wall time.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from flows.config import load_config
from tests.helpers import (ONNX_INT8_ONLY_OVERRIDES, OPEN_GATE_OVERRIDES, data_overrides, fresh_mlflow_db, import_tiny_teacher,
                           task_runs)
from distill_gap.errors import DistillError
from tests.reliability._tcp_proxy import TcpProxy

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "distill-outage"
OUTAGE_S = 4.0
RETRY_DELAYS = "[2, 6]"  # seconds after attempts 1 and 2: the last attempt starts >= 8 s after the cut
GIVE_UP_WITHIN_S = 120.0


@pytest.fixture(scope="module")
def moto_client(s3_endpoint):
    """A client that talks to moto directly (never through the proxy): what is really stored."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    host, port = s3_endpoint.removeprefix("http://").split(":")
    px = TcpProxy((host, int(port)))
    px.up()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", px.url)      # every client the pipeline makes goes through the proxy
        yield px
    px.stop()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, proxy, moto_client, prefect_api, tiny_model_dir, tiny_data, mlflow_db_template):
    """A working directory with a bucket (behind the proxy), a SQLite MLflow store and the pinned tiny teacher."""

    tmp = tmp_path_factory.mktemp("s3-outage")
    old = os.getcwd()
    os.chdir(tmp)
    moto_client.create_bucket(Bucket=BUCKET)
    # 64 training rows (tiny.yaml's, from CSV files) in shards of 16: four shard PUTs, the outage starts at the second
    base = [f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp)}", f"soft_labels.store=s3://{BUCKET}/labels",
            *data_overrides(tiny_data), "soft_labels.shard_size=16", f"soft_labels.retry_delays={RETRY_DELAYS}"]
    import_tiny_teacher(load_config(ROOT / "configs/tiny.yaml", base), tiny_model_dir)  # faults, not quality
    yield tmp, base
    os.chdir(old)


# This file is about the store, so the stages after the soft labels are trimmed to what a complete run
# needs (ONNX Runtime INT8 only, no bootstrap intervals or stress suites) and the quality
# gates are opened: a tiny model missing a gate is not what is tested here.
TRIMMED = [*ONNX_INT8_ONLY_OVERRIDES, "evaluate.bootstrap_samples=0", "evaluate.stress_rows=0", *OPEN_GATE_OVERRIDES]


def _config(workspace, *overrides):
    _, base = workspace
    return load_config(ROOT / "configs/tiny.yaml", [*base, *TRIMMED, *overrides])


class _AtShardPut:
    """Proxy hook: the n-th shard PUT under `prefix` gets half its body through, then `action` runs (the
    endpoint goes down with the upload half sent: the server holds a truncated request, the client a reset)."""

    def __init__(self, prefix: str, nth: int, action):
        self.marker, self.nth, self.action = f"/{BUCKET}/{prefix}/", nth, action
        self.seen = 0
        self.fired_at: float | None = None
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, length: int):
        with self._lock:
            if self.fired_at is not None or method != "PUT" or self.marker not in path or "/shards/" not in path:
                return None
            self.seen += 1
            if self.seen < self.nth:
                return None
            self.fired_at = time.monotonic()
            return length // 2, self.action


def _objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under s3://BUCKET/<prefix>/, read straight from moto."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def _run_logs(flow_run_id, expect: str, timeout: float = 20.0) -> list[str]:
    """The run's log messages as the Prefect API holds them (waits for `expect` to arrive)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            msgs = [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [flow_run_id]}),
                                                             limit=200)]
        if any(expect in m for m in msgs) or time.monotonic() > deadline:
            return msgs
        time.sleep(0.5)


def _mlflow_runs(cfg, flow_run_id):
    """(pipeline run, its stage runs) of one flow run."""
    from distill_gap.registry.tracking import client_for

    client = client_for(cfg.tracking)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    parent = client.search_runs(exp_ids, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(parent) == 1, parent
    children = client.search_runs(exp_ids, filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    return parent[0], children


def _versions(cfg) -> dict[str, int]:
    from distill_gap.registry.tracking import client_for

    client = client_for(cfg.tracking)
    return {name: len(client.search_model_versions(f"name='{name}'")) for name in ("tiny-student", "tiny-edge")}


def test_endpoint_down_briefly_during_shard_writes_is_retried_and_the_run_completes(workspace, proxy, moto_client):
    from flows.pipeline import distill_pipeline
    from distill_gap.softlabels.maintenance import show_entry, verify_entry
    from distill_gap.softlabels.store import MANIFEST, SoftLabelStore

    prefix = "flaky"
    store_uri = f"s3://{BUCKET}/{prefix}"
    cfg = _config(workspace, f"soft_labels.store={store_uri}")
    trigger = _AtShardPut(prefix, nth=2, action=lambda: proxy.outage(OUTAGE_S))
    proxy.cut.clear()
    proxy.on_request = trigger
    started = time.monotonic()
    try:
        state = distill_pipeline(cfg, trigger_reason=f"test: {OUTAGE_S:.0f} s S3 outage", return_state=True)
    finally:
        proxy.on_request = None
        proxy.up()
    took = time.monotonic() - started

    # the outage happened mid-stage, half-way through shard 1's upload, and lasted OUTAGE_S
    assert trigger.fired_at is not None, "the soft-label stage never wrote a second shard through the proxy"
    (down, up), = proxy.outages()[-1:]
    assert up is not None and up - down >= OUTAGE_S - 0.05
    (_, _, path, sent, length), = proxy.cut
    assert "/shards/part-00001.parquet" in path and 0 < sent < length
    assert state.is_completed(), state.message
    result = state.result()
    flow_run_id = state.state_details.flow_run_id

    # the soft-label entry is complete and verifies: manifest, every shard's sha256
    soft = result["soft_labels"]
    assert soft["hit"] is False and soft["uri"] == f"{store_uri}/{soft['key']}"
    report = verify_entry(store_uri, soft["key"])
    assert report["ok"], report
    manifest = show_entry(store_uri, soft["key"])
    assert [s["name"] for s in manifest["shards"]] == [f"part-{i:05d}.parquet" for i in range(len(manifest["shards"]))]
    assert len(manifest["shards"]) >= 3 and manifest["produced_by"]["reused_shards"] == 0
    # nothing else: no duplicate, temporary or partial object next to the entry
    stored = _objects(moto_client, prefix)
    entry = f"{prefix}/{soft['key']}"
    expected = [f"{entry}/{MANIFEST}"] + [f"{entry}/shards/{s['name']}" for s in manifest["shards"]]
    assert sorted(stored) == sorted(expected)
    ids, logits = SoftLabelStore(store_uri).read(soft["key"])
    assert len(ids) == len(set(ids)) == manifest["num_examples"] == logits.shape[0]

    # the retries: shard 1's task ran again after the outage, and the run's logs say so
    shard_runs = {t.name: t for t in task_runs(flow_run_id) if t.name.startswith("label-shard-")}
    retried = shard_runs["label-shard-1"]
    assert retried.state.is_completed() and retried.run_count >= 2
    assert all(t.state.is_completed() for t in shard_runs.values())
    logs = _run_logs(flow_run_id, expect="label-shard-1: soft-label store error on attempt 1")
    retry_logs = [m for m in logs if "soft-label store error on attempt" in m]
    assert len(retry_logs) == retried.run_count - 1, logs
    assert all(f"cannot reach {proxy.url}" in m and "retrying in" in m for m in retry_logs), retry_logs

    # the rest of the run went on as usual: MLflow run finished, versions registered
    parent, children = _mlflow_runs(cfg, flow_run_id)
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    assert result["registered"]["student"]["version"] >= 1 and result["registered"]["edge"]["version"] >= 1
    print(f"\n[s3-outage] down {up - down:.1f} s from shard PUT 2; label-shard-1 ran {retried.run_count} times; "
          f"run took {took:.1f} s; retry log: {retry_logs}")


def test_endpoint_down_for_good_fails_clearly_and_leaves_only_whole_shards(workspace, proxy, moto_client):
    from flows.pipeline import distill_pipeline
    from distill_gap.data.splits import load_splits
    from distill_gap.digest import sha256_bytes, tokenizer_digest
    from distill_gap.softlabels.labelling import ensure_soft_labels, plan_soft_labels
    from distill_gap.softlabels.shards import decode_shard
    from distill_gap.registry.tracking import client_for
    from tasks.teacher import resolve_teacher

    prefix = "gone"
    store_uri = f"s3://{BUCKET}/{prefix}"
    cfg = _config(workspace, f"soft_labels.store={store_uri}")
    versions_before = _versions(cfg)
    trigger = _AtShardPut(prefix, nth=2, action=proxy.down)
    proxy.cut.clear()
    proxy.on_request = trigger
    try:
        started = time.monotonic()
        state = distill_pipeline(cfg, trigger_reason="test: S3 down for good", return_state=True)
        took = time.monotonic() - started
        assert trigger.fired_at is not None, "the soft-label stage never wrote a second shard through the proxy"
        (_, _, path, sent, length), = proxy.cut
        assert "/shards/part-00001.parquet" in path and 0 < sent < length
        failed_after = time.monotonic() - trigger.fired_at

        # one clear error, within a bounded time
        assert state.is_failed()
        with pytest.raises(DistillError) as err:
            state.result()
        message = str(err.value)
        assert failed_after < GIVE_UP_WITHIN_S, failed_after
        assert message.startswith(f"cannot reach {proxy.url} for {store_uri} ("), message
        assert "gave up after 3 attempts" in message
        assert err.value.fix and "AWS_ENDPOINT_URL" in err.value.fix and "server is up" in err.value.fix

        # nothing half-written: no manifest; what is there is shard 0, whole (it was stored before the outage)
        splits = load_splits(cfg.data, cfg.seed)
        train = splits["train"]
        teacher = resolve_teacher(client_for(cfg.tracking), cfg.teacher_model_name, cfg.teacher, cfg.data.labels)
        inputs = dict(teacher_digest=teacher.digest, tokenizer_digest=tokenizer_digest(teacher.path),
                      data_digest=splits.digests()["train"], ids=train["id"].tolist(), texts=train["text"].tolist(),
                      labels=splits.labels, max_length=cfg.runtime.max_length, shard_size=cfg.soft_labels.shard_size,
                      dtype=cfg.soft_labels.dtype)
        plan = plan_soft_labels(store_uri, **inputs)
        left = _objects(moto_client, prefix)
        assert not [k for k in left if k.endswith("manifest.json")], sorted(left)
        assert sorted(left) == [f"{prefix}/{plan.key}/shards/part-00000.parquet"], sorted(left)
        jobs = {f"{prefix}/{plan.key}/shards/{job.name}": job for job in plan.jobs()}
        for key, data in left.items():
            got_ids, logits = decode_shard(data, key)      # Parquet page checksums: a torn object fails here
            assert got_ids == jobs[key].ids and logits.shape == (len(got_ids), len(splits.labels))

        # no registry version, the MLflow run and its soft-labels stage FAILED, nothing left RUNNING
        assert _versions(cfg) == versions_before
        parent, children = _mlflow_runs(cfg, state.state_details.flow_run_id)
        assert parent.info.status == "FAILED"
        stages = {r.data.tags["distill.stage"]: r.info.status for r in children}
        assert stages.get("soft-labels") == "FAILED" and "RUNNING" not in stages.values(), stages
        assert "distill" not in stages and "register" not in stages
    finally:
        proxy.on_request = None
        proxy.up()

    # endpoint back: the shard left behind is reused as it is, and its bytes are the ones the manifest pins
    teacher_meta = {"name": teacher.name, "version": teacher.version}
    again = ensure_soft_labels(store_uri, teacher_dir=teacher.path, teacher_meta=teacher_meta, progress=False,
                               device="cpu", **inputs)
    assert again.key == plan.key and again.manifest["produced_by"]["reused_shards"] == len(left)
    pinned = {s["name"]: s["sha256"] for s in again.manifest["shards"]}
    for key, data in left.items():
        assert pinned[key.rsplit("/", 1)[1]] == sha256_bytes(data)
    print(f"\n[s3-outage] down for good from shard PUT 2: run failed after {took:.1f} s "
          f"({failed_after:.1f} s after the outage began); error: {message}")
