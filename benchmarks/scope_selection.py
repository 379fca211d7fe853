"""How `scope.detector`'s default was chosen, without looking at the OOD sets the shipped guard is scored on.

    .venv/bin/python benchmarks/scope_selection.py       # after `make demo` (and the compression sweep, below)

Selection data: a selection set of real text that is neither a review nor one of the demo's OOD sets: the first
paragraph of the docstring of every Python standard library module that has one (sorted, capped). Models: the
demo's pinned teacher and every registered version of its student (demo-student): the guard ships with a student,
fitted on that student's own features, and a narrow student's features separate less than the teacher's. Every
detector is fitted on each model's training features exactly as the pipeline fits it and scored test-vs-selection;
the detector whose WORST AUROC over these models is best becomes the default (ties: lower worst FPR95), among the
detectors that read the model: `lexical` alone reads only the text, scores every model alike, and would make the
OOD gate (each model's guard against the teacher's) one that cannot fail; it is measured, not eligible. With
MLFLOW_TRACKING_URI set to benchmarks/compression.py's workspace (.distill/bench/compression/mlflow.db) the
students include the size sweep's narrow candidates. benchmarks/scope.py then scores the shipped guard on
configs/ood/not_drug_reviews.csv and the held-out conditions, which took no part in the choice. Writes
benchmarks/results/scope_selection.json.
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
MODEL_INDEPENDENT = ("lexical",)  # scores the text alone: the same for every model
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
    from distill_gap.evaluation.scope import evaluate_detectors, split_texts
    from distill_gap.inference.predictor import load_predictor
    from distill_gap.registry.tracking import client_for
    from distill_gap.registry.versions import fetch_model
    from flows.config import load_config

    cfg = load_config(CONFIG)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        cfg.tracking.uri = os.environ["MLFLOW_TRACKING_URI"]
    client = client_for(cfg.tracking)
    splits = load_splits(cfg.data, cfg.seed)
    models = {"teacher": fetch_model(client, cfg.teacher_model_name, alias=cfg.teacher.alias).path}
    for mv in sorted(client.search_model_versions(f"name='{cfg.student_model_name}'"), key=lambda v: int(v.version)):
        models[f"student-v{mv.version}"] = fetch_model(client, cfg.student_model_name, version=int(mv.version)).path
    selection = stdlib_docstrings()
    label_id = {label: i for i, label in enumerate(splits.labels)}
    sample = train_sample(splits, cfg.scope.train_rows, cfg.seed)
    texts = {"validation": splits["validation"]["text"].tolist(), "test": splits["test"]["text"].tolist(),
             "ood:selection": selection}
    logits, features, train, temperatures = {}, {}, {}, {}
    for name, path in models.items():
        model = load_predictor(path)
        out = {s: model.predict_outputs(t) for s, t in texts.items()}
        logits[name], features[name] = {s: o[0] for s, o in out.items()}, {s: o[1] for s, o in out.items()}
        train[name] = (model.predict_outputs(sample["text"].tolist())[1], sample["label"].map(label_id).to_numpy())
        temperatures[name] = fit_temperature(out["validation"][0],
                                             splits["validation"]["label"].map(label_id).to_numpy())
    results, _, missing = evaluate_detectors(
        logits, features, train, num_classes=len(splits.labels), temperatures=temperatures, tpr=cfg.scope.tpr,
        k=cfg.scope.k, bank_size=cfg.scope.bank_size, bootstrap_samples=1000, seed=cfg.seed,
        texts={**texts, **split_texts(splits, (), sample)})
    by_model = results["ood:selection"]
    detectors = [d for d in next(iter(by_model.values())) if all(d in r for r in by_model.values())]
    print(f"selection: test ({len(splits['test'])} rows) vs {len(selection)} standard-library docstrings; "
          f"models: {', '.join(models)}\n")
    print(f"{'detector':<20} " + " ".join(f"{m:>12}" for m in by_model) + f" {'worst':>7} {'worst FPR95':>12}")
    worst = {}
    for det in detectors:
        aurocs = [by_model[m][det]["auroc"] for m in by_model]
        fprs = [by_model[m][det]["fpr_at_tpr"] for m in by_model]
        worst[det] = (min(aurocs), max(fprs))
        print(f"{det:<20} " + " ".join(f"{a:>12.3f}" for a in aurocs) + f" {min(aurocs):>7.3f} {max(fprs):>12.3f}")
    chosen = max((d for d in worst if d not in MODEL_INDEPENDENT), key=lambda d: (round(worst[d][0], 3), -worst[d][1]))
    print(f"\nchosen default: {chosen}" + (f"; not evaluated: {missing}" if missing else ""))
    result = {"chosen_detector": chosen, "n_selection": len(selection), "n_test": int(len(splits["test"])),
              "models": ",".join(models),
              **{f"{d}_worst_auroc_selection": w[0] for d, w in worst.items()},
              **{f"{d}_worst_fpr95_selection": w[1] for d, w in worst.items()},
              **{f"{d}_auroc_selection_{m}": by_model[m][d]["auroc"] for d in detectors for m in by_model}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
