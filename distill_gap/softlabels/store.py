"""SoftLabelStore: the content-addressed soft-label cache on file:// (or a plain path) or s3://bucket/prefix.

Layout under `<store>/<key>/` (DESIGN.md, "Identities and keys"):

    shards/part-00000.parquet   columns `id` (string) and `logits` (fixed_size_list<float16|float32>[C]),
    shards/part-00001.parquet   rows sorted by id (manifest `row_order: sorted-ids`), `shard_size` rows each
    manifest.json               key inputs, teacher identity, dtype, shard list with sha256 and row counts

The manifest is written last and create-only (O_EXCL-style hard link on file://, `If-None-Match: *`
on s3://): an entry without a manifest is incomplete, and its shards that still decode to the
planned ids are reused when labelling resumes. A complete entry's shard that fails its sha256 (or
is missing) is never trusted: read_checked reports it, and repair_shard rewrites it and the manifest
with a `repairs` record. A top-k entry (shards.py) records `"top_k": k` and its columns in the
manifest; k is part of the cache key, so a top-k entry never serves a full request.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Sequence

import numpy as np

from distill_gap.digest import sha256_bytes
from distill_gap.errors import DistillError
from distill_gap.softlabels.backends import open_backend
from distill_gap.softlabels.cache_key import KEY_RE, cache_key, check_key, check_top_k
from distill_gap.softlabels.shards import (DTYPES, SHARD_RE, decode_shard, decode_topk_shard, dense_from_top_k,
                                           encode_shard, encode_topk_shard, index_dtype, shard_name, top_k_split)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Fields the store itself writes into a manifest; `meta` passed to write() may not set them.
_RESERVED = {"format_version", "key", "dtype", "num_examples", "num_classes", "columns", "shards", "created_at",
             "top_k"}


class SoftLabelStore:
    """Content-addressed soft-label cache on file:// (or a plain path) or s3://bucket/prefix."""

    def __init__(self, uri: str):
        self._backend = open_backend(str(uri))
        self.uri = self._backend.uri

    def entry_uri(self, key: str) -> str:
        return f"{self.uri}/{check_key(key)}"

    def manifest(self, key: str) -> dict | None:
        """The entry's manifest, or None when the entry is missing or incomplete."""
        data = self._backend.get(f"{check_key(key)}/{MANIFEST}")
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

        A damaged or missing shard raises a DistillError naming it (labelling.ensure_soft_labels recomputes
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
            if not SHARD_RE.match(name):
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
            ids, indices, values, lse_rest = decode_topk_shard(data, name)
            if len(ids) != shard["rows"] or values.shape[1] != top_k:
                raise DistillError(f"soft-label shard {name} holds {values.shape} top-k logits, manifest says "
                                   f"{shard['rows']} rows x top_k {top_k}", "relabel it")
            if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= num_classes):
                raise DistillError(f"soft-label shard {name} holds class indices outside [0, {num_classes})",
                                   "relabel it")
            return ids, dense_from_top_k(indices, values, lse_rest, num_classes)
        ids, logits = decode_shard(data, name)
        if len(ids) != shard["rows"] or logits.shape[1] != num_classes:
            raise DistillError(f"soft-label shard {name} holds {logits.shape} logits, manifest says "
                               f"{shard['rows']} rows x {num_classes} classes", "relabel it")
        return ids, logits.astype(np.float32)

    def present_shards(self, key: str) -> set[str]:
        """Names of the shard objects an entry (complete or not) holds now."""
        return {rel.rsplit("/", 1)[1] for rel in self._backend.list(f"{check_key(key)}/shards")}

    def valid_shard(self, rel: str, ids: Sequence[str], num_classes: int, dtype: str,
                     top_k: int | None = None) -> tuple[bytes, np.ndarray] | None:
        """(bytes, logits) of the shard object at `rel` when it decodes to exactly these ids, classes and dtype.

        None when it is missing or holds anything else: a resumed or concurrent writer may reuse it only then.
        """
        data = self._backend.get(rel)
        if data is None:
            return None
        if top_k is not None:
            try:
                got_ids, indices, values, lse_rest = decode_topk_shard(data, rel)
            except DistillError:
                return None
            if (got_ids != list(ids) or values.shape[1] != top_k or values.dtype != DTYPES[dtype]
                    or indices.dtype != index_dtype(num_classes)
                    or (indices.size and int(indices.max()) >= num_classes)):
                return None
            return data, dense_from_top_k(indices, values, lse_rest, num_classes)
        try:
            got_ids, logits = decode_shard(data, rel)
        except DistillError:
            return None
        if got_ids != list(ids) or logits.shape[1] != num_classes or logits.dtype != DTYPES[dtype]:
            return None
        return data, logits

    def _encode(self, ids: Sequence[str], logits: np.ndarray, dtype: str, top_k: int | None) -> bytes:
        """Shard bytes for (ids, (n, C) logits) in `dtype`, full or top-k; non-finite values refused."""
        _check_finite(logits, dtype, top_k)
        if top_k is None:
            return encode_shard(ids, logits.astype(DTYPES[dtype]))
        idx, vals, lse_rest = top_k_split(logits, top_k)
        with np.errstate(over="ignore"):
            vals = vals.astype(DTYPES[dtype])
        if not np.isfinite(vals).all() or not np.isfinite(lse_rest).all():
            raise DistillError(f"top-k teacher logits are not finite in {dtype} (max |logit| {np.abs(logits).max():.3g})",
                               "store float32 soft labels (soft_labels.dtype: float32) or check the teacher")
        return encode_topk_shard(ids, idx.astype(index_dtype(logits.shape[1])), vals, lse_rest)

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
        name = shard_name(index)
        rel = f"{check_key(key)}/shards/{name}"
        if not self._backend.put_new(rel, data):
            kept = self.valid_shard(rel, ids, logits.shape[1], dtype, top_k=top_k)
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
            index_type = np.dtype(index_dtype(num_classes)).name
            manifest["top_k"] = top_k
            manifest["columns"] = {"id": "string", "indices": f"fixed_size_list<{index_type}>[{top_k}]",
                                   "logits": f"fixed_size_list<{dtype}>[{top_k}]", "lse_rest": "float32"}
        body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        if not self._backend.put_new(f"{check_key(key)}/{MANIFEST}", body):
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
        check_key(key)
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
            top_k = check_top_k(top_k, logits.shape[1])
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
            if rest == MANIFEST and KEY_RE.match(key):
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
