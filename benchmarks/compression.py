"""Compression benchmark (issue 21 figures). Run with no arguments:

    .venv/bin/python benchmarks/compression.py

In its own workspace (.distill/bench/compression: SQLite registry, soft-label store, keys, Prefect home), on the
demo config and data, in one process tree and one run:
1. `distill teacher bootstrap` (reused when the workspace already has demo-teacher@pinned), then `distill run` (today's
   default student: layers [0, 5], full vocabulary; reused when runs.json in the workspace names its edge version)
   and `distill run --set sweep.enabled=true` (the demo's ladder, configs/demo.yaml `sweep`; its chosen candidate
   goes through quantization, evaluation and registration).
2. The artifacts measured, each with ONNX Runtime on 2 threads: the teacher (exported to ONNX fp32 with optimum,
   the project's export_onnx), the user's alternative (that teacher export quantized by optimum's ORTQuantizer with
   ONNX Runtime dynamic INT8, `avx2` and `avx512_vnni` presets), the default run's edge model and the sweep's
   (each the edge folder's primary ONNX artifact, fetched from the registry and digest-checked).
3. On the demo test split: accuracy; throughput at batch 32 (length-sorted batches padded to their longest row) and
   latency at batch 1, round-robin over the artifacts for ROUNDS rounds, medians; bytes on disk of the model file
   (with its external data).

Prints a table and writes benchmarks/results/compression.json (flat): size_ratio_vs_teacher, speedup_vs_teacher_b32,
speedup_vs_teacher_b1, retention (edge test accuracy / the teacher's, same ONNX runtime), critical_slices_held (every
critical-slice gate of the shipped edge version passed; critical_slice_rows: each slice's test rows / the labelled
rows its gate says would decide it), speedup_vs_alternative_b32, size_ratio_vs_alternative,
accuracy_minus_alternative (against the better of the two presets), sweep_minutes (the sweep stage, from its MLflow
run), plus the sweep's choice and the same figures for the default student (`default_*`); the issue's keys are null
when the sweep's choice did not pass the release gates (nothing registered to measure). COMPRESSION_BENCH_ROUNDS
(default 5); COMPRESSION_BENCH_REUSE_SWEEP=1 measures again on the runs recorded in the workspace's runs.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402

apply_embedded_env({"DISTILL_PROGRESS": "0"})

WORK = ROOT / ".distill" / "bench" / "compression"
OUT = ROOT / "benchmarks" / "results" / "compression.json"
BIN = Path(sys.executable).parent
THREADS = 2
MAX_LENGTH = 128
B1_CALLS = 40
ROUNDS = int(os.environ.get("COMPRESSION_BENCH_ROUNDS", 5))
REUSE_SWEEP = os.environ.get("COMPRESSION_BENCH_REUSE_SWEEP") == "1"  # measure again without a new sweep run
FIGURES = ("size_ratio_vs_teacher", "speedup_vs_teacher_b32", "speedup_vs_teacher_b1", "retention",
           "critical_slices_held", "speedup_vs_alternative_b32", "size_ratio_vs_alternative",
           "accuracy_minus_alternative")  # the keys: null when the sweep registered no edge model


def log(msg: str) -> None:
    print(f"[compression] {msg}", file=sys.stderr, flush=True)


def environment() -> dict:
    return {**os.environ, "PREFECT_HOME": str(WORK / "prefect-home"), "MLFLOW_TRACKING_URI": f"sqlite:///{WORK}/mlflow.db",
            "DISTILL_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false"}


def distill(env: dict, *args: str) -> subprocess.CompletedProcess:
    log("distill " + " ".join(args))
    proc = subprocess.run([str(BIN / "distill"), *args], env=env, cwd=ROOT, capture_output=True, text=True)
    (WORK / "logs").mkdir(exist_ok=True)
    (WORK / "logs" / f"{int(time.time())}-{args[0]}.log").write_text(proc.stdout + proc.stderr)
    return proc


def prepare() -> Path:
    """The demo config with every store in the workspace."""
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["soft_labels"]["store"] = f"file://{WORK}/soft-labels"
    raw["tracking"] = {"uri": f"sqlite:///{WORK}/mlflow.db", "artifact_location": str(WORK / "mlartifacts")}
    raw["governance"]["key_dir"] = str(WORK / "keys")
    raw["approval"]["approvers"] = []
    WORK.mkdir(parents=True, exist_ok=True)
    config = WORK / "demo.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def ensure_teacher(env: dict, config: Path, cfg, client) -> None:
    """`distill teacher bootstrap` when the workspace has no pinned teacher yet."""
    try:
        client.get_model_version_by_alias(cfg.teacher_model_name, cfg.teacher.alias)
    except Exception:  # noqa: BLE001 - no pinned teacher yet
        proc = distill(env, "teacher", "bootstrap", "--config", str(config))
        if proc.returncode:
            raise SystemExit(f"teacher bootstrap failed:\n{proc.stderr[-3000:]}")


def runs(env: dict, config: Path, cfg, client) -> dict:
    """The two pipeline runs (teacher bootstrapped first when missing); the edge version each registered."""
    ensure_teacher(env, config, cfg, client)
    record = WORK / "runs.json"
    out = json.loads(record.read_text()) if record.is_file() else {}
    for kind, extra in (("default", []), ("sweep", ["--set", "sweep.enabled=true"])):
        if kind in out and (kind == "default" and out[kind].get("version") or REUSE_SWEEP):
            log(f"reusing the {kind} run recorded in {record} (edge version {out[kind].get('version')})")
            continue
        before = {v.version for v in client.search_model_versions(f"name='{cfg.edge_model_name}'")}
        t = time.perf_counter()
        proc = distill(env, "run", "--config", str(config), *extra)
        seconds = time.perf_counter() - t
        new = [v for v in client.search_model_versions(f"name='{cfg.edge_model_name}'") if v.version not in before]
        out[kind] = {"seconds": seconds, "rc": proc.returncode, "version": new[0].version if new else None,
                     "error": None if new else proc.stderr.strip().splitlines()[-3:]}
        log(f"{kind} run: rc {proc.returncode}, {seconds:.0f} s, edge version {out[kind]['version']}")
        record.write_text(json.dumps(out, indent=2))
    return out


def sweep_record(client, cfg, version: str | None) -> dict:
    """The sweep stage run of the pipeline run that registered edge `version` (the newest sweep run when the sweep
    registered nothing): minutes, the chosen candidate, every candidate's row. Not simply the newest sweep run: other
    sweeps in the workspace (benchmarks/compression_ablation.py's) would lend their minutes and candidates."""
    from distill_gap.registry.presentation import stage_run_id

    if version:
        register = client.get_run(client.get_model_version(cfg.edge_model_name, version).run_id)
        run = client.get_run(stage_run_id(client, register.data.tags["mlflow.parentRunId"], "sweep"))
    else:
        exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        run = client.search_runs([exp], filter_string="tags.`distill.stage` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
    rows = json.loads(Path(client.download_artifacts(run.info.run_id, "sweep/candidates.json",
                                                     str(WORK / "tmp"))).read_text())
    return {"minutes": run.data.metrics.get("sweep.minutes"), "chosen": run.data.tags.get("distill.sweep.chosen"),
            "rows": rows}


def edge_onnx(client, cfg, version: str) -> tuple[Path, dict, dict]:
    """(the primary ONNX folder of an edge version, edge.json, its gates) from the verified local cache."""
    from distill_gap.registry.versions import fetch_model

    ref = fetch_model(client, cfg.edge_model_name, version=int(version), cache_root=WORK / "models")
    manifest = json.loads((ref.path / "edge.json").read_text())
    primary = manifest["primary"]
    folder = primary if primary in ("onnx-int8", "onnx") else "onnx-int8"
    mv = client.get_model_version(cfg.edge_model_name, version)
    source = client.get_run(mv.run_id)
    pipeline = source.data.tags.get("mlflow.parentRunId", mv.run_id)
    evaluate = client.search_runs([source.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pipeline}' "
                                  "and tags.`distill.stage` = 'evaluate'")[0]
    report = json.loads(Path(client.download_artifacts(evaluate.info.run_id, "evaluation/gap_report.json",
                                                       str(WORK / "tmp"))).read_text())
    return ref.path / folder, manifest, {"primary": primary, "measured": folder, "gates": report["gates"],
                                         "tags": mv.tags}


def teacher_artifacts(client, cfg, splits) -> dict[str, Path]:
    """The teacher's ONNX fp32 export and the user's alternative: optimum ORTQuantizer, dynamic INT8, two presets."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from distill_gap.edge.onnx_export import export_onnx
    from distill_gap.registry.versions import fetch_model

    teacher = fetch_model(client, cfg.teacher_model_name, alias=cfg.teacher.alias, cache_root=WORK / "models")
    fp32 = WORK / "teacher-onnx"
    if not (fp32 / "model.onnx").is_file():
        export_onnx(teacher.path, fp32, heldout_texts=splits["validation"]["text"].tolist()[:64],
                    max_length=MAX_LENGTH)
    out = {"teacher (ONNX fp32)": fp32}
    for preset in ("avx2", "avx512_vnni"):
        folder = WORK / f"teacher-ort-dynamic-int8-{preset}"
        if not (folder / "model.onnx").is_file():
            qcfg = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=False)
            ORTQuantizer.from_pretrained(fp32, file_name="model.onnx").quantize(qcfg, save_dir=folder)
            produced = next(folder.glob("*quantized*.onnx"))
            produced.rename(folder / "model.onnx")
            for f in fp32.iterdir():  # tokenizer and config beside it, as the fp32 folder has them
                if f.suffix != ".onnx" and f.is_file() and not (folder / f.name).exists():
                    (folder / f.name).write_bytes(f.read_bytes())
        out[f"alternative: ORT dynamic INT8 ({preset})"] = folder
    return out


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(
        ".onnx_data"))


def measure(models: dict[str, Path], texts: list[str], truth, *, say=log) -> dict:
    """Accuracy, b32 throughput and b1 latency per model: round-robin rounds with a rotating order, medians; `say`
    reports each round (the calling benchmark's log)."""
    import numpy as np

    from distill_gap.inference.onnx_runtime import OnnxPredictor

    preds = {name: OnnxPredictor(path, max_length=MAX_LENGTH, threads=THREADS) for name, path in models.items()}
    acc = {name: float((p.predict_logits(texts).argmax(-1) == truth).mean()) for name, p in preds.items()}
    b32, b1 = {n: [] for n in models}, {n: [] for n in models}
    single = texts[:B1_CALLS]
    names = list(models)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            p = preds[name]
            t = time.perf_counter()
            p.predict_logits(texts, batch_size=32)
            b32[name].append(len(texts) / (time.perf_counter() - t))
            t = time.perf_counter()
            for text in single:
                p.predict_logits([text], batch_size=1)
            b1[name].append((time.perf_counter() - t) * 1000 / len(single))
        say(f"round {r + 1}/{ROUNDS} done")
    return {name: {"accuracy": acc[name], "b32_rows_per_s": statistics.median(b32[name]),
                   "b1_ms": statistics.median(b1[name]), "bytes": model_bytes(models[name]),
                   "b32_all": [round(x, 1) for x in b32[name]], "b1_all": [round(x, 2) for x in b1[name]]}
            for name in names} | {"_rows": len(texts), "_labels_seen": int(np.unique(truth).size)}


def main() -> int:
    from distill_gap.data.splits import load_splits
    from distill_gap.registry.tracking import client_for
    from flows.config import load_config

    start = time.perf_counter()
    config = prepare()
    env = environment()
    cfg = load_config(config)
    client = client_for(cfg.tracking)
    done = runs(env, config, cfg, client)
    sweep = sweep_record(client, cfg, done["sweep"].get("version"))
    splits = load_splits(cfg.data, cfg.seed)
    test = splits["test"]
    label_id = {label: i for i, label in enumerate(splits.labels)}
    texts, truth = test["text"].tolist(), test["label"].map(label_id).to_numpy()

    models = teacher_artifacts(client, cfg, splits)
    info = {}
    for kind in ("default", "sweep"):
        if done[kind]["version"] is not None:
            path, manifest, meta = edge_onnx(client, cfg, done[kind]["version"])
            models[f"{kind} edge (v{done[kind]['version']}, {meta['measured']})"] = path
            info[kind] = meta
    m = measure(models, texts, truth)
    teacher = m["teacher (ONNX fp32)"]
    alternatives = {k: v for k, v in m.items() if k.startswith("alternative")}
    alt = max(alternatives.values(), key=lambda v: (v["accuracy"], v["b32_rows_per_s"]))

    def figures(kind: str) -> dict:
        key = next((k for k in m if k.startswith(f"{kind} edge")), None)
        if key is None:
            return {}
        e, gates = m[key], info[kind]["gates"]
        slices = {k: g for k, g in gates.items() if k.startswith("noninferior:slice:")}
        return {"size_ratio_vs_teacher": teacher["bytes"] / e["bytes"],
                "speedup_vs_teacher_b32": e["b32_rows_per_s"] / teacher["b32_rows_per_s"],
                "speedup_vs_teacher_b1": teacher["b1_ms"] / e["b1_ms"],
                "retention": e["accuracy"] / teacher["accuracy"],
                "critical_slices_held": bool(slices) and all(g.get("outcome") == "pass" for g in slices.values()),
                "critical_slice_outcomes": ",".join(f"{k.split('=', 1)[1]}:{g.get('outcome')}"
                                                    for k, g in slices.items()),
                # test rows each slice has, and the labelled rows its gate says would decide it (insufficient only)
                "critical_slice_rows": ",".join(f"{k.split('=', 1)[1]}:{g.get('n')}/{g.get('rows_needed') or '-'}"
                                                for k, g in slices.items()),
                "speedup_vs_alternative_b32": e["b32_rows_per_s"] / alt["b32_rows_per_s"],
                "size_ratio_vs_alternative": alt["bytes"] / e["bytes"],
                "accuracy_minus_alternative": e["accuracy"] - alt["accuracy"],
                "edge_accuracy": e["accuracy"], "edge_mb": e["bytes"] / 1e6,
                "gates_outcome": info[kind]["tags"].get("gates.outcome")}

    chosen = {**dict.fromkeys(FIGURES), **figures("sweep")}
    result = {**chosen, "sweep_minutes": sweep["minutes"], "sweep_chosen": sweep["chosen"],
              "sweep_candidates": len(sweep["rows"]), "sweep_registered": done["sweep"]["version"] is not None,
              **{f"sweep_chosen_{k}": next((r[k] for r in sweep["rows"] if r["name"] == sweep["chosen"]), None)
                 for k in ("size_mb", "accuracy", "outcome")},
              "sweep_release_error": None if done["sweep"]["version"] else " ".join(done["sweep"].get("error") or [])[:400],
              **{f"default_{k}": v for k, v in figures("default").items()},
              "teacher_accuracy": teacher["accuracy"], "teacher_mb": teacher["bytes"] / 1e6,
              "alternative_accuracy": alt["accuracy"], "alternative_mb": alt["bytes"] / 1e6,
              "test_rows": m["_rows"], "rounds": ROUNDS, "threads": THREADS,
              "benchmark_minutes": (time.perf_counter() - start) / 60,  # this invocation: measuring only when reused
              "reused_runs": REUSE_SWEEP}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, default=str) + "\n")
    (WORK / "details.json").write_text(json.dumps({"measured": m, "sweep": sweep, "runs": done}, indent=2,
                                                  default=str))
    print(f"\nCompression on the demo test split ({m['_rows']} rows), ONNX Runtime, {THREADS} threads, medians of "
          f"{ROUNDS} rounds\n")
    print("| model | MB | test accuracy | rows/s, batch 32 | ms, batch 1 |\n|---|---|---|---|---|")
    for name, v in m.items():
        if not name.startswith("_"):
            print(f"| {name} | {v['bytes'] / 1e6:.1f} | {v['accuracy']:.3f} | {v['b32_rows_per_s']:.0f} | "
                  f"{v['b1_ms']:.1f} |")
    print(f"\nsweep: {sweep['chosen']} chosen of {len(sweep['rows'])} in {sweep['minutes'] or 0:.1f} min")
    for r in sweep["rows"]:
        print(f"  {r['name']}: {r['outcome']}, {(r['parameters'] or 0) / 1e6:.2f}M parameters, test accuracy "
              f"{r['accuracy'] if r['accuracy'] is None else round(r['accuracy'], 3)}")
    print("\n" + json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
