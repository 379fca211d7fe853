"""The soft-labels stage as Prefect runs it: mapped shard tasks on the local and the Dask task
runner, retries on an unreachable S3 endpoint, no retry of bad data.

A real Prefect API (prefect_test_harness), a real moto S3 server on 127.0.0.1, a tiny real teacher.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

import tasks.soft_labels as sl
from distill_gap.data.splits import split_digest
from distill_gap.digest import model_digest, tokenizer_digest
from distill_gap.errors import DistillError
from distill_gap.softlabels.labelling import ensure_soft_labels
from tests.conftest import LABELS
from tests.helpers import sharpened_teacher, task_runs

N, SHARD = 96, 32              # three shards


@pytest.fixture(scope="module")
def rows(review_frame):
    return review_frame.head(N)


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, rows, tmp_path_factory):
    return sharpened_teacher(tiny_model_dir, rows["text"].tolist(), tmp_path_factory.mktemp("stage-teacher"))


@pytest.fixture(scope="module")
def args(teacher_dir, rows):
    return dict(teacher_dir=teacher_dir, teacher_digest=model_digest(teacher_dir),
                tokenizer_digest=tokenizer_digest(teacher_dir), data_digest=split_digest(rows),
                ids=rows["id"].tolist(), texts=rows["text"].tolist(), labels=list(LABELS), max_length=64,
                batch_size=16, shard_size=SHARD, engine="torch", threads=2)


def _run_stage(**kwargs):
    """soft_labels_stage inside a flow; returns (final state, flow run id)."""
    from prefect import flow

    @flow(name="soft-labels-stage-test")
    def stage_flow():
        return sl.soft_labels_stage(**kwargs)

    state = stage_flow(return_state=True)
    return state, state.state_details.flow_run_id


def _shard_runs(flow_run_id) -> list[str]:
    return sorted(t.name for t in task_runs(flow_run_id) if t.name.startswith("label-shard-") and t.state.is_completed())


def test_miss_maps_one_task_per_shard_then_hits(prefect_api, args, tmp_path):
    store = f"file://{tmp_path}/store"
    state, run_id = _run_stage(store_uri=store, **args)
    first = state.result()
    assert first.hit is False and first.labelled == N and first.ids == args["ids"]
    assert _shard_runs(run_id) == ["label-shard-0", "label-shard-1", "label-shard-2"]
    assert first.manifest["produced_by"]["task_runner"] == "local"
    assert first.manifest["row_order"] == "sorted-ids"
    shard_ids = [json.loads(json.dumps(s)) for s in first.manifest["shards"]]
    assert [s["rows"] for s in shard_ids] == [32, 32, 32]

    state, run_id = _run_stage(store_uri=store, **args)
    hit = state.result()
    assert hit.hit and hit.labelled == 0 and np.array_equal(hit.logits, first.logits)
    assert _shard_runs(run_id) == [], "a hit runs no shard task"


def test_dask_task_runner_labels_the_same(prefect_api, args, tmp_path):
    """Shards mapped onto a Dask LocalCluster of two worker processes: the same entry as labelling locally,
    byte for byte (same key, same shard names, rows and sha256, identical logits)."""
    local = ensure_soft_labels(f"file://{tmp_path}/local", progress=False, **args)
    state, run_id = _run_stage(store_uri=f"file://{tmp_path}/dask", task_runner="dask", dask_workers=2, **args)
    on_dask = state.result()
    assert on_dask.key == local.key and on_dask.labelled == N
    assert on_dask.manifest["produced_by"]["task_runner"] == "dask"
    assert on_dask.manifest["shards"] == local.manifest["shards"]
    np.testing.assert_array_equal(on_dask.logits, local.logits)
    assert _shard_runs(run_id) == ["label-shard-0", "label-shard-1", "label-shard-2"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_store_is_retried_then_one_clear_error(prefect_api, args, s3_bucket, monkeypatch):
    """The lookup task retries connection errors (with backoff), then fails once, naming endpoint and
    bucket; nothing reaches the store."""
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")          # botocore's own retries off: count Prefect's
    monkeypatch.setattr(sl, "soft_labels_lookup_task",
                        sl.soft_labels_lookup_task.with_options(retry_delay_seconds=[0.2, 0.4]))
    state, run_id = _run_stage(store_uri=f"s3://{s3_bucket}/labels", **args)

    assert state.is_failed()
    with pytest.raises(DistillError) as err:
        state.result()
    assert f"cannot reach http://127.0.0.1:{port}" in str(err.value) and f"s3://{s3_bucket}/labels" in str(err.value)
    lookup = [t for t in task_runs(run_id) if t.name.startswith("soft-labels-lookup")]
    assert len(lookup) == 1 and lookup[0].run_count == 3 and lookup[0].state.is_failed()
    assert not [t for t in task_runs(run_id) if t.name.startswith("label-shard")]
    monkeypatch.undo()
    import boto3

    assert boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_store_tasks_retry_transient_errors_only():
    for task in (sl.soft_labels_lookup_task, sl.label_shard_task, sl.finish_soft_labels_task):
        assert task.retries == len(sl.RETRY_DELAYS) and task.retry_delay_seconds == sl.RETRY_DELAYS
        assert task.retry_condition_fn.__name__ == "retry_if_transient_as('soft-label store error')"


def test_bad_data_is_not_retried(prefect_api, args, tmp_path, monkeypatch):
    """A teacher that is not the pinned one is a user error: one attempt, the clear message."""
    state, run_id = _run_stage(store_uri=f"file://{tmp_path}/store", **{**args, "teacher_digest": "f" * 64})
    with pytest.raises(DistillError, match="pinned teacher"):
        state.result()
    lookup = [t for t in task_runs(run_id) if t.name.startswith("soft-labels-lookup")]
    assert lookup[0].run_count == 1
    assert not list((tmp_path / "store").rglob("manifest.json"))
