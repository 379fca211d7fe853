"""Distillation: build the student (teacher layers, a fresh config or a pretrained folder) and train
it on the cached soft labels; optionally a hard-label baseline of the same student and budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from distill_gap.errors import DistillError
from distill_gap.ops.failpoints import failpoint


def student_from_teacher(teacher, layers: list[int]):
    """A copy of `teacher` keeping only the encoder layers in `layers` (DistilBERT-style init)."""
    from distill_gap.kd.students import student_from_layers

    return student_from_layers(teacher, layers)


def student_spec(cfg) -> dict:
    """The distill_gap.kd.students.build_student spec of a DistillConfig."""
    s = cfg.student
    if s.kind == "layers":
        return {"kind": "layers", "every": s.every} if s.every else {"kind": "layers", "layers": list(cfg.student_layers)}
    if s.kind == "config":
        return {"kind": "config", "num_layers": s.num_layers, "hidden_size": s.hidden_size, "num_heads": s.num_heads,
                "intermediate_size": s.intermediate_size}
    if not s.path:
        raise DistillError("distill.student.kind is pretrained but distill.student.path is not set",
                           "set distill.student.path to a local model folder that shares the teacher's tokenizer")
    return {"kind": "pretrained", "path": s.path}


@dataclass
class StudentResult:
    path: Path
    digest: str
    layers: list[int]            # teacher layers kept (kind layers), else []
    parameters: int
    best_epoch: int
    best_val_metric: float
    history: list[dict]
    seconds: float
    spec: dict = field(default_factory=dict)
    hard_labels_only: bool = False
    examples_per_second: float = 0.0
    baseline: "StudentResult | None" = None   # the hard-label student of the same spec (distill.baseline)

    def summary(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["baseline"] = self.baseline.summary() if self.baseline else None
        return d


def settings_for(cfg, *, max_length: int, seed: int, hard_labels_only: bool = False):
    """TrainSettings of a DistillConfig; the hard-label baseline keeps the budget and drops every teacher term."""
    from distill_gap.kd.training import TrainSettings

    return TrainSettings(
        epochs=cfg.epochs, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
        warmup_fraction=cfg.warmup_fraction, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        patience=cfg.patience, alpha=1.0 if hard_labels_only else cfg.alpha,
        alpha_end=None if hard_labels_only else cfg.alpha_end,
        alpha_schedule="constant" if hard_labels_only else cfg.alpha_schedule, temperature=cfg.temperature,
        divergence=cfg.divergence, select_metric="accuracy" if hard_labels_only else cfg.select_metric,
        lr_schedule=cfg.lr_schedule, grad_accumulation=cfg.grad_accumulation,
        hidden_loss="none" if hard_labels_only else cfg.hidden_loss, hidden_weight=cfg.hidden_weight,
        layer_map=cfg.layer_map, attention_loss=False if hard_labels_only else cfg.attention_loss,
        attention_weight=cfg.attention_weight, max_length=max_length, seed=seed,
    )


def example_weights(teacher_logits: np.ndarray, critical: np.ndarray | None, *, critical_weight: float = 1.0,
                    uncertainty_weight: float = 0.0) -> np.ndarray | None:
    """Per-example loss weights: `critical_weight` on critical-slice rows, plus `uncertainty_weight` times
    (1 - the teacher's max probability), so the cases compression loses first count more. None when all 1."""
    from scipy.special import softmax

    n = len(teacher_logits)
    w = np.ones(n, dtype=np.float64)
    if critical is not None and critical_weight != 1.0:
        w[np.asarray(critical, dtype=bool)] *= critical_weight
    if uncertainty_weight:
        w += uncertainty_weight * (1.0 - softmax(np.asarray(teacher_logits, np.float64), axis=-1).max(-1))
    return None if np.all(w == 1.0) else w.astype(np.float32)


def distill_student(teacher_dir: str | Path, out_dir: str | Path, *, train_texts, train_label_ids, teacher_logits,
                    val_texts, val_label_ids, cfg, max_length: int, seed: int, device: str, on_epoch=None,
                    train_ids=None, weights=None, hard_labels_only: bool = False, desc: str = "distill") -> StudentResult:
    """Build the student, train it (KD, or hard labels only for the baseline) and save the best checkpoint.

    Validation fidelity is measured against the teacher's own predictions on `val_texts`. Every
    configuration error (student spec, tokenizer, layer map, head counts) is raised before training.
    """
    import torch

    from distill_gap.digest import model_digest
    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier, model_labels, save_classifier
    from distill_gap.ops.runtime import seed_everything
    from distill_gap.kd.students import build_student, check_layer_map, default_layer_map
    from distill_gap.kd.training import _hidden_dims, train_classifier

    seed_everything(seed)
    teacher, tokenizer = load_classifier(teacher_dir)
    spec = student_spec(cfg)
    student = build_student(teacher.cpu(), tokenizer, spec, labels=model_labels(teacher))
    if cfg.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    settings = settings_for(cfg, max_length=max_length, seed=seed, hard_labels_only=hard_labels_only)
    uses_teacher_model = settings.hidden_loss != "none" or settings.attention_loss
    if uses_teacher_model:
        n_s, n_t = len(_hidden_dims(student)) - 1, len(_hidden_dims(teacher)) - 1
        check_layer_map(settings.layer_map if settings.layer_map is not None else default_layer_map(n_s, n_t), n_s, n_t)
    teacher_logits = None if hard_labels_only else np.asarray(teacher_logits, dtype=np.float32)
    if teacher_logits is not None and teacher_logits.shape != (len(train_texts), len(model_labels(teacher))):
        raise DistillError(f"teacher logits have shape {teacher_logits.shape}, expected "
                           f"({len(train_texts)}, {len(model_labels(teacher))})", "relabel: the soft labels do not "
                           "match the training split")
    val_teacher_preds = predict_logits(teacher, tokenizer, val_texts, max_length=max_length, device=device).argmax(-1)
    teacher_model = teacher if uses_teacher_model else None
    if teacher_model is None:
        del teacher
        if device == "cuda":
            torch.cuda.empty_cache()
    result = train_classifier(student, tokenizer, train_texts, np.asarray(train_label_ids), settings,
                              val_texts=val_texts, val_label_ids=np.asarray(val_label_ids),
                              teacher_logits=teacher_logits, val_teacher_preds=val_teacher_preds, device=device,
                              desc=desc, on_epoch=on_epoch, example_ids=train_ids,
                              weights=None if hard_labels_only else weights, teacher_model=teacher_model)
    out = save_classifier(student.cpu(), tokenizer, out_dir)
    return StudentResult(path=out, digest=model_digest(out), layers=list(spec.get("layers") or []),
                         parameters=sum(p.numel() for p in student.parameters()), best_epoch=result.best_epoch,
                         best_val_metric=result.best_metric, history=result.history, seconds=result.seconds,
                         spec=spec, hard_labels_only=hard_labels_only, examples_per_second=result.examples_per_second)


# ---------------------------------------------------------------------------------------------
# Prefect task


@task(name="distill", cache_policy=NO_CACHE)
def distill_task(teacher_dir, splits, soft, cfg, workdir, *, device: str, client=None, run_id: str | None = None):
    """Train the student on the cached soft labels (never retried: training is not idempotent).

    With distill.baseline the same student is also trained on hard labels only (result.baseline).
    """
    from prefect.logging import get_run_logger

    log = get_run_logger()
    label_id = {l: i for i, l in enumerate(splits.labels)}
    train, val = splits["train"], splits["validation"]
    by_id = dict(zip(soft.ids, range(len(soft.ids))))
    teacher_logits = soft.logits[[by_id[i] for i in train["id"]]]  # (N, C), aligned with train rows
    critical = None
    for column, values in cfg.data.critical_slices.items():
        hit = train[column].astype(str).isin([str(v) for v in values]).to_numpy()
        critical = hit if critical is None else critical | hit
    weights = example_weights(teacher_logits, critical, critical_weight=cfg.distill.critical_weight,
                              uncertainty_weight=cfg.distill.uncertainty_weight)
    if weights is not None:
        log.info("rare-case emphasis: %d critical rows, weights %.2f..%.2f (mean %.2f)",
                 0 if critical is None else int(critical.sum()), weights.min(), weights.max(), weights.mean())

    def on_epoch_for(prefix):
        def on_epoch(row):
            log.info("%s epoch %d: loss %.4f, val accuracy %.3f, val fidelity %.3f", prefix, row["epoch"],
                     row["train_loss"], row["val_accuracy"], row.get("val_fidelity", float("nan")))
            if client is not None:
                for k, v in row.items():
                    if k != "epoch":
                        client.log_metric(run_id, f"{prefix}.{k}", v, step=row["epoch"])
            failpoint("distill.epoch-end")
        return on_epoch

    common = dict(train_texts=train["text"].tolist(), train_label_ids=train["label"].map(label_id).to_numpy(),
                  teacher_logits=teacher_logits, val_texts=val["text"].tolist(),
                  val_label_ids=val["label"].map(label_id).to_numpy(), cfg=cfg.distill,
                  max_length=cfg.runtime.max_length, seed=cfg.seed, device=device, train_ids=train["id"].tolist())
    result = distill_student(teacher_dir, workdir / "student", on_epoch=on_epoch_for("student"), weights=weights,
                             **common)
    log.info("student %s: %.1fM parameters, best epoch %d (val %s %.3f), %.0f s, %.0f examples/s", result.spec,
             result.parameters / 1e6, result.best_epoch, cfg.distill.select_metric, result.best_val_metric,
             result.seconds, result.examples_per_second)
    if cfg.distill.baseline:
        result.baseline = distill_student(teacher_dir, workdir / "student-hard", on_epoch=on_epoch_for("student_hard"),
                                          hard_labels_only=True, desc="hard-label baseline", **common)
        log.info("hard-label baseline: best epoch %d (val accuracy %.3f), %.0f s", result.baseline.best_epoch,
                 result.baseline.best_val_metric, result.baseline.seconds)
    return result
