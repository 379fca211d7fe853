"""Serving benchmark (issue 20 figures): `distill predict` on 100k short rows, and 8 predicts at once on a cold cache.

    .venv/bin/python benchmarks/serving.py

The model: the edge @champion (else @challenger) of the demo registry in $SERVING_BENCH_REGISTRY (default
/tmp/fresh/.distill, then .distill) when its ONNX INT8 artifact passed its checks; otherwise an ONNX INT8 edge
folder of the demo student's shape (2 layers, 384 wide, built from a config and untrained: speed and memory, not
accuracy) with a kNN scope guard, signed and registered in a SQLite registry under .distill/bench/serving/.

Every figure comes from `distill predict` run as a user runs it, a fresh process each time:
- 100k rows (4-14 words each, one JSONL file), the cache warm, the ONNX INT8 artifact, RUNS times: peak RSS of the
  process (wait4's ru_maxrss), seconds from the "loaded" line on stderr to the first JSONL row on stdout, rows per
  second from that line to the exit;
- a cold cache: 8 predicts of 5 rows started at once in one new working folder (one empty .distill/models),
  TRIALS times: how many exit non-zero (cold_cache_concurrent_failures is the worst trial);
- the same with the code of BASELINE_REF (the commit before this work, checked out in a temporary git worktree):
  the baseline_* keys.
Medians over the runs. Prints a table; writes benchmarks/results/serving.json (flat). SERVING_BENCH_RUNS,
SERVING_BENCH_TRIALS, SERVING_BENCH_ROWS and SERVING_BENCH_BASELINE=0 shorten it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "serving.json"
BENCH = ROOT / ".distill" / "bench" / "serving"
BASELINE_REF = "a5fd51d"  # main before issue 20's serving work
ROWS = int(os.environ.get("SERVING_BENCH_ROWS", 100_000))
RUNS = int(os.environ.get("SERVING_BENCH_RUNS", 3))
TRIALS = int(os.environ.get("SERVING_BENCH_TRIALS", 3))
CONCURRENT = 8
LABELS = ["negative", "neutral", "positive"]
WORDS = ("the tablets helped my pain but made me dizzy and tired so I stopped after two weeks good bad fine sleep "
         "headache nausea better worse doctor dose").split()


def log(msg: str) -> None:
    print(f"[serving] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the model: the demo's, or one built here


def demo_model() -> dict | None:
    """{"tracking_uri", "model", "artifact", "key"} of the demo registry's edge champion/challenger, or None."""
    from benchmarks.demo_edge import demo_edge_version

    for root in [os.environ.get("SERVING_BENCH_REGISTRY"), "/tmp/fresh/.distill", str(ROOT / ".distill")]:
        db, key = Path(root or "-") / "mlflow.db", Path(root or "-") / "keys" / "signing-key.pub.pem"
        found = demo_edge_version(f"sqlite:///{db}") if key.is_file() else None
        if found is None:
            continue
        alias, mv = found
        return {"tracking_uri": f"sqlite:///{db}", "model": f"models:/demo-edge/{mv.version}", "key": str(key),
                "artifact": "onnx-int8", "source": f"{root} demo-edge v{mv.version} (@{alias})",
                "primary": mv.tags.get("edge.primary")}
    return None


def built_model() -> dict:
    """An ONNX INT8 edge folder of the demo student's shape, signed and registered in a SQLite store under BENCH."""
    from flows.config import GovernanceConfig, TrackingConfig
    from distill_gap.digest import model_digest
    from distill_gap.edge.onnx_export import export_onnx, quantize_onnx_int8
    from distill_gap.edge.serving import load_edge
    from distill_gap.evaluation.scope import fit_guard
    from distill_gap.models.from_scratch import build_scratch_classifier
    from distill_gap.registry.pyfunc import link_version, log_model_folder
    from distill_gap.registry.tracking import client_for, experiment_id
    from distill_gap.registry.versions import create_version, sign_and_log

    shutil.rmtree(BENCH, ignore_errors=True)
    texts = [short_text(random.Random(i)) for i in range(400)]
    model = build_scratch_classifier(texts, LABELS, BENCH / "student", hidden_size=384, num_hidden_layers=2,
                                     num_attention_heads=12, intermediate_size=1536, vocab_size=4000, seed=0)
    edge = BENCH / "edge"
    export_onnx(model, edge / "onnx", heldout_texts=texts[:8], max_length=128)
    quantize_onnx_int8(edge / "onnx", edge / "onnx-int8", heldout_texts=texts[:8], max_length=128)
    shutil.rmtree(edge / "onnx")
    (edge / "edge.json").write_text(json.dumps({
        "format": 1, "primary": "onnx-int8", "labels": LABELS, "max_length": 128, "quantized": True,
        "artifacts": {"onnx-int8": {"path": "onnx-int8", "runtime": "onnxruntime", "ok": True,
                                    "check": "built by benchmarks/serving.py"}}}, indent=2))
    logits, features = load_edge(edge).predict_outputs(texts)
    guard = fit_guard("knn", train_features=features[::2], train_labels=logits[::2].argmax(-1), num_classes=3,
                      val_logits=logits[1::2], val_features=features[1::2], tpr=0.95, temperature=1.0, k=1)
    guard.info = {"model": "serving benchmark", "fitted_on": f"{len(texts)} generated texts"}
    guard.write(edge)
    tracking = TrackingConfig(uri=f"sqlite:///{BENCH}/mlflow.db", artifact_location=str(BENCH / "mlartifacts"))
    governance = GovernanceConfig(key_dir=str(BENCH / "keys"))
    client = client_for(tracking)
    run_id = client.create_run(experiment_id(client, tracking), run_name="serving-benchmark").info.run_id
    signed = sign_and_log(client, run_id, edge, "edge", governance)
    logged = log_model_folder(client, run_id, edge, "edge", example_texts=texts[:3], labels=LABELS)
    mv = create_version(client, "bench-edge", source=logged.model_uri, run_id=run_id, model_id=logged.model_id,
                        governance=governance, tags={"model.digest": model_digest(edge), **signed})
    link_version(client, logged, "bench-edge", mv.version)
    client.set_terminated(run_id, "FINISHED")
    return {"tracking_uri": tracking.uri, "model": f"models:/bench-edge/{mv.version}", "primary": "onnx-int8",
            "key": str(BENCH / "keys" / "signing-key.pub.pem"), "artifact": "onnx-int8",
            "source": "an untrained 2-layer, 384-wide BERT built here (ONNX INT8, kNN guard), signed and registered"}


def short_text(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(4, 14)))


def write_rows(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "text": short_text(rng)}) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# one `distill predict`, watched from outside


def predict_args(m: dict, rows: Path, baseline: bool) -> list[str]:
    args = ["predict", "--model", m["model"], "--input", str(rows), "--tracking-uri", m["tracking_uri"],
            "--out-of-scope", "answer"]
    if m["artifact"] != m.get("primary"):
        args += ["--artifact", m["artifact"]] + ([] if baseline else ["--allow-failed-artifact"])
    return args + ([] if baseline else ["--public-key", m["key"]])


def run_predict(args: list[str], cwd: Path, code: Path) -> dict:
    """Spawn `python -m flows.cli <args>` with the code in `code`: seconds to the first stdout row and to the
    "loaded" stderr line, rows out, peak RSS (MB), exit code."""
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(code)}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err, marks = [], {}

    def read_err():
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            err.append(line)
            if "loaded in" in line and "loaded" not in marks:
                marks["loaded"] = time.monotonic() - start

    peak = [0]

    def watch_memory():  # VmHWM of the process itself (wait4's ru_maxrss would count the parent's pages at fork)
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            peak[0] = max(peak[0], int(status.split("VmHWM:")[1].split()[0]) if "VmHWM:" in status else 0)
            time.sleep(0.02)

    reader, watcher = threading.Thread(target=read_err), threading.Thread(target=watch_memory)
    reader.start()
    watcher.start()
    first, rows = None, 0
    for _ in proc.stdout:
        first = first if first is not None else time.monotonic() - start
        rows += 1
    proc.wait()
    total = time.monotonic() - start
    reader.join()
    watcher.join()
    return {"first_output_s": first, "loaded_s": marks.get("loaded"), "total_s": total, "rows": rows,
            "peak_rss_mb": peak[0] / 1024, "rc": proc.returncode, "stderr": err[-3:]}


def big_runs(m: dict, rows: Path, work: Path, code: Path, baseline: bool) -> list[dict]:
    runs = []
    run_predict(predict_args(m, write_rows(work / "warm.jsonl", 10), baseline), work, code)  # fill the cache
    for i in range(RUNS):
        r = run_predict(predict_args(m, rows, baseline), work, code)
        assert r["rc"] == 0 and r["rows"] == ROWS, r
        r["rows_per_s"] = ROWS / (r["total_s"] - (r["loaded_s"] or 0.0))
        log(f"{'baseline' if baseline else 'now'} run {i + 1}: {r['peak_rss_mb']:.0f} MB, first row at "
            f"{r['first_output_s']:.2f} s (loaded at {r['loaded_s']}), {r['total_s']:.1f} s, {r['rows_per_s']:.0f}/s")
        runs.append(r)
    return runs


def cold_trials(m: dict, work: Path, code: Path, baseline: bool) -> list[int]:
    """Failures of CONCURRENT predicts started at once on an empty cache, per trial."""
    failures = []
    for t in range(TRIALS):
        folder = Path(tempfile.mkdtemp(dir=work, prefix="cold-"))
        rows = write_rows(folder / "rows.jsonl", 5)
        results = [None] * CONCURRENT

        def one(i):
            results[i] = run_predict(predict_args(m, rows, baseline), folder, code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        bad = [r for r in results if r["rc"] != 0 or r["rows"] != 5]
        failures.append(len(bad))
        log(f"{'baseline' if baseline else 'now'} cold trial {t + 1}: {len(bad)} of {CONCURRENT} failed"
            + (f" ({bad[0]['stderr'][-1][:200]})" if bad else ""))
    return failures


def measure(m: dict, rows: Path, work: Path, code: Path, baseline: bool) -> dict:
    prefix = "baseline_" if baseline else ""
    runs = big_runs(m, rows, work, code, baseline)
    med = lambda key: round(statistics.median(r[key] for r in runs), 2)  # noqa: E731
    out = {f"{prefix}predict_100k_peak_rss_mb": round(med("peak_rss_mb")),
           f"{prefix}predict_first_output_from_start_s": med("first_output_s"),
           f"{prefix}predict_100k_total_s": med("total_s")}
    if not baseline:
        out["predict_first_output_s"] = round(statistics.median(r["first_output_s"] - r["loaded_s"] for r in runs), 2)
        out["predict_100k_rows_per_s"] = round(med("rows_per_s"))
    else:
        out["baseline_predict_100k_rows_per_s"] = round(statistics.median(ROWS / r["total_s"] for r in runs))
    failures = cold_trials(m, work, code, baseline)
    out[f"{prefix}cold_cache_concurrent_failures"] = max(failures)
    out[f"{prefix}cold_cache_concurrent_failures_per_trial"] = failures
    return out


def main() -> None:
    from distill_gap.ops.runtime import apply_embedded_env

    apply_embedded_env({"DISTILL_PROGRESS": "0"})
    if sys.argv[1:] == ["--build"]:  # in a process of its own: torch's pages stay out of the measured ones
        print(json.dumps(built_model()))
        return
    m = demo_model()
    if m is None:
        log("no demo registry with an edge champion: building a demo-sized ONNX INT8 edge model")
        built = subprocess.run([sys.executable, __file__, "--build"], cwd=ROOT, check=True, capture_output=True,
                               text=True)
        m = json.loads(built.stdout.strip().splitlines()[-1])
    log(f"model: {m['source']}")
    result = {"model": m["source"], "rows": ROWS, "runs": RUNS, "trials": TRIALS, "concurrent_starts": CONCURRENT,
              "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        work = Path(tmp)
        rows = write_rows(work / "rows.jsonl", ROWS)
        (work / "now").mkdir()
        result.update(measure(m, rows, work / "now", ROOT, baseline=False))
        if os.environ.get("SERVING_BENCH_BASELINE", "1") != "0":
            base = work / "baseline-code"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), BASELINE_REF], cwd=ROOT, check=True)
            try:
                (work / "base").mkdir()
                result.update(measure(m, rows, work / "base", base, baseline=True))
                result["baseline_ref"] = BASELINE_REF
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    result["load_average_end"] = os.getloadavg()[0]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
