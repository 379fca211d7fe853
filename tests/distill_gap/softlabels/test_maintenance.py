"""Soft-label cache administration on real stores (file:// and moto S3) and a real MLflow registry."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from distill_gap.softlabels.maintenance import gc_entries, list_entries, referenced_keys, show_entry, verify_entry
from distill_gap.errors import DistillError
from distill_gap.softlabels.store import MANIFEST, SoftLabelStore


def _key(i: int) -> str:
    return f"{i:08x}" + "ab" * 28


def _write(uri: str, key: str, created_at: str, *, n: int = 10, shard_size: int = 4) -> dict:
    """A real entry, then its manifest's created_at rewritten so the order is deterministic."""
    store = SoftLabelStore(uri)
    rng = np.random.default_rng(0)
    manifest = store.write(key, [f"id{i}" for i in range(n)], rng.normal(size=(n, 3)).astype(np.float32),
                           dtype="float16", shard_size=shard_size, meta={"teacher": {"name": "tiny", "version": "1"}})
    manifest["created_at"] = created_at
    store._backend.put(f"{key}/{MANIFEST}", json.dumps(manifest).encode())
    return manifest


def _fill(uri: str, k: int) -> list[str]:
    """k entries, key i created on 2026-01-(i+1): oldest first."""
    keys = [_key(i) for i in range(k)]
    for i, key in enumerate(keys):
        _write(uri, key, f"2026-01-{i + 1:02d}T00:00:00+00:00")
    return keys


@pytest.fixture()
def file_store(tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    return uri, _fill(uri, 3)


def _registry(tmp_path, refs: dict[str, str]):
    """A real MLflow registry on SQLite with one version per (model name -> soft_labels.key)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db", registry_uri=f"sqlite:///{tmp_path}/m.db")
    for name, key in refs.items():
        client.create_registered_model(name)
        client.create_model_version(name, source=str(tmp_path), tags={"soft_labels.key": key})
    return client


# --------------------------------------------------------------------------------------------
# list / show


def test_list_newest_first_with_sizes(file_store, tmp_path):
    uri, keys = file_store
    SoftLabelStore(uri)._backend.put(f"{_key(99)}/shards/part-00000.parquet", b"x")   # incomplete: not listed
    rows = list_entries(uri)
    assert [r["key"] for r in rows] == keys[::-1]
    r = rows[0]
    assert (r["num_examples"], r["num_classes"], r["dtype"], r["shards"]) == (10, 3, "float16", 3)
    assert r["created_at"] == "2026-01-03T00:00:00+00:00"
    assert r["teacher"] == {"name": "tiny", "version": "1"}
    assert r["bytes"] == sum(p.stat().st_size for p in (tmp_path / "store" / keys[2] / "shards").iterdir())


def test_list_empty_store(tmp_path):
    assert list_entries(f"file://{tmp_path / 'nothing'}") == []


def test_show_full_key_and_prefix(file_store):
    uri, keys = file_store
    assert show_entry(uri, keys[1])["key"] == keys[1]
    assert show_entry(uri, keys[1][:8])["key"] == keys[1]
    assert show_entry(uri, keys[1][:8].upper())["shards"][0]["name"] == "part-00000.parquet"


def test_show_unknown_short_and_ambiguous_keys(file_store):
    uri, keys = file_store
    with pytest.raises(DistillError, match="no complete soft-label entry") as err:
        show_entry(uri, "f" * 64)
    assert "distill cache ls" in err.value.fix
    with pytest.raises(DistillError, match="no complete soft-label entry"):
        show_entry(uri, "ffffffff")
    with pytest.raises(DistillError, match="at least 8 hex"):
        show_entry(uri, keys[0][:7])
    other = keys[0][:8] + "cd" * 28
    _write(uri, other, "2026-02-01T00:00:00+00:00", n=2)
    with pytest.raises(DistillError, match="ambiguous") as err:
        show_entry(uri, keys[0][:8])
    assert keys[0] in str(err.value) and other in str(err.value)
    assert show_entry(uri, keys[0][:10])["key"] == keys[0]


# --------------------------------------------------------------------------------------------
# verify


def test_verify_clean_entry(file_store):
    uri, keys = file_store
    report = verify_entry(uri, keys[0])
    assert report["ok"] and report["key"] == keys[0]
    assert [s["name"] for s in report["shards"]] == [f"part-0000{i}.parquet" for i in range(3)]
    assert all(s["ok"] and s["problem"] is None for s in report["shards"])


def test_verify_flags_a_flipped_byte_and_a_missing_shard(file_store, tmp_path):
    uri, keys = file_store
    shards = tmp_path / "store" / keys[0] / "shards"
    data = bytearray((shards / "part-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0x01
    (shards / "part-00001.parquet").write_bytes(bytes(data))
    (shards / "part-00002.parquet").unlink()
    report = verify_entry(uri, keys[0][:8])
    assert report["ok"] is False
    by_name = {s["name"]: s for s in report["shards"]}
    assert by_name["part-00000.parquet"]["ok"]
    assert not by_name["part-00001.parquet"]["ok"] and "sha256" in by_name["part-00001.parquet"]["problem"]
    assert not by_name["part-00002.parquet"]["ok"] and by_name["part-00002.parquet"]["problem"] == "missing"
    assert verify_entry(uri, keys[1])["ok"]                 # the others are untouched


def test_verify_on_s3(s3_bucket):
    uri = f"s3://{s3_bucket}/labels"
    keys = _fill(uri, 1)
    assert verify_entry(uri, keys[0])["ok"]
    backend = SoftLabelStore(uri)._backend
    rel = f"{keys[0]}/shards/part-00000.parquet"
    data = bytearray(backend.get(rel))
    data[-20] ^= 0xFF
    backend.put(rel, bytes(data))
    report = verify_entry(uri, keys[0])
    assert not report["ok"] and [s["name"] for s in report["shards"] if not s["ok"]] == ["part-00000.parquet"]


# --------------------------------------------------------------------------------------------
# registry references and gc


def test_referenced_keys_from_a_real_registry(tmp_path):
    client = _registry(tmp_path, {"student": _key(1), "edge": _key(1), "other": _key(2)})
    client.create_registered_model("untagged")
    client.create_model_version("untagged", source=str(tmp_path))
    refs = referenced_keys(client, page_size=1)              # every page is followed
    assert refs == {_key(1): ["edge/1", "student/1"], _key(2): ["other/1"]}


def _age(root, key, seconds):
    """Backdate every file of an entry on a file:// store."""
    t = time.time() - seconds
    for dirpath, _, files in os.walk(root / key):
        for f in files:
            os.utime(os.path.join(dirpath, f), (t, t))


def test_gc_keeps_newest_and_referenced_on_file(tmp_path):
    root = tmp_path / "store"
    uri = f"file://{root}"
    keys = _fill(uri, 5)                                    # keys[4] newest
    backend = SoftLabelStore(uri)._backend
    old_incomplete, young_incomplete = _key(50), _key(51)
    backend.put(f"{old_incomplete}/shards/part-00000.parquet", b"stale")
    backend.put(f"{young_incomplete}/shards/part-00000.parquet", b"in progress")
    _age(root, old_incomplete, 2 * 3600)
    client = _registry(tmp_path, {"student": keys[0]})      # the oldest is referenced
    refs = referenced_keys(client)

    before = sorted(p.as_posix() for p in root.rglob("*"))
    plan = gc_entries(uri, keep=2, referenced=refs, dry_run=True)
    assert sorted(p.as_posix() for p in root.rglob("*")) == before      # dry run deletes nothing
    assert plan["dry_run"] is True

    result = gc_entries(uri, keep=2, referenced=refs)
    assert result["kept"] == [keys[4], keys[3]]
    assert result["kept_referenced"] == [keys[0]]
    assert sorted(result["deleted"]) == sorted([keys[1], keys[2], old_incomplete])
    assert sorted(plan["deleted"]) == sorted(result["deleted"])
    assert [r["key"] for r in list_entries(uri)] == [keys[4], keys[3], keys[0]]
    for key in (keys[1], keys[2], old_incomplete):
        assert not (root / key).exists()
    assert (root / young_incomplete / "shards" / "part-00000.parquet").exists()
    assert verify_entry(uri, keys[0])["ok"]
    # Idempotent: nothing more to delete.
    assert gc_entries(uri, keep=2, referenced=refs)["deleted"] == []


def test_gc_keep_zero_never_deletes_referenced(file_store):
    uri, keys = file_store
    result = gc_entries(uri, keep=0, referenced={keys[1]: ["student/3"]})
    assert result["kept_referenced"] == [keys[1]] and result["kept"] == []
    assert [r["key"] for r in list_entries(uri)] == [keys[1]]


def test_gc_rejects_negative_keep(file_store):
    with pytest.raises(DistillError, match="keep"):
        gc_entries(file_store[0], keep=-1, referenced={})


def test_gc_on_s3(s3_bucket):
    import boto3

    uri = f"s3://{s3_bucket}/labels"
    keys = _fill(uri, 4)
    s3 = boto3.client("s3")

    def objects():
        return sorted(o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
                      for o in page.get("Contents", []))

    before = objects()
    plan = gc_entries(uri, keep=1, referenced={keys[1]: ["student/1"]}, dry_run=True)
    assert objects() == before
    result = gc_entries(uri, keep=1, referenced={keys[1]: ["student/1"]})
    assert sorted(result["deleted"]) == sorted(plan["deleted"]) == sorted([keys[0], keys[2]])
    assert result["kept"] == [keys[3]] and result["kept_referenced"] == [keys[1]]
    left = objects()
    assert not [k for k in left if keys[0] in k or keys[2] in k]
    assert len([k for k in left if keys[1] in k]) == 4     # manifest + 3 shards
    assert [r["key"] for r in list_entries(uri)] == [keys[3], keys[1]]


def test_gc_deletes_the_manifest_first(file_store, monkeypatch):
    import distill_gap.softlabels.maintenance as admin

    uri, keys = file_store
    order = []
    real = admin.delete
    monkeypatch.setattr(admin, "delete", lambda backend, rel: (order.append(rel), real(backend, rel)))
    gc_entries(uri, keep=2, referenced={})
    assert order[0] == f"{keys[0]}/{MANIFEST}" and len(order) == 4
