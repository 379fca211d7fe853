"""The soft-labels stage as Prefect runs it: mapped shard tasks on the local and the Dask task
runner, retries on an unreachable S3 endpoint, and the cache key against real file changes.

A real Prefect API (prefect_test_harness), a real moto S3 server on 127.0.0.1, a tiny real teacher.
"""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest

import tasks.soft_labels as sl
from distill_gap.data.splits import split_digest
from distill_gap.digest import model_digest, tokenizer_digest
from distill_gap.errors import DistillError
from tests.conftest import LABELS
from tests.helpers import sharpened_teacher

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


def _task_runs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))


def _shard_runs(flow_run_id) -> list[str]:
    return sorted(t.name for t in _task_runs(flow_run_id) if t.name.startswith("label-shard-") and t.state.is_completed())


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
    local = sl.ensure_soft_labels(f"file://{tmp_path}/local", progress=False, **args)
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
    lookup = [t for t in _task_runs(run_id) if t.name.startswith("soft-labels-lookup")]
    assert len(lookup) == 1 and lookup[0].run_count == 3 and lookup[0].state.is_failed()
    assert not [t for t in _task_runs(run_id) if t.name.startswith("label-shard")]
    monkeypatch.undo()
    import boto3

    assert boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_bad_data_is_not_retried(prefect_api, args, tmp_path, monkeypatch):
    """A teacher that is not the pinned one is a user error: one attempt, the clear message."""
    state, run_id = _run_stage(store_uri=f"file://{tmp_path}/store", **{**args, "teacher_digest": "f" * 64})
    with pytest.raises(DistillError, match="pinned teacher"):
        state.result()
    lookup = [t for t in _task_runs(run_id) if t.name.startswith("soft-labels-lookup")]
    assert lookup[0].run_count == 1
    assert not list((tmp_path / "store").rglob("manifest.json"))


# --------------------------------------------------------------------------- key, from real files


def _plan_key(**change) -> str:
    base = dict(teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, ids=["a", "b"],
                texts=["x", "y"], labels=list(LABELS), max_length=64)
    return sl.plan_soft_labels("file:///tmp/unused-store", **{**base, **change}).key


def test_key_changes_with_one_teacher_weight(teacher_dir, tmp_path, args):
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "teacher"
    shutil.copytree(teacher_dir, changed)
    weights = load_file(changed / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert tokenizer_digest(changed) == args["tokenizer_digest"]
    assert _plan_key(teacher_digest=model_digest(changed)) != _plan_key(teacher_digest=args["teacher_digest"])


def test_key_changes_with_the_tokenizer(teacher_dir, tmp_path, args):
    changed = tmp_path / "teacher"
    shutil.copytree(teacher_dir, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["do_lower_case"] = not config.get("do_lower_case", True)
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_digest(changed) != args["tokenizer_digest"]
    assert _plan_key(tokenizer_digest=tokenizer_digest(changed)) != _plan_key(tokenizer_digest=args["tokenizer_digest"])


def test_key_changes_with_max_length():
    assert _plan_key(max_length=64) != _plan_key(max_length=65)


def test_key_changes_with_the_label_order():
    assert _plan_key(labels=list(LABELS)) != _plan_key(labels=list(reversed(LABELS)))


def test_key_changes_with_one_training_row(rows):
    edited = rows.copy()
    edited.iloc[7, edited.columns.get_loc("text")] += " (edited)"
    assert _plan_key(data_digest=split_digest(edited)) != _plan_key(data_digest=split_digest(rows))
    # ... and does not change with the row order alone.
    assert split_digest(rows.iloc[::-1]) == split_digest(rows)


def test_rows_are_stored_in_id_order_whatever_the_callers_order(args, tmp_path):
    """The entry depends on the set of rows only: a shuffled request hits and gets its own order back."""
    store = f"file://{tmp_path}/store"
    first = sl.ensure_soft_labels(store, progress=False, **args)
    order = np.random.default_rng(0).permutation(N)
    shuffled = {**args, "ids": [args["ids"][i] for i in order], "texts": [args["texts"][i] for i in order]}
    again = sl.ensure_soft_labels(store, progress=False, **shuffled)
    assert again.hit and again.ids == shuffled["ids"]
    assert np.array_equal(again.logits, first.logits[order])
    stored_ids, _ = sl.SoftLabelStore(store).read(first.key)
    assert stored_ids == sorted(args["ids"])
