"""Top-k soft-label storage: exact top-k probabilities and residual mass, key identity, size on disk."""

from __future__ import annotations

import numpy as np
import pytest

from distill_gap.errors import DistillError
from tasks.soft_labels import SoftLabelStore, _encode_shard, cache_key, ensure_soft_labels
# Module fixtures of the full-mode tests (the sharp tiny teacher and its review rows), reused here.
from tests.tasks.test_soft_labels import rows, sharp_teacher_dir, teacher  # noqa: F401

META = {"teacher": {"name": "t"}}


def _key_args(c=200, **change):
    return {**dict(teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, max_length=128,
                   labels=[f"class-{i}" for i in range(c)]), **change}


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


# ------------------------------------------------------------------------------------ round trip


@pytest.fixture(params=["file", "s3"])
def store_uri(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return f"s3://{request.getfixturevalue('s3_bucket')}/soft-labels/topk"


# fp16 logits of |x| < 16 are within 2**-8 of the original: probabilities within about 2 * 2**-8 relative.
@pytest.mark.parametrize("dtype,rtol", [("float16", 2 * 2**-8), ("float32", 1e-5)])
def test_top_k_probabilities_and_residual_mass_are_reconstructed(store_uri, dtype, rtol):
    store = SoftLabelStore(store_uri)
    ids, logits = _entry()
    k = 8
    key = cache_key(**_key_args(top_k=k))

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


def test_top_k_shard_schema(tmp_path):
    import pyarrow.parquet as pq

    ids, logits = _entry(n=10, c=50)
    key = cache_key(**_key_args(c=50, top_k=4))
    SoftLabelStore(tmp_path).write(key, ids, logits, meta=META, top_k=4)
    table = pq.read_table(tmp_path / key / "shards" / "part-00000.parquet")
    assert table.column_names == ["id", "indices", "logits", "lse_rest"]
    assert str(table.schema.field("indices").type) == "fixed_size_list<element: uint16>[4]"
    assert str(table.schema.field("logits").type) == "fixed_size_list<element: halffloat>[4]"
    assert str(table.schema.field("lse_rest").type) == "float"
    # Largest first, and lse_rest really is the log-sum-exp of the other logits.
    idx = np.stack(table.column("indices").to_pylist())
    assert np.array_equal(idx, np.argsort(-logits, axis=1, kind="stable")[:, :4])
    rest = logits.astype(np.float64).copy()
    np.put_along_axis(rest, idx.astype(np.int64), -np.inf, 1)
    expect = np.log(np.exp(rest).sum(1))
    np.testing.assert_allclose(table.column("lse_rest").to_numpy(), expect, rtol=1e-6)


def test_wide_label_space_uses_int32_indices(tmp_path):
    ids, logits = _entry(n=3, c=70_000)
    key = cache_key(**_key_args(c=70_000, top_k=5))
    manifest = SoftLabelStore(tmp_path).write(key, ids, logits, dtype="float32", meta=META, top_k=5)
    assert manifest["columns"]["indices"] == "fixed_size_list<int32>[5]"
    got = SoftLabelStore(tmp_path).read(key)[1]
    idx, top, rest = _top_k_and_rest(logits, 5)
    assert np.array_equal(np.take_along_axis(got, idx, 1), np.take_along_axis(logits, idx, 1))
    np.testing.assert_allclose(np.take_along_axis(_softmax(got), idx, 1), top, rtol=1e-5)


def test_corrupted_top_k_shard_is_detected(tmp_path):
    store = SoftLabelStore(tmp_path)
    ids, logits = _entry()
    key = cache_key(**_key_args(top_k=3))
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
    key = cache_key(**_key_args(c=7))
    manifest = store.write(key, ids, logits, shard_size=8, meta=META, top_k=None)
    assert "top_k" not in manifest
    assert manifest["columns"] == {"id": "string", "logits": "fixed_size_list<float16>[7]"}
    for i, start in enumerate(range(0, 20, 8)):
        shard = (tmp_path / key / "shards" / f"part-{i:05d}.parquet").read_bytes()
        assert shard == _encode_shard(ids[start:start + 8], logits[start:start + 8].astype(np.float16))
    np.testing.assert_allclose(store.read(key)[1], logits, atol=5e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------- key


def test_key_includes_top_k_only_when_set():
    full = cache_key(**_key_args())
    assert cache_key(**_key_args(), top_k=None) == full
    top16 = cache_key(**_key_args(top_k=16))
    assert top16 != full and top16 != cache_key(**_key_args(top_k=17))
    assert cache_key(**_key_args(top_k=np.int64(16))) == top16


def test_full_key_is_the_pre_top_k_key():
    """The key without top_k is the same sha256 of the same five inputs as before."""
    from distill_gap.digest import sha256_json

    args = _key_args(c=3)
    assert cache_key(**args) == sha256_json(args)
    assert cache_key(**args, top_k=2) == sha256_json({**args, "top_k": 2})


@pytest.mark.parametrize("bad", [0, -1, 200, 201, True, 2.5, "4"])
def test_invalid_top_k_is_refused(tmp_path, bad):
    ids, logits = _entry(n=4)
    with pytest.raises(DistillError, match="top_k"):
        cache_key(**_key_args(top_k=bad))
    with pytest.raises(DistillError, match="top_k"):
        SoftLabelStore(tmp_path).write(cache_key(**_key_args()), ids, logits, meta=META, top_k=bad)
    assert list(tmp_path.iterdir()) == []


def test_key_inputs_must_agree_with_top_k(tmp_path):
    ids, logits = _entry(n=4)
    inputs = _key_args(top_k=4)
    with pytest.raises(ValueError, match="top_k"):
        SoftLabelStore(tmp_path).write(cache_key(**inputs), ids, logits, meta={"key_inputs": inputs}, top_k=5)


# ------------------------------------------------------------------------------------------ size


def test_top_k_entry_is_a_small_fraction_of_the_full_one(tmp_path):
    n, c, k = 2_000, 32_000, 16
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, c), dtype=np.float32) * 3                 # (N, C), 256 MB
    ids = [f"ex-{i}" for i in range(n)]
    store = SoftLabelStore(tmp_path)
    full_key, top_key = cache_key(**_key_args(c=c)), cache_key(**_key_args(c=c, top_k=k))

    store.write(full_key, ids, logits, dtype="float16", shard_size=256, meta=META)
    store.write(top_key, ids, logits, dtype="float16", shard_size=256, meta=META, top_k=k)

    full, top = _shard_bytes(tmp_path, full_key), _shard_bytes(tmp_path, top_key)
    ratio = top / full
    print(f"\ntop-{k} / full fp16 shard bytes: {top} / {full} = {ratio:.5f}")
    assert full > n * c                    # fp16 noise hardly compresses: ~2 bytes a logit
    assert ratio <= 0.10


# ----------------------------------------------------------------------------- ensure_soft_labels


def test_ensure_soft_labels_top_k_miss_hit_and_resume(tmp_path, teacher):
    full = ensure_soft_labels(tmp_path, **teacher)
    first = ensure_soft_labels(tmp_path, **teacher, top_k=2)
    assert first.hit is False and first.key != full.key and first.manifest["top_k"] == 2
    assert first.manifest["key_inputs"]["top_k"] == 2 and "top_k" not in full.manifest["key_inputs"]
    assert first.logits.shape == full.logits.shape
    # Top-2 of 3 classes: the probabilities of the two largest logits and of the third are all exact.
    np.testing.assert_allclose(_softmax(first.logits), _softmax(full.logits), rtol=3e-3, atol=0)

    second = ensure_soft_labels(tmp_path, **{**teacher, "teacher_dir": tmp_path / "gone"}, top_k=2)
    assert second.hit and np.array_equal(second.logits, first.logits) and second.manifest == first.manifest
    # A full request still gets the full entry, not the top-k one.
    again_full = ensure_soft_labels(tmp_path, **{**teacher, "teacher_dir": tmp_path / "gone"})
    assert again_full.hit and again_full.key == full.key and np.array_equal(again_full.logits, full.logits)

    # Resume: the manifest and one shard are gone; the other top-k shards are reused, not relabelled.
    (tmp_path / first.key / "manifest.json").unlink()
    (tmp_path / first.key / "shards" / "part-00001.parquet").unlink()
    resumed = ensure_soft_labels(tmp_path, **teacher, top_k=2)
    assert resumed.labelled == 32 and resumed.manifest["produced_by"]["reused_shards"] == 2
    np.testing.assert_allclose(resumed.logits, first.logits, atol=4e-3)


def test_ensure_soft_labels_refuses_bad_top_k(tmp_path, teacher):
    with pytest.raises(DistillError, match="top_k"):
        ensure_soft_labels(tmp_path, **teacher, top_k=3)              # 3 labels: k must be < 3
    assert list(tmp_path.iterdir()) == []
