"""benchmarks/edge.py's inputs: the demo models from the local MLflow registry, and the three edge artifacts built
from the student with distill_gap/edge/ (INC INT8, fp32 ONNX, ONNX Runtime INT8) into .distill/bench/edge/."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.edge_worker import MAX_LENGTH, THREADS

ROOT = Path(__file__).resolve().parents[1]
TRACKING_URI = "sqlite:///.distill/mlflow.db"
SCRATCH = ROOT / ".distill" / "bench" / "edge"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[edge {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def registry_models(cache_root: Path):
    """(client, teacher ModelRef, student ModelRef) from the local registry; exit 1 with a hint when empty."""
    hint = "run `make demo` first: it trains and registers demo-teacher@pinned and demo-student"
    db = ROOT / TRACKING_URI.removeprefix("sqlite:///")
    if not db.is_file():
        print(f"no MLflow registry at {db}: {hint}", file=sys.stderr)
        raise SystemExit(1)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from distill_gap.errors import DistillError
    from distill_gap.registry.versions import fetch_model

    mlflow.set_tracking_uri(TRACKING_URI)
    mlflow.set_registry_uri(TRACKING_URI)
    client = MlflowClient(TRACKING_URI, registry_uri=TRACKING_URI)
    try:
        versions = client.search_model_versions("name='demo-student'")
        if not versions:
            raise DistillError("no demo-student versions", hint)
        latest = max(int(v.version) for v in versions)
        teacher = fetch_model(client, "demo-teacher", alias="pinned", cache_root=cache_root)
        student = fetch_model(client, "demo-student", version=latest, cache_root=cache_root)
    except (DistillError, MlflowException) as err:
        print(f"the registry at {TRACKING_URI} has no demo models ({str(err).splitlines()[0]}): {hint}",
              file=sys.stderr)
        raise SystemExit(1) from None
    return client, teacher, student


def build_artifacts(student, splits, reuse: bool) -> dict:
    """INC INT8 (autotune), fp32 ONNX and ONNX Runtime INT8 of the student, in SCRATCH; their build records."""
    import torch

    from distill_gap.digest import folder_bytes
    from distill_gap.edge.inc_quantization import autotune_int8
    from distill_gap.edge.onnx_export import export_onnx, quantize_onnx_int8

    torch.set_num_threads(THREADS)
    record = SCRATCH / "build.json"
    dirs = {"inc-int8": SCRATCH / "inc-int8", "onnx-fp32": SCRATCH / "onnx-fp32", "onnx-int8": SCRATCH / "onnx-int8"}
    if reuse and record.is_file():
        rec = json.loads(record.read_text())
        if rec.get("student_digest") == student.digest and all(d.is_dir() for d in dirs.values()):
            log("reusing the edge artifacts in .distill/bench/edge (--reuse-artifacts)")
            return rec
    train, val = splits["train"], splits["validation"]
    label_id = {label: i for i, label in enumerate(splits.labels)}
    calib = train.sample(128, random_state=13)["text"].tolist()
    val_texts = val["text"].tolist()
    val_ids = val["label"].map(label_id).to_numpy()
    rec = {"student_digest": student.digest, "calibration_examples": len(calib), "validation_rows": len(val_texts)}

    log(f"INC autotune on {len(calib)} calibration texts, goal: validation accuracy within 1% (relative) ...")
    t0 = time.perf_counter()
    inc = autotune_int8(student.path, calib, val_texts, val_ids, val_texts, dirs["inc-int8"], tolerable_loss=0.01,
                        max_trials=6, max_length=MAX_LENGTH, log=log)
    rec["inc-int8"] = {"build_s": time.perf_counter() - t0, "size_bytes": inc.size_bytes, "parity": inc.parity,
                       "approach": inc.approach, "tuning": inc.tuning.to_dict() if inc.tuning else None}
    log(f"INC INT8: {inc.approach}, {inc.size_bytes / 1e6:.1f} MB, {rec['inc-int8']['build_s']:.0f} s, "
        f"parity {inc.parity}")

    t0 = time.perf_counter()
    onnx = export_onnx(student.path, dirs["onnx-fp32"], heldout_texts=val_texts, max_length=MAX_LENGTH)
    rec["onnx-fp32"] = {"build_s": time.perf_counter() - t0, "size_bytes": onnx.size_bytes, "parity": onnx.parity}
    log(f"ONNX fp32: {onnx.size_bytes / 1e6:.1f} MB, {rec['onnx-fp32']['build_s']:.0f} s, parity {onnx.parity}")

    t0 = time.perf_counter()
    q = quantize_onnx_int8(dirs["onnx-fp32"], dirs["onnx-int8"], heldout_texts=val_texts, max_length=MAX_LENGTH)
    rec["onnx-int8"] = {"build_s": time.perf_counter() - t0, "size_bytes": q.size_bytes, "parity": q.parity}
    log(f"ONNX INT8: {q.size_bytes / 1e6:.1f} MB, {rec['onnx-int8']['build_s']:.0f} s, parity {q.parity}")
    for name, d in dirs.items():
        rec[name]["path"] = str(d)
        assert folder_bytes(d) == rec[name]["size_bytes"]
    record.write_text(json.dumps(rec, indent=2, default=str))
    return rec
