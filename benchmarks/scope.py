"""Scope guard benchmark (issue 18): the demo's edge model (models:/demo-edge@champion, else @challenger: see
benchmarks/demo_edge.py; digest verified) and the guard it ships, on the demo's own splits.

    .venv/bin/python benchmarks/scope.py        # after `make demo`

Prints a table of every detector (MSP, energy, Mahalanobis, kNN, lexical, Mahalanobis + lexical) on the edge
primary's own outputs and the rows' words: AUROC and FPR at 95% TPR for the far-OOD set (configs/ood/not_drug_reviews.csv: package descriptions, not drug reviews) and the
near-OOD set (the five held-out conditions), then the shipped guard's figures, and writes
benchmarks/results/scope.json with: scope_detector, scope_auroc_far, scope_fpr95_far, scope_auroc_near,
msp_auroc_near, junk_rows_out_of_scope, batch_dependence_max_abs_prob_diff, guard_overhead_ratio,
predict_cold_start_s, predict_cold_start_registry_s, edge_ece, teacher_ece (medians of REPEATS runs where timed), and
scope_model (the registry URI measured).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402

apply_embedded_env({"DISTILL_PROGRESS": "0", "PREFECT_LOGGING_LEVEL": "WARNING"})

import numpy as np  # noqa: E402

REPEATS = 5
OVERHEAD_ROUNDS = 15
TRACKING_URI = "sqlite:///.distill/mlflow.db"
CONFIG = ROOT / "configs/demo.yaml"
OUT = ROOT / "benchmarks" / "results" / "scope.json"
FAR, NEAR = "ood:not_drug_reviews", "ood:unseen_conditions"


def log(msg: str) -> None:
    print(f"[scope] {msg}", file=sys.stderr, flush=True)


def _cold_start(model: str, rows: Path) -> float:
    """Wall seconds of `distill predict` on one row, in a fresh process (median of REPEATS)."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = subprocess.run([str(Path(sys.executable).parent / "distill"), "predict", "--model", model, "--input",
                              str(rows), "--tracking-uri", TRACKING_URI], capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"distill predict failed: {out.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    from benchmarks.demo_edge import demo_edge_uri
    from distill_gap.data.splits import load_splits
    from distill_gap.edge.serving import load_edge
    from distill_gap.evaluation.gap_report import train_sample
    from distill_gap.evaluation.junk import JUNK_ROWS
    from distill_gap.evaluation.metrics import ece, fit_temperature
    from distill_gap.evaluation.ood import msp_score, ood_detection
    from distill_gap.evaluation.scope import evaluate_detectors, split_texts
    from distill_gap.inference.predictor import load_predictor
    from distill_gap.registry.model_uri import resolve_edge
    from distill_gap.registry.tracking import client_for
    from distill_gap.registry.versions import fetch_model
    from flows.config import load_config

    cfg = load_config(CONFIG)
    splits = load_splits(cfg.data, cfg.seed)
    if FAR not in splits.frames or NEAR not in splits.frames:
        raise SystemExit(f"configs/demo.yaml must declare {FAR} and {NEAR}")
    model = demo_edge_uri(TRACKING_URI)
    if model is None:
        raise SystemExit(f"no demo-edge @champion or @challenger in {TRACKING_URI}: run `make demo` first")
    folder = resolve_edge(model, TRACKING_URI, log=log)
    edge = load_edge(folder)
    guard = edge.guard
    if guard is None:
        raise SystemExit(f"{folder} ships no scope guard: run `make demo` with this version")
    log(f"edge primary {edge.artifact} ({edge.runtime}); shipped guard {guard.detector}, threshold {guard.threshold:.4g}")

    # 1. every detector on the edge primary's own outputs (a training sample as the reference rows)
    label_id = {label: i for i, label in enumerate(splits.labels)}
    sample = train_sample(splits, cfg.scope.train_rows, cfg.seed)
    outputs = {s: edge.predict_outputs(splits[s]["text"].tolist()) for s in ("validation", "test", NEAR, FAR)}
    train_f = edge.predict_outputs(sample["text"].tolist())[1]
    logits = {"edge": {s: o[0] for s, o in outputs.items()}}
    features = {"edge": {s: o[1] for s, o in outputs.items()}}
    results, _, missing = evaluate_detectors(
        logits, features, {"edge": (train_f, sample["label"].map(label_id).to_numpy())},
        num_classes=len(splits.labels), temperatures={"edge": guard.temperature}, tpr=cfg.scope.tpr, k=cfg.scope.k,
        bank_size=cfg.scope.bank_size, bootstrap_samples=1000, seed=cfg.seed,
        texts=split_texts(splits, outputs, sample))
    print(f"\n{'detector':<20} {'far AUROC [95%]':<24} {'far FPR95':>9}   {'near AUROC [95%]':<24} {'near FPR95':>10}")
    for det in ("msp", "energy", "mahalanobis", "knn", "lexical", "mahalanobis+lexical"):
        if det not in results[FAR]["edge"]:
            continue
        f, n = results[FAR]["edge"][det], results[NEAR]["edge"][det]
        cell = lambda r: f"{r['auroc']:.3f} [{r['ci']['low']:.3f}-{r['ci']['high']:.3f}]"  # noqa: E731
        print(f"{det:<20} {cell(f):<24} {f['fpr_at_tpr']:>9.3f}   {cell(n):<24} {n['fpr_at_tpr']:>10.3f}")
    for m in missing:
        print(f"not evaluated: {m}")

    # 2. the shipped guard as it runs: scores from the files in the edge folder
    shipped = {s: guard.score(*outputs[s], splits[s]["text"].tolist()) for s in outputs}
    far = ood_detection(shipped["test"], shipped[FAR])
    near = ood_detection(shipped["test"], shipped[NEAR])
    msp_near = ood_detection(msp_score(outputs["test"][0]), msp_score(outputs[NEAR][0]))
    junk = edge.predict_rows([{"id": k, "text": v} for k, v in JUNK_ROWS.items()])
    junk_out = {r["id"]: r["in_scope"] is False for r in junk}

    # 3. batch dependence: 32 test rows alone vs in one batch of 32
    texts = splits["test"]["text"].tolist()[:32]
    batch = guard.probabilities(edge.predict_logits(texts, batch_size=32))
    alone = np.concatenate([guard.probabilities(edge.predict_logits([t], batch_size=1)) for t in texts])
    batch_diff = float(np.abs(batch - alone).max())

    # 4. guard overhead at batch 32: the model with features + the guard, against logits only, in alternating rounds
    # after one warm-up each (medians of OVERHEAD_ROUNDS): timed one after the other, drift between the two blocks
    # (CPU clock, cache) moved the ratio by +-0.1, more than the guard's own cost (~9 ms of ~370 ms on 256 rows)
    big = splits["test"]["text"].tolist()[:256]
    runs = {"base": [], "guarded": []}
    work = {"base": lambda: edge.predictor.predict_logits(big, batch_size=32),
            "guarded": lambda: guard.score(*edge.predict_outputs(big, batch_size=32), big)}
    for fn in work.values():
        fn()
    for _ in range(OVERHEAD_ROUNDS):
        for name, fn in work.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    base, guarded = statistics.median(runs["base"]), statistics.median(runs["guarded"])

    # 5. calibration of what ships, beside the teacher's (its own temperature fitted on validation)
    truth = splits["test"]["label"].map(label_id).to_numpy()
    edge_ece = ece(guard.probabilities(outputs["test"][0]), truth)
    client = client_for(cfg.tracking)
    teacher = load_predictor(fetch_model(client, cfg.teacher_model_name, alias=cfg.teacher.alias).path)
    t_val, t_test = (teacher.predict_logits(splits[s]["text"].tolist()) for s in ("validation", "test"))
    t = fit_temperature(t_val, splits["validation"]["label"].map(label_id).to_numpy())
    from scipy.special import softmax

    teacher_ece = ece(softmax(t_test / t, axis=-1), truth)

    # 6. cold starts of `distill predict` on one row
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "one.jsonl"
        rows.write_text(json.dumps({"id": "r1", "text": splits["test"]["text"].iloc[0]}) + "\n")
        cold_local = _cold_start(str(folder), rows)
        cold_registry = _cold_start(model, rows)

    result = {"scope_detector": guard.detector, "scope_auroc_far": far["auroc"], "scope_fpr95_far": far["fpr_at_tpr"],
              "scope_auroc_near": near["auroc"], "msp_auroc_near": msp_near["auroc"],
              "scope_far_in_scope_at_threshold": float(np.mean(guard.in_scope(shipped[FAR]))),
              "junk_rows_out_of_scope": float(np.mean(list(junk_out.values()))),
              "batch_dependence_max_abs_prob_diff": batch_diff, "guard_overhead_ratio": guarded / base,
              "predict_cold_start_s": cold_local, "predict_cold_start_registry_s": cold_registry,
              "edge_ece": edge_ece, "teacher_ece": teacher_ece, "edge_artifact": edge.artifact,
              "scope_model": model, "n_test": int(len(truth)), "n_far": int(len(splits[FAR])),
              "n_near": int(len(splits[NEAR]))}
    print(f"\nshipped guard ({guard.detector}): far AUROC {far['auroc']:.3f}, FPR95 {far['fpr_at_tpr']:.3f}; "
          f"near AUROC {near['auroc']:.3f} (MSP {msp_near['auroc']:.3f})")
    print("junk rows out of scope: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in junk_out.items()))
    for k, v in result.items():
        print(f"{k:<40} {v:.4g}" if isinstance(v, float) else f"{k:<40} {v}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
