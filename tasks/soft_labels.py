"""Stage: teacher soft labels for every training example, from the content-addressed cache or labelled per shard.

soft_labels_stage runs the library's steps (distill_gap/softlabels/labelling.py) as Prefect tasks inside
the flow: a lookup task (a verified hit, or the missing shards), one mapped `label-shard` task per missing
shard on a local or Dask task runner, and a manifest task. The store-touching tasks retry transient
errors only (distill_gap/ops/transient.py), each retry logged as a warning.
"""

from __future__ import annotations

import time
from typing import Sequence

import pandas as pd

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.data.splits import PRODUCTION, split_digest
from distill_gap.digest import tokenizer_digest
from distill_gap.errors import DistillError
from distill_gap.governance.attestation import soft_labels_statement
from distill_gap.kd.augment import ExtraRows, extra_texts
from distill_gap.ops.task_runners import task_runner as stage_task_runner
from distill_gap.ops.transient import is_transient, retry_if_transient_as
from distill_gap.softlabels.engines import resolve_engine
from distill_gap.softlabels.labelling import (LabelPlan, ShardJob, SoftLabels, finish_soft_labels, label_shard,
                                              lookup_soft_labels, plan_soft_labels)
from tasks.attest import attest_task

# Seconds between the attempts of a store-touching task. An S3/MinIO endpoint that is back within ~20 s
# is ridden out (down 10 s from a shard write: the retry at +5 s fails, the one at +15 s more succeeds;
# tests/reliability/test_s3_outage.py); one that stays down fails the stage ~20-30 s after its first
# error. Each attempt's S3 calls also get botocore's own quick retries (standard mode, AWS_MAX_ATTEMPTS,
# 3 by default). soft_labels_stage(retry_delays=...) sets another schedule for one run.
RETRY_DELAYS = [5, 15]


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


def extra_rows(splits, *, augment=None, redistill=None, feedback_store: str = "", seed: int = 13):
    """(rows to train on, held-out rows, the production sample read): the rows beyond the training split, each text
    once and none equal to a row of any split (distill.augment's edits and unlabelled texts, then redistill's
    production rows and feedback answers), validated by the data suite; redistill.holdout_fraction of the rows a
    person answered are held out as the `production` suite. None for each that there is not."""
    from distill_gap.data.validation import validate_extra_rows
    from distill_gap.kd.production import hold_out_answers, production_rows

    exclude = {str(t) for df in splits.frames.values() for t in df["text"]}
    parts = [] if augment is None else [extra_texts(augment, splits.frames, seed=seed, exclude=exclude)]
    production = None
    if redistill is not None:
        parts.append(production_rows(redistill, feedback_store=feedback_store, labels=list(splits.labels),
                                     slice_columns=list(splits.slice_columns),
                                     exclude=exclude, seed=seed, log=get_run_logger().warning))
        production = None if parts[-1] is None else parts[-1].attrs.get("production")
    parts = [p for p in parts if p is not None]
    if not parts:
        return None, None, None
    frame = pd.concat(parts, ignore_index=True)
    validate_extra_rows("extra rows", frame, list(splits.labels))  # nothing unvalidated is labelled or trained on
    held = None
    if redistill is not None and redistill.holdout_fraction:
        frame, held = hold_out_answers(frame, redistill.holdout_fraction, seed=seed)
    return (frame if len(frame) else None), (held if held is not None and len(held) else None), production


def soft_labels(run, sl_cfg, *, teacher, splits, max_length: int, augment=None, redistill=None,
                feedback_store: str = "", seed: int = 13) -> SoftLabels:
    """The run's `soft-labels` stage for the training split (`sl_cfg`: the soft_labels section), then its
    attestation. Extra rows (extra_rows: distill.augment's, redistill's) are labelled by the same teacher under their
    own key (soft.extra). Call it from inside a flow: it submits the stage's tasks."""
    train = splits["train"]
    common = dict(teacher_dir=teacher.path, teacher_digest=teacher.digest, tokenizer_digest=tokenizer_digest(teacher.path),
                  labels=splits.labels, max_length=max_length, batch_size=sl_cfg.batch_size,
                  shard_size=sl_cfg.shard_size, dtype=sl_cfg.dtype, top_k=sl_cfg.top_k, device=run.device,
                  engine=sl_cfg.engine, task_runner=sl_cfg.task_runner, dask_address=sl_cfg.dask_address,
                  dask_workers=sl_cfg.dask_workers, threads=run.threads, retry_delays=sl_cfg.retry_delays,
                  teacher_meta={"name": teacher.name, "version": teacher.version})
    with run.stage("soft-labels") as stage_run_id:
        soft = soft_labels_stage(sl_cfg.store, data_digest=splits.digests()["train"], ids=train["id"].tolist(),
                                 texts=train["text"].tolist(), **common)
        extra, held, production = extra_rows(splits, augment=augment, redistill=redistill,
                                             feedback_store=feedback_store, seed=seed)
        if held is not None:  # evidence before scope: judged on answers it never trained on
            splits.add_suite(PRODUCTION, held)
            run.client.log_dict(run.run_id, {"data": splits.digests(), "teacher": teacher.summary()},
                                "lineage/inputs.json")
            get_run_logger().info(f"production suite: {len(held)} rows a person answered, held out of training")
        if extra is not None:
            digest = split_digest(extra)
            entry = soft_labels_stage(sl_cfg.store, data_digest=digest, ids=extra["id"].tolist(),
                                      texts=extra["text"].tolist(), **common)
            soft.extra = ExtraRows(frame=extra, digest=digest, soft=entry, production=production)
            splits.scope_rows = soft.extra.scope_rows(list(splits.labels))  # the guard's reference includes them
            s = soft.extra.summary()
            by_source = ", ".join(f"{k} {v}" for k, v in s["by_source"].items())
            get_run_logger().info(f"extra rows: {s['rows']} labelled by the teacher ({by_source}; "
                                  f"{s['answered']} with a person's answer)")
            for key, value in (("extra.rows", s["rows"]), ("extra.key", s["key"]), ("extra.digest", digest),
                               ("extra.sources", by_source), ("extra.answered", s["answered"])):
                run.client.log_param(stage_run_id, key, value)
    attest_task(run, soft_labels_statement(sl_cfg, max_length=max_length, soft=soft, teacher=teacher, splits=splits,
                                           context=run.context))
    return soft


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
        with stage_task_runner(task_runner, dask_address=dask_address, dask_workers=dask_workers) as runner:
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


# --------------------------------------------------------------------------------------------
# The tasks: a lookup task, one mapped task per shard (local or on Dask), a manifest task.

_RETRYING = dict(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
                 retry_condition_fn=retry_if_transient_as("soft-label store error", logger="distill.soft_labels"),
                 cache_policy=NO_CACHE)


@step("soft-labels-lookup", **_RETRYING)
def soft_labels_lookup_task(plan: LabelPlan, *, teacher_dir, teacher_digest: str, tokenizer_digest: str,
                            labels: list[str], run: dict) -> tuple[SoftLabels | None, list[ShardJob]]:
    """lookup_soft_labels as a task: store reads retried on transient S3 errors."""
    return lookup_soft_labels(plan, teacher_dir=teacher_dir, teacher_digest=teacher_digest,
                              tokenizer_digest=tokenizer_digest, labels=labels, run=run)


@task(name="label-shard", task_run_name="label-shard-{job.index}", **_RETRYING)
def label_shard_task(job: ShardJob, teacher_dir, run: dict) -> dict:
    """One shard: labelled by the teacher and created in the store (or reused when already there)."""
    return label_shard(job, teacher_dir, **{**run, "progress": False})


@step("soft-labels-manifest", **_RETRYING)
def finish_soft_labels_task(plan: LabelPlan, shards: list[dict], *, teacher_meta: dict | None,
                            produced_by: dict) -> SoftLabels:
    """The manifest from the shard results (create-only, last), and the entry read back."""
    return finish_soft_labels(plan, shards, teacher_meta=teacher_meta, produced_by=produced_by)
