"""Labelling: plan the rows of an entry, label the missing shards with the teacher, write the manifest, read back.

Labelling runs per shard: `plan_soft_labels` -> `label_shard` for each missing shard ->
`finish_soft_labels` (the manifest). `ensure_soft_labels` runs them in this process; the pipeline's
soft-labels stage (tasks/soft_labels.py) runs the same steps as Prefect tasks, the shards mapped over
a local or Dask task runner. A cache hit is verified shard by shard (`read_soft_labels`): a damaged
shard is recomputed by the teacher and rewritten, with a warning naming it.
"""

from __future__ import annotations

from typing import Any

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from distill_gap.digest import model_digest, sha256_bytes, sha256_json
from distill_gap.digest import tokenizer_digest as compute_tokenizer_digest
from distill_gap.errors import DistillError
from distill_gap.models.loading import check_teacher_labels, config_labels
from distill_gap.ops.failpoints import failpoint
from distill_gap.softlabels.cache_key import cache_key_inputs
from distill_gap.softlabels.engines import resolve_engine, teacher_logits, warn
from distill_gap.softlabels.shards import DTYPES, shard_name
from distill_gap.softlabels.store import SoftLabelStore


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
    # distill.augment / redistill: the teacher-labelled extra rows (distill_gap.kd.augment.ExtraRows), their own entry
    extra: Any = None


def _check_teacher(teacher_dir, labels: list[str], teacher_digest: str, tokenizer_digest: str) -> None:
    """Refuse to label with a teacher whose classes or files are not the ones the key names."""
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
        return shard_name(self.index)


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
                         self.num_classes, self.dtype, self.top_k, self.max_length, shard_name(i) in present)
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
        kept = store.valid_shard(f"{job.key}/shards/{job.name}", job.ids, job.num_classes, job.dtype, top_k=job.top_k)
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
            warn(f"soft-label shard {b['name']} of {plan.uri} failed verification ({b['problem']}); "
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
    same steps as Prefect tasks, shards mapped over a task runner (tasks.soft_labels.soft_labels_stage).

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
