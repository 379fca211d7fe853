"""Evaluation parity: every model scored on its own on the same suites, the gap shown per slice."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

# Slices smaller than this are reported but never flagged: one example would swing them by >10 points.
MIN_SLICE_ROWS = 10


def score(pred: np.ndarray, truth: np.ndarray, num_classes: int, teacher_pred: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1 (scikit-learn) and fidelity (agreement with the teacher's predictions)."""
    from sklearn.metrics import accuracy_score, f1_score

    out = {"n": int(len(truth))}
    if len(truth) == 0:
        return out
    out["accuracy"] = float(accuracy_score(truth, pred))
    out["macro_f1"] = float(f1_score(truth, pred, labels=list(range(num_classes)), average="macro", zero_division=0))
    if teacher_pred is not None:
        out["fidelity"] = float(np.mean(pred == teacher_pred))
    return out


@dataclass
class GapReport:
    """Per model, per suite metrics; suites are splits and the slices of the test split."""

    models: list[str]
    suites: dict[str, dict[str, dict]] = field(default_factory=dict)  # suite -> model -> metrics
    flags: list[dict] = field(default_factory=list)
    threshold: float = 0.02

    def metric(self, suite: str, model: str, key: str = "accuracy") -> float | None:
        return self.suites.get(suite, {}).get(model, {}).get(key)

    def to_dict(self) -> dict:
        return {"models": self.models, "threshold": self.threshold, "suites": self.suites, "flags": self.flags}

    def worst_slices(self, model: str, k: int = 3) -> list[tuple[str, float]]:
        """The slices where `model` lost most accuracy against the teacher."""
        gaps = []
        for suite, by_model in self.suites.items():
            if suite.startswith("slice:") and by_model["teacher"]["n"] >= MIN_SLICE_ROWS and model in by_model:
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
                s = by_model[m]
                mark = " ⚠" if (suite, m) in flagged else ""
                cells += [f"{s['accuracy']:.3f} ({s['accuracy'] - t['accuracy']:+.3f}){mark}", f"{s['macro_f1']:.3f}",
                          f"{s.get('fidelity', float('nan')):.3f}"]
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
        return "\n".join(lines) + "\n"


def gap_report(logits: dict[str, dict[str, np.ndarray]], splits, threshold: float = 0.02) -> GapReport:
    """Score each model's logits (model -> split -> (N, C)) per split and per test slice against the teacher."""
    labels = list(splits.labels)
    label_id = {l: i for i, l in enumerate(labels)}
    models = list(logits)
    assert models[0] == "teacher", "the teacher comes first"
    report = GapReport(models=models, threshold=threshold)
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
        for m in models:
            pred = logits[m][split].argmax(-1)
            pred = pred[mask] if mask is not None else pred
            by_model[m] = score(pred, truth, len(labels), None if m == "teacher" else teacher_pred)
        report.suites[suite] = by_model
        if by_model["teacher"]["n"] >= MIN_SLICE_ROWS:
            for m in models[1:]:
                gap = by_model[m]["accuracy"] - by_model["teacher"]["accuracy"]
                if gap < -threshold:
                    report.flags.append({"suite": suite, "model": m, "gap": gap, "n": by_model[m]["n"]})
    return report


def gate_thresholds(evaluate_cfg) -> dict[str, float]:
    """All promotion thresholds in one place (mlops-stacks style): data, not literals in code."""
    return {"edge_accuracy_drop_vs_student": evaluate_cfg.max_edge_drop,
            "edge_argmax_agreement_vs_student": evaluate_cfg.min_edge_agreement}


def evaluate_gates(report: GapReport, edge_model: str, edge_parity: dict, evaluate_cfg, *,
                   quantization: dict | None = None) -> dict[str, dict]:
    """Each gate with its measured value, threshold and verdict (and a `detail` sentence where it helps).

    `quantization` comes from the quantize stage: {"passed": bool, "detail": str}; absent, the gate is not added.
    """
    limits = gate_thresholds(evaluate_cfg)
    drop = report.metric("test", "student") - report.metric("test", edge_model)
    agree = edge_parity["argmax_agreement"]
    finite = bool(edge_parity.get("finite", True))
    gates = {
        "edge_accuracy_drop_vs_student": {"value": drop, "threshold": limits["edge_accuracy_drop_vs_student"],
                                          "passed": drop <= limits["edge_accuracy_drop_vs_student"] + 1e-12,
                                          "detail": f"{edge_model} test accuracy vs the fp32 student"},
        "edge_argmax_agreement_vs_student": {"value": agree, "threshold": limits["edge_argmax_agreement_vs_student"],
                                             "passed": finite and agree >= limits["edge_argmax_agreement_vs_student"],
                                             "detail": f"{edge_model} on held-out validation texts"},
        "edge_outputs_finite": {"value": float(finite), "threshold": 1.0, "passed": finite,
                                "detail": "no NaN or inf in the edge model's held-out logits"},
    }
    if quantization is not None:
        gates["quantization"] = {"value": float(quantization["passed"]), "threshold": 1.0,
                                 "passed": bool(quantization["passed"]), "detail": quantization["detail"]}
    return gates


def model_predictors(paths: dict[str, str], *, max_length: int, batch_size: int, device: str) -> dict:
    """name -> callable(texts) -> logits, for HF folders, INC INT8 folders and ONNX folders."""
    from pathlib import Path

    from tasks.inference import predict_logits
    from tasks.modeling import load_classifier

    predictors = {}
    for name, path in paths.items():
        path = Path(path)
        if (path / "int8_meta.json").is_file():
            from tasks.quantize import load_int8

            int8 = load_int8(path)
            predictors[name] = lambda texts, m=int8: m.predict_logits(list(texts), batch_size=batch_size)
        elif (path / "model.onnx").is_file():
            from tasks.quantize import onnx_predict_logits

            predictors[name] = lambda texts, p=path: onnx_predict_logits(p, list(texts), batch_size=batch_size,
                                                                        max_length=max_length)
        else:
            model, tok = load_classifier(path)
            predictors[name] = lambda texts, m=model, t=tok, n=name: predict_logits(
                m, t, list(texts), batch_size=batch_size, max_length=max_length, device=device, desc=f"evaluate {n}")
    return predictors


# ---------------------------------------------------------------------------------------------
# Prefect task


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(model_paths: dict[str, str], splits, cfg, *, device: str, client=None, run_id: str | None = None):
    """Score teacher, student and each edge artifact independently; publish the gap report."""
    import json
    import tempfile
    from pathlib import Path

    from prefect.artifacts import create_markdown_artifact
    from prefect.logging import get_run_logger

    log = get_run_logger()
    predictors = model_predictors(model_paths, max_length=cfg.runtime.max_length, batch_size=cfg.evaluate.batch_size,
                                  device=device)
    logits = {name: {split: predict(splits[split]["text"].tolist()) for split in splits.frames
                     if split not in ("train", "validation")}
              for name, predict in predictors.items()}
    report = gap_report(logits, splits, cfg.evaluate.gap_threshold)
    md = report.markdown(f"Gap report: {cfg.name} (teacher vs compressed models)")
    create_markdown_artifact(key=f"{cfg.name}-gap-report", markdown=md, description=f"Evaluation parity for {cfg.name}")
    if client is not None:
        for suite in ("test", *[s for s in splits.frames if s.startswith("ood:")]):
            for model, metrics in report.suites.get(suite, {}).items():
                for k, v in metrics.items():
                    if k != "n":
                        client.log_metric(run_id, f"{model}.{suite.replace(':', '.')}.{k}", v)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "gap_report.md").write_text(md)
            (Path(tmp) / "gap_report.json").write_text(json.dumps(report.to_dict(), indent=2))
            client.log_artifacts(run_id, tmp, "evaluation")
    for name in report.models:
        t = report.metric("test", name)
        log.info("%s: test accuracy %.3f, macro-F1 %.3f", name, t, report.metric("test", name, "macro_f1"))
    return report
