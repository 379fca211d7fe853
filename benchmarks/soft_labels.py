"""Soft-label store benchmark (issue 3 figures). Run with no arguments:

    .venv/bin/python benchmarks/soft_labels.py

Prints a table and writes benchmarks/results/soft_labels.json with the keys
labelling_speedup_vs_pipeline, cache_hit_time_ratio, fp16_bytes_per_example, topk_size_ratio,
peak_rss_gb_1m (plus labelling_speedup_vs_pipeline_torch_engine). The speedup is that of the
labelling engine the pipeline uses by default on CPU (soft_labels.engine auto = ONNX Runtime). Medians over REPEATS runs; the baseline is measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402

apply_embedded_env({"DISTILL_PROGRESS": "0"})

import numpy as np  # noqa: E402

REPEATS = 3
THREADS = 2
MAX_LENGTH = 128
BATCH = 8
LABELS = ["negative", "neutral", "positive"]
OUT = Path(__file__).resolve().parent / "results" / "soft_labels.json"


def _shard_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def _teacher_dir(tmp: Path) -> Path:
    """The demo teacher's architecture: MiniLM-L6 with a 3-label head (weights as shipped offline)."""
    from distill_gap.models.loading import load_classifier, save_classifier
    from distill_gap.kd.teacher import BUILTIN_MINILM, base_model_dir

    model, tok = load_classifier(base_model_dir(BUILTIN_MINILM), labels=LABELS)
    return save_classifier(model, tok, tmp / "teacher")


def labelling(tmp: Path, texts: list[str]) -> dict:
    """teacher_logits (torch and ONNX Runtime engines) vs a plain loop over pipeline("text-classification").

    Each repeat times the baseline and both engines back to back; the ONNX export (and its parity
    probe) happens once before the first timed run and is reported separately.
    """
    import torch
    from transformers import pipeline

    import distill_gap.softlabels.engines as sl

    torch.set_num_threads(THREADS)
    sl.ONNX_CACHE = tmp / "onnx"
    teacher = _teacher_dir(tmp)
    pipe = pipeline("text-classification", model=str(teacher), tokenizer=str(teacher), device=-1, top_k=None)
    t0 = time.perf_counter()
    sl.teacher_logits(teacher, texts[:4], max_length=MAX_LENGTH, progress=False, engine="onnxruntime", threads=THREADS)
    export_s = time.perf_counter() - t0
    runs = {"pipeline": [], "torch": [], "onnxruntime": []}
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for t in texts:
            pipe(t, truncation=True, max_length=MAX_LENGTH)
        runs["pipeline"].append(len(texts) / (time.perf_counter() - t0))
        for engine in ("torch", "onnxruntime"):
            t0 = time.perf_counter()
            sl.teacher_logits(teacher, texts, batch_size=BATCH, max_length=MAX_LENGTH, progress=False, engine=engine,
                              threads=THREADS)
            runs[engine].append(len(texts) / (time.perf_counter() - t0))
    return {"teacher": teacher, "export_s": export_s, **{f"{k}_examples_per_s": statistics.median(v)
                                                         for k, v in runs.items()}}


def cache_hit_ratio(tmp: Path, teacher: Path, ids: list[str], texts: list[str]) -> dict:
    from distill_gap.digest import model_digest, sha256_json, tokenizer_digest
    from distill_gap.softlabels.labelling import ensure_soft_labels

    args = dict(teacher_dir=teacher, teacher_digest=model_digest(teacher), tokenizer_digest=tokenizer_digest(teacher),
                data_digest=sha256_json(ids), ids=ids, texts=texts, labels=LABELS, max_length=MAX_LENGTH,
                batch_size=BATCH, shard_size=256, progress=False, engine="auto", threads=THREADS)
    miss, hit = [], []
    for i in range(REPEATS):
        store = f"file://{tmp}/store-{i}"
        t0 = time.perf_counter()
        assert not ensure_soft_labels(store, **args).hit
        miss.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert ensure_soft_labels(store, **args).hit
        hit.append(time.perf_counter() - t0)
    return {"miss_s": statistics.median(miss), "hit_s": statistics.median(hit),
            "fp16_bytes_per_example": _shard_bytes(tmp / "store-0") / len(ids)}


def topk_ratio(tmp: Path, n: int = 2000, classes: int = 32000, k: int = 16) -> float:
    from distill_gap.softlabels.store import SoftLabelStore

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(n, classes)).astype(np.float32)
    ids = [f"x{i}" for i in range(n)]
    meta = {"teacher": {"name": "synthetic"}}
    SoftLabelStore(f"file://{tmp}/full").write("a" * 64, ids, logits, dtype="float16", shard_size=256, meta=meta)
    SoftLabelStore(f"file://{tmp}/topk").write("b" * 64, ids, logits, dtype="float16", shard_size=256, meta=meta, top_k=k)
    return _shard_bytes(tmp / "topk") / _shard_bytes(tmp / "full")


_RSS_CHILD = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from distill_gap.softlabels.store import SoftLabelStore
n, c = 1_000_000, 10
ids = [f"e{i}" for i in range(n)]
logits = np.random.default_rng(0).normal(size=(n, c)).astype(np.float32)
store = SoftLabelStore("file://" + sys.argv[1])
store.write("c" * 64, ids, logits, dtype="float16", shard_size=65536, meta={"teacher": {"name": "synthetic"}})
got_ids, got = store.read("c" * 64)
assert len(got_ids) == n and got.shape == (n, c)
# VmHWM: this process's own peak. ru_maxrss would include the parent's memory image, which Linux
# carries into a child's maxrss across fork + exec (the benchmark's parent holds models).
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(hwm_kb / 1024 / 1024)
"""


def peak_rss_1m(tmp: Path) -> float:
    """Peak RSS (GB) of a fresh process writing and reading 1,000,000 x 10 synthetic logits."""
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp / "rss"), root], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from distill_gap.data.splits import load_splits
    from flows.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/demo.yaml")
    train = load_splits(cfg.data, cfg.seed)["train"]
    ids, texts = train["id"].tolist(), train["text"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lab = labelling(tmp, texts)
        hit = cache_hit_ratio(tmp, lab["teacher"], ids, texts)
        topk = topk_ratio(tmp)
        rss = peak_rss_1m(tmp)
    result = {
        "labelling_speedup_vs_pipeline": lab["onnxruntime_examples_per_s"] / lab["pipeline_examples_per_s"],
        "labelling_speedup_vs_pipeline_torch_engine": lab["torch_examples_per_s"] / lab["pipeline_examples_per_s"],
        "cache_hit_time_ratio": hit["hit_s"] / hit["miss_s"],
        "fp16_bytes_per_example": hit["fp16_bytes_per_example"],
        "topk_size_ratio": topk,
        "peak_rss_gb_1m": rss,
    }
    rows = [
        ("pipeline() loop, examples/s", f"{lab['pipeline_examples_per_s']:.1f}", "baseline"),
        ("teacher_logits engine=torch, examples/s", f"{lab['torch_examples_per_s']:.1f}",
         f"{result['labelling_speedup_vs_pipeline_torch_engine']:.2f}x"),
        ("teacher_logits engine=onnxruntime, examples/s", f"{lab['onnxruntime_examples_per_s']:.1f}",
         "(the default on CPU)"),
        ("ONNX export + parity probe, once per teacher (s)", f"{lab['export_s']:.1f}", ""),
        ("labelling_speedup_vs_pipeline", f"{result['labelling_speedup_vs_pipeline']:.2f}x", ">= 2x"),
        ("soft-label step miss / hit (s)", f"{hit['miss_s']:.2f} / {hit['hit_s']:.3f}", ""),
        ("cache_hit_time_ratio", f"{result['cache_hit_time_ratio']:.3f}", "<= 0.05"),
        ("fp16_bytes_per_example (3 classes)", f"{result['fp16_bytes_per_example']:.1f}", "2*3+16 = 22 + Parquet overhead"),
        ("topk_size_ratio (32,000 classes, k=16)", f"{result['topk_size_ratio']:.4f}", "<= 0.10"),
        ("peak_rss_gb_1m (1M x 10 write+read)", f"{result['peak_rss_gb_1m']:.2f}", "<= 1.5"),
    ]
    print(f"soft labels on {len(texts)} demo training texts, {THREADS} threads, {MAX_LENGTH} tokens, median of {REPEATS}")
    for name, value, target in rows:
        print(f"  {name:<48} {value:>16}   {target}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
