"""SoftLabelStore on file:// and s3:// (moto on loopback): round trips, create-only manifests, damage detected,
top-k entries (exact top-k probabilities and residual mass), size on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_gap.errors import DistillError
from distill_gap.softlabels.cache_key import cache_key
from distill_gap.softlabels.shards import encode_shard
from distill_gap.softlabels.store import SoftLabelStore
from tests.distill_gap.softlabels.keys import key_args, key as make_key

META = {"teacher": {"name": "t"}}


def _entry_files(tmp_path):
    return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())


def _random_entry(n=100, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return [f"ex-{i}" for i in range(n)], rng.normal(size=(n, c)).astype(np.float32) * 4


def _entry(n=50, c=200, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return [f"ex-{i}" for i in range(n)], (rng.normal(size=(n, c)) * scale).astype(np.float32)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top_k_and_rest(logits, k):
    """Per row: the original probabilities of the k largest logits (and their indices), and the mass of the rest."""
    p = _softmax(logits)
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(p, idx, 1)
    return idx, top, 1.0 - top.sum(1)


def _shard_bytes(root, key):
    return sum(p.stat().st_size for p in (root / key / "shards").glob("*.parquet"))


# ------------------------------------------------------------------------------ full round trip


@pytest.mark.parametrize("dtype,atol", [("float16", 5e-3), ("float32", 0.0)])
def test_write_then_read_round_trip(store_uri, dtype, atol):
    store = SoftLabelStore(store_uri)
    ids, logits = _random_entry()
    key = make_key()
    assert store.manifest(key) is None and store.list_keys() == []

    manifest = store.write(key, ids, logits, dtype=dtype, shard_size=30, meta=META)

    assert store.manifest(key) == manifest
    assert [s["rows"] for s in manifest["shards"]] == [30, 30, 30, 10]
    assert [s["name"] for s in manifest["shards"]][0] == "part-00000.parquet"
    assert manifest["num_examples"] == 100 and manifest["num_classes"] == 3 and manifest["dtype"] == dtype
    assert manifest["teacher"] == {"name": "t"} and manifest["created_at"].endswith("+00:00")
    got_ids, got = store.read(key)
    assert got_ids == ids and got.dtype == np.float32
    np.testing.assert_allclose(got, logits, atol=atol, rtol=1e-3 if atol else 0)
    assert store.list_keys() == [key]


def test_file_store_layout_and_parquet_schema(tmp_path):
    import pyarrow.parquet as pq

    store = SoftLabelStore(str(tmp_path))          # a plain path works too
    ids, logits = _random_entry(n=10)
    store.write(make_key(), ids, logits, shard_size=8, meta=META)
    assert _entry_files(tmp_path) == [f"{make_key()}/manifest.json", f"{make_key()}/shards/part-00000.parquet",
                                      f"{make_key()}/shards/part-00001.parquet"]
    table = pq.read_table(tmp_path / make_key() / "shards" / "part-00000.parquet")
    assert str(table.schema.field("id").type) == "string"
    assert str(table.schema.field("logits").type) == "fixed_size_list<element: halffloat>[3]"
    assert store.uri == f"file://{tmp_path}"


def test_manifest_is_create_only(store_uri):
    """A second write under the same key changes nothing: the first complete entry stands."""
    store = SoftLabelStore(store_uri)
    ids, first = _random_entry(seed=1)
    _, second = _random_entry(seed=2)
    key = make_key()
    m1 = store.write(key, ids, first, shard_size=40, meta=META)

    m2 = store.write(key, ids, second, shard_size=40, meta={"teacher": {"name": "other"}})

    assert m2 == m1 and store.manifest(key) == m1
    np.testing.assert_allclose(store.read(key)[1], first, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_corrupted_shard_is_detected(store_uri, damage):
    store = SoftLabelStore(store_uri)
    ids, logits = _random_entry()
    key = make_key()
    store.write(key, ids, logits, shard_size=40, meta=META)
    rel = f"{key}/shards/part-00001.parquet"
    data = store._backend.get(rel)
    if damage == "flip":
        data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    elif damage == "truncate":
        data = data[:-20]
    if damage == "missing":
        if store_uri.startswith("file://"):
            (store._backend.root / rel).unlink()
        else:
            store._backend.client.delete_object(Bucket=store._backend.bucket, Key=store._backend._key(rel))
    else:
        store._backend.put(rel, data)

    with pytest.raises(DistillError, match="part-00001.parquet") as err:
        store.read(key)
    assert "delete" in str(err.value)


def test_manifest_json_is_readable_by_other_tools(tmp_path):
    store = SoftLabelStore(tmp_path)
    ids, logits = _random_entry(n=5)
    store.write(make_key(), ids, logits, meta={"key_inputs": dict(
        teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, max_length=128,
        labels=["negative", "neutral", "positive"]), "teacher": {"name": "t"}})
    manifest = json.loads((tmp_path / make_key() / "manifest.json").read_text())
    assert cache_key(**manifest["key_inputs"]) == manifest["key"] == make_key()
    assert set(manifest) >= {"key", "key_inputs", "teacher", "dtype", "num_examples", "num_classes", "shards",
                             "created_at", "format_version"}
    with pytest.raises(ValueError, match="does not hash to the key"):
        store.write(make_key(max_length=7), ids, logits, meta={"key_inputs": manifest["key_inputs"]})


def test_fp16_overflow_is_refused(tmp_path):
    ids, logits = _random_entry(n=4)
    logits[0, 0] = 1e6
    with pytest.raises(DistillError, match="float32"):
        SoftLabelStore(tmp_path).write(make_key(), ids, logits, meta=META)
    assert SoftLabelStore(tmp_path).write(make_key(), ids, logits, dtype="float32", meta=META)["dtype"] == "float32"


# ------------------------------------------------------------------------------------ top-k entries


# fp16 logits of |x| < 16 are within 2**-8 of the original: probabilities within about 2 * 2**-8 relative.
@pytest.mark.parametrize("dtype,rtol", [("float16", 2 * 2**-8), ("float32", 1e-5)])
def test_top_k_probabilities_and_residual_mass_are_reconstructed(store_uri, dtype, rtol):
    store = SoftLabelStore(store_uri)
    ids, logits = _entry()
    k = 8
    key = cache_key(**key_args(top_k=k))

    manifest = store.write(key, ids, logits, dtype=dtype, shard_size=16, meta=META, top_k=k)

    assert manifest["top_k"] == k and store.manifest(key) == manifest
    assert manifest["num_classes"] == 200 and manifest["num_examples"] == 50 and manifest["dtype"] == dtype
    assert manifest["columns"] == {"id": "string", "indices": "fixed_size_list<uint16>[8]",
                                   "logits": f"fixed_size_list<{dtype}>[8]", "lse_rest": "float32"}
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 16, 2]
    got_ids, got = store.read(key)
    assert got_ids == ids and got.shape == logits.shape and got.dtype == np.float32

    assert np.abs(logits).max() < 16
    idx, top, rest = _top_k_and_rest(logits, k)
    p = _softmax(got)
    np.testing.assert_allclose(np.take_along_axis(p, idx, 1), top, rtol=rtol, atol=0)
    np.testing.assert_allclose(1.0 - np.take_along_axis(p, idx, 1).sum(1), rest, rtol=rtol, atol=0)
    # Exactly (to float32) the distribution of the stored top-k logits plus the exact residual mass.
    x = logits.astype(np.float64)
    v = np.take_along_axis(logits, idx, 1).astype(dtype).astype(np.float64)          # as stored
    rest_sum = np.exp(x).sum(1) - np.exp(np.take_along_axis(x, idx, 1)).sum(1)
    norm = np.exp(v).sum(1) + rest_sum
    np.testing.assert_allclose(np.take_along_axis(p, idx, 1), np.exp(v) / norm[:, None], rtol=1e-5, atol=0)
    np.testing.assert_allclose(1.0 - np.take_along_axis(p, idx, 1).sum(1), rest_sum / norm, rtol=1e-5, atol=0)
    # The stored logits sit at their classes; the residual mass is spread evenly over the others.
    np.testing.assert_allclose(np.take_along_axis(got, idx, 1), np.take_along_axis(logits, idx, 1),
                               atol=5e-3 if dtype == "float16" else 0, rtol=1e-3 if dtype == "float16" else 0)
    others = np.ones_like(got, dtype=bool)
    np.put_along_axis(others, idx, False, 1)
    rest_logits = got[others].reshape(len(ids), -1)
    assert (rest_logits == rest_logits[:, :1]).all()
    assert (rest_logits[:, 0] <= np.take_along_axis(got, idx, 1).min(1)).all()


def test_wide_label_space_uses_int32_indices(tmp_path):
    ids, logits = _entry(n=3, c=70_000)
    key = cache_key(**key_args(c=70_000, top_k=5))
    manifest = SoftLabelStore(tmp_path).write(key, ids, logits, dtype="float32", meta=META, top_k=5)
    assert manifest["columns"]["indices"] == "fixed_size_list<int32>[5]"
    got = SoftLabelStore(tmp_path).read(key)[1]
    idx, top, rest = _top_k_and_rest(logits, 5)
    assert np.array_equal(np.take_along_axis(got, idx, 1), np.take_along_axis(logits, idx, 1))
    np.testing.assert_allclose(np.take_along_axis(_softmax(got), idx, 1), top, rtol=1e-5)


def test_corrupted_top_k_shard_is_detected(tmp_path):
    store = SoftLabelStore(tmp_path)
    ids, logits = _entry()
    key = cache_key(**key_args(top_k=3))
    store.write(key, ids, logits, shard_size=20, meta=META, top_k=3)
    path = tmp_path / key / "shards" / "part-00001.parquet"
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(DistillError, match="part-00001.parquet"):
        store.read(key)


# ------------------------------------------------------------------------------- full mode intact


def test_full_mode_is_unchanged(tmp_path):
    """top_k=None writes exactly what the store wrote before top-k existed: no top_k, same shard bytes."""
    store = SoftLabelStore(tmp_path)
    ids, logits = _entry(n=20, c=7)
    key = cache_key(**key_args(c=7))
    manifest = store.write(key, ids, logits, shard_size=8, meta=META, top_k=None)
    assert "top_k" not in manifest
    assert manifest["columns"] == {"id": "string", "logits": "fixed_size_list<float16>[7]"}
    for i, start in enumerate(range(0, 20, 8)):
        shard = (tmp_path / key / "shards" / f"part-{i:05d}.parquet").read_bytes()
        assert shard == encode_shard(ids[start:start + 8], logits[start:start + 8].astype(np.float16))
    np.testing.assert_allclose(store.read(key)[1], logits, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("bad", [0, -1, 200, 201, True, 2.5, "4"])
def test_invalid_top_k_is_refused_before_anything_is_written(tmp_path, bad):
    ids, logits = _entry(n=4)
    with pytest.raises(DistillError, match="top_k"):
        SoftLabelStore(tmp_path).write(cache_key(**key_args()), ids, logits, meta=META, top_k=bad)
    assert list(tmp_path.iterdir()) == []


def test_key_inputs_must_agree_with_top_k(tmp_path):
    ids, logits = _entry(n=4)
    inputs = key_args(top_k=4)
    with pytest.raises(ValueError, match="top_k"):
        SoftLabelStore(tmp_path).write(cache_key(**inputs), ids, logits, meta={"key_inputs": inputs}, top_k=5)


# ------------------------------------------------------------------------------------------ size


def test_top_k_entry_is_a_small_fraction_of_the_full_one(tmp_path):
    n, c, k = 400, 32_000, 16  # the ratio is per row: 400 rows of a 32k vocabulary show it as 2,000 did (11 s)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, c), dtype=np.float32) * 3                 # (N, C), 51 MB
    ids = [f"ex-{i}" for i in range(n)]
    store = SoftLabelStore(tmp_path)
    full_key, top_key = cache_key(**key_args(c=c)), cache_key(**key_args(c=c, top_k=k))

    store.write(full_key, ids, logits, dtype="float16", shard_size=128, meta=META)
    store.write(top_key, ids, logits, dtype="float16", shard_size=128, meta=META, top_k=k)

    full, top = _shard_bytes(tmp_path, full_key), _shard_bytes(tmp_path, top_key)
    ratio = top / full
    print(f"\ntop-{k} / full fp16 shard bytes: {top} / {full} = {ratio:.5f}")
    assert full > n * c                    # fp16 noise hardly compresses: ~2 bytes a logit
    assert ratio <= 0.10
