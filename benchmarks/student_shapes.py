"""Where a student's speed comes from: ONNX Runtime throughput of each student shape against the teacher (issue 21's
sweep ladder was chosen from this). Run with no arguments:

    .venv/bin/python benchmarks/student_shapes.py

Untrained models of each shape, built from the demo teacher's config (MiniLM-L6: 6 layers, 384 wide, FFN 1536;
weights do not change the speed), exported and quantized exactly as the pipeline does it (distill_gap.edge.onnx_export:
optimum fp32 export, then static INT8 with 8-bit embeddings, calibrated on 128 training texts). The teacher is
measured as fp32 ONNX, as benchmarks/compression.py does. Also: ONNX Runtime's transformer fusion
(onnxruntime.transformers.optimizer, model_type bert) on the 2-layer 256-wide fp32 graph against the plain export, and
the share of tokenization in the smallest shape's prediction loop. On the demo test split (260 rows), 2 threads,
batches of 32 padded per batch, round-robin rounds in a rotating order, medians: benchmarks/compression.py's
settings and its `measure` (COMPRESSION_BENCH_ROUNDS, default 5). Workspace:
.distill/bench/student_shapes (exports reused). Prints a table and writes benchmarks/results/student_shapes.json
(flat): `<shape>_rows_per_s`, `<shape>_speedup_vs_teacher`, `<shape>_mb`, teacher_rows_per_s,
fusion_fp32_rows_per_s, plain_fp32_rows_per_s, tokenize_share_<smallest shape>, rounds, threads.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the same runtime settings (2 threads, 128 tokens, rounds) and timing loop as the compression benchmark
from benchmarks.compression import MAX_LENGTH, ROUNDS, THREADS, measure  # noqa: E402

WORK = ROOT / ".distill" / "bench" / "student_shapes"
OUT = ROOT / "benchmarks" / "results" / "student_shapes.json"
# name: (layers, hidden, heads, ffn); heads of 32 dimensions, as MiniLM's
SHAPES = {"L2-W384-F1536": (2, 384, 12, 1536), "L2-W256-F1536": (2, 256, 8, 1536), "L2-W256-F768": (2, 256, 8, 768),
          "L2-W192-F1536": (2, 192, 6, 1536), "L2-W192-F768": (2, 192, 6, 768), "L1-W256-F1536": (1, 256, 8, 1536),
          "L1-W192-F768": (1, 192, 6, 768)}
FUSED_SHAPE = "L2-W256-F1536"


def build(name: str, config, tokenizer, *, layers=None, hidden=None, heads=None, ffn=None) -> Path:
    """An untrained classifier of the given shape (the teacher's config otherwise) saved with the tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = WORK / "models" / name
    if not (folder / "config.json").is_file():
        changes = {k: v for k, v in {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                                     "intermediate_size": ffn}.items() if v is not None}
        base = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        cfg = type(config).from_dict({**base, **changes, "num_labels": 3})
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(cfg).eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def exported(name: str, model_dir: Path, heldout: list[str], calibration: list[str], *, int8: bool) -> Path:
    from distill_gap.edge.onnx_export import export_onnx, quantize_onnx_int8

    fp32 = WORK / "onnx" / name
    if not (fp32 / "model.onnx").is_file():
        export_onnx(model_dir, fp32, heldout_texts=heldout, max_length=MAX_LENGTH)
    if not int8:
        return fp32
    q = WORK / "onnx-int8" / name
    if not (q / "model.onnx").is_file():
        quantize_onnx_int8(fp32, q, heldout_texts=heldout, calibration_texts=calibration, max_length=MAX_LENGTH,
                           embedding_bits=8)
    return q


def fused(src: Path, heads: int, hidden: int) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    out = WORK / "onnx-fused" / src.name
    if not (out / "model.onnx").is_file():
        shutil.copytree(src, out, dirs_exist_ok=True)
        logging.disable(logging.INFO)  # the fusion's INFO line per pattern
        try:
            optimize_model(str(src / "model.onnx"), model_type="bert", num_heads=heads,
                           hidden_size=hidden).save_model_to_file(str(out / "model.onnx"))
        finally:
            logging.disable(logging.NOTSET)
    return out


def main() -> int:
    from transformers import AutoConfig, AutoTokenizer

    from distill_gap.data.splits import load_splits
    from distill_gap.kd.teacher import base_model_dir
    from distill_gap.ops.quiet import quiet_libraries
    from flows.config import load_config

    quiet_libraries()

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    splits = load_splits(cfg.data, cfg.seed)
    texts = splits["test"]["text"].tolist()
    calibration = splits["train"]["text"].sample(128, random_state=cfg.seed).tolist()
    heldout = splits["validation"]["text"].tolist()[:32]
    base = base_model_dir(cfg.teacher.base)
    config, tokenizer = AutoConfig.from_pretrained(base), AutoTokenizer.from_pretrained(base)

    models = {"teacher": exported("teacher", build("teacher", config, tokenizer), heldout, calibration, int8=False)}
    for name, (layers, hidden, heads, ffn) in SHAPES.items():
        folder = build(name, config, tokenizer, layers=layers, hidden=hidden, heads=heads, ffn=ffn)
        models[name] = exported(name, folder, heldout, calibration, int8=True)
    _, hidden, heads, _ = SHAPES[FUSED_SHAPE]
    models["plain fp32"] = WORK / "onnx" / FUSED_SHAPE
    models["fused fp32"] = fused(models["plain fp32"], heads, hidden)

    label_id = {label: i for i, label in enumerate(splits.labels)}
    m = measure(models, texts, splits["test"]["label"].map(label_id).to_numpy(),  # untrained: accuracy unused
                say=lambda msg: print(f"[student_shapes] {msg}", file=sys.stderr, flush=True))
    rate = {name: m[name]["b32_rows_per_s"] for name in models}

    smallest = list(SHAPES)[-1]
    tok = AutoTokenizer.from_pretrained(models[smallest])
    tok_s = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        tok([str(x) for x in texts], truncation=True, max_length=MAX_LENGTH)
        tok_s.append(time.perf_counter() - t)
    share = statistics.median(tok_s) / (len(texts) / rate[smallest])

    result = {"teacher_rows_per_s": round(rate["teacher"], 1)}
    lines = ["| model (ONNX Runtime, 2 threads, batch 32) | MB | rows/s | x teacher |", "|---|---|---|---|",
             f"| teacher, fp32 | {m['teacher']['bytes'] / 1e6:.1f} | "
             f"{rate['teacher']:.0f} | 1.00 |"]
    for name in SHAPES:
        mb = m[name]["bytes"] / 1e6
        result |= {f"{name}_rows_per_s": round(rate[name], 1), f"{name}_mb": round(mb, 2),
                   f"{name}_speedup_vs_teacher": round(rate[name] / rate["teacher"], 3)}
        lines.append(f"| {name}, INT8 | {mb:.1f} | {rate[name]:.0f} | {rate[name] / rate['teacher']:.2f} |")
    for name in ("plain fp32", "fused fp32"):
        lines.append(f"| {FUSED_SHAPE}, {name} | - | {rate[name]:.0f} | {rate[name] / rate['teacher']:.2f} |")
    result |= {"plain_fp32_rows_per_s": round(rate["plain fp32"], 1), "fused_fp32_rows_per_s": round(rate["fused fp32"], 1),
               f"tokenize_share_{smallest}": round(share, 3), "test_rows": len(texts), "rounds": ROUNDS,
               "threads": THREADS}
    print("\n".join(lines))
    print(f"\ntokenization: {share:.0%} of {smallest}'s batch-32 prediction time; vocabulary untrimmed here "
          f"(the sweep's students use 8k pieces: their ONNX files are smaller than these)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
