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
from distill_gap.evaluation.intervals import bootstrap_metrics
from distill_gap.evaluation.metrics import ece, fit_temperature, mean_kl, reliability_bins, score
from distill_gap.evaluation.noninferiority import paired_drop
from distill_gap.evaluation.ood import auroc_drop_interval, energy_score, msp_score, ood_detection
from distill_gap.evaluation.stress import stress_result, stress_variants
from distill_gap.inference.predictor import load_predictor
from distill_gap.outcomes import FAIL, INSUFFICIENT, by_outcome


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
    scope: dict[str, dict] = field(default_factory=dict)  # model -> the guard of scope.detector (threshold, ...)
    noninferiority: dict[str, list[dict]] = field(default_factory=dict)  # model -> paired checks vs the teacher
    # a redistillation: the edge model against the champion it would replace, same checks ({"name", "checks"})
    champion: dict = field(default_factory=dict)
    not_evaluated: list[dict] = field(default_factory=list)  # {"model", "suite", "reason"}
    seconds: float | None = None  # wall time of the evaluation
    sizes: dict[str, int] = field(default_factory=dict)  # model -> bytes of its folder on disk

    def metric(self, suite: str, model: str, key: str = "accuracy") -> float | None:
        return self.suites.get(suite, {}).get(model, {}).get(key)

    def to_dict(self) -> dict:
        return {"models": self.models, "labels": self.labels, "threshold": self.threshold, "suites": self.suites,
                "flags": self.flags, "calibration": self.calibration, "ood": self.ood, "stress": self.stress,
                "scope": self.scope, "noninferiority": self.noninferiority, "champion": self.champion,
                "not_evaluated": self.not_evaluated,
                "worst_slices": {m: self.worst_slices(m) for m in self.models if m != "teacher"}}

    def worst_slices(self, model: str, k: int = 3) -> list[tuple[str, float]]:
        """The slices where `model` lost most accuracy against the teacher."""
        gaps = []
        for suite, by_model in self.suites.items():
            if (suite.startswith("slice:") and by_model["teacher"]["n"] >= MIN_SLICE_ROWS and model in by_model
                    and "accuracy" in by_model[model]):
                gaps.append((suite, by_model[model]["accuracy"] - by_model["teacher"]["accuracy"]))
        return sorted(gaps, key=lambda g: g[1])[:k]

    def markdown(self, title: str = "Gap report", *, edge: str | None = None, gates: dict | None = None,
                 links: dict[str, str] | None = None) -> str:
        """What ops teams read in the Prefect UI, in this order: the verdict (with `gates`), the flagged suites of
        the shipped artifact `edge` (default: the last compressed model), a compact table of `edge` against the
        teacher on the suites with enough rows (fits ~900 px), the links (the HTML report in MLflow) and what
        could not be evaluated. Every other model and section (calibration, OOD detectors, scope, stress,
        non-inferiority, the small slices) is in the HTML report and gap_report.json."""
        others = [m for m in self.models if m != "teacher"]
        edge = edge if edge is not None else (others[-1] if others else "teacher")
        lines = []
        if gates is not None:
            lines += [*verdict_lines(gates, self.not_evaluated), ""]
        lines += [f"## {title}", ""]
        # 1. flagged suites of the shipped artifact, worst first
        flags = sorted((f for f in self.flags if f["model"] == edge), key=lambda f: f["gap"])
        if flags:
            lines += [f"**⚠ `{edge}` (shipped) loses more than {self.threshold:.0%} accuracy to the teacher on "
                      f"{len(flags)} suite(s):**", ""]  # a blank line: strict renderers start the list
            for f in flags:
                t, e = self.suites[f["suite"]]["teacher"], self.suites[f["suite"]][edge]
                lines.append(f"- {f['suite'].removeprefix('slice:')}: {f['gap'] * 100:+.1f} pts "
                             f"({e['accuracy']:.3f} vs {t['accuracy']:.3f}, n={f['n']}{_gap_text(e)})")
        else:
            lines.append(f"No suite where `{edge}` (shipped) loses more than {self.threshold:.0%} accuracy to the "
                         f"teacher (suites of {MIN_SLICE_ROWS}+ rows).")
        # 2. the edge model against the teacher where there are enough rows; slices worst first
        rows, small = [], 0
        for suite, by_model in sorted(self.suites.items(), key=lambda kv: self._order(kv[0], edge)):
            t, e = by_model.get("teacher", {}), by_model.get(edge)
            if not t.get("n"):
                continue
            if t["n"] < MIN_SLICE_ROWS:
                small += 1
                continue
            if not e or "accuracy" not in e:
                rows.append(f"| {suite.removeprefix('slice:')} | {t['n']} | {t['accuracy']:.3f} | not evaluated | - | - |")
                continue
            mark = " ⚠" if any(f["suite"] == suite for f in flags) else ""
            rows.append(f"| {suite.removeprefix('slice:')} | {t['n']} | {t['accuracy']:.3f} | "
                        f"{e['accuracy']:.3f}{_ci_text(e)} | {e['accuracy'] - t['accuracy']:+.3f}{mark} | "
                        f"{_num(e.get('fidelity'))} |")
        lines += ["", f"### `{edge}` vs the teacher (accuracy; suites of {MIN_SLICE_ROWS}+ rows, slices worst first)",
                  "", f"| suite | n | teacher | {edge} [95% CI] | Δ | fidelity |", "|---|--:|--:|--:|--:|--:|", *rows]
        if small:
            lines += ["", f"{small} slice(s) under {MIN_SLICE_ROWS} rows (never flagged) are in the HTML report and "
                          "gap_report.json."]
        # 3. where the rest is
        links = {k: v for k, v in (links or {}).items() if v}
        rest = [m for m in others if m != edge]
        lines += ["", (" · ".join(f"[{k}]({v})" for k, v in links.items()) + ": " if links else "")
                  + "plots, every model" + (f" ({', '.join(rest)})" if rest else "") + " and every section "
                  "(per-class recall, calibration, OOD detectors and scope guard, non-inferiority, stress suites) "
                  "are in the HTML report; every number in gap_report.json (MLflow, evaluate run, evaluation/)."]
        if gates is None:  # the verdict lists them otherwise
            lines += [f"\n**not evaluated**: `{m['model']}` on {m['suite']}: {m['reason']}" for m in self.not_evaluated]
        return "\n".join(lines) + "\n"

    def _order(self, suite: str, edge: str) -> tuple:
        """Held-out splits, then OOD suites, then slices by the edge model's gap (worst first)."""
        if not suite.startswith("slice:"):
            return (0 if not suite.startswith("ood:") else 1, 0.0)
        by_model = self.suites[suite]
        e, t = by_model.get(edge, {}), by_model.get("teacher", {})
        gap = e["accuracy"] - t["accuracy"] if "accuracy" in e and "accuracy" in t else 0.0
        return (2, gap)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def verdict_lines(gates: dict[str, dict], not_evaluated: list[dict] | None = None) -> list[str]:
    """The gates' outcome in markdown, short: the verdict, then one bullet per failed or undecided gate with its
    evidence (failed first), the passed gates in one line, what was not evaluated."""
    failed, thin = by_outcome(gates, FAIL), by_outcome(gates, INSUFFICIENT)
    if failed:
        head = f"**Verdict: {len(failed)} gate(s) FAILED: {', '.join(failed)}** (@champion not moved)"
    elif thin:
        head = (f"**Verdict: insufficient evidence for {len(thin)} gate(s)** (@challenger only: @champion needs a "
                "named approver's signed waiver of these gates)")
    else:
        head = f"**Verdict: all {len(gates)} gates passed.**"
    lines = [head, ""]
    for label, group in (("**FAIL**", failed), ("undecided", thin)):
        lines += [f"- {label} `{k}`: {g['value']:.3f} vs threshold {g['threshold']:.3f}"
                  + (" (inherited from the teacher)" if g.get("inherited") else "")
                  + (f"; {g['detail']}" if g.get("detail") else "") for k, g in group.items()]
    passed = [k for k in gates if k not in failed and k not in thin]
    if passed:
        lines.append(f"- passed ({len(passed)}): " + ", ".join(f"`{k}`" for k in passed))
    lines += [f"- not evaluated: `{m['model']}` on {m['suite']}: {m['reason']}" for m in not_evaluated or []]
    return lines


def _gap_text(metrics: dict) -> str:
    """"; 90% interval of the paired gap [low, high] pts" where gap_report measured it."""
    gap = (metrics.get("ci") or {}).get("gap_vs_teacher") or {}
    if gap.get("low") is None:
        return ""
    return f"; paired 90% interval [{gap['low'] * 100:+.1f}, {gap['high'] * 100:+.1f}] pts"


def _ci_text(metrics: dict) -> str:
    ci = (metrics.get("ci") or {}).get("accuracy")
    if not ci:
        return ""
    if ci.get("low") is None:
        return " (n too small)"
    return f" [{ci['low']:.3f}, {ci['high']:.3f}]"


def gap_interval(teacher_ok, model_ok, *, seed: int = 0) -> dict:
    """The accuracy gap model - teacher on the same rows with a 90% interval: the non-inferiority checks' paired
    posterior (noninferiority.paired_drop), its one-sided 95% bounds negated. {"value", "low", "high", "level"}."""
    r = paired_drop(teacher_ok, model_ok, seed=seed)
    return {"value": -r["drop"], "low": -r["high"], "high": -r["low"], "level": 0.90}


def gap_report(logits: dict[str, dict[str, np.ndarray]], splits, threshold: float = 0.02, *,
               bootstrap_samples: int = 0, seed: int = 0) -> GapReport:
    """Score each model's logits (model -> split -> (N, C)) per split and per test slice against the teacher.

    With `bootstrap_samples`, each metric gets its bootstrap interval under "ci", and each compressed model on a
    suite of MIN_SLICE_ROWS+ rows the paired interval of its gap to the teacher (ci["gap_vs_teacher"])."""
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
        truth = df["label"].map(label_id).to_numpy(dtype=float)  # NaN: no label, or one outside the label set
        known = ~np.isnan(truth)
        if not known.any():  # an OOD set of unseen classes or without labels: detection only, no accuracy
            continue
        if not known.all():  # accuracy only where the label is in the set
            mask = known if mask is None else mask & known
        truth = truth.astype(int) if mask is None else truth[mask].astype(int)
        teacher_pred = logits["teacher"][split].argmax(-1)
        if mask is not None:
            teacher_pred = teacher_pred[mask]
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
                if m != "teacher" and len(truth) >= MIN_SLICE_ROWS:
                    by_model[m]["ci"]["gap_vs_teacher"] = gap_interval(teacher_pred == truth, pred == truth, seed=seed)
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
                            bootstrap_samples: int = 0, seed: int = 0) -> GapReport:
    """Calibration (T fitted on validation, ECE on test before/after) and OOD detection by the logits alone (MSP
    and energy AUROC, FPR at 95% TPR, test = in-distribution); add_scope adds the feature-space detectors and the
    guard that ships.

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


def load_predictors(paths: dict, *, max_length: int, device: str) -> tuple[dict, list[dict]]:
    """name -> Predictor for each model folder (any runtime, through load_predictor), and the models that could
    not be loaded, listed (the teacher is required: its failure raises)."""
    predictors, missing = {}, []
    for name, path in paths.items():
        try:
            predictors[name] = load_predictor(path, max_length=max_length, device=device)
        except Exception as err:
            if name == "teacher":
                raise
            missing.append({"model": name, "suite": "all", "reason": f"could not be loaded: {err}"})
    return predictors, missing


def train_sample(splits, rows: int, seed: int):
    """The seeded sample of the rows the model trained on that the scope detectors are fitted on (all of it under
    `rows`): the training split, plus splits.scope_rows (a redistillation's production rows) when there are any."""
    import pandas as pd

    train, extra = splits["train"], splits.scope_rows
    if extra is not None and len(extra):
        train = pd.concat([train[["id", "text", "label"]], extra[["id", "text", "label"]]], ignore_index=True)
    return train if len(train) <= rows else train.sample(n=rows, random_state=seed)


def collect_outputs(predictors: dict, splits, *, batch_size: int = 32, train_rows: int = 0, seed: int = 0):
    """model -> split -> logits (N, C) and pooled features (N, D) for every split but train, plus the features of
    train_sample(splits, train_rows) under "train" (features only: the detectors' reference rows).

    Returns (logits, features, failed): features[model] lacks a split where the artifact gives no features; a
    model that fails or returns the wrong number of classes is left out and listed (the teacher is required).
    """
    num_classes = len(splits.labels)
    logits: dict[str, dict[str, np.ndarray]] = {}
    features: dict[str, dict[str, np.ndarray]] = {}
    missing: list[dict] = []
    texts = {split: splits[split]["text"].tolist() for split in splits.frames if split != "train"}
    if train_rows:
        texts["train"] = train_sample(splits, train_rows, seed)["text"].tolist()
    for name, model in predictors.items():
        out, feats = {}, {}
        try:
            for split, split_texts in texts.items():
                arr, f = model.predict_outputs(split_texts, batch_size=batch_size, desc=f"evaluate {name} {split}")
                arr = np.asarray(arr)
                if arr.ndim != 2 or arr.shape[1] != num_classes:
                    raise DistillError(f"{name} returns logits of shape {arr.shape} on {split}; the label set "
                                       f"has {num_classes} classes {list(splits.labels)}",
                                       "check that the model was trained on data.labels, in that order")
                if split != "train":
                    out[split] = arr
                if f is not None:
                    feats[split] = np.asarray(f, dtype=np.float32)
        except Exception as err:
            if name == "teacher":
                raise
            missing.append({"model": name, "suite": "all", "reason": str(err).splitlines()[0]})
            continue
        logits[name], features[name] = out, feats
    return logits, features, missing


def scope_record(report: GapReport, model: str, splits) -> dict | None:
    """The evidence that ships with the edge model's guard (scope.json): what it was fitted and scored on."""
    if model not in report.scope:
        return None
    g = report.scope[model]
    return {"model": model, "fitted_on": g.get("fitted_on"), "data_digests": splits.digests(),
            "slices": [s.removeprefix("slice:") for s in report.suites if s.startswith("slice:")],
            "ood_sets": {suite: {k: v for k, v in (by_model.get(model, {}).get(g["detector"]) or {}).items()
                                 if k != "hist"} for suite, by_model in report.ood.items()},
            "test_accuracy": report.metric("test", model),
            "calibration": {k: report.calibration.get(model, {}).get(k) for k in ("temperature", "ece_after")},
            **({"regions": g["regions"]} if g.get("regions") else {}),
            "rule": f"in_scope = {g['detector']} score >= threshold; probabilities = softmax(logits / temperature)"}


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
