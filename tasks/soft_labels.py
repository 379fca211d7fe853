"""Teacher soft labels: raw logits for every training example, cached in a content-addressed store.

Layout under `<store>/<key>/` (DESIGN.md, "Identities and keys"):

    shards/part-00000.parquet   columns `id` (string) and `logits` (fixed_size_list<float16|float32>[C]),
    shards/part-00001.parquet   rows sorted by id (manifest `row_order: sorted-ids`), `shard_size` rows each
    manifest.json               key inputs, teacher identity, dtype, shard list with sha256 and row counts

The manifest is written last and create-only (O_EXCL-style hard link on file://, `If-None-Match: *`
on s3://): an entry without a manifest is incomplete, and its shards that still decode to the
planned ids are reused when labelling resumes. A complete entry's shard that fails its sha256 (or
is missing) is never trusted: a warning names it, the teacher recomputes its rows (known from the
sorted order) and the shard and manifest are rewritten with a `repairs` record. Raw logits are
stored; temperature is applied at training time, so it is not part of the key.

Labelling runs per shard: `plan_soft_labels` -> `label_shard` for each missing shard ->
`finish_soft_labels` (the manifest). `ensure_soft_labels` runs them in this process;
`soft_labels_stage` runs them as Prefect tasks, the shards mapped over a local or Dask task runner.

Top-k mode (`top_k=k`, for large label spaces): each shard row holds `id`, `indices`
(fixed_size_list<uint16|int32>[k], uint16 when C < 65536), `logits` (fixed_size_list<dtype>[k], the k
largest logits, largest first) and `lse_rest` (float32, log-sum-exp of the other C-k logits). The
manifest records `"top_k": k` (absent in full mode) and those columns, and k is part of the cache
key (only when set, so full-mode keys are unchanged): a top-k entry never serves a full request.
`read` rebuilds dense (N, C) float32 logits: the stored logits at their indices and
`lse_rest - log(C-k)` everywhere else, so softmax gives the stored top-k probabilities exactly and
spreads the residual mass uniformly over the other classes (exact up to the storage dtype).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distill_gap.digest import model_digest, sha256_bytes, sha256_json
from distill_gap.digest import tokenizer_digest as compute_tokenizer_digest
from distill_gap.errors import DistillError
from distill_gap.ops.failpoints import failpoint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_SHARD_RE = re.compile(r"^part-\d{5,}\.parquet$")
# Fields the store itself writes into a manifest; `meta` passed to write() may not set them.
_RESERVED = {"format_version", "key", "dtype", "num_examples", "num_classes", "columns", "shards", "created_at",
             "top_k"}


def cache_key(*, teacher_digest: str, tokenizer_digest: str, data_digest: str, max_length: int,
              labels: Sequence[str], top_k: int | None = None) -> str:
    """sha256 over the canonical JSON of everything that changes the stored logits.

    `top_k` (top-k storage mode) enters the hashed inputs only when it is not None, so full-logit
    keys are the same as before top-k existed, and a top-k entry never answers a full request.
    """
    return sha256_json(cache_key_inputs(teacher_digest=teacher_digest, tokenizer_digest=tokenizer_digest,
                                        data_digest=data_digest, max_length=max_length, labels=labels, top_k=top_k))


def cache_key_inputs(*, teacher_digest: str, tokenizer_digest: str, data_digest: str, max_length: int,
                     labels: Sequence[str], top_k: int | None = None) -> dict:
    """The checked inputs cache_key hashes (also recorded in the manifest as `key_inputs`)."""
    for name, value in (("teacher_digest", teacher_digest), ("tokenizer_digest", tokenizer_digest),
                        ("data_digest", data_digest)):
        if not isinstance(value, str) or not value:
            raise DistillError(f"soft-label cache key needs a non-empty {name}, got {value!r}",
                               "compute it with distill_gap.digest (model_digest / tokenizer_digest / dataset digest)")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise DistillError(f"max_length must be a positive integer, got {max_length!r}", "set data.max_length, e.g. 128")
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels) or not all(isinstance(l, str) for l in labels):
        raise DistillError(f"labels must be a non-empty list of distinct names, got {labels!r}",
                           "set data.labels to the class names in the teacher's output order")
    inputs = {"teacher_digest": teacher_digest, "tokenizer_digest": tokenizer_digest,
              "data_digest": data_digest, "max_length": max_length, "labels": labels}
    if top_k is not None:
        inputs["top_k"] = _check_top_k(top_k, len(labels))
    return inputs


def _check_top_k(top_k, num_classes: int) -> int:
    """A valid top_k for `num_classes` classes (1 <= k < C), else DistillError."""
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 1 <= int(top_k) < num_classes:
        raise DistillError(f"soft_labels.top_k must be an integer with 1 <= top_k < {num_classes} (the number of "
                           f"classes), got {top_k!r}",
                           "set soft_labels.top_k to a small k (e.g. 16), or leave it unset to store full logits")
    return int(top_k)


@dataclass
class SoftLabels:
    """Teacher logits for a list of example ids, and where they are stored."""

    key: str
    uri: str                 # "<store>/<key>"
    ids: list[str]
    logits: np.ndarray       # (N, C) float32, row i belongs to ids[i]
    hit: bool                # True: read from the cache, the teacher was not run
    manifest: dict
    labelled: int = 0        # examples the teacher labelled in this call (0 on a clean hit)
    seconds: float = 0.0     # wall time of this call's teacher pass
    repaired: list[str] = field(default_factory=list)   # shards of a hit that failed verification and were recomputed


# --------------------------------------------------------------------------------------------
# Storage backends: bytes in, bytes out, paths relative to the store root.


class _Backend(Protocol):
    uri: str

    def get(self, rel: str) -> bytes | None: ...
    def put(self, rel: str, data: bytes) -> None: ...
    def put_new(self, rel: str, data: bytes) -> bool: ...   # False when the object already exists
    def list(self, under: str = "") -> list[str]: ...       # every object below `under`, recursively


class _FileBackend:
    """A folder; every write goes through a temp file in the same folder (atomic)."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"file://{root.as_posix()}"

    def get(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def _temp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        os.replace(self._temp(path, data), path)

    def put_new(self, rel: str, data: bytes) -> bool:
        path = self.root / rel
        tmp = self._temp(path, data)
        try:
            os.link(tmp, path)          # atomic and fails if `path` exists
            return True
        except FileExistsError:
            return False
        except OSError:
            # No hard links on this file system: O_EXCL still makes creation exclusive.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, under: str = "") -> list[str]:
        base = self.root / under
        if not base.is_dir():
            return []
        return [p.relative_to(self.root).as_posix() for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".")]


# ClientError codes worth a retry (throttling, server trouble, conditional write in flight).
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "ConditionalRequestConflict", "500", "502", "503", "504"}


class _S3Backend:
    """A bucket prefix; credentials, region and endpoint come from the standard AWS env/config."""

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # A fresh session resolves credentials now (the default session caches them).
            self._client = boto3.session.Session().client(
                "s3", config=Config(connect_timeout=10, read_timeout=120))
        return self._client

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn errors a user can fix into DistillError; the cause is kept so retries can see it."""
        from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, NoCredentialsError,
                                         PartialCredentialsError)

        where = f"{self.uri} ({action})"
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as err:
            raise DistillError(f"no usable AWS credentials for {where}: {err}",
                               "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); for MinIO "
                               "also AWS_ENDPOINT_URL") from err
        except (ConnectionError, HTTPClientError) as err:
            endpoint = self._client.meta.endpoint_url if self._client else "the S3 endpoint"
            raise DistillError(f"cannot reach {endpoint} for {where}: {err}",
                               "check AWS_ENDPOINT_URL and that the S3/MinIO server is up "
                               "(docker compose -f infra/docker-compose.yml up -d minio)") from err
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise DistillError(f"bucket {self.bucket!r} does not exist at {self.client.meta.endpoint_url}",
                                   f"create it (aws s3 mb s3://{self.bucket}) or point soft_labels.store at "
                                   "an existing bucket") from err
            if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}:
                raise DistillError(f"access denied to {where} ({code})",
                                   "check the AWS credentials and that they may read, write and list "
                                   f"s3://{self.bucket}") from err
            raise

    def get(self, rel: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors(f"get {rel}"):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as err:
                # get (not head): NoSuchKey and NoSuchBucket stay distinguishable.
                if err.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return None
                raise
            return obj["Body"].read()

    def put(self, rel: str, data: bytes) -> None:
        with self._errors(f"put {rel}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def put_new(self, rel: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(f"create {rel}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, IfNoneMatch="*")
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    return False
                raise

    def list(self, under: str = "") -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        if under:
            under = under.rstrip("/") + "/"
        names: list[str] = []
        with self._errors("list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start + under):
                names += [obj["Key"][len(start):] for obj in page.get("Contents", [])]
        return names


def _backend(uri: str) -> _Backend:
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise DistillError(f"soft-label store {uri!r} names no bucket", "use s3://bucket/prefix")
        return _S3Backend(bucket, prefix.strip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://"):]          # file://rel/path -> rel/path, file:///abs -> /abs
    elif "://" in uri:
        raise DistillError(f"soft-label store {uri!r} has an unsupported scheme",
                           "use file://path (or a plain path) or s3://bucket/prefix")
    if not uri:
        raise DistillError("soft-label store path is empty", "use file://.distill/soft-labels or s3://bucket/prefix")
    return _FileBackend(Path(uri).expanduser().resolve())


# --------------------------------------------------------------------------------------------
# Shards: Parquet bytes <-> (ids, logits).


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _encode_shard(ids: Sequence[str], logits: np.ndarray) -> bytes:
    """(ids, (n, C) logits) -> Parquet bytes with page checksums (bit rot shows up on decode)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, c = logits.shape
    table = pa.table({"id": pa.array(list(ids), pa.string()),
                      "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), c)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def _decode_shard(data: bytes, name: str) -> tuple[list[str], np.ndarray]:
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


def _index_dtype(num_classes: int):
    return np.uint16 if num_classes < 65536 else np.int32


def _top_k_split(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _encode_topk_shard(ids: Sequence[str], indices: np.ndarray, logits: np.ndarray, lse_rest: np.ndarray) -> bytes:
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


def _decode_topk_shard(data: bytes, name: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
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


def _dense_from_top_k(indices: np.ndarray, logits: np.ndarray, lse_rest: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) float32 logits whose softmax gives the stored top-k probabilities exactly and spreads the
    residual mass exp(lse_rest) uniformly: stored logits at `indices`, lse_rest - log(C-k) elsewhere."""
    n, k = logits.shape
    fill = (lse_rest.astype(np.float64) - np.log(num_classes - k)).astype(np.float32)       # (N,)
    dense = np.repeat(fill[:, None], num_classes, axis=1)                                      # (N, C)
    np.put_along_axis(dense, indices.astype(np.int64), logits.astype(np.float32), axis=1)
    return dense


# --------------------------------------------------------------------------------------------


class SoftLabelStore:
    """Content-addressed soft-label cache on file:// (or a plain path) or s3://bucket/prefix."""

    def __init__(self, uri: str):
        self._backend = _backend(str(uri))
        self.uri = self._backend.uri

    def entry_uri(self, key: str) -> str:
        return f"{self.uri}/{_check_key(key)}"

    def manifest(self, key: str) -> dict | None:
        """The entry's manifest, or None when the entry is missing or incomplete."""
        data = self._backend.get(f"{_check_key(key)}/{MANIFEST}")
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except ValueError as err:
            raise DistillError(f"{self.entry_uri(key)}/{MANIFEST} is not valid JSON: {err}",
                               f"delete {self.entry_uri(key)} and run again to relabel") from err
        if manifest.get("key") != key or manifest.get("format_version") != FORMAT_VERSION:
            raise DistillError(f"{self.entry_uri(key)}/{MANIFEST} belongs to key {manifest.get('key')!r} "
                               f"(format {manifest.get('format_version')!r})",
                               f"delete {self.entry_uri(key)} and run again to relabel")
        return manifest

    def read(self, key: str) -> tuple[list[str], np.ndarray]:
        """All (ids, (N, C) float32 logits) of a complete entry, each shard checked against its sha256.

        A damaged or missing shard raises a DistillError naming it (ensure_soft_labels recomputes
        such shards instead: see read_checked). A top-k entry (manifest `top_k` = k) comes back dense:
        each row holds the stored k logits at their class indices and `lse_rest - log(C-k)` at the
        other C-k classes, so softmax(row) equals the stored top-k probabilities exactly and the other
        classes share the residual mass exp(lse_rest) / sum(exp(all logits)) uniformly (exact up to
        the storage dtype).
        """
        ids, logits, bad = self.read_checked(key)
        if bad:
            raise DistillError(bad[0]["problem"], f"delete {self.entry_uri(key)} and run again to relabel")
        return ids, logits

    def read_checked(self, key: str, manifest: dict | None = None) -> tuple[list[str | None], np.ndarray, list[dict]]:
        """(ids, (N, C) float32 logits, bad shards) of a complete entry; damage is reported, not raised.

        Each bad shard is {"index", "name", "start", "rows", "problem"}: missing, sha256 mismatch,
        undecodable or the wrong shape. Its rows hold None ids and NaN logits. A manifest that is
        itself broken (invalid JSON, foreign key, bad shard names) still raises DistillError.
        """
        manifest = manifest or self.manifest(key)
        if manifest is None:
            raise DistillError(f"no complete soft-label entry at {self.entry_uri(key)}",
                               "run the soft_labels step to create it")
        fix = f"delete {self.entry_uri(key)} and run again to relabel"
        all_ids: list[str | None] = []
        parts: list[np.ndarray] = []
        bad: list[dict] = []
        num_classes, top_k = manifest["num_classes"], manifest.get("top_k")
        for index, shard in enumerate(manifest["shards"]):
            name = shard["name"]
            if not _SHARD_RE.match(name):
                raise DistillError(f"{self.entry_uri(key)}/{MANIFEST} lists an invalid shard name {name!r}", fix)
            try:
                ids, logits = self._read_shard(key, shard, num_classes, top_k)
            except DistillError as err:
                bad.append({"index": index, "name": name, "start": len(all_ids), "rows": shard["rows"],
                            "problem": err.problem})
                ids, logits = [None] * shard["rows"], np.full((shard["rows"], num_classes), np.nan, np.float32)
            all_ids += ids
            parts.append(logits)
        logits = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, num_classes), np.float32)
        if len(all_ids) != manifest["num_examples"]:  # an edited or damaged manifest: never trust its rows
            raise DistillError(f"{self.entry_uri(key)}/{MANIFEST} is inconsistent: its shards hold {len(all_ids)} rows "
                               f"but it says num_examples {manifest['num_examples']}", fix)
        return all_ids, logits, bad

    def _read_shard(self, key: str, shard: dict, num_classes: int, top_k: int | None) -> tuple[list[str], np.ndarray]:
        name, where = shard["name"], self.entry_uri(key)
        data = self._backend.get(f"{key}/shards/{name}")
        if data is None:
            raise DistillError(f"soft-label shard {name} listed in {where}/{MANIFEST} is missing", "relabel it")
        if sha256_bytes(data) != shard["sha256"]:
            raise DistillError(f"soft-label shard {name} in {where} does not match the sha256 in its manifest "
                               "(corrupted or overwritten)", "relabel it")
        if top_k is not None:
            ids, indices, values, lse_rest = _decode_topk_shard(data, name)
            if len(ids) != shard["rows"] or values.shape[1] != top_k:
                raise DistillError(f"soft-label shard {name} holds {values.shape} top-k logits, manifest says "
                                   f"{shard['rows']} rows x top_k {top_k}", "relabel it")
            if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= num_classes):
                raise DistillError(f"soft-label shard {name} holds class indices outside [0, {num_classes})",
                                   "relabel it")
            return ids, _dense_from_top_k(indices, values, lse_rest, num_classes)
        ids, logits = _decode_shard(data, name)
        if len(ids) != shard["rows"] or logits.shape[1] != num_classes:
            raise DistillError(f"soft-label shard {name} holds {logits.shape} logits, manifest says "
                               f"{shard['rows']} rows x {num_classes} classes", "relabel it")
        return ids, logits.astype(np.float32)

    def present_shards(self, key: str) -> set[str]:
        """Names of the shard objects an entry (complete or not) holds now."""
        return {rel.rsplit("/", 1)[1] for rel in self._backend.list(f"{_check_key(key)}/shards")}

    def _valid_shard(self, rel: str, ids: Sequence[str], num_classes: int, dtype: str,
                     top_k: int | None = None) -> tuple[bytes, np.ndarray] | None:
        data = self._backend.get(rel)
        if data is None:
            return None
        if top_k is not None:
            try:
                got_ids, indices, values, lse_rest = _decode_topk_shard(data, rel)
            except DistillError:
                return None
            if (got_ids != list(ids) or values.shape[1] != top_k or values.dtype != DTYPES[dtype]
                    or indices.dtype != _index_dtype(num_classes)
                    or (indices.size and int(indices.max()) >= num_classes)):
                return None
            return data, _dense_from_top_k(indices, values, lse_rest, num_classes)
        try:
            got_ids, logits = _decode_shard(data, rel)
        except DistillError:
            return None
        if got_ids != list(ids) or logits.shape[1] != num_classes or logits.dtype != DTYPES[dtype]:
            return None
        return data, logits

    def _encode(self, ids: Sequence[str], logits: np.ndarray, dtype: str, top_k: int | None) -> bytes:
        """Shard bytes for (ids, (n, C) logits) in `dtype`, full or top-k; non-finite values refused."""
        _check_finite(logits, dtype, top_k)
        if top_k is None:
            return _encode_shard(ids, logits.astype(DTYPES[dtype]))
        idx, vals, lse_rest = _top_k_split(logits, top_k)
        with np.errstate(over="ignore"):
            vals = vals.astype(DTYPES[dtype])
        if not np.isfinite(vals).all() or not np.isfinite(lse_rest).all():
            raise DistillError(f"top-k teacher logits are not finite in {dtype} (max |logit| {np.abs(logits).max():.3g})",
                               "store float32 soft labels (soft_labels.dtype: float32) or check the teacher")
        return _encode_topk_shard(ids, idx.astype(_index_dtype(logits.shape[1])), vals, lse_rest)

    def write_shard(self, key: str, index: int, ids: Sequence[str], logits: np.ndarray, *, dtype: str = "float16",
                    top_k: int | None = None) -> dict | None:
        """Create shard `index` of an incomplete entry: {"name", "sha256", "rows"}, or None when another
        writer completed the entry meanwhile (its shards are then never touched).

        Create-only: when the object exists and holds exactly these ids (an interrupted or concurrent
        writer of the same plan), that shard is kept and described instead; when it holds other rows
        (a leftover of another shard plan) and the entry is still incomplete, it is replaced.
        """
        logits = np.asarray(logits)
        data = self._encode(ids, logits, dtype, top_k)
        name = _shard_name(index)
        rel = f"{_check_key(key)}/shards/{name}"
        if not self._backend.put_new(rel, data):
            kept = self._valid_shard(rel, ids, logits.shape[1], dtype, top_k=top_k)
            if kept is not None:
                data = kept[0]
            elif self.manifest(key) is not None:
                return None
            else:
                self._backend.put(rel, data)
        return {"name": name, "sha256": sha256_bytes(data), "rows": len(ids)}

    def write_manifest(self, key: str, shards: list[dict], *, num_classes: int, dtype: str = "float16",
                       top_k: int | None = None, meta: dict) -> dict:
        """The manifest, last and create-only; if another writer finished first, theirs wins and is returned."""
        manifest = {
            "format_version": FORMAT_VERSION, "key": key, **meta, "dtype": dtype,
            "num_examples": sum(s["rows"] for s in shards), "num_classes": num_classes,
            "columns": {"id": "string", "logits": f"fixed_size_list<{dtype}>[{num_classes}]"},
            "shards": shards, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if top_k is not None:
            index_type = np.dtype(_index_dtype(num_classes)).name
            manifest["top_k"] = top_k
            manifest["columns"] = {"id": "string", "indices": f"fixed_size_list<{index_type}>[{top_k}]",
                                   "logits": f"fixed_size_list<{dtype}>[{top_k}]", "lse_rest": "float32"}
        body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        if not self._backend.put_new(f"{_check_key(key)}/{MANIFEST}", body):
            theirs = self.manifest(key)
            assert theirs is not None, "manifest create failed but no manifest exists"
            return theirs
        return json.loads(body)                        # exactly what a later manifest() returns

    def repair_shard(self, key: str, index: int, ids: Sequence[str], logits: np.ndarray, *, reason: str) -> dict:
        """Replace damaged shard `index` of a complete entry with recomputed logits and update its manifest.

        The shard is rewritten first, then the manifest (with the new sha256 and a `repairs` record).
        Two repairers at once may leave a manifest whose sha256 belongs to the other's shard: the next
        read finds the mismatch and repairs again, so damaged bytes are never trusted.
        """
        manifest = self.manifest(key)
        if manifest is None:
            raise DistillError(f"no complete soft-label entry at {self.entry_uri(key)}", "run the soft_labels step")
        shard = manifest["shards"][index]
        if len(ids) != shard["rows"]:
            raise ValueError(f"shard {shard['name']} has {shard['rows']} rows, got {len(ids)} ids")
        data = self._encode(ids, np.asarray(logits), manifest["dtype"], manifest.get("top_k"))
        self._backend.put(f"{key}/shards/{shard['name']}", data)
        shard["sha256"] = sha256_bytes(data)
        manifest.setdefault("repairs", []).append(
            {"shard": shard["name"], "reason": reason,
             "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self._backend.put(f"{key}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
        return manifest

    def write(self, key: str, ids: Sequence[str], logits: np.ndarray, *, dtype: str = "float16",
              shard_size: int = 256, meta: dict, top_k: int | None = None) -> dict:
        """Write shards, then the manifest (last, create-only); return the manifest that won.

        `meta` adds fields to the manifest (key_inputs, teacher, ...). When the entry is already
        complete nothing is written and its manifest is returned; a shard that already holds the
        planned ids (an interrupted earlier write) is kept, never overwritten.

        `top_k=k` (1 <= k < C) stores per row only the k largest logits (in `dtype`), their class
        indices (uint16 when C < 65536, else int32) and `lse_rest`, the float32 log-sum-exp of the
        other C-k logits; the manifest records `top_k`. The key should come from
        cache_key(..., top_k=k). None (the default) stores full logits, exactly as before.
        """
        # 1. Check the arguments: these are programming errors, not user errors.
        _check_key(key)
        ids = [str(i) for i in ids]
        logits = np.asarray(logits)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if logits.ndim != 2 or logits.shape[0] != len(ids) or logits.shape[1] < 1:
            raise ValueError(f"logits must be (len(ids)={len(ids)}, C), got {logits.shape}")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if _RESERVED & set(meta):
            raise ValueError(f"meta may not set {sorted(_RESERVED & set(meta))}")
        if "key_inputs" in meta and cache_key(**meta["key_inputs"]) != key:
            raise ValueError("meta['key_inputs'] does not hash to the key")
        if "key_inputs" in meta and meta["key_inputs"].get("top_k") != top_k:
            raise ValueError(f"meta['key_inputs'] has top_k {meta['key_inputs'].get('top_k')!r}, write got {top_k!r}")
        if top_k is not None:
            top_k = _check_top_k(top_k, logits.shape[1])
        _check_finite(logits, dtype, top_k)            # before anything is written

        # 2. A complete entry is never touched.
        existing = self.manifest(key)
        if existing is not None:
            return existing

        # 3. Shards, create-only; then 4. the manifest.
        shards = []
        for i, start in enumerate(range(0, len(ids), shard_size)):
            info = self.write_shard(key, i, ids[start:start + shard_size], logits[start:start + shard_size],
                                    dtype=dtype, top_k=top_k)
            if info is None:
                return self.manifest(key)
            shards.append(info)
        return self.write_manifest(key, shards, num_classes=logits.shape[1], dtype=dtype, top_k=top_k, meta=meta)

    def list_keys(self) -> list[str]:
        """Keys of the complete entries (those with a manifest), sorted."""
        keys = []
        for rel in self._backend.list():
            key, _, rest = rel.partition("/")
            if rest == MANIFEST and _KEY_RE.match(key):
                keys.append(key)
        return sorted(keys)


def _check_finite(logits: np.ndarray, dtype: str, top_k: int | None) -> None:
    """Refuse logits that are not finite, or (full mode) not finite once cast to the storage dtype."""
    if top_k is not None:
        if not np.isfinite(logits).all():
            raise DistillError("teacher logits are not finite", "check the teacher")
        return
    with np.errstate(over="ignore"):
        finite = np.isfinite(logits.astype(DTYPES[dtype])).all()
    if not finite:
        raise DistillError(f"teacher logits are not finite in {dtype} (max |logit| {np.abs(logits).max():.3g})",
                           "store float32 soft labels (soft_labels.dtype: float32) or check the teacher")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"not a soft-label cache key (64 hex digits): {key!r}")
    return key


# --------------------------------------------------------------------------------------------
# The teacher pass: torch, or the same teacher exported to ONNX and run by ONNX Runtime.

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_CACHE = Path(".distill/onnx")
_ONNX_PARITY_ATOL = 1e-3        # max |ORT - torch| logit difference accepted on the check texts
_PREDICTORS: dict[tuple, object] = {}   # one loaded teacher per process (and per Dask worker)


def resolve_engine(engine: str, device: str) -> str:
    """auto -> torch on CUDA, onnxruntime on CPU (~1.1x torch eager for MiniLM on 2 cores, after its export)."""
    if engine not in ENGINES:
        raise DistillError(f"soft_labels.engine {engine!r} is not one of {list(ENGINES)}",
                           "set soft_labels.engine to auto, torch or onnxruntime")
    if engine == "auto":
        return "torch" if str(device).startswith("cuda") else "onnxruntime"
    return engine


def onnx_teacher(teacher_dir, digest: str, cache_root: str | Path | None = None) -> Path:
    """The teacher exported to ONNX by optimum, cached under `<cache_root>/<teacher digest>/model.onnx`.

    The export is written to a temporary folder and renamed into place; a `model.onnx.sha256` sidecar
    written with it must match before a cached export is used.
    """
    import shutil

    from distill_gap.digest import sha256_file

    out = Path(cache_root or ONNX_CACHE) / digest
    model, sidecar = out / "model.onnx", out / "model.onnx.sha256"
    if model.is_file() and sidecar.is_file() and sidecar.read_text().strip() == sha256_file(model):
        return out
    from optimum.exporters.onnx import main_export

    tmp = out.with_name(f".{digest}.{uuid.uuid4().hex[:8]}.partial")
    try:
        main_export(str(teacher_dir), tmp, task="text-classification", do_validation=False, local_files_only=True)
        if not (tmp / "model.onnx").is_file():
            raise DistillError(f"optimum wrote no model.onnx for the teacher in {teacher_dir}",
                               "set soft_labels.engine: torch")
        (tmp / "model.onnx.sha256").write_text(sha256_file(tmp / "model.onnx"))
        shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not model.is_file():     # another process renamed its export into place first: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _OrtTeacher:
    """ONNX Runtime session over an exported teacher; same batching as distill_gap.inference.batching.predict_logits."""

    def __init__(self, onnx_dir: Path, tokenizer, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(onnx_dir / "model.onnx"), options, providers=providers)
        self.tokenizer = tokenizer
        self.names = [i.name for i in self.session.get_inputs()]
        self.num_labels = self.session.get_outputs()[0].shape[-1]

    def __call__(self, texts: Sequence[str], *, batch_size: int, max_length: int, desc: str | None) -> np.ndarray:
        from tqdm.auto import tqdm

        from distill_gap.inference.batching import length_sorted_batches, pad_batch
        from distill_gap.ops.runtime import progress_disabled

        out = np.zeros((len(texts), self.num_labels), dtype=np.float32)     # (N, C)
        if not len(texts):
            return out
        enc = self.tokenizer([str(t) for t in texts], truncation=True, max_length=max_length)
        pad_id = self.tokenizer.pad_token_id or 0
        batches = length_sorted_batches([len(x) for x in enc["input_ids"]], batch_size)
        for idx in tqdm(batches, desc=desc, unit="batch", disable=desc is None or progress_disabled()):
            out[idx] = self.session.run(None, pad_batch(enc, idx, pad_id, self.names))[0]  # (B, C)
        return out


def _predictor(teacher_dir, *, engine: str, device: str, threads: int | None = None):
    """A callable texts -> (N, C) logits for the teacher, loaded once per process and engine.

    The ONNX engine is checked against torch on a few texts the first time (max |diff| <= 1e-3);
    with engine auto an export or parity failure falls back to torch with a warning.
    """
    import torch

    from distill_gap.digest import model_digest
    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier

    requested = engine
    engine = resolve_engine(engine, device)
    cache_key_ = (str(Path(teacher_dir).resolve()), requested, device, threads)
    if cache_key_ in _PREDICTORS:
        return _PREDICTORS[cache_key_]
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_classifier(teacher_dir)

    def torch_predict(texts, *, batch_size, max_length, desc=None):
        return predict_logits(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, device=device,
                              desc=desc)

    predict = torch_predict
    if engine == "onnxruntime":
        try:
            ort_predict = _OrtTeacher(onnx_teacher(teacher_dir, model_digest(teacher_dir)), tokenizer, threads)
            probe = ["an onnx parity probe", "the teacher must agree with itself " * 8, "short"]
            diff = float(np.abs(ort_predict(probe, batch_size=3, max_length=64, desc=None)
                                - torch_predict(probe, batch_size=3, max_length=64)).max())
            if not diff <= _ONNX_PARITY_ATOL:
                raise DistillError(f"the teacher's ONNX export differs from torch by {diff:.2g} (> {_ONNX_PARITY_ATOL})",
                                   "set soft_labels.engine: torch")
            predict = ort_predict
            model = None                  # the torch copy is no longer needed
        except Exception as err:  # noqa: BLE001 - auto falls back, an explicit request fails
            if requested == "onnxruntime":
                raise
            _warn(f"ONNX Runtime teacher unavailable ({err}); labelling with torch instead")
    _PREDICTORS.clear()                   # one teacher at a time: memory stays bounded
    _PREDICTORS[cache_key_] = predict
    return predict


def teacher_logits(model_dir, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                   device: str = "cpu", progress: bool = True, engine: str = "torch",
                   threads: int | None = None) -> np.ndarray:
    """(N, C) float32 logits of the classifier in `model_dir`, row i for texts[i].

    Texts are batched by tokenized length with padding per batch; `engine` picks torch or the
    teacher exported to ONNX Runtime (see resolve_engine).
    """
    import torch

    from distill_gap.ops.runtime import select_device

    if device == "auto":
        device = select_device("auto")
    elif str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"device {device!r} asked for but no CUDA device is available",
                           "set runtime.device to auto or cpu")
    predict = _predictor(model_dir, engine=engine, device=device, threads=threads)
    return predict(list(texts), batch_size=batch_size, max_length=max_length, desc="teacher logits" if progress else None)


def _warn(message: str) -> None:
    """A warning in the Prefect run log when inside a run, else on the module logger."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        logging.getLogger("distill.soft_labels").warning(message)


def _check_teacher(teacher_dir, labels: list[str], teacher_digest: str, tokenizer_digest: str) -> None:
    """Refuse to label with a teacher whose classes or files are not the ones the key names."""
    from distill_gap.models.loading import check_teacher_labels, config_labels

    check_teacher_labels(config_labels(teacher_dir), labels, f"the teacher in {teacher_dir}")
    got_model, got_tok = model_digest(teacher_dir), compute_tokenizer_digest(teacher_dir)
    if (got_model, got_tok) != (teacher_digest, tokenizer_digest):
        raise DistillError(f"the teacher files in {teacher_dir} have digest {got_model[:12]} / tokenizer "
                           f"{got_tok[:12]}, but the pinned teacher is {teacher_digest[:12]} / {tokenizer_digest[:12]}",
                           "point teacher_dir at the pinned teacher's files (distill_gap.digest.model_digest and "
                           "tokenizer_digest of that folder are the digests to pass)")


def _align(stored_ids: list[str], stored: np.ndarray, ids: list[str], uri: str) -> np.ndarray:
    """Rows of `stored` in the order of `ids`; every id must be present."""
    row = {i: r for r, i in enumerate(stored_ids)}
    missing = [i for i in ids if i not in row]
    if missing:
        raise DistillError(f"soft-label entry {uri} lacks {len(missing)} of the {len(ids)} requested ids "
                           f"(e.g. {missing[:5]})",
                           "the data digest must cover exactly the ids labelled; check how data_digest is "
                           f"computed, or delete {uri} to relabel")
    return stored[[row[i] for i in ids]]


# --------------------------------------------------------------------------------------------
# Plan -> shards -> manifest. Rows are stored sorted by id, so an entry depends only on the set of
# examples (which the data digest names), and the ids of any shard follow from the manifest alone.


@dataclass(frozen=True)
class ShardJob:
    """One shard to label and write: what a mapped Prefect task (or a Dask worker) receives."""

    store_uri: str
    key: str
    index: int
    ids: list[str]
    texts: list[str]
    num_classes: int
    dtype: str
    top_k: int | None
    max_length: int
    may_exist: bool          # an object of that name exists: reuse it when it holds exactly these ids

    @property
    def name(self) -> str:
        return _shard_name(self.index)


@dataclass
class LabelPlan:
    """The key, and the training rows in stored (sorted-id) order, split into shards."""

    store_uri: str
    key: str
    uri: str
    key_inputs: dict
    request_ids: list[str]   # the caller's order, which SoftLabels.logits follows
    ids: list[str]           # sorted: the stored order
    texts: list[str]
    num_classes: int
    shard_size: int
    dtype: str
    top_k: int | None
    max_length: int

    def jobs(self, present: set[str] = frozenset()) -> list[ShardJob]:
        return [ShardJob(self.store_uri, self.key, i, self.ids[s:s + self.shard_size], self.texts[s:s + self.shard_size],
                         self.num_classes, self.dtype, self.top_k, self.max_length, _shard_name(i) in present)
                for i, s in enumerate(range(0, len(self.ids), self.shard_size))]


def plan_soft_labels(store_uri: str, *, teacher_digest: str, tokenizer_digest: str, data_digest: str,
                     ids: Sequence[str], texts: Sequence[str], labels: Sequence[str], max_length: int = 128,
                     shard_size: int = 256, dtype: str = "float16", top_k: int | None = None) -> LabelPlan:
    """Check the inputs, compute the cache key and order the rows for storage."""
    ids, labels = [str(i) for i in ids], list(labels)
    if len(ids) != len(texts):
        raise DistillError(f"{len(ids)} ids but {len(texts)} texts", "pass one text per example id")
    if not ids:
        raise DistillError("no training examples to label", "check the training split of the data config")
    if len(set(ids)) != len(ids):
        raise DistillError("example ids are not unique", "give every training row a distinct id")
    if dtype not in DTYPES:
        raise DistillError(f"soft-label dtype {dtype!r} is not supported", f"use one of {sorted(DTYPES)}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise DistillError(f"soft_labels.shard_size must be a positive integer, got {shard_size!r}",
                           "set soft_labels.shard_size, e.g. 256")
    key_inputs = cache_key_inputs(teacher_digest=teacher_digest, tokenizer_digest=tokenizer_digest,
                                  data_digest=data_digest, max_length=max_length, labels=labels, top_k=top_k)
    key = sha256_json(key_inputs)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    store = SoftLabelStore(store_uri)
    return LabelPlan(store_uri=store.uri, key=key, uri=store.entry_uri(key), key_inputs=key_inputs, request_ids=ids,
                     ids=[ids[i] for i in order], texts=[str(texts[i]) for i in order], num_classes=len(labels),
                     shard_size=shard_size, dtype=dtype, top_k=key_inputs.get("top_k"), max_length=max_length)


def label_shard(job: ShardJob, teacher_dir, *, batch_size: int = 32, device: str = "cpu", engine: str = "torch",
                threads: int | None = None, progress: bool = True) -> dict:
    """Label one shard with the teacher and create it; reuse it when it already holds exactly its ids.

    Returns {"index", "name", "sha256", "rows", "reused", "labelled", "seconds"}, or
    {"index", "complete": True} when another writer completed the entry meanwhile.
    """
    store = SoftLabelStore(job.store_uri)
    if job.may_exist:
        kept = store._valid_shard(f"{job.key}/shards/{job.name}", job.ids, job.num_classes, job.dtype, top_k=job.top_k)
        if kept is not None:
            return {"index": job.index, "name": job.name, "sha256": sha256_bytes(kept[0]), "rows": len(job.ids),
                    "reused": True, "labelled": 0, "seconds": 0.0}
    started = time.perf_counter()
    logits = teacher_logits(teacher_dir, job.texts, batch_size=batch_size, max_length=job.max_length, device=device,
                            engine=engine, threads=threads, progress=progress)
    seconds = time.perf_counter() - started
    if logits.shape[1] != job.num_classes:
        raise DistillError(f"the teacher in {teacher_dir} gives {logits.shape[1]} logits per example, the labels "
                           f"name {job.num_classes} classes", "use a teacher trained on data.labels")
    info = store.write_shard(job.key, job.index, job.ids, logits, dtype=job.dtype, top_k=job.top_k)
    failpoint("soft-labels.shard-written")  # crash drills (distill_gap/ops/failpoints.py): hold here, the test kills the run
    if info is None:
        return {"index": job.index, "complete": True}
    return {**info, "index": job.index, "reused": False, "labelled": len(job.ids), "seconds": seconds}


def finish_soft_labels(plan: LabelPlan, shards: list[dict], *, teacher_meta: dict | None = None,
                       produced_by: dict | None = None) -> SoftLabels:
    """Write the manifest (create-only, last) from the shard results and read the entry back."""
    store = SoftLabelStore(plan.store_uri)
    shards = sorted(shards, key=lambda s: s["index"])
    planned = list(range(-(-len(plan.ids) // plan.shard_size)))
    if [s["index"] for s in shards] != planned and not any(s.get("complete") for s in shards):
        raise ValueError(f"shard results {[s['index'] for s in shards]} do not cover the plan")
    if any(s.get("complete") for s in shards):
        manifest = store.manifest(plan.key)      # another writer completed the entry: theirs is the entry
        assert manifest is not None
    else:
        import torch
        import transformers

        meta = {"key_inputs": plan.key_inputs, "teacher": dict(teacher_meta or {}), "row_order": "sorted-ids",
                "produced_by": {**(produced_by or {}), "torch": torch.__version__,
                                "transformers": transformers.__version__,
                                "reused_shards": sum(bool(s["reused"]) for s in shards)}}
        manifest = store.write_manifest(plan.key, [{k: s[k] for k in ("name", "sha256", "rows")} for s in shards],
                                        num_classes=plan.num_classes, dtype=plan.dtype, top_k=plan.top_k, meta=meta)
    stored_ids, stored = store.read(plan.key)
    return SoftLabels(key=plan.key, uri=plan.uri, ids=plan.request_ids,
                      logits=_align(stored_ids, stored, plan.request_ids, plan.uri), hit=False, manifest=manifest,
                      labelled=sum(s.get("labelled", 0) for s in shards),
                      seconds=sum(s.get("seconds", 0.0) for s in shards))


def read_soft_labels(plan: LabelPlan, manifest: dict, *, teacher_dir, teacher_digest: str, tokenizer_digest: str,
                     labels: Sequence[str], batch_size: int = 32, device: str = "cpu", engine: str = "torch",
                     threads: int | None = None, progress: bool = True) -> SoftLabels:
    """A cache hit: every shard verified; a damaged or missing one is recomputed with a warning naming it."""
    store = SoftLabelStore(plan.store_uri)
    stored_ids, stored, bad = store.read_checked(plan.key, manifest)
    labelled, seconds = 0, 0.0
    if bad:
        for b in bad:
            _warn(f"soft-label shard {b['name']} of {plan.uri} failed verification ({b['problem']}); "
                  "recomputing it with the teacher")
        fix = f"delete {plan.uri} and run again to relabel"
        if manifest.get("row_order") != "sorted-ids" or manifest["num_examples"] != len(plan.ids):
            raise DistillError(bad[0]["problem"] + " (this entry's rows cannot be recomputed in place)", fix)
        try:
            _check_teacher(teacher_dir, list(labels), teacher_digest, tokenizer_digest)
        except (DistillError, FileNotFoundError, OSError) as err:
            raise DistillError(f"{bad[0]['problem']}, and the teacher needed to recompute it is not usable: {err}",
                               f"restore the pinned teacher's files, or {fix}") from err
        started = time.perf_counter()
        for b in bad:
            rows = slice(b["start"], b["start"] + b["rows"])
            logits = teacher_logits(teacher_dir, plan.texts[rows], batch_size=batch_size, max_length=plan.max_length,
                                    device=device, engine=engine, threads=threads, progress=progress)
            manifest = store.repair_shard(plan.key, b["index"], plan.ids[rows], logits, reason=b["problem"])
            labelled += b["rows"]
        seconds = time.perf_counter() - started
        stored_ids, stored = store.read(plan.key)
    return SoftLabels(key=plan.key, uri=plan.uri, ids=plan.request_ids,
                      logits=_align(stored_ids, stored, plan.request_ids, plan.uri), hit=True, manifest=manifest,
                      labelled=labelled, seconds=seconds, repaired=[b["name"] for b in bad])


def lookup_soft_labels(plan: LabelPlan, *, teacher_dir, teacher_digest: str, tokenizer_digest: str,
                       labels: list[str], run: dict) -> tuple[SoftLabels | None, list[ShardJob]]:
    """A hit (verified, damaged shards recomputed), or the shard jobs of a miss once the teacher checks out."""
    store = SoftLabelStore(plan.store_uri)
    manifest = store.manifest(plan.key)
    if manifest is not None:
        return read_soft_labels(plan, manifest, teacher_dir=teacher_dir, teacher_digest=teacher_digest,
                                tokenizer_digest=tokenizer_digest, labels=labels, **run), []
    _check_teacher(teacher_dir, list(labels), teacher_digest, tokenizer_digest)
    return None, plan.jobs(store.present_shards(plan.key))


def ensure_soft_labels(store_uri: str, *, teacher_dir, teacher_digest: str, tokenizer_digest: str,
                       data_digest: str, ids: Sequence[str], texts: Sequence[str], labels: Sequence[str],
                       max_length: int = 128, batch_size: int = 32, shard_size: int = 256,
                       dtype: str = "float16", device: str = "cpu", teacher_meta: dict | None = None,
                       progress: bool = True, top_k: int | None = None, engine: str = "torch",
                       threads: int | None = None) -> SoftLabels:
    """Teacher logits for `ids`, from the cache when the key matches, else labelled and stored (in this process).

    The logits returned are always the stored ones (read back after a write), so a run that
    labels and a later run that hits the cache train on identical numbers. The pipeline runs the
    same steps as Prefect tasks, shards mapped over a task runner (soft_labels_stage).

    `top_k=k` stores only the k largest logits per example plus the log-sum-exp of the rest (see
    SoftLabelStore.write); k is part of the cache key, and the logits returned are the dense
    reconstruction of SoftLabelStore.read (exact top-k probabilities, residual mass spread uniformly).
    """
    plan = plan_soft_labels(store_uri, teacher_digest=teacher_digest, tokenizer_digest=tokenizer_digest,
                            data_digest=data_digest, ids=ids, texts=texts, labels=labels, max_length=max_length,
                            shard_size=shard_size, dtype=dtype, top_k=top_k)
    run = dict(batch_size=batch_size, device=device, engine=engine, threads=threads, progress=progress)
    hit, jobs = lookup_soft_labels(plan, teacher_dir=teacher_dir, teacher_digest=teacher_digest,
                                   tokenizer_digest=tokenizer_digest, labels=list(labels), run=run)
    if hit is not None:
        return hit
    results = []
    for job in jobs:
        results.append(label_shard(job, teacher_dir, **run))
        if results[-1].get("complete"):
            break
    return finish_soft_labels(plan, results, teacher_meta=teacher_meta,
                              produced_by={"device": device, "engine": resolve_engine(engine, device),
                                           "batch_size": batch_size, "task_runner": "in-process"})


# --------------------------------------------------------------------------------------------
# Prefect: a lookup task, one mapped task per shard (local or on Dask), a manifest task.


def is_transient(exc: BaseException | None) -> bool:
    """True for connection trouble and S3 throttling/server errors, also when wrapped in a DistillError."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, HTTPClientError)):
            return True
        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", "")) in _TRANSIENT_CODES
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return False


def retry_on_transient_store_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry S3/connection blips only, never bad labels or data.

    Prefect asks only while retries are left, so a True here is a retry that will happen: it is logged
    as a warning (attempt, delay, the store's error), visible in the run's logs at the default level.
    """
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failure being judged
        transient = is_transient(exc)
        if transient and task is not None and task_run is not None:
            _warn_retry(task, task_run, exc)
        return transient
    return False


def _warn_retry(task, task_run, exc: BaseException) -> None:
    attempt = max(1, int(getattr(task_run, "run_count", 1) or 1))
    delays = task.retry_delay_seconds
    if isinstance(delays, (list, tuple)):
        delay = delays[min(attempt - 1, len(delays) - 1)] if delays else 0
    else:
        delay = delays or 0
    problem = exc.problem if isinstance(exc, DistillError) else f"{type(exc).__name__}: {exc}"
    _warn(f"{task_run.name}: soft-label store error on attempt {attempt} of {task.retries + 1}, retrying in "
          f"{delay:g} s: {problem}")


# Seconds between the attempts of a store-touching task. An S3/MinIO endpoint that is back within ~20 s
# is ridden out (down 10 s from a shard write: the retry at +5 s fails, the one at +15 s more succeeds;
# tests/reliability/test_s3_outage.py); one that stays down fails the stage ~20-30 s after its first
# error. Each attempt's S3 calls also get botocore's own quick retries (standard mode, AWS_MAX_ATTEMPTS,
# 3 by default). soft_labels_stage(retry_delays=...) sets another schedule for one run.
RETRY_DELAYS = [5, 15]
_RETRYING = dict(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
                 retry_condition_fn=retry_on_transient_store_error, cache_policy=NO_CACHE)


@task(name="soft-labels-lookup", **_RETRYING)
def soft_labels_lookup_task(plan: LabelPlan, *, teacher_dir, teacher_digest: str, tokenizer_digest: str,
                            labels: list[str], run: dict) -> tuple[SoftLabels | None, list[ShardJob]]:
    """lookup_soft_labels as a task: store reads retried on transient S3 errors."""
    return lookup_soft_labels(plan, teacher_dir=teacher_dir, teacher_digest=teacher_digest,
                              tokenizer_digest=tokenizer_digest, labels=labels, run=run)


@task(name="label-shard", task_run_name="label-shard-{job.index}", **_RETRYING)
def label_shard_task(job: ShardJob, teacher_dir, run: dict) -> dict:
    """One shard: labelled by the teacher and created in the store (or reused when already there)."""
    return label_shard(job, teacher_dir, **{**run, "progress": False})


@task(name="soft-labels-manifest", **_RETRYING)
def finish_soft_labels_task(plan: LabelPlan, shards: list[dict], *, teacher_meta: dict | None,
                            produced_by: dict) -> SoftLabels:
    return finish_soft_labels(plan, shards, teacher_meta=teacher_meta, produced_by=produced_by)


def shard_task_runner(task_runner: str = "local", *, dask_address: str | None = None, dask_workers: int = 2):
    """The Prefect task runner for the shard tasks: in this process one at a time, or on Dask."""
    if task_runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)   # torch already uses every thread it was given
    if task_runner != "dask":
        raise DistillError(f"soft_labels.task_runner {task_runner!r} is not local or dask",
                           "set soft_labels.task_runner to local or dask")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - a dependency of this project
        raise DistillError("soft_labels.task_runner is dask but prefect-dask is not installed",
                           "pip install prefect-dask (it is in pyproject.toml)") from err
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})


def soft_labels_stage(store_uri: str, *, teacher_dir, teacher_digest: str, tokenizer_digest: str, data_digest: str,
                      ids: list[str], texts: list[str], labels: list[str], max_length: int = 128,
                      batch_size: int = 32, shard_size: int = 256, dtype: str = "float16", device: str = "cpu",
                      teacher_meta: dict | None = None, top_k: int | None = None, engine: str = "auto",
                      task_runner: str = "local", dask_address: str | None = None, dask_workers: int = 2,
                      threads: int | None = None, retry_delays: Sequence[float] | None = None) -> SoftLabels:
    """The soft-labels stage of a flow: lookup task, one mapped `label-shard` task per missing shard, manifest task.

    Call it from inside a flow. Store-touching tasks retry transient S3 errors (RETRY_DELAYS, or
    `retry_delays`: one retry per entry, that many seconds after the failed attempt), each retry
    logged as a warning; when the store stays unreachable the stage fails with a DistillError that
    names the endpoint, the fix and how long it was retried. Shards are created before the manifest,
    so a failed stage leaves no manifest, only whole shards that a later run reuses. With
    task_runner dask the shard tasks run on a Dask cluster (a LocalCluster of `dask_workers`
    processes sharing `threads`, or the scheduler at `dask_address`).
    """
    started = time.monotonic()
    try:
        return _soft_labels_stage(
            store_uri, teacher_dir=teacher_dir, teacher_digest=teacher_digest, tokenizer_digest=tokenizer_digest,
            data_digest=data_digest, ids=ids, texts=texts, labels=labels, max_length=max_length,
            batch_size=batch_size, shard_size=shard_size, dtype=dtype, device=device, teacher_meta=teacher_meta,
            top_k=top_k, engine=engine, task_runner=task_runner, dask_address=dask_address,
            dask_workers=dask_workers, threads=threads, retry_delays=retry_delays)
    except DistillError as err:
        if not is_transient(err):
            raise
        # Only retries running out let a transient error through: say so, once, with the store's fix.
        attempts = (len(retry_delays) if retry_delays is not None else label_shard_task.retries) + 1
        raise DistillError(f"{err.problem} (gave up after {attempts} attempts, {time.monotonic() - started:.0f} s "
                           "into the soft-labels stage)", err.fix) from err


def _retrying(task, retry_delays: Sequence[float] | None):
    if retry_delays is None:
        return task
    delays = [float(d) for d in retry_delays]
    if any(d < 0 for d in delays):
        raise DistillError(f"soft-label store retry delays must be >= 0 seconds, got {delays}",
                           "use e.g. [5, 15] (one retry per entry)")
    return task.with_options(retries=len(delays), retry_delay_seconds=delays or 0)


def _soft_labels_stage(store_uri: str, *, teacher_dir, teacher_digest: str, tokenizer_digest: str,
                       data_digest: str, ids: list[str], texts: list[str], labels: list[str], max_length: int,
                       batch_size: int, shard_size: int, dtype: str, device: str, teacher_meta: dict | None,
                       top_k: int | None, engine: str, task_runner: str, dask_address: str | None,
                       dask_workers: int, threads: int | None, retry_delays: Sequence[float] | None) -> SoftLabels:
    from prefect.utilities.annotations import unmapped

    logger = get_run_logger()
    lookup_task = _retrying(soft_labels_lookup_task, retry_delays)
    shard_task = _retrying(label_shard_task, retry_delays)
    manifest_task = _retrying(finish_soft_labels_task, retry_delays)
    plan = plan_soft_labels(store_uri, teacher_digest=teacher_digest, tokenizer_digest=tokenizer_digest,
                            data_digest=data_digest, ids=ids, texts=texts, labels=labels, max_length=max_length,
                            shard_size=shard_size, dtype=dtype, top_k=top_k)
    run = dict(batch_size=batch_size, device=device, engine=engine, threads=threads)
    hit, jobs = lookup_task(plan, teacher_dir=teacher_dir, teacher_digest=teacher_digest,
                            tokenizer_digest=tokenizer_digest, labels=list(labels), run=run)
    if hit is not None:
        logger.info(f"cache hit {hit.key}" + (f" (recomputed {', '.join(hit.repaired)})" if hit.repaired else ""))
        result = hit
    else:
        local_dask = task_runner == "dask" and not dask_address
        shard_run = {**run, "threads": max(1, (threads or 2) // dask_workers) if local_dask else threads}
        logger.info(f"cache miss {plan.key}: {len(jobs)} shards on the {task_runner} task runner")
        with shard_task_runner(task_runner, dask_address=dask_address, dask_workers=dask_workers) as runner:
            futures = runner.map(shard_task, {"job": jobs, "teacher_dir": unmapped(str(teacher_dir)),
                                              "run": unmapped(shard_run)})
            shards = [f.result() for f in futures]
        result = manifest_task(plan, shards, teacher_meta=teacher_meta,
                               produced_by={"device": device, "engine": resolve_engine(engine, device),
                                            "batch_size": batch_size, "task_runner": task_runner})
        logger.info(f"labelled {result.labelled} examples in {result.seconds:.1f} s of teacher time "
                    f"({result.manifest['produced_by'].get('reused_shards', 0)} shards reused)")
    stored_as = f" (top-{top_k} stored)" if top_k is not None else ""
    logger.info(f"soft labels: {len(result.ids)} x {result.logits.shape[1]}{stored_as} at {result.uri}")
    return result
