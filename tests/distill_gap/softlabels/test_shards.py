"""Soft-label shards: Parquet bytes round trip, the top-k split and its dense reconstruction, damage detected."""

from __future__ import annotations

import numpy as np
import pytest

from distill_gap.errors import DistillError
from distill_gap.softlabels.cache_key import cache_key
from distill_gap.softlabels.shards import (decode_shard, decode_topk_shard, dense_from_top_k, encode_shard,
                                           encode_topk_shard, index_dtype, shard_name, top_k_split)
from distill_gap.softlabels.store import SoftLabelStore

META = {"teacher": {"name": "t"}}


def _entry(n=10, c=50, seed=0):
    rng = np.random.default_rng(seed)
    return [f"ex-{i}" for i in range(n)], (rng.normal(size=(n, c)) * 3).astype(np.float32)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_shard_names_sort_in_shard_order():
    names = [shard_name(i) for i in (0, 1, 9, 10, 99_999)]
    assert names[0] == "part-00000.parquet" and names == sorted(names)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_full_shard_round_trip_keeps_ids_and_dtype(dtype):
    ids, logits = _entry()
    got_ids, got = decode_shard(encode_shard(ids, logits.astype(dtype)), "part-00000.parquet")
    assert got_ids == ids and got.dtype == dtype and np.array_equal(got, logits.astype(dtype))


def test_top_k_split_is_largest_first_and_rest_is_the_log_sum_exp():
    _, logits = _entry(n=6, c=20)
    logits[0, 3] = logits[0, 4] = 9.0                        # a tie: the lower class index comes first
    idx, vals, lse_rest = top_k_split(logits, 4)
    assert idx.shape == vals.shape == (6, 4) and lse_rest.shape == (6,)
    assert list(idx[0, :2]) == [3, 4]
    assert (np.diff(vals, axis=1) <= 0).all()
    assert np.array_equal(vals, np.take_along_axis(logits, idx, 1))
    rest = logits.astype(np.float64).copy()
    np.put_along_axis(rest, idx, -np.inf, 1)
    np.testing.assert_allclose(lse_rest, np.log(np.exp(rest).sum(1)), rtol=1e-6)


def test_dense_reconstruction_keeps_top_k_probabilities_and_spreads_the_rest():
    _, logits = _entry(n=5, c=30)
    idx, vals, lse_rest = top_k_split(logits, 3)
    ids = [f"ex-{i}" for i in range(5)]
    got_ids, g_idx, g_vals, g_lse = decode_topk_shard(encode_topk_shard(ids, idx.astype(index_dtype(30)), vals,
                                                                        lse_rest), "part-00000.parquet")
    assert got_ids == ids and g_idx.dtype == np.uint16
    dense = dense_from_top_k(g_idx, g_vals, g_lse, 30)
    p, q = _softmax(logits), _softmax(dense)
    np.testing.assert_allclose(np.take_along_axis(q, idx, 1), np.take_along_axis(p, idx, 1), rtol=1e-5)
    others = np.ones_like(q, dtype=bool)
    np.put_along_axis(others, idx, False, 1)
    rest = q[others].reshape(5, -1)
    np.testing.assert_allclose(rest, rest[:, :1].repeat(27, 1), rtol=1e-6)


def test_index_dtype_widens_for_wide_label_spaces():
    assert index_dtype(65_535) == np.uint16 and index_dtype(65_536) == np.int32


@pytest.mark.parametrize("decode", [decode_shard, decode_topk_shard])
def test_damaged_bytes_are_a_clear_error_naming_the_shard(decode):
    ids, logits = _entry()
    data = encode_shard(ids, logits) if decode is decode_shard else encode_topk_shard(ids, *top_k_split(logits, 2))
    with pytest.raises(DistillError, match="part-00007.parquet cannot be decoded") as err:
        decode(data[:-20], "part-00007.parquet")
    assert "relabel" in str(err.value)


def test_top_k_shard_schema(tmp_path):
    import pyarrow.parquet as pq

    ids, logits = _entry(n=10, c=50)
    key = cache_key(teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, max_length=128,
                    labels=[f"class-{i}" for i in range(50)], top_k=4)
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
