"""How `scope.detector`'s default was chosen, without looking at the OOD sets the shipped guard is scored on.

    .venv/bin/python benchmarks/scope_selection.py       # after `distill teacher bootstrap --config configs/demo.yaml`

Selection data: the demo's pinned TEACHER (not the edge model that ships) and a selection set of real text that is
neither a review nor one of the demo's OOD sets: the first paragraph of the docstring of every Python standard
library module that has one (sorted, capped). Every detector is fitted on the teacher's training features exactly
as the pipeline fits it and scored test-vs-selection; the detector with the best AUROC (ties: lower FPR95) becomes
the default. benchmarks/scope.py then scores the shipped guard on configs/ood/not_drug_reviews.csv and the held-out
conditions, which took no part in the choice. Writes benchmarks/results/scope_selection.json.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402

apply_embedded_env({"DISTILL_PROGRESS": "0", "PREFECT_LOGGING_LEVEL": "WARNING"})

CONFIG = ROOT / "configs/demo.yaml"
OUT = ROOT / "benchmarks" / "results" / "scope_selection.json"
MAX_ROWS = 300
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__", "__phello__"}


def stdlib_docstrings() -> list[str]:
    """First docstring paragraph (>= 40 characters) of each importable standard-library module, sorted by name."""
    import warnings

    texts = []
    for name in sorted(sys.stdlib_module_names - SKIP):
        if name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = importlib.import_module(name).__doc__ or ""
        except Exception:  # noqa: BLE001 - platform modules that do not import here
            continue
        para = " ".join(doc.strip().split("\n\n")[0].split())
        if len(para) >= 40:
            texts.append(para)
    return texts[:MAX_ROWS]


def main() -> None:
    from distill_gap.data.splits import load_splits
    from distill_gap.evaluation.gap_report import train_sample
    from distill_gap.evaluation.metrics import fit_temperature
    from distill_gap.evaluation.scope import evaluate_detectors
    from distill_gap.inference.predictor import load_predictor
    from distill_gap.registry.tracking import client_for
    from distill_gap.registry.versions import fetch_model
    from flows.config import load_config

    cfg = load_config(CONFIG)
    splits = load_splits(cfg.data, cfg.seed)
    teacher = load_predictor(fetch_model(client_for(cfg.tracking), cfg.teacher_model_name, alias=cfg.teacher.alias).path)
    selection = stdlib_docstrings()
    label_id = {label: i for i, label in enumerate(splits.labels)}
    sample = train_sample(splits, cfg.scope.train_rows, cfg.seed)
    out = {s: teacher.predict_outputs(t) for s, t in (("validation", splits["validation"]["text"].tolist()),
                                                     ("test", splits["test"]["text"].tolist()),
                                                     ("ood:selection", selection))}
    train_f = teacher.predict_outputs(sample["text"].tolist())[1]
    t = fit_temperature(out["validation"][0], splits["validation"]["label"].map(label_id).to_numpy())
    results, _, missing = evaluate_detectors(
        {"teacher": {s: o[0] for s, o in out.items()}}, {"teacher": {s: o[1] for s, o in out.items()}},
        {"teacher": (train_f, sample["label"].map(label_id).to_numpy())}, num_classes=len(splits.labels),
        temperatures={"teacher": t}, tpr=cfg.scope.tpr, k=cfg.scope.k, bank_size=cfg.scope.bank_size,
        bootstrap_samples=1000, seed=cfg.seed)
    by_det = results["ood:selection"]["teacher"]
    print(f"selection: the pinned teacher, test ({len(splits['test'])} rows) vs {len(selection)} standard-library "
          "docstrings\n")
    print(f"{'detector':<12} {'AUROC [95%]':<22} {'FPR95':>6}")
    for det, r in by_det.items():
        print(f"{det:<12} {r['auroc']:.3f} [{r['ci']['low']:.3f}-{r['ci']['high']:.3f}]   {r['fpr_at_tpr']:>6.3f}")
    chosen = max(by_det, key=lambda d: (round(by_det[d]["auroc"], 3), -by_det[d]["fpr_at_tpr"]))
    print(f"\nchosen default: {chosen}" + (f"; not evaluated: {missing}" if missing else ""))
    result = {"chosen_detector": chosen, "n_selection": len(selection), "n_test": int(len(splits["test"])),
              **{f"{d}_auroc_selection": r["auroc"] for d, r in by_det.items()},
              **{f"{d}_fpr95_selection": r["fpr_at_tpr"] for d, r in by_det.items()}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
