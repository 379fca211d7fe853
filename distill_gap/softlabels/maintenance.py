"""Soft-label cache administration: plain functions behind `distill cache ls|show|verify|gc`.

No Prefect here. Entries live under `<store>/<key>/` (store.py): an entry is complete when its
`manifest.json` exists. Garbage collection deletes the manifest first, so an entry being removed
turns incomplete (never half-complete) before its shards go.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from distill_gap.digest import sha256_bytes
from distill_gap.errors import DistillError
from distill_gap.softlabels.backends import FileBackend, S3Backend
from distill_gap.softlabels.cache_key import KEY_RE
from distill_gap.softlabels.shards import SHARD_RE
from distill_gap.softlabels.store import MANIFEST, SoftLabelStore

_PREFIX_RE = re.compile(r"^[0-9a-f]{8,64}$")
TAG = "soft_labels.key"
INCOMPLETE_MAX_AGE_S = 3600.0


# --------------------------------------------------------------------------------------------
# Inventory and deletion on the store's backend objects.


@dataclass
class _Entry:
    key: str
    objects: dict[str, tuple[int, float]] = field(default_factory=dict)   # rel -> (bytes, mtime epoch s)

    @property
    def complete(self) -> bool:
        return f"{self.key}/{MANIFEST}" in self.objects

    @property
    def newest_mtime(self) -> float:
        return max((m for _, m in self.objects.values()), default=0.0)


def _inventory(backend) -> dict[str, _Entry]:
    """Every object under a key folder, with its size and modification time, in one listing."""
    objects: dict[str, tuple[int, float]] = {}
    if isinstance(backend, FileBackend):
        root: Path = backend.root
        if root.is_dir():
            for p in root.rglob("*"):
                if p.is_file():              # dotfiles too: an interrupted write's temp files
                    st = p.stat()
                    objects[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime)
    elif isinstance(backend, S3Backend):
        start = f"{backend.prefix}/" if backend.prefix else ""
        with backend._errors("list"):
            for page in backend.client.get_paginator("list_objects_v2").paginate(Bucket=backend.bucket,
                                                                                 Prefix=start):
                for obj in page.get("Contents", []):
                    objects[obj["Key"][len(start):]] = (int(obj["Size"]), obj["LastModified"].timestamp())
    else:  # pragma: no cover - only two backends exist
        objects = {rel: (-1, 0.0) for rel in backend.list()}
    entries: dict[str, _Entry] = {}
    for rel, info in objects.items():
        key, _, rest = rel.partition("/")
        if rest and KEY_RE.match(key):
            entries.setdefault(key, _Entry(key)).objects[rel] = info
    return entries


def delete(backend, rel: str) -> None:
    """Remove one object (missing is fine); on file:// also prune folders left empty."""
    if isinstance(backend, FileBackend):
        path = backend.root / rel
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        parent = path.parent
        while parent != backend.root and backend.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
    elif isinstance(backend, S3Backend):
        with backend._errors(f"delete {rel}"):
            backend.client.delete_object(Bucket=backend.bucket, Key=backend._key(rel))
    else:  # pragma: no cover
        raise DistillError(f"cannot delete from {backend.uri}", "use a file:// or s3:// soft-label store")


def _delete_entry(backend, entry: _Entry) -> None:
    manifest = f"{entry.key}/{MANIFEST}"
    if manifest in entry.objects:
        delete(backend, manifest)            # first: the entry is incomplete from here on
    for rel in sorted(entry.objects):
        if rel != manifest:
            delete(backend, rel)


def _created(manifest: dict) -> float:
    try:
        dt = datetime.fromisoformat(str(manifest.get("created_at")))
    except ValueError:
        return 0.0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _complete(store_uri: str) -> tuple[SoftLabelStore, object, list[tuple[dict, _Entry]]]:
    """(store, backend, [(manifest, entry)] of complete entries, newest first)."""
    store = SoftLabelStore(store_uri)
    backend = store._backend
    found = []
    for key, entry in _inventory(backend).items():
        if entry.complete:
            manifest = store.manifest(key)
            if manifest is not None:          # deleted between listing and reading
                found.append((manifest, entry))
    found.sort(key=lambda me: (_created(me[0]), me[0]["key"]), reverse=True)
    return store, backend, found


# --------------------------------------------------------------------------------------------
# list / show / verify


def list_entries(store_uri: str) -> list[dict]:
    """One summary per complete entry, newest first."""
    _, _, found = _complete(store_uri)
    out = []
    for manifest, entry in found:
        key = manifest["key"]
        shard_rels = [f"{key}/shards/{s['name']}" for s in manifest.get("shards", [])]
        row = {"key": key, "created_at": manifest.get("created_at"), "num_examples": manifest.get("num_examples"),
               "num_classes": manifest.get("num_classes"), "dtype": manifest.get("dtype"),
               "shards": len(shard_rels), "teacher": dict(manifest.get("teacher") or {})}
        sizes = [entry.objects[r][0] for r in shard_rels if r in entry.objects]
        if len(sizes) == len(shard_rels) and all(s >= 0 for s in sizes):
            row["bytes"] = sum(sizes)
        out.append(row)
    return out


def resolve_key(store_uri: str, key: str) -> str:
    """A full key of a complete entry from a key or a unique prefix of >= 8 hex digits."""
    key = str(key).strip().lower()
    store = SoftLabelStore(store_uri)
    if not _PREFIX_RE.match(key):
        raise DistillError(f"{key!r} is not a soft-label cache key or a prefix of at least 8 hex digits",
                           f"copy a key from `distill cache ls` (store {store.uri})")
    if len(key) == 64:
        if store.manifest(key) is not None:
            return key
        candidates: list[str] = []
    else:
        candidates = [k for k in store.list_keys() if k.startswith(key)]
        if len(candidates) == 1:
            return candidates[0]
    if not candidates:
        raise DistillError(f"no complete soft-label entry {key} in {store.uri}",
                           "run `distill cache ls` to see the entries in the store (an entry without a "
                           "manifest is incomplete and cannot be shown)")
    raise DistillError(f"key prefix {key} is ambiguous in {store.uri}: matches {', '.join(candidates)}",
                       "give more hex digits of the key")


def show_entry(store_uri: str, key: str) -> dict:
    """The manifest of the entry named by `key` (or a unique prefix of it)."""
    full = resolve_key(store_uri, key)
    manifest = SoftLabelStore(store_uri).manifest(full)
    if manifest is None:
        raise DistillError(f"soft-label entry {full} in {store_uri} disappeared while reading it",
                           "run `distill cache ls` and try again")
    return manifest


def verify_entry(store_uri: str, key: str) -> dict:
    """Re-hash every shard against the manifest; problems are reported, never raised."""
    full = resolve_key(store_uri, key)
    store = SoftLabelStore(store_uri)
    manifest = store.manifest(full)
    if manifest is None:
        return {"key": full, "ok": False, "shards": [], "problem": "manifest missing (entry incomplete)"}
    results = []
    for shard in manifest.get("shards", []):
        name = str(shard.get("name"))
        problem = None
        if not SHARD_RE.match(name):
            problem = f"invalid shard name {name!r} in the manifest"
        else:
            data = store._backend.get(f"{full}/shards/{name}")
            if data is None:
                problem = "missing"
            elif sha256_bytes(data) != shard.get("sha256"):
                problem = f"sha256 mismatch: manifest {str(shard.get('sha256'))[:12]}, shard {sha256_bytes(data)[:12]}"
        results.append({"name": name, "ok": problem is None, "problem": problem})
    return {"key": full, "ok": all(r["ok"] for r in results), "shards": results}


# --------------------------------------------------------------------------------------------
# Registry references and garbage collection


def referenced_keys(client, *, page_size: int = 200) -> dict[str, list[str]]:
    """soft_labels.key -> ["<model>/<version>", ...] over every registered model version."""
    refs: dict[str, list[str]] = {}
    token = None
    while True:
        page = client.search_model_versions(max_results=page_size, page_token=token)
        for mv in page:
            key = (mv.tags or {}).get(TAG)
            if key:
                refs.setdefault(key, []).append(f"{mv.name}/{mv.version}")
        token = getattr(page, "token", None)
        if not token:
            break
    return {k: sorted(set(v)) for k, v in refs.items()}


def gc_entries(store_uri: str, *, keep: int, referenced: dict[str, list[str]], dry_run: bool = False,
               incomplete_max_age_s: float = INCOMPLETE_MAX_AGE_S, now: float | None = None) -> dict:
    """Keep the `keep` newest complete entries and every referenced one; delete the rest.

    Incomplete entries (no manifest) whose newest object is older than `incomplete_max_age_s` are
    deleted too; younger ones may be a labelling run in progress. A referenced key is never deleted,
    complete or not. Returns {"deleted", "kept", "kept_referenced"} (keys; deleted in deletion order).
    """
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise DistillError(f"keep must be a non-negative integer, got {keep!r}", "pass e.g. --keep 5")
    now = time.time() if now is None else now
    store = SoftLabelStore(store_uri)
    backend = store._backend
    entries = _inventory(backend)
    complete = []
    for key, entry in entries.items():
        if entry.complete:
            manifest = store.manifest(key)
            if manifest is not None:
                complete.append((manifest, entry))
    complete.sort(key=lambda me: (_created(me[0]), me[0]["key"]), reverse=True)

    deleted, kept, kept_referenced = [], [], []
    doomed: list[_Entry] = []
    for rank, (manifest, entry) in enumerate(complete):
        if entry.key in referenced:
            kept_referenced.append(entry.key)
        elif rank < keep:
            kept.append(entry.key)
        else:
            doomed.append(entry)
    complete_keys = {m["key"] for m, _ in complete}
    for key, entry in sorted(entries.items()):
        if key in complete_keys:
            continue
        if key in referenced:
            kept_referenced.append(key)
        elif now - entry.newest_mtime > incomplete_max_age_s:
            doomed.append(entry)
    for entry in doomed:
        if not dry_run:
            _delete_entry(backend, entry)
        deleted.append(entry.key)
    return {"deleted": deleted, "kept": kept, "kept_referenced": kept_referenced, "dry_run": dry_run}
