"""The evaluate stage: every model scored on its own on the same suites, the gap report published three ways, and
the edge folder completed with what evaluation learnt (scope.json, reference.json).

The gap report itself is distill_gap/evaluation/gap_report.py; the gates that read it are in gates.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.digest import folder_bytes, model_digest
from distill_gap.edge.folder import write_reference
from distill_gap.edge.guard import ScopeGuard
from distill_gap.evaluation.gap_report import (GapReport, add_calibration_and_ood, add_stress, collect_outputs,
                                               gap_report, load_predictors, report_metrics, scope_record)
from distill_gap.evaluation.noninferiority import add_champion_comparison, add_noninferiority
from distill_gap.evaluation.regions import add_regions
from distill_gap.evaluation.scope import add_scope
from distill_gap.evaluation.gates import evaluate_gates, quantization_gate
from distill_gap.governance.attestation import evaluate_statement
from distill_gap.monitoring.drift import reference_profile
from distill_gap.ops.transient import is_transient
from distill_gap.registry.presentation import describe_run
from tasks.attest import attest_task

_log = logging.getLogger("distill.evaluate")


def evaluate(models: dict[str, str | Path], splits, evaluate_cfg, drift_cfg, scope_cfg, *, seed: int,
             max_length: int, device: str, edge_model: str | None = None, edge_folder: str | Path | None = None,
             stress_models: list[str] | None = None, critical_slices: dict[str, list[str]] | None = None,
             champion: str | None = None, client=None, run_id: str | None = None, log=_log) -> GapReport:
    """Score teacher, student and each edge artifact independently on every suite; return the gap report.

    A model that cannot be loaded or returns the wrong number of classes is reported under `not_evaluated` and
    the others go on (the teacher is required). Stress suites run for `stress_models` (default: all). Every OOD
    detector is scored on each model's own logits and features; with `edge_folder`, the scope guard of
    `edge_model` (its primary artifact; `scope_cfg.detector`) and the drift reference are written into it from
    the outputs computed here; the folder sizes (report.sizes) are measured after that.
    """
    ev = evaluate_cfg
    start = time.perf_counter()
    # 1. one prediction per model and split (and a training sample, for the detectors); these feed everything below
    predictors, missing = load_predictors(models, max_length=max_length, device=device)
    logits, features, failed = collect_outputs(predictors, splits, batch_size=ev.batch_size,
                                               train_rows=scope_cfg.train_rows, seed=seed)
    # 2. the report: suites and slices with intervals, calibration, OOD detectors and the scope guard, stress
    report = gap_report(logits, splits, ev.gap_threshold, bootstrap_samples=ev.bootstrap_samples, seed=seed)
    report.not_evaluated += missing + failed
    add_calibration_and_ood(report, logits, splits, bootstrap_samples=ev.bootstrap_samples, seed=seed)
    add_noninferiority(report, logits, splits, ev, critical_slices=critical_slices, seed=seed)
    if champion is not None:  # `champion` (one of `models`): the model the edge model would replace
        add_champion_comparison(report, logits, splits, ev, champion=champion, edge_model=edge_model,
                                critical_slices=critical_slices, seed=seed)
    guards = add_scope(report, logits, features, splits, scope_cfg, bootstrap_samples=ev.bootstrap_samples, seed=seed)
    add_regions(report, logits, splits, scope_cfg, ev, seed=seed)  # which regions it may answer for, on what evidence
    add_stress(report, {m: (lambda texts, p=p: p.predict_logits(list(texts), batch_size=ev.batch_size))
                        for m, p in predictors.items() if m in logits}, splits,
               stress_models or list(logits), rows=ev.stress_rows, seed=seed)
    report.seconds = time.perf_counter() - start
    if client is not None:
        client.log_metric(run_id, "evaluate.seconds", report.seconds)
        for key, value in report_metrics(report).items():
            client.log_metric(run_id, key, value)
    for name in report.models:
        log.info("%s: test accuracy %.3f, macro-F1 %.3f", name, report.metric("test", name),
                 report.metric("test", name, "macro_f1"))
    for miss in report.not_evaluated:
        log.warning("not evaluated: %s on %s: %s", miss["model"], miss["suite"], miss["reason"])
    log.info("evaluation of %d models took %.1f s", len(report.models), report.seconds)
    # 3. what ships with the edge model (part of its digest): its scope guard, and the drift monitor's reference
    if edge_folder is not None:
        write_scope_and_reference(report, logits, features, guards.get(edge_model), splits, edge_model, edge_folder,
                                  sample_size=drift_cfg.sample_size, seed=seed, log=log)
    report.sizes = {name: folder_bytes(path) for name, path in models.items()}
    if client is not None:
        client.log_dict(run_id, report.sizes, "evaluation/sizes_bytes.json")
    return report


def write_scope_and_reference(report: GapReport, logits: dict, features: dict, guard: ScopeGuard | None, splits,
                              edge_model: str, edge_folder: str | Path, *, sample_size: int, seed: int,
                              log=_log) -> None:
    """scope.json + scope_stats.npz (the guard and its evidence) and reference.json (the reference profile on
    validation + test, with the guard's scores) in the edge folder, from the outputs the report was built on."""
    if edge_model not in logits:  # its gates fail with the reason (edge_evaluated); nothing to profile
        log.warning("no scope guard and no reference profile: %s was not evaluated", edge_model)
        return
    if guard is None:  # the reason is in report.not_evaluated; predict then refuses to run without --out-of-scope answer
        log.warning("no scope guard for %s: its detector could not be fitted", edge_model)
    else:
        guard.info = scope_record(report, edge_model, splits)
        guard.write(edge_folder)
    texts = [*splits["validation"]["text"].tolist(), *splits["test"]["text"].tolist()]
    edge_logits = np.concatenate([logits[edge_model]["validation"], logits[edge_model]["test"]])
    scores = None
    if guard is not None:
        f = features.get(edge_model, {})
        scores = np.concatenate([guard.score(logits[edge_model][s], f.get(s), splits[s]["text"].tolist())
                                 for s in ("validation", "test")])
    write_reference(edge_folder, reference_profile(texts, edge_logits, list(splits.labels),
                                                   scope_scores=scores,
                                                   scope_threshold=None if guard is None else guard.threshold,
                                                   sample_size=sample_size, seed=seed))


def champion_to_compare(run, log=_log) -> tuple[str, Path] | None:
    """(report name `champion-v<N>`, its primary artifact's folder) of the edge model's @champion, fetched and
    digest-checked like any served model; None when there is no champion yet."""
    from distill_gap.edge.lean import read_manifest
    from distill_gap.errors import DistillError
    from distill_gap.registry.versions import fetch_model, resolve_version

    try:
        mv = resolve_version(run.client, run.edge_model_name, alias="champion")
    except DistillError as err:
        if is_transient(err):
            raise
        log.info("no @champion of %s yet: nothing to compare with", run.edge_model_name)
        return None
    ref = fetch_model(run.client, run.edge_model_name, version=int(mv.version), cache_root=run.workdir / "champion",
                      mv=mv)
    manifest = read_manifest(ref.path)
    log.info("comparing with the champion it would replace: %s v%s (%s)", run.edge_model_name, mv.version,
             manifest["primary"])
    return f"champion-v{mv.version}", Path(ref.path) / manifest["artifacts"][manifest["primary"]]["path"]


def edge_parity(artifact: dict) -> dict:
    """What the agreement gate reads: the argmax agreement with the fp32 student on the quantize stage's unlabelled
    agreement sample (hundreds of rows, issue 19) where it was measured, else on the validation rows."""
    parity, v = artifact["parity"], artifact.get("validation") or {}
    if v.get("agreement") is None:
        return parity
    return {**parity, "argmax_agreement": v["agreement"], "n": v["agreement_n"],
            "where": f"{v['agreement_n']} unlabelled training texts (the quantize stage's agreement sample)"}


def publish_report(report: GapReport, gates: dict[str, dict], name: str, *, edge: str | None = None,
                   links: dict[str, str] | None = None, client=None, run_id: str | None = None) -> dict:
    """The gap report three ways: Prefect markdown (verdict, what the shipped `edge` model loses, links: `links`
    name -> URL, e.g. the HTML report in the MLflow UI) + table artifacts (3 decimals), HTML with plots and JSON
    in MLflow."""
    import json
    import tempfile

    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    title = f"Gap report: {name} (teacher vs compressed models)"
    md = report.markdown(title, edge=edge, gates=gates, links=links)
    create_markdown_artifact(key=f"{name}-gap-report", markdown=md, description=f"Evaluation parity for {name}")
    table = [{"suite": suite, "model": m, "n": v.get("n"), "accuracy": _round(v.get("accuracy")),
              "low": _round(((v.get("ci") or {}).get("accuracy") or {}).get("low")),
              "high": _round(((v.get("ci") or {}).get("accuracy") or {}).get("high")),
              "gap_vs_teacher": _round(v["accuracy"] - by_model["teacher"]["accuracy"])
              if "accuracy" in v and "accuracy" in by_model.get("teacher", {}) else None,
              "fidelity": _round(v.get("fidelity")), "kl_teacher": _round(v.get("kl_teacher"))}
             for suite, by_model in report.suites.items() for m, v in by_model.items()]
    create_table_artifact(key=f"{name}-gap-table", table=table, description=f"Per-suite metrics of {name}")
    data = {**report.to_dict(), "gates": gates, "seconds": report.seconds}
    html = None
    try:
        from distill_gap.evaluation.html_report import render_html

        html = render_html(report.to_dict(), title=title, gates=gates, edge=edge)
    except ImportError:  # matplotlib missing: the markdown and JSON still go out
        pass
    if client is not None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "gap_report.md").write_text(md)
            (Path(tmp) / "gap_report.json").write_text(json.dumps(data, indent=2, default=str))
            if html:
                (Path(tmp) / "gap_report.html").write_text(html)
            client.log_artifacts(run_id, tmp, "evaluation")
    return data


def _round(x: float | None) -> float | None:
    """3 decimals for people (the table artifact); the JSON keeps every digit."""
    return None if x is None else round(float(x), 3) + 0.0


@step("evaluate", cache_policy=NO_CACHE)
def evaluate_task(run, evaluate_cfg, drift_cfg, scope_cfg, *, teacher, student, edge, splits, critical_slices: dict[str, list],
                  require_int8: bool, max_length: int, seed: int,
                  against_champion: bool = False) -> tuple[GapReport, dict[str, dict], object]:
    """The run's `evaluate` stage: every model scored on its own (see `evaluate`), the gates, the gap report
    published, the step attested. Returns (report, gates, edge) with the edge folder's digest taken again, since
    scope.json and reference.json are part of it now. `against_champion` (a redistillation): the champion it would
    replace is evaluated beside it on every suite and compared with it (vs_champion gates)."""
    from prefect.logging import get_run_logger

    models = {"teacher": teacher.path, "student": student.path}
    if student.baseline is not None:
        models["student-hard"] = student.baseline.path  # what distillation bought, in the same report
    for art in edge.artifacts.values():
        models.setdefault(art["report_name"], edge.path / art["path"])
    with run.stage("evaluate") as stage_run_id:
        champion = champion_to_compare(run, get_run_logger()) if against_champion else None
        if champion is not None:
            models[champion[0]] = champion[1]
        report = evaluate(models, splits, evaluate_cfg, drift_cfg, scope_cfg, seed=seed, max_length=max_length, device=run.device,
                          edge_model=edge.report_name, edge_folder=edge.path, critical_slices=critical_slices,
                          champion=champion and champion[0],
                          stress_models=None if champion is None else [m for m in models if m != champion[0]],
                          client=run.client, run_id=stage_run_id, log=get_run_logger())
        edge = dataclasses.replace(edge, digest=model_digest(edge.path))
        gates = evaluate_gates(report, edge.report_name, edge_parity(edge.artifacts[edge.primary]), evaluate_cfg,
                               quantization=quantization_gate(edge, require_int8), critical_slices=critical_slices)
        gap_link = run.mlflow_url(stage_run_id, "evaluation/gap_report.html")  # absolute: read in Prefect
        publish_report(report, gates, run.name, edge=edge.report_name,
                       links={"Gap report with plots (MLflow)": gap_link}, client=run.client, run_id=stage_run_id)
    # the pipeline run's page: verdict, flagged slices, headline metrics (the dossier link follows at registration)
    describe_run(run.client, run.run_id, report, gates, edge.report_name, links=run.links(evaluate_run=stage_run_id))
    digests = {"teacher": teacher.digest, "student": student.digest,
               **({"student-hard": student.baseline.digest} if student.baseline is not None else {}),
               **{a["report_name"]: a["digest"] for a in edge.artifacts.values()}}  # taken once, when built
    attest_task(run, evaluate_statement(evaluate_cfg, scope_cfg, critical_slices=critical_slices,
                                        edge_model_name=run.edge_model_name, report=report, gates=gates,
                                        edge_digest=edge.digest, model_digests=digests, splits=splits,
                                        context=run.context, edge_report_name=edge.report_name))
    return report, gates, edge


