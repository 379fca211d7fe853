"""Drift monitor benchmark: read 100,000 production rows and build the drift report on 2 cores (target: <= 60 s).

    .venv/bin/python benchmarks/drift.py

The model is the registered demo edge version (models:/demo-edge@champion, else @challenger: benchmarks/demo_edge.py;
in sqlite:///.distill/mlflow.db, digest verified), using its ONNX Runtime INT8 artifact when the edge folder has one (DRIFT_BENCH_ARTIFACT=<name> picks
another, e.g. int8 for the INC primary); without a demo run, an untrained tiny BERT from distill_gap.models.from_scratch (the output
says which). The reference profile is built from the demo's validation + test texts; the production sample is
100,000 real in-scope reviews resampled with seeded light perturbations (distill_gap.evaluation.stress variants) and a week of
timestamps, written to .distill/bench/drift/production.jsonl. Each run times read_production_rows + drift_report
(2,000 rows scored); the median of REPEATS runs is `drift_monitor_seconds_100k` in benchmarks/results/drift.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402

apply_embedded_env({"DISTILL_PROGRESS": "0", "PREFECT_LOGGING_LEVEL": "WARNING"})

import numpy as np  # noqa: E402

REPEATS = 3
ROWS = 100_000
SAMPLE_SIZE = 2000
THREADS = 2
TARGET_S = 60.0
TRACKING_URI = "sqlite:///.distill/mlflow.db"
SCRATCH = ROOT / ".distill" / "bench" / "drift"
OUT = ROOT / "benchmarks" / "results" / "drift.json"
# share of production rows given each light perturbation (the rest are the reviews as they are)
PERTURB = {"typos": 0.05, "casing": 0.05, "whitespace": 0.05, "punctuation": 0.05}


def log(msg: str) -> None:
    print(f"[drift] {msg}", file=sys.stderr, flush=True)


def load_model(splits):
    """(predict_logits, labels, scope threshold or None, description): the demo edge version, else a scratch BERT."""
    from benchmarks.demo_edge import demo_edge_uri
    from distill_gap.errors import DistillError

    uri = demo_edge_uri(TRACKING_URI)
    try:
        if uri is None:
            raise DistillError(f"no demo-edge @champion or @challenger in {TRACKING_URI}", "run `make demo` first")
        from distill_gap.edge.folder import read_manifest
        from distill_gap.edge.serving import load_edge
        from distill_gap.registry.model_uri import resolve_edge

        said = []
        folder = resolve_edge(uri, TRACKING_URI, log=said.append)
        manifest = read_manifest(folder)
        artifact = os.environ.get("DRIFT_BENCH_ARTIFACT") or ("onnx-int8" if "onnx-int8" in manifest["artifacts"]
                                                               else manifest["primary"])
        edge = load_edge(folder, artifact)
        # this benchmark scores MSP; the shipped threshold applies only when the guard is an MSP guard
        guard = edge.guard
        scope = guard.threshold if guard is not None and guard.detector == "msp" else None
        return edge.predict_logits, edge.labels, scope, \
            f"{said[0].split(':')[0]}, artifact {artifact} ({edge.runtime}; primary {manifest['primary']})"
    except DistillError as err:
        log(f"no demo edge model ({err.problem}); using an untrained tiny BERT from distill_gap.models.from_scratch")
    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier
    from distill_gap.models.from_scratch import build_scratch_classifier

    model, tokenizer = load_classifier(build_scratch_classifier(splits["train"]["text"].tolist(), splits.labels,
                                                                SCRATCH / "scratch-model", seed=0))
    return (lambda texts: predict_logits(model, tokenizer, texts, max_length=128)), splits.labels, None, \
        "scratch BERT (hidden 32, 2 layers, untrained; no demo edge champion registered)"


def write_production(splits, path: Path, seed: int = 0) -> None:
    """ROWS real in-scope reviews, resampled with seeded light perturbations, a week of timestamps, label + condition."""
    import orjson
    import pandas as pd

    from distill_gap.evaluation.stress import stress_variants

    pool = pd.concat([splits["train"], splits["validation"], splits["test"]], ignore_index=True)
    variants = {"clean": pool["text"].tolist(), **stress_variants(pool["text"].tolist(), seed=seed)}
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(pool), ROWS)
    names = list(PERTURB) + ["clean"]
    kind = rng.choice(len(names), size=ROWS, p=list(PERTURB.values()) + [1 - sum(PERTURB.values())])
    start = np.datetime64("2026-11-15T00:00:00")
    seconds = np.sort(rng.integers(0, 7 * 86400, ROWS))
    label, condition = pool["label"].tolist(), pool["condition"].tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i, (row, k, s) in enumerate(zip(pick, kind, seconds)):
            f.write(orjson.dumps({"id": f"p{i}", "text": variants[names[k]][row], "label": label[row],
                                  "condition": condition[row],
                                  "timestamp": f"{start + np.timedelta64(int(s), 's')}Z"}) + b"\n")


def main() -> None:
    from flows.config import load_config
    from distill_gap.data.splits import load_splits
    from distill_gap.monitoring.drift import DriftThresholds, drift_markdown, drift_report, read_production_rows, reference_profile
    from distill_gap.evaluation.ood import msp_score, threshold_at_tpr
    from distill_gap.ops.runtime import configure_threads

    configure_threads(THREADS)
    cfg = load_config("configs/demo.yaml")
    splits = load_splits(cfg.data, cfg.seed)
    predict, labels, scope, model_name = load_model(splits)
    log(f"model: {model_name}")

    t0 = time.perf_counter()
    val_logits, test_logits = predict(splits["validation"]["text"].tolist()), predict(splits["test"]["text"].tolist())
    scope_source = "scope.json"
    if scope is None:  # as the pipeline does: the MSP threshold keeping 95% of validation rows in scope
        scope, scope_source = threshold_at_tpr(msp_score(val_logits), 0.95), "fitted here at 95% TPR on validation"
    reference = reference_profile(splits["validation"]["text"].tolist() + splits["test"]["text"].tolist(),
                                  np.vstack([val_logits, test_logits]), labels, scope_threshold=scope)
    log(f"reference profile: {reference['n']} validation + test rows, {time.perf_counter() - t0:.1f} s; "
        f"scope threshold {scope:.4f} ({scope_source})")

    path = SCRATCH / "production.jsonl"
    t0 = time.perf_counter()
    write_production(splits, path)
    log(f"production sample: {ROWS:,} rows, {path.stat().st_size / 1e6:.1f} MB, written in {time.perf_counter() - t0:.1f} s")

    runs, report = [], None
    for i in range(REPEATS):
        t0 = time.perf_counter()
        prod = read_production_rows(str(path))
        t_read = time.perf_counter() - t0
        report = drift_report(reference, prod, predict, labels, thresholds=DriftThresholds(), scope_threshold=scope,
                              sample_size=SAMPLE_SIZE, seed=i)
        total = time.perf_counter() - t0
        runs.append({"total": total, "read": t_read, "report": report["seconds"], "model": report["model_seconds"]})
        log(f"run {i + 1}/{REPEATS}: {total:.1f} s (read {t_read:.1f}, report {report['seconds']:.1f}, "
            f"of which model {report['model_seconds']:.1f}); load average {os.getloadavg()[0]:.2f}")

    totals = [r["total"] for r in runs]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    result = {
        "drift_monitor_seconds_100k": statistics.median(totals),
        "drift_monitor_seconds_min": min(totals),
        "drift_monitor_seconds_max": max(totals),
        "drift_monitor_seconds_runs": ",".join(f"{t:.1f}" for t in totals),
        "runs": REPEATS,
        "target_seconds": TARGET_S,
        "met_target": statistics.median(totals) <= TARGET_S,
        "read_seconds_median": med("read"),
        "report_seconds_median": med("report"),
        "model_seconds_median": med("model"),
        "rows": report["rows"],
        "rows_scored": report["scored"],
        "model": model_name,
        "reference_rows": reference["n"],
        "scope_threshold": scope,
        "scope_threshold_source": scope_source,
        "drifted": report["drifted"],
        "reasons": " | ".join(report["reasons"]),
        "prediction_psi": report["prediction"]["psi"],
        "prediction_js": report["prediction"]["js"],
        "out_of_scope_increase": report["scope"]["increase"],
        "accuracy_scored_rows": report["accuracy"]["accuracy"] if report["accuracy"] else None,
        "cpu_threads": THREADS,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    (SCRATCH / "report.md").write_text(drift_markdown(report))
    print(f"{'run':<6} {'total s':>8} {'read s':>8} {'report s':>9} {'model s':>8}")
    for i, r in enumerate(runs, 1):
        print(f"{i:<6} {r['total']:>8.1f} {r['read']:>8.1f} {r['report']:>9.1f} {r['model']:>8.1f}")
    print()
    for k, v in result.items():
        print(f"{k:<30} {v:.4f}" if isinstance(v, float) else f"{k:<30} {v}")
    print(f"\nmarkdown report of the last run: {SCRATCH / 'report.md'}")


if __name__ == "__main__":
    main()
