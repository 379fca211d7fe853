"""Soft-label shards: Parquet bytes <-> (ids, logits), full or top-k, with page checksums.

Full mode: columns `id` (string) and `logits` (fixed_size_list<float16|float32>[C]).

Top-k mode (`top_k=k`, for large label spaces): each row holds `id`, `indices`
(fixed_size_list<uint16|int32>[k], uint16 when C < 65536), `logits` (fixed_size_list<dtype>[k], the k
largest logits, largest first) and `lse_rest` (float32, log-sum-exp of the other C-k logits).
dense_from_top_k rebuilds dense (N, C) float32 logits: the stored logits at their indices and
`lse_rest - log(C-k)` everywhere else, so softmax gives the stored top-k probabilities exactly and
spreads the residual mass uniformly over the other classes (exact up to the storage dtype).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from distill_gap.errors import DistillError

DTYPES = {"float16": np.float16, "float32": np.float32}
SHARD_RE = re.compile(r"^part-\d{5,}\.parquet$")


def shard_name(i: int) -> str:
    """The object name of shard `i` (part-00000.parquet, ...): its order in the entry."""
    return f"part-{i:05d}.parquet"


def encode_shard(ids: Sequence[str], logits: np.ndarray) -> bytes:
    """(ids, (n, C) logits) -> Parquet bytes with page checksums (bit rot shows up on decode)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, c = logits.shape
    table = pa.table({"id": pa.array(list(ids), pa.string()),
                      "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), c)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def decode_shard(data: bytes, name: str) -> tuple[list[str], np.ndarray]:
    """Parquet bytes -> (ids, (n, C) logits in the stored dtype); unreadable -> DistillError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        col = table.column("logits").combine_chunks()
        if not pa.types.is_fixed_size_list(col.type) or col.null_count or table.column("id").null_count:
            raise ValueError(f"unexpected schema {table.schema}")
        logits = np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), col.type.list_size)
        return table.column("id").to_pylist(), logits
    except (pa.ArrowException, ValueError, KeyError, OSError) as err:
        raise DistillError(f"soft-label shard {name} cannot be decoded: {err}",
                           "delete the cache entry and run again to relabel") from err


def index_dtype(num_classes: int):
    """The class-index dtype of top-k shards: uint16 when it holds every class, else int32."""
    return np.uint16 if num_classes < 65536 else np.int32


def top_k_split(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, C) finite logits -> indices (n, k) of the k largest (largest first, ties by index),
    their float32 logits (n, k), and the float32 log-sum-exp of the other C-k logits (n,)."""
    x = np.asarray(logits, dtype=np.float32)
    n, c = x.shape
    idx = np.argpartition(-x, k - 1, axis=1)[:, :k]                          # (n, k), unordered
    vals = np.take_along_axis(x, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=-1)                                # value desc, then index asc
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    rest = x.astype(np.float64)                                              # (n, C)
    np.put_along_axis(rest, idx, -np.inf, axis=1)
    peak = rest.max(axis=1, keepdims=True)                                   # finite: C-k >= 1 rest logits
    lse_rest = (peak[:, 0] + np.log(np.exp(rest - peak).sum(axis=1))).astype(np.float32)
    return idx, vals, lse_rest


def encode_topk_shard(ids: Sequence[str], indices: np.ndarray, logits: np.ndarray, lse_rest: np.ndarray) -> bytes:
    """(ids, (n, k) indices, (n, k) logits, (n,) lse_rest) -> Parquet bytes with page checksums."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = logits.shape
    table = pa.table({"id": pa.array(list(ids), pa.string()),
                      "indices": pa.FixedSizeListArray.from_arrays(pa.array(indices.reshape(-1)), k),
                      "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), k),
                      "lse_rest": pa.array(np.asarray(lse_rest, np.float32))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def decode_topk_shard(data: bytes, name: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Parquet bytes -> (ids, (n, k) indices, (n, k) logits in the stored dtype, (n,) float32 lse_rest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        cols = {}
        for col_name in ("indices", "logits"):
            col = table.column(col_name).combine_chunks()
            if not pa.types.is_fixed_size_list(col.type) or col.null_count:
                raise ValueError(f"unexpected schema {table.schema}")
            cols[col_name] = np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(
                len(col), col.type.list_size)
        lse = table.column("lse_rest")
        if lse.null_count or table.column("id").null_count or cols["indices"].shape != cols["logits"].shape:
            raise ValueError(f"unexpected schema {table.schema}")
        lse_rest = np.asarray(lse.to_numpy(), dtype=np.float32)
        return table.column("id").to_pylist(), cols["indices"], cols["logits"], lse_rest
    except (pa.ArrowException, ValueError, KeyError, OSError) as err:
        raise DistillError(f"soft-label shard {name} cannot be decoded: {err}",
                           "delete the cache entry and run again to relabel") from err


def dense_from_top_k(indices: np.ndarray, logits: np.ndarray, lse_rest: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) float32 logits whose softmax gives the stored top-k probabilities exactly and spreads the
    residual mass exp(lse_rest) uniformly: stored logits at `indices`, lse_rest - log(C-k) elsewhere."""
    n, k = logits.shape
    fill = (lse_rest.astype(np.float64) - np.log(num_classes - k)).astype(np.float32)       # (N,)
    dense = np.repeat(fill[:, None], num_classes, axis=1)                                      # (N, C)
    np.put_along_axis(dense, indices.astype(np.int64), logits.astype(np.float32), axis=1)
    return dense
