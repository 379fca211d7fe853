"""Stage: the size sweep (issue 21), the distill stage of a run with sweep.enabled. Every candidate of the ladder
(sweep.candidates: changes to the distill section) is trained on the run's one set of soft labels as its own
`sweep-<name>` task and nested MLflow run under the `sweep` stage run, quantized and evaluated as the quantize and
evaluate stages will (the artifact judged is the one that would ship) and judged by every release gate, and the
smallest candidate that holds goes on through quantization as the run's student (distill_gap/kd/sweep.py decides;
the report shows every candidate and the Pareto front). Candidates run one at a time here or on Dask
(sweep.task_runner), with no change to the code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distill_gap.errors import DistillError
from distill_gap.governance.attestation import distill_statement
from distill_gap.kd.sweep import (choose, failed_candidate, summarize, sweep_markdown, sweep_plot,
                                  why_not)
from distill_gap.ops.task_runners import task_runner
from tasks.attest import attest_task
from tasks.distill import distill, student_seed


def labelled_test_rows(splits) -> dict:
    """The labelled test rows every candidate's latency and accuracy are measured on (texts, class ids); the
    teacher's own answers come from each candidate's evaluation, which scores the teacher beside it."""
    test = splits["test"]
    truth = test["label"].map({label: i for i, label in enumerate(splits.labels)}).to_numpy(dtype=float)
    known = ~np.isnan(truth)
    if not known.any():
        raise DistillError("the size sweep compares candidates with the teacher on labelled test rows, and the test "
                           "split has none", "give data.test labelled rows, or set sweep.enabled false")
    return {"texts": test["text"][known].tolist(), "truth": truth[known].astype(int)}


def _weights_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6


def train_candidate(name: str, distill_cfg, changes: dict, *, teacher_dir, splits, soft, reference: dict,
                    evaluate_cfg, quantize_cfg, drift_cfg, scope_cfg, critical_slices: dict[str, list],
                    max_length: int, seed: int, device: str, threads: int | None, workdir: Path, tracking_uri: str,
                    parent_run_id: str, run_name: str, log=None) -> dict:
    """Train one candidate in its own nested MLflow run, quantize it as the quantize stage will (same config, seed
    and samples: the same primary artifact), evaluate that artifact, the one that would ship, beside the teacher and
    its fp32 student as the evaluate stage does, and judge it by every promotion gate (evaluate_gates: the
    non-inferiority checks, edge vs student, OOD and the scope guard, calibration, stress, quantization). Returns its
    summary row (distill_gap.kd.sweep.summarize; size: the primary's bytes) and the trained StudentResult."""
    from mlflow import MlflowClient

    from distill_gap.evaluation.gates import evaluate_gates, quantization_gate
    from distill_gap.inference.predictor import load_predictor
    from distill_gap.ops.runtime import configure_threads
    from distill_gap.registry.tracking import mlflow_run
    from tasks.evaluate import edge_parity, evaluate
    from tasks.quantize import quantize_samples, quantize_stage

    configure_threads(threads)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with mlflow_run(client, parent_run_id=parent_run_id, run_name=run_name,
                    tags={"distill.stage": "sweep-candidate", "distill.candidate": name}) as run_id:
        client.log_param(run_id, "candidate.changes", json.dumps(changes, sort_keys=True)[:6000])
        student = distill(teacher_dir, splits, soft, distill_cfg, workdir, critical_slices=critical_slices,
                          max_length=max_length, seed=seed, device=device, client=client, run_id=run_id,
                          **({"log": log} if log is not None else {}))
        train, val = splits["train"], splits["validation"]
        calibration, agreement = quantize_samples(train, quantize_cfg, seed=seed)
        edge = quantize_stage(student.path, Path(workdir) / "edge", calibration_texts=calibration,
                              val_texts=val["text"].tolist(), qcfg=quantize_cfg, max_length=max_length, seed=seed,
                              val_label_ids=val["label"].map({k: i for i, k in enumerate(splits.labels)}).to_numpy(),
                              min_agreement=evaluate_cfg.min_edge_agreement, agreement_texts=agreement,
                              log=(log.info if log is not None else print))
        primary = edge.artifacts[edge.primary]
        predictor = load_predictor(edge.path / primary["path"], max_length=max_length, device=device)
        predictor.predict_logits(reference["texts"][:32], batch_size=32)  # untimed: allocation, kernel selection
        start = time.perf_counter()
        pred = predictor.predict_logits(reference["texts"], batch_size=32).argmax(-1)
        latency_ms = (time.perf_counter() - start) * 1000 / len(reference["texts"])
        report = evaluate({"teacher": teacher_dir, "student": student.path,
                           primary["report_name"]: edge.path / primary["path"]}, splits, evaluate_cfg, drift_cfg,
                          scope_cfg, seed=seed, max_length=max_length, device=device,
                          edge_model=primary["report_name"], critical_slices=critical_slices,
                          **({"log": log} if log is not None else {}))
        gates = evaluate_gates(report, primary["report_name"], edge_parity(primary), evaluate_cfg,
                               quantization=quantization_gate(edge, quantize_cfg.require_int8),
                               critical_slices=critical_slices)
        row = summarize(name, gates, accuracy=float((pred == reference["truth"]).mean()),
                        parameters=student.parameters, size_mb=primary["size_bytes"] / 1e6, latency_ms=latency_ms,
                        run_id=run_id, student={"spec": student.spec, "vocab": student.vocab,
                                                "pruning": student.pruning, "best_epoch": student.best_epoch,
                                                "edge": edge.primary, "edge_ok": edge.primary_ok,
                                                "fp32_mb": _weights_mb(student.path)})
        row["teacher_accuracy"] = report.metric("test", "teacher")
        for key in ("accuracy", "parameters", "size_mb", "latency_ms", "worst_slice_drop"):
            if row[key] is not None:
                client.log_metric(run_id, f"sweep.{key}", row[key])
        client.set_tag(run_id, "distill.sweep.outcome", row["outcome"])
        client.log_dict(run_id, gates, "sweep/gates.json")
    return {"row": row, "student": student}


@task(name="sweep-candidate", task_run_name="sweep-{name}", cache_policy=NO_CACHE)
def sweep_candidate_task(name: str, distill_cfg, changes: dict, *, teacher_dir, splits, soft, reference: dict,
                         evaluate_cfg, quantize_cfg, drift_cfg, scope_cfg, critical_slices: dict[str, list],
                         max_length: int, seed: int, device: str,
                         threads: int | None, workdir: Path, tracking_uri: str, parent_run_id: str,
                         run_name: str) -> dict:
    """One candidate of the ladder (never retried: training is not idempotent). Every parameter is named: Prefect's
    task runners map parameters by name."""
    return train_candidate(name, distill_cfg, changes, teacher_dir=teacher_dir, splits=splits, soft=soft,
                           reference=reference, evaluate_cfg=evaluate_cfg, quantize_cfg=quantize_cfg,
                           drift_cfg=drift_cfg, scope_cfg=scope_cfg, critical_slices=critical_slices,
                           max_length=max_length, seed=seed, device=device, threads=threads, workdir=workdir,
                           tracking_uri=tracking_uri, parent_run_id=parent_run_id, run_name=run_name,
                           log=get_run_logger())


def _report(run, stage_run_id: str, rows: list[dict], chosen: dict | None, *, teacher_accuracy: float,
            minutes: float) -> str:
    """The sweep report as a Prefect markdown artifact `<name>-size-sweep` and, with its plot, in the sweep
    stage's MLflow run (sweep/report.md, sweep/pareto.png, sweep/candidates.json)."""
    import tempfile

    from prefect.artifacts import create_markdown_artifact

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "pareto.png"
        png.write_bytes(sweep_plot(rows, chosen, teacher_accuracy=teacher_accuracy))
        run.client.log_artifact(stage_run_id, str(png), "sweep")
    md = sweep_markdown(rows, chosen, teacher_accuracy=teacher_accuracy, minutes=minutes,
                        plot_link=run.mlflow_url(stage_run_id, "sweep/pareto.png"))
    run.client.log_text(stage_run_id, md, "sweep/report.md")
    run.client.log_dict(stage_run_id, [{k: v for k, v in r.items() if k != "gates"} for r in rows],
                        "sweep/candidates.json")
    create_markdown_artifact(key=f"{run.name}-size-sweep", markdown=md,
                             description=f"Size sweep of {run.name}: every candidate against the teacher")
    return md


def sweep(run, sweep_cfg, distill_cfg, evaluate_cfg, quantize_cfg, *, drift_cfg, scope_cfg, teacher, soft, splits,
          critical_slices: dict[str, list], max_length: int, seed: int):
    """(the run's student chosen by the size sweep (a StudentResult, attested like the distill stage's, naming the
    candidates), the quantize section it was judged with (the run's, with the candidate's `quantize` changes)), or a
    DistillError when no candidate holds: the candidates' runs keep the evidence, nothing goes on.
    Call it from inside a flow: it submits the stage's tasks."""
    from prefect.utilities.annotations import unmapped

    log = get_run_logger()
    candidates = sweep_cfg.resolve(distill_cfg, quantize_cfg)
    changes = {c.name: {**c.distill, **({"quantize": c.quantize} if c.quantize else {})} for c in sweep_cfg.candidates}
    start = time.time()
    with run.stage("sweep") as stage_run_id:
        reference = labelled_test_rows(splits)
        local_dask = sweep_cfg.task_runner == "dask" and not sweep_cfg.dask_address
        threads = max(1, (run.threads or 2) // sweep_cfg.dask_workers) if local_dask else run.threads
        names = [name for name, _, _ in candidates]
        log.info(f"size sweep: {len(names)} candidates ({', '.join(names)}) on the {sweep_cfg.task_runner} task "
                 f"runner, each judged by every release gate ({len(reference['truth'])} labelled test rows)")
        common = dict(teacher_dir=unmapped(str(teacher.path)), splits=unmapped(splits), soft=unmapped(soft),
                      reference=unmapped(reference), evaluate_cfg=unmapped(evaluate_cfg), drift_cfg=unmapped(drift_cfg),
                      scope_cfg=unmapped(scope_cfg),
                      critical_slices=unmapped(critical_slices), max_length=unmapped(max_length),
                      seed=unmapped(seed), device=unmapped(run.device), threads=unmapped(threads),
                      tracking_uri=unmapped(run.client._tracking_client.tracking_uri),
                      parent_run_id=unmapped(stage_run_id))
        with task_runner(sweep_cfg.task_runner, dask_address=sweep_cfg.dask_address,
                         dask_workers=sweep_cfg.dask_workers, setting="sweep.task_runner") as runner:
            futures = runner.map(sweep_candidate_task, {
                "name": names, "distill_cfg": [d for _, d, _ in candidates],
                "quantize_cfg": [q for _, _, q in candidates],
                "changes": [changes[n] for n in names],
                "workdir": [run.workdir / "sweep" / n for n in names],
                "run_name": [f"{run.name}-sweep-{n}" for n in names], **common})
            outcomes = []
            for name, future in zip(names, futures):
                try:
                    outcomes.append(future.result())
                except Exception as err:  # noqa: BLE001 - one broken candidate is a row of the report, not the end
                    log.warning(f"sweep candidate {name} could not be trained: {err}")
                    why = str(err).splitlines()[0] if isinstance(err, DistillError) else f"{type(err).__name__}: {err}"
                    outcomes.append({"row": failed_candidate(name, why[:300]), "student": None})
        rows = [o["row"] for o in outcomes]
        chosen = choose(rows)
        teacher_accuracy = next((r["teacher_accuracy"] for r in rows if r.get("teacher_accuracy") is not None),
                                float("nan"))  # the same test rows in every candidate's evaluation
        minutes = (time.time() - start) / 60
        md = _report(run, stage_run_id, rows, chosen, teacher_accuracy=teacher_accuracy, minutes=minutes)
        run.client.log_metric(stage_run_id, "sweep.minutes", minutes)
        run.client.log_metric(stage_run_id, "sweep.candidates", len(rows))
        if chosen is not None:
            run.client.log_metric(stage_run_id, "sweep.chosen_parameters", chosen["parameters"])
            run.client.set_tag(stage_run_id, "distill.sweep.chosen", chosen["name"])
        log.info(md.split("\n", 1)[0].replace("**", ""))
        if chosen is None:  # inside the stage: its MLflow run is FAILED, with the report and every candidate's run
            raise DistillError(f"size sweep: none of the {len(rows)} candidates holds against the teacher ("
                               + "; ".join(f"{r['name']}: {why_not(r)}" for r in rows) + "); nothing goes on",
                               "read the size-sweep report (Prefect artifact "
                               f"{run.name}-size-sweep, MLflow run {run.name}-sweep): add larger candidates, "
                               "more training (epochs, distill.augment), or lighter cuts (vocab floor, prune ratios)")
    student = next(o["student"] for o in outcomes if o["row"]["name"] == chosen["name"])
    chosen_cfg, chosen_quantize = next((d, q) for n, d, q in candidates if n == chosen["name"])
    log.info(f"size sweep: {chosen['name']} goes on as the student ({student.path})")
    attest_task(run, distill_statement(chosen_cfg, seed=student_seed(chosen_cfg, seed),
                                       student_model_name=run.student_model_name,
                                       student=student, soft=soft, teacher=teacher, splits=splits,
                                       context=run.context,
                                       sweep={"chosen": chosen["name"], "chosen_by": "test split, every release "
                                              "gate; the smallest edge artifact with none failed",
                                              "candidates": [{k: r[k] for k in ("name", "parameters", "accuracy",
                                                                                "outcome")} for r in rows]}))
    return student, chosen_quantize
