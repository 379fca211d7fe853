"""The gap report: every model scored on its own on the same suites (held-out splits, test slices, OOD sets,
stress variants), the gap to the teacher shown per suite, and what ships with the edge model (its scope).

Pure library: logits or predictor callables in, a GapReport out; the evaluate stage (tasks/evaluate.py) loads
the models, logs to MLflow and writes the edge folder's scope and reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.evaluation.gates import MIN_SLICE_ROWS
from distill_gap.evaluation.html_report import drop_cell
from distill_gap.evaluation.intervals import bootstrap_metrics
from distill_gap.evaluation.metrics import ece, fit_temperature, mean_kl, reliability_bins, score
from distill_gap.evaluation.ood import auroc_drop_interval, energy_score, msp_score, ood_detection, threshold_at_tpr
from distill_gap.evaluation.stress import stress_result, stress_variants
from distill_gap.inference.predictor import load_predictor


@dataclass
class GapReport:
    """Per model, per suite metrics; suites are splits and the slices of the test split."""

    models: list[str]
    suites: dict[str, dict[str, dict]] = field(default_factory=dict)  # suite -> model -> metrics (+ "ci")
    flags: list[dict] = field(default_factory=list)
    threshold: float = 0.02
    labels: list[str] = field(default_factory=list)
    calibration: dict[str, dict] = field(default_factory=dict)  # model -> temperature, ECE before/after, bins
    ood: dict[str, dict[str, dict]] = field(default_factory=dict)  # ood suite -> model -> msp/energy detection
    stress: dict[str, dict[str, dict]] = field(default_factory=dict)  # variant -> model -> drop, flip rate
    scope: dict[str, dict] = field(default_factory=dict)  # model -> OOD score threshold at scope_tpr
    not_evaluated: list[dict] = field(default_factory=list)  # {"model", "suite", "reason"}
    seconds: float | None = None  # wall time of the evaluation
    sizes: dict[str, int] = field(default_factory=dict)  # model -> bytes of its folder on disk

    def metric(self, suite: str, model: str, key: str = "accuracy") -> float | None:
        return self.suites.get(suite, {}).get(model, {}).get(key)

    def to_dict(self) -> dict:
        return {"models": self.models, "labels": self.labels, "threshold": self.threshold, "suites": self.suites,
                "flags": self.flags, "calibration": self.calibration, "ood": self.ood, "stress": self.stress,
                "scope": self.scope, "not_evaluated": self.not_evaluated,
                "worst_slices": {m: self.worst_slices(m) for m in self.models if m != "teacher"}}

    def worst_slices(self, model: str, k: int = 3) -> list[tuple[str, float]]:
        """The slices where `model` lost most accuracy against the teacher."""
        gaps = []
        for suite, by_model in self.suites.items():
            if (suite.startswith("slice:") and by_model["teacher"]["n"] >= MIN_SLICE_ROWS and model in by_model
                    and "accuracy" in by_model[model]):
                gaps.append((suite, by_model[model]["accuracy"] - by_model["teacher"]["accuracy"]))
        return sorted(gaps, key=lambda g: g[1])[:k]

    def markdown(self, title: str = "Gap report") -> str:
        """A table ops teams read in the Prefect UI: teacher beside each compressed model, per suite."""
        others = [m for m in self.models if m != "teacher"]
        head = "| suite | n | teacher acc | " + " | ".join(f"{m} acc (Δ) | {m} F1 | {m} fidelity" for m in others) + " |"
        sep = "|" + "---|" * (3 + 3 * len(others))
        rows = [head, sep]
        flagged = {(f["suite"], f["model"]) for f in self.flags}
        for suite, by_model in self.suites.items():
            t = by_model["teacher"]
            if not t.get("n"):
                continue
            cells = [suite, str(t["n"]), f"{t['accuracy']:.3f}"]
            for m in others:
                s = by_model.get(m)
                if not s or "accuracy" not in s:
                    cells += ["not evaluated", "-", "-"]
                    continue
                mark = " ⚠" if (suite, m) in flagged else ""
                cells += [f"{s['accuracy']:.3f}{_ci_text(s)} ({s['accuracy'] - t['accuracy']:+.3f}){mark}",
                          f"{s['macro_f1']:.3f}", f"{s.get('fidelity', float('nan')):.3f}"]
            rows.append("| " + " | ".join(cells) + " |")
        lines = [f"## {title}", "", *rows, ""]
        if self.flags:
            lines.append(f"**⚠ {len(self.flags)} suite(s) where a compressed model loses more than "
                         f"{self.threshold:.0%} accuracy against the teacher** (slices under {MIN_SLICE_ROWS} rows not flagged):")
            lines += [f"- `{f['model']}` on `{f['suite']}`: {f['gap']:+.3f} (n={f['n']})" for f in self.flags]
        else:
            lines.append(f"No suite where a compressed model loses more than {self.threshold:.0%} against the teacher.")
        for m in others:
            worst = self.worst_slices(m)
            if worst:
                lines.append(f"- largest slice losses of `{m}`: " + ", ".join(f"{s.removeprefix('slice:')} {g:+.3f}" for s, g in worst))
        if self.calibration:
            lines += ["", "### Calibration (ECE on test, 15 bins; T fitted on validation)", "",
                      "| model | T | ECE before | ECE after |", "|---|---|---|---|"]
            lines += [f"| {m} | {c['temperature']:.2f} | {c['ece_before']:.3f} | {c['ece_after']:.3f} |"
                      for m, c in self.calibration.items()]
        if self.ood:
            lines += ["", "### OOD detection (in = test)", "", "| OOD set | model | MSP AUROC | MSP AUROC drop vs teacher "
                      "[paired 95%] | MSP FPR@95 | energy AUROC | energy FPR@95 |", "|---|---|---|---|---|---|---|"]
            for suite, by_model in self.ood.items():
                lines += [f"| {suite} | {m} | {d['msp']['auroc']:.3f} | {drop_cell(d['msp'].get('drop_vs_teacher'))} | "
                          f"{d['msp']['fpr_at_tpr']:.3f} | {d['energy']['auroc']:.3f} | {d['energy']['fpr_at_tpr']:.3f} |"
                          for m, d in by_model.items()]
        if self.stress:
            lines += ["", "### Stress suites (seeded sample of test)", "", "| variant | " +
                      " | ".join(f"{m} drop / flips" for m in self.models) + " |", "|---|" + "---|" * len(self.models)]
            for variant, by_model in self.stress.items():
                lines.append(f"| {variant} | " + " | ".join(
                    f"{by_model[m]['accuracy_drop']:+.3f} / {by_model[m]['flip_rate']:.3f}" if m in by_model else "-"
                    for m in self.models) + " |")
        for miss in self.not_evaluated:
            lines.append(f"\n**not evaluated**: `{miss['model']}` on {miss['suite']}: {miss['reason']}")
        return "\n".join(lines) + "\n"


def _ci_text(metrics: dict) -> str:
    ci = (metrics.get("ci") or {}).get("accuracy")
    if not ci:
        return ""
    if ci.get("low") is None:
        return " (n too small)"
    return f" [{ci['low']:.3f}, {ci['high']:.3f}]"


def gap_report(logits: dict[str, dict[str, np.ndarray]], splits, threshold: float = 0.02, *,
               bootstrap_samples: int = 0, seed: int = 0) -> GapReport:
    """Score each model's logits (model -> split -> (N, C)) per split and per test slice against the teacher."""
    labels = list(splits.labels)
    label_id = {l: i for i, l in enumerate(labels)}
    models = list(logits)
    assert models[0] == "teacher", "the teacher comes first"
    report = GapReport(models=models, threshold=threshold, labels=labels)
    # train and validation shaped the models (fitting, checkpoint choice): report held-out suites only
    suites: list[tuple[str, str, np.ndarray | None]] = [(name, name, None) for name in splits.frames
                                                          if name not in ("train", "validation")]
    test = splits["test"]
    for col in splits.slice_columns:
        for value in sorted(test[col].unique()):
            suites.append((f"slice:{col}={value}", "test", (test[col] == value).to_numpy()))
    for suite, split, mask in suites:
        df = splits[split]
        if split not in logits["teacher"]:
            continue
        truth = df["label"].map(label_id).to_numpy()
        teacher_pred = logits["teacher"][split].argmax(-1)
        if mask is not None:
            truth, teacher_pred = truth[mask], teacher_pred[mask]
        by_model = {}
        teacher_logits = logits["teacher"][split] if mask is None else logits["teacher"][split][mask]
        for m in models:
            if split not in logits[m]:
                continue
            model_logits = logits[m][split] if mask is None else logits[m][split][mask]
            pred = model_logits.argmax(-1)
            by_model[m] = score(pred, truth, len(labels), None if m == "teacher" else teacher_pred)
            if len(truth) and m != "teacher":
                by_model[m]["kl_teacher"] = mean_kl(teacher_logits, model_logits)
            if bootstrap_samples and len(truth):
                by_model[m]["ci"] = bootstrap_metrics(truth, pred, num_classes=len(labels), n_boot=bootstrap_samples,
                                                      seed=seed, min_n=MIN_SLICE_ROWS)
        report.suites[suite] = by_model
        if by_model["teacher"]["n"] >= MIN_SLICE_ROWS:
            for m in [m for m in models[1:] if m in by_model]:
                gap = by_model[m]["accuracy"] - by_model["teacher"]["accuracy"]
                if gap < -threshold:
                    report.flags.append({"suite": suite, "model": m, "gap": gap, "n": by_model[m]["n"]})
    return report


def _truth(splits, split: str) -> np.ndarray:
    label_id = {label: i for i, label in enumerate(splits.labels)}
    return splits[split]["label"].map(label_id).to_numpy()


def add_calibration_and_ood(report: GapReport, logits: dict[str, dict[str, np.ndarray]], splits, *,
                            scope_tpr: float = 0.95, bootstrap_samples: int = 0, seed: int = 0) -> GapReport:
    """Calibration (T fitted on validation, ECE on test before/after), OOD detection (MSP and energy AUROC,
    FPR at 95% TPR, test = in-distribution) and the scope threshold (MSP at `scope_tpr` of validation).

    With `bootstrap_samples`, each model's MSP AUROC drop against the teacher on the same rows gets a paired 95%
    interval (ood[suite][model]["msp"]["drop_vs_teacher"]), which the OOD gate reads."""
    from scipy.special import softmax

    has_val = "validation" in splits.frames and len(splits["validation"]) > 0
    test_truth = _truth(splits, "test")
    oods = [name for name in splits.frames if name.startswith("ood:") and len(splits[name])]
    for m in report.models:
        by_split = logits[m]
        if "test" not in by_split or not len(test_truth):
            continue
        test = by_split["test"]
        if has_val and "validation" in by_split:
            val, val_truth = by_split["validation"], _truth(splits, "validation")
            t = fit_temperature(val, val_truth)
            report.scope[m] = {"score": "msp", "threshold": threshold_at_tpr(msp_score(val), scope_tpr),
                               "tpr": scope_tpr, "temperature": t, "fitted_on": f"validation ({len(val)} rows)"}
        else:
            t = 1.0
            report.not_evaluated.append({"model": m, "suite": "calibration/scope",
                                         "reason": "no validation split to fit the temperature and threshold on"})
        before, after = softmax(test, axis=-1), softmax(test / t, axis=-1)
        report.calibration[m] = {"temperature": t, "ece_before": ece(before, test_truth),
                                 "ece_after": ece(after, test_truth),
                                 "reliability_before": reliability_bins(before, test_truth),
                                 "reliability_after": reliability_bins(after, test_truth)}
        for name in oods:
            if name not in by_split:
                continue
            d = {}
            for score_name, fn in (("msp", msp_score), ("energy", energy_score)):
                d[score_name] = ood_detection(fn(test), fn(by_split[name]))
            s_in, s_out = msp_score(test), msp_score(by_split[name])
            edges = np.linspace(min(s_in.min(), s_out.min()), max(s_in.max(), s_out.max()), 21)
            d["hist"] = {"score": "msp", "edges": edges.tolist(),
                         "in": np.histogram(s_in, edges)[0].tolist(), "out": np.histogram(s_out, edges)[0].tolist()}
            report.ood.setdefault(name, {})[m] = d
    if bootstrap_samples and "teacher" in logits:
        ref_in = msp_score(logits["teacher"]["test"])
        for name, by_model in report.ood.items():
            if "teacher" not in by_model:
                continue
            ref_out = msp_score(logits["teacher"][name])
            for m, d in by_model.items():
                if m != "teacher":
                    d["msp"]["drop_vs_teacher"] = auroc_drop_interval(
                        ref_in, ref_out, msp_score(logits[m]["test"]), msp_score(logits[m][name]),
                        n_boot=bootstrap_samples, seed=seed)
    return report


def add_stress(report: GapReport, predictors: dict, splits, models: list[str], *, rows: int, seed: int) -> GapReport:
    """Stress suites on a seeded sample of test: accuracy drop and prediction flips against the clean texts."""
    test = splits["test"]
    if rows <= 0 or not len(test):
        return report
    sample = test.sample(min(rows, len(test)), random_state=seed)
    truth = _truth(splits, "test")[test.index.get_indexer(sample.index)]
    clean_texts = sample["text"].tolist()
    variants = stress_variants(clean_texts, seed=seed)
    for m in models:
        if m not in predictors:
            continue
        try:
            clean = predictors[m](clean_texts).argmax(-1)
            for variant, texts in variants.items():
                report.stress.setdefault(variant, {})[m] = stress_result(clean, predictors[m](texts).argmax(-1), truth)
        except Exception as err:  # a model that breaks on noisy text is reported, the others go on
            report.not_evaluated.append({"model": m, "suite": "stress", "reason": f"{type(err).__name__}: {err}"})
    return report


def load_predictors(paths: dict, *, max_length: int, batch_size: int, device: str) -> tuple[dict, list[dict]]:
    """name -> callable(texts) -> logits for each model folder (any runtime, through load_predictor), and the
    models that could not be loaded, listed (the teacher is required: its failure raises)."""
    predictors, missing = {}, []
    for name, path in paths.items():
        try:
            model = load_predictor(path, max_length=max_length, device=device)
        except Exception as err:
            if name == "teacher":
                raise
            missing.append({"model": name, "suite": "all", "reason": f"could not be loaded: {err}"})
            continue
        predictors[name] = lambda texts, m=model, n=name: m.predict_logits(list(texts), batch_size=batch_size,
                                                                           desc=f"evaluate {n}")
    return predictors, missing


def collect_logits(predictors: dict, splits) -> tuple[dict[str, dict[str, np.ndarray]], list[dict]]:
    """model -> split -> logits (N, C) for every split but train; a model that fails or returns the wrong number
    of classes is left out and listed (the teacher is required: its failure raises)."""
    num_classes = len(splits.labels)
    logits: dict[str, dict[str, np.ndarray]] = {}
    missing: list[dict] = []
    for name, predict in predictors.items():
        out = {}
        try:
            for split in splits.frames:
                if split == "train":
                    continue
                arr = np.asarray(predict(splits[split]["text"].tolist()))
                if arr.ndim != 2 or arr.shape[1] != num_classes:
                    raise DistillError(f"{name} returns logits of shape {arr.shape} on {split}; the label set "
                                       f"has {num_classes} classes {list(splits.labels)}",
                                       "check that the model was trained on data.labels, in that order")
                out[split] = arr
        except Exception as err:
            if name == "teacher":
                raise
            missing.append({"model": name, "suite": "all", "reason": str(err).splitlines()[0]})
            continue
        logits[name] = out
    return logits, missing


def scope_record(report: GapReport, model: str, splits) -> dict | None:
    """What ships with the edge model: its OOD threshold and the evidence it was evaluated on."""
    if model not in report.scope:
        return None
    return {**report.scope[model], "model": model, "data_digests": splits.digests(),
            "slices": [s.removeprefix("slice:") for s in report.suites if s.startswith("slice:")],
            "ood_sets": {suite: report.ood.get(suite, {}).get(model, {}).get("msp") for suite in report.ood},
            "test_accuracy": report.metric("test", model),
            "calibration": {k: report.calibration.get(model, {}).get(k) for k in ("temperature", "ece_after")},
            "rule": "in_scope = max softmax probability of the raw logits >= threshold"}


def report_metrics(report: GapReport) -> dict[str, float]:
    """The report's headline numbers as flat MLflow metric names: per model, test and OOD suite metrics, ECE after
    scaling, MSP AUROC and the bounds of its drop against the teacher."""
    out: dict[str, float] = {}
    for suite in ("test", *[s for s in report.suites if s.startswith("ood:")]):
        for model, metrics in report.suites.get(suite, {}).items():
            for k, v in metrics.items():
                if k != "n" and isinstance(v, (int, float)):
                    out[f"{model}.{suite.replace(':', '.')}.{k}"] = v
    for model, c in report.calibration.items():
        out[f"{model}.test.ece_after_scaling"] = c["ece_after"]
    for suite, by_model in report.ood.items():
        for model, d in by_model.items():
            out[f"{model}.{suite.replace(':', '.')}.msp_auroc"] = d["msp"]["auroc"]
            drop = d["msp"].get("drop_vs_teacher") or {}
            for k in ("low", "high"):
                if drop.get(k) is not None:
                    out[f"{model}.{suite.replace(':', '.')}.msp_auroc_drop_{k}"] = drop[k]
    return out
