"""Issue 6 figure: the full evaluation of the demo (teacher, student, edge; all suites, bootstrap) on 2 cores.

Runs the pipeline's own evaluate step (tasks.evaluate.evaluate, the function the `evaluate` task calls; it needs no
flow context) on the demo's registered models: demo-teacher@pinned, the newest demo-student and the demo-edge version
made from it (its primary artifact). Three repetitions; the median wall time is `eval_seconds`. The OOD keys are the
held-out conditions suite (data.holdout), by MSP and by the edge model's shipped scope detector. Needs `make demo`.

    .venv/bin/python benchmarks/evaluation.py
writes benchmarks/results/evaluation.json (flat) and .distill/bench/evaluation_report.json (the whole report).

Issue 19's keys: gates_outcome, gates_failed, gates_insufficient, rows_needed_max (the most labelled rows an undecided
gate needs at its observed drop) and quantize_choice_stable: the INT8 primary the quantize stage's accuracy goal
picks, re-decided on 5 seeds of its unlabelled agreement sample (quantize_choices), is the same every time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402

apply_embedded_env({"DISTILL_PROGRESS": "0", "PREFECT_LOGGING_LEVEL": "WARNING"})

REPEATS = 3
OUT = ROOT / "benchmarks" / "results"


def _models(cfg):
    """teacher / student / edge-primary folders of the newest demo run, digests verified by fetch_model."""
    from distill_gap.edge.folder import read_manifest
    from distill_gap.errors import DistillError
    from distill_gap.registry.tracking import client_for
    from distill_gap.registry.versions import fetch_model

    client = client_for(cfg.tracking)
    try:
        teacher = fetch_model(client, cfg.teacher_model_name, alias=cfg.teacher.alias)
        students = client.search_model_versions(f"name='{cfg.student_model_name}'")
        student_v = max(int(v.version) for v in students)
        edges = [v for v in client.search_model_versions(f"name='{cfg.edge_model_name}'")
                 if v.tags.get("parent") == f"{cfg.student_model_name}/{student_v}"]
        if not edges:
            raise DistillError(f"no {cfg.edge_model_name} version made from {cfg.student_model_name} v{student_v}",
                               "run `make demo`")
        student = fetch_model(client, cfg.student_model_name, version=student_v)
        edge = fetch_model(client, cfg.edge_model_name, version=int(edges[0].version))
    except DistillError as err:
        sys.exit(f"{err}\nrun `make demo` first: this benchmark evaluates the demo's registered models")
    manifest = read_manifest(edge.path)
    primary = manifest["artifacts"][manifest["primary"]]
    name = primary.get("report_name") or {"int8": "student-int8", "onnx-int8": "student-onnx-int8",
                                          "onnx": "student-onnx", "fp32": "student-fp32-edge"}[manifest["primary"]]
    return {"teacher": teacher.path, "student": student.path, name: edge.path / primary["path"]}, name, \
        {"teacher": teacher.version, "student": student.version, "edge": edge.version}, edge.path


SEEDS = (13, 14, 15, 16, 17)  # agreement samples for quantize_choice_stable


def choice_per_seed(cfg, splits, student_dir, edge_dir) -> list[str]:
    """The INT8 primary the quantize stage's decision would pick on each of SEEDS' unlabelled agreement samples,
    with every other input as the stage had it (the artifacts of the registered edge folder, the validation rows,
    the batch checks recorded in edge.json): noninferiority.accuracy_goal + the stage's order (quantize.primary)."""
    from distill_gap.edge.folder import EDGE_ARTIFACTS, read_manifest
    from distill_gap.evaluation.noninferiority import accuracy_goal
    from distill_gap.inference.predictor import load_predictor
    from tasks.quantize import primary_order, quantize_samples

    manifest = read_manifest(edge_dir)
    q, val = cfg.quantize, splits["validation"]
    label_ids = val["label"].map({lab: i for i, lab in enumerate(splits.labels)}).to_numpy()
    student = load_predictor(student_dir, runtime="transformers", max_length=cfg.runtime.max_length)
    models = {a: load_predictor(Path(edge_dir) / a, runtime=EDGE_ARTIFACTS[a][0], max_length=cfg.runtime.max_length)
              for a in ("onnx-int8", "int8") if a in manifest["artifacts"]}
    val_texts = val["text"].tolist()
    ref_val = student.predict_logits(val_texts)
    val_out = {a: m.predict_logits(val_texts) for a, m in models.items()}
    choices = []
    for seed in SEEDS:
        texts = quantize_samples(splits["train"], q, seed=cfg.seed, agreement_seed=seed)[1]
        ref = student.predict_logits(texts)
        ok = {a: accuracy_goal(ref_val, val_out[a], label_ids, tolerable_loss=q.tolerable_loss, reference_sample=ref,
                               candidate_sample=m.predict_logits(texts),
                               min_agreement=cfg.evaluate.min_edge_agreement)["met_goal"]
              and (manifest["artifacts"][a].get("batch_independence") or {}).get("ok", True)
              for a, m in models.items()}
        choices.append(next((a for a in primary_order(q) if ok.get(a)), "none"))
        print(f"agreement sample seed {seed}: {choices[-1]} ({', '.join(f'{a} {v}' for a, v in ok.items())})",
              file=sys.stderr)
    return choices


def main() -> None:
    from flows.config import load_config
    from tasks.data import load_data
    from distill_gap.evaluation.gates import evaluate_gates
    from distill_gap.outcomes import FAIL, INSUFFICIENT, by_outcome, overall_outcome
    from tasks.evaluate import evaluate
    from distill_gap.ops.runtime import configure_threads

    cfg = load_config("configs/demo.yaml")
    configure_threads(2)
    splits = load_data(cfg.data, cfg.seed)  # a Prefect task, called outside a flow (its own task run on the API)
    models, edge_name, versions, edge_dir = _models(cfg)

    seconds, report = [], None
    for i in range(REPEATS):
        # no edge_folder: the fetched versions are digest-checked cache folders, scope and reference stay as shipped
        report = evaluate(models, splits, cfg.evaluate, cfg.drift, cfg.scope, seed=cfg.seed,
                          max_length=cfg.runtime.max_length, device="cpu", edge_model=edge_name,
                          stress_models=list(models), critical_slices=cfg.data.critical_slices)
        seconds.append(report.seconds)
        print(f"run {i + 1}/{REPEATS}: {report.seconds:.1f} s", file=sys.stderr)
    choices = choice_per_seed(cfg, splits, models["student"], edge_dir)
    worst = report.worst_slices("student", k=3)
    ood = f"ood:{cfg.data.holdout.name}" if cfg.data.holdout is not None else next(iter(report.ood))
    detector = (report.scope.get(edge_name) or {}).get("detector", "msp")  # the edge model's shipped guard
    gates = evaluate_gates(report, edge_name, {"argmax_agreement": 1.0}, cfg.evaluate,
                           critical_slices=cfg.data.critical_slices)
    result = {
        "eval_seconds": statistics.median(seconds),
        "eval_seconds_runs": ",".join(f"{s:.1f}" for s in seconds),
        "worst_slice": worst[0][0].removeprefix("slice:") if worst else None,
        "worst_slice_gap_points": round(100 * worst[0][1], 2) if worst else None,
        "worst_slice_n": report.suites[worst[0][0]]["student"]["n"] if worst else None,
        "student_ood_auroc": report.ood[ood]["student"]["msp"]["auroc"],
        "teacher_ood_auroc": report.ood[ood]["teacher"]["msp"]["auroc"],
        "edge_ood_auroc": report.ood[ood][edge_name]["msp"]["auroc"],
        "edge_scope_auroc_near": report.ood[ood][edge_name][detector]["auroc"],
        "teacher_scope_auroc_near": report.ood[ood]["teacher"][detector]["auroc"],
        "scope_detector": detector,
        "edge_model": edge_name,
        "ood_set": ood,
        "models": len(report.models),
        "suites": len(report.suites),
        "stress_variants": len(report.stress),
        "bootstrap_samples": cfg.evaluate.bootstrap_samples,
        "student_ece_after": report.calibration["student"]["ece_after"],
        "teacher_ece_after": report.calibration["teacher"]["ece_after"],
        "gates_failed": ",".join(by_outcome(gates, FAIL)),
        "gates_insufficient": ",".join(by_outcome(gates, INSUFFICIENT)),
        "gates_outcome": overall_outcome(gates),
        # the most labelled rows any undecided gate needs at its observed drop (issue 19's power calculation)
        "rows_needed_max": max([g["rows_needed"] for g in gates.values() if g.get("rows_needed")] or [0]),
        "versions": json.dumps(versions),
        "quantize_choices": ",".join(choices),
        "quantize_choice_stable": len(set(choices)) == 1,
        "cpu_threads": 2,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "evaluation.json").write_text(json.dumps(result, indent=2))
    full = ROOT / ".distill" / "bench" / "evaluation_report.json"  # 0.6 MB: kept out of the repository
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(json.dumps({**report.to_dict(), "gates": gates}, indent=2, default=str))
    print(f"{'key':<28} value")
    for k, v in result.items():
        print(f"{k:<28} {v:.4f}" if isinstance(v, float) else f"{k:<28} {v}")
    print("largest slice losses of the student:", ", ".join(f"{s.removeprefix('slice:')} {100 * g:+.1f} pts"
                                                              for s, g in worst))


if __name__ == "__main__":
    main()
