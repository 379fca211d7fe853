"""Soft-label cache under faults, against a real S3 endpoint (moto's server on loopback).

A labelling process SIGKILLed mid-write, two processes labelling one key at once, a flipped byte in
a stored shard, and an S3 endpoint that is down. The labelling runs in real subprocesses
(tests/distill_gap/softlabels/_labelling_worker.py) so that a kill and a race are what a real run would meet. They
are forked from one interpreter that imported torch, transformers, boto3 and the labelling code once
(tests/forkserver.py): each worker is its own process, with its own environment, killed by a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from distill_gap.digest import model_digest, sha256_json, tokenizer_digest
from distill_gap.errors import DistillError
from distill_gap.ops.transient import is_transient
from distill_gap.softlabels.labelling import ensure_soft_labels
from distill_gap.softlabels.store import SoftLabelStore
from tests.conftest import LABELS
from tests.forkserver import ForkServer

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("_labelling_worker.py")
FP16_ATOL = 4e-3      # as in test_labelling.py: fp16 storage plus padding-dependent fp32 rounding
N = 96                # rows labelled per test
SHARD = 16            # six shards of 16
PREFIX = "soft-labels/v1"
PRELOAD = ["numpy", "torch", "transformers.modeling_utils", "transformers.models.bert.modeling_bert",
           "optimum.exporters.onnx", "boto3", "distill_gap.softlabels.backends", "distill_gap.softlabels.labelling"]


@pytest.fixture(scope="module")
def teacher(sharp_teacher_dir, rows):
    """JSON-able keyword arguments of ensure_soft_labels (also what the worker gets); the package's
    sharp teacher and review rows (conftest.py), six shards of 16."""
    return dict(teacher_dir=str(sharp_teacher_dir), teacher_digest=model_digest(sharp_teacher_dir),
                tokenizer_digest=tokenizer_digest(sharp_teacher_dir),
                data_digest=sha256_json(rows[["id", "text", "label"]].values.tolist()),
                ids=rows["id"].tolist(), texts=rows["text"].tolist(), labels=list(LABELS),
                max_length=64, batch_size=16, shard_size=SHARD, teacher_meta={"name": "tiny", "version": "1"})


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    """The fork server the labelling workers start from."""
    server = ForkServer(PRELOAD, env=_worker_env(), log=tmp_path_factory.mktemp("forkserver") / "log.txt")
    yield server
    server.close()


def _worker_env(**env) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            **{k: str(v) for k, v in env.items()}}


def _objects(bucket: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _start_worker(forks: ForkServer, tmp_path: Path, name: str, store_uri: str, teacher: dict, **env):
    """A labelling worker process (forked, see the module docstring); returns it and its output folder."""
    out = tmp_path / name
    out.mkdir()
    args = out / "args.json"
    args.write_text(json.dumps({**teacher, "store_uri": store_uri, "out": str(out)}))
    full_env = _worker_env(**env)
    assert full_env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:"), "the worker must talk to moto"
    proc = forks.start([str(WORKER), str(args)], entry=str(WORKER), env=full_env, cwd=REPO,
                       log=out / "log.txt")
    return proc, out


def _wait_for(path: Path, proc, out: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"worker exited {proc.returncode} before {path.name}:\n{(out / 'log.txt').read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path.name} after {timeout} s:\n{(out / 'log.txt').read_text()}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------- SIGKILL mid-write


def test_sigkill_mid_write_resumes_from_the_shards_written(s3_bucket, teacher, tmp_path, forks):
    store_uri = f"s3://{s3_bucket}/{PREFIX}"
    marker = tmp_path / "three-shards-written"
    proc, out = _start_worker(forks, tmp_path, "killed", store_uri, teacher,
                              WORKER_HANG_AFTER_SHARDS=3, WORKER_HANG_MARKER=marker)
    try:
        _wait_for(marker, proc, out)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # What the dead run left: three shards, no manifest, so the entry is incomplete.
    left = _objects(s3_bucket, PREFIX + "/")
    assert len(left) == 3 and all("/shards/part-0000" in k for k in left), left
    assert [k.rsplit("/", 1)[1] for k in left] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert json.loads(marker.read_text()) == [k[len(PREFIX) + 1:] for k in left]

    resumed = ensure_soft_labels(store_uri, progress=False, **teacher)

    assert resumed.hit is False
    assert resumed.manifest["produced_by"]["reused_shards"] == 3
    assert resumed.labelled == N - 3 * SHARD
    after = _objects(s3_bucket, PREFIX + "/")
    assert after.count(f"{PREFIX}/{resumed.key}/manifest.json") == 1
    assert len(after) == N // SHARD + 1 and left[0].startswith(f"{PREFIX}/{resumed.key}/")

    # An uninterrupted run under another prefix of the same bucket gives the same numbers.
    fresh = ensure_soft_labels(f"s3://{s3_bucket}/fresh", progress=False, **teacher)
    assert fresh.labelled == N and fresh.key == resumed.key
    np.testing.assert_allclose(resumed.logits, fresh.logits, atol=FP16_ATOL, rtol=0)
    assert resumed.ids == fresh.ids == teacher["ids"]
    # And a later run is a plain hit on the resumed entry.
    again = ensure_soft_labels(store_uri, progress=False, **{**teacher, "teacher_dir": str(tmp_path / "gone")})
    assert again.hit and np.array_equal(again.logits, resumed.logits)


# ------------------------------------------------------------------------------- two writers at once


def test_two_concurrent_runs_on_one_key_agree(s3_bucket, teacher, tmp_path, forks):
    store_uri = f"s3://{s3_bucket}/{PREFIX}"
    go = tmp_path / "go"
    # Both start labelling together (go file) and both pass the "no manifest yet" check before either
    # creates an object (write barrier): they race on every shard and on the manifest.
    workers = [_start_worker(forks, tmp_path, name, store_uri, teacher, WORKER_GO_FILE=go,
                             WORKER_READY_FILE=tmp_path / f"{name}.ready",
                             WORKER_WRITE_BARRIER=tmp_path / "barrier", WORKER_WRITE_PARTIES=2)
               for name in ("a", "b")]
    try:
        for (proc, out), name in zip(workers, ("a", "b")):
            _wait_for(tmp_path / f"{name}.ready", proc, out)
        go.write_text("go")                          # both imported: label and write at the same time
        codes = [proc.wait(timeout=120) for proc, _ in workers]
    finally:
        for proc, _ in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = "\n".join((out / "log.txt").read_text() for _, out in workers)
    assert codes == [0, 0], logs

    results = [json.loads((out / "result.json").read_text()) for _, out in workers]
    key = results[0]["key"]
    assert results[1]["key"] == key
    assert [r["hit"] for r in results] == [False, False] and [r["labelled"] for r in results] == [N, N]
    # Every object was attempted by both and created by exactly one (the loser kept the winner's shard).
    names = [f"{key}/shards/part-{i:05d}.parquet" for i in range(N // SHARD)] + [f"{key}/manifest.json"]
    for r in results:
        assert sorted(rel for rel, _ in r["put_new"]) == sorted(names), r["put_new"]
    won = {name: sum(won for r in results for rel, won in r["put_new"] if rel == name) for name in names}
    assert won == {name: 1 for name in names}
    objects = _objects(s3_bucket, PREFIX + "/")
    assert [k for k in objects if k.endswith("manifest.json")] == [f"{PREFIX}/{key}/manifest.json"]
    assert len(objects) == N // SHARD + 1
    # Both returned the manifest that won (same created_at / produced_by) and the same numbers.
    assert results[0]["created_at"] == results[1]["created_at"]
    a, b = (np.load(out / "logits.npy") for _, out in workers)
    assert a.shape == (N, len(LABELS)) and np.array_equal(a, b)
    # ... which are what the store holds.
    hit = ensure_soft_labels(store_uri, progress=False, **{**teacher, "teacher_dir": str(tmp_path / "gone")})
    assert hit.hit and np.array_equal(hit.logits, a)


# ------------------------------------------------------------------------------- bit rot on S3


def _flip_byte(bucket: str, key: str, at: int = 100) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    client.put_object(Bucket=bucket, Key=key, Body=data)


def _stored(store_uri: str, key: str, ids: list[str]) -> np.ndarray:
    """What the store holds for `key`, rows in the order of `ids`."""
    got_ids, got = SoftLabelStore(store_uri).read(key)
    row = {i: r for r, i in enumerate(got_ids)}
    return got[[row[i] for i in ids]]


def test_flipped_byte_in_a_stored_shard_is_recomputed_with_a_warning(s3_bucket, teacher, caplog):
    """A complete entry with a damaged shard: detected on read (sha256 mismatch), a warning names the
    shard, the teacher recomputes exactly that shard's rows, and shard + manifest are rewritten."""
    store_uri = f"s3://{s3_bucket}/{PREFIX}"
    first = ensure_soft_labels(store_uri, progress=False, **teacher)
    shard = f"{PREFIX}/{first.key}/shards/part-00002.parquet"
    _flip_byte(s3_bucket, shard)
    before = _objects(s3_bucket, PREFIX + "/")

    with caplog.at_level("WARNING", logger="distill.soft_labels"):
        again = ensure_soft_labels(store_uri, progress=False, **teacher)

    assert again.hit and again.repaired == ["part-00002.parquet"] and again.labelled == SHARD
    warned = [r.getMessage() for r in caplog.records if r.name == "distill.soft_labels"]
    assert len(warned) == 1 and "part-00002.parquet" in warned[0] and "sha256" in warned[0] and "recomputing" in warned[0]
    np.testing.assert_allclose(again.logits, first.logits, atol=FP16_ATOL, rtol=0)
    assert _objects(s3_bucket, PREFIX + "/") == before              # rewritten in place, nothing added
    repairs = again.manifest["repairs"]
    assert [r["shard"] for r in repairs] == ["part-00002.parquet"] and "sha256" in repairs[0]["reason"]
    # The repaired entry verifies end to end and is a clean hit from now on.
    assert np.array_equal(_stored(store_uri, first.key, teacher["ids"]), again.logits)
    clean = ensure_soft_labels(store_uri, progress=False, **teacher)
    assert clean.hit and clean.repaired == [] and clean.labelled == 0


def test_flipped_byte_without_the_teacher_is_a_clear_error(s3_bucket, teacher, tmp_path):
    """Damage that cannot be recomputed (the teacher files are gone) stops with the shard named and
    the fix; nothing is rewritten and the error is not retried."""
    store_uri = f"s3://{s3_bucket}/{PREFIX}"
    first = ensure_soft_labels(store_uri, progress=False, **teacher)
    _flip_byte(s3_bucket, f"{PREFIX}/{first.key}/shards/part-00002.parquet")
    before = _objects(s3_bucket, PREFIX + "/")
    manifest_before = SoftLabelStore(store_uri).manifest(first.key)

    with pytest.raises(DistillError, match=r"soft-label shard part-00002\.parquet in s3://") as err:
        ensure_soft_labels(store_uri, progress=False, **{**teacher, "teacher_dir": str(tmp_path / "gone")})
    assert "sha256" in str(err.value) and "teacher" in str(err.value) and f"delete {first.uri}" in str(err.value)
    assert not is_transient(err.value), "bit rot is not retried"
    assert _objects(s3_bucket, PREFIX + "/") == before
    assert SoftLabelStore(store_uri).manifest(first.key) == manifest_before


def test_flipped_byte_in_an_incomplete_entry_is_relabelled(s3_bucket, teacher):
    """Without a manifest (an interrupted run) the damaged shard is not reused: it fails its Parquet page
    checksum, is relabelled and replaced; the other shards are reused."""
    import boto3

    store_uri = f"s3://{s3_bucket}/{PREFIX}"
    first = ensure_soft_labels(store_uri, progress=False, **teacher)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.delete_object(Bucket=s3_bucket, Key=f"{PREFIX}/{first.key}/manifest.json")
    _flip_byte(s3_bucket, f"{PREFIX}/{first.key}/shards/part-00002.parquet")

    again = ensure_soft_labels(store_uri, progress=False, **teacher)

    assert again.hit is False and again.manifest["produced_by"]["reused_shards"] == N // SHARD - 1
    assert again.labelled == SHARD
    np.testing.assert_allclose(again.logits, first.logits, atol=FP16_ATOL, rtol=0)
    assert np.array_equal(_stored(store_uri, first.key, teacher["ids"]), again.logits)


# ------------------------------------------------------------------------------- endpoint down


def test_endpoint_down_is_transient_and_writes_nothing(s3_bucket, teacher, monkeypatch):
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    real = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store_uri = f"s3://{s3_bucket}/{PREFIX}"

    started = time.monotonic()
    with pytest.raises(DistillError) as err:
        ensure_soft_labels(store_uri, progress=False, **teacher)
    assert time.monotonic() - started < 30

    message = str(err.value)
    assert f"http://127.0.0.1:{port}" in message and f"s3://{s3_bucket}/{PREFIX}" in message
    assert "AWS_ENDPOINT_URL" in message
    assert is_transient(err.value), "the Prefect task must retry an endpoint that is down"

    monkeypatch.setenv("AWS_ENDPOINT_URL", real)
    assert _objects(s3_bucket, "") == []
