"""Distillation: a student built from a subset of the teacher's layers, trained on cached soft labels."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import DistillError

# Encoder layer containers of the architectures we can slice (BERT-likes, DistilBERT).
_LAYER_KEY = re.compile(r"^(?P<pre>.*\.(?:encoder|transformer)\.layer\.)(?P<idx>\d+)(?P<post>\..*)$")


def student_from_teacher(teacher, layers: list[int]):
    """A copy of `teacher` keeping only the encoder layers in `layers` (DistilBERT-style init)."""
    from transformers import AutoModelForSequenceClassification

    cfg = teacher.config.to_dict()
    n_attr = "num_hidden_layers" if "num_hidden_layers" in cfg else "n_layers" if "n_layers" in cfg else None
    if n_attr is None:
        raise DistillError(f"cannot slice layers of a {teacher.config.model_type} model",
                           "use a BERT-like or DistilBERT teacher")
    n_teacher = cfg[n_attr]
    bad = [i for i in layers if i >= n_teacher]
    if bad or len(set(layers)) != len(layers):
        raise DistillError(f"distill.student_layers {layers} must be distinct indices below the teacher's {n_teacher} layers",
                           f"pick layers from 0..{n_teacher - 1}, e.g. [0, {n_teacher - 1}]")
    student_cfg = teacher.config.__class__.from_dict({**cfg, n_attr: len(layers)})
    student = AutoModelForSequenceClassification.from_config(student_cfg)
    new_of_old = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value.clone()
        elif int(m["idx"]) in new_of_old:
            state[f"{m['pre']}{new_of_old[int(m['idx'])]}{m['post']}"] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (missing, unexpected)
    return student


@dataclass
class StudentResult:
    path: Path
    digest: str
    layers: list[int]
    parameters: int
    best_epoch: int
    best_val_metric: float
    history: list[dict]
    seconds: float

    def summary(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def distill_student(teacher_dir: str | Path, out_dir: str | Path, *, train_texts, train_label_ids, teacher_logits,
                    val_texts, val_label_ids, cfg, max_length: int, seed: int, device: str,
                    on_epoch=None) -> StudentResult:
    """Build the student from the teacher's layers, train it with KD and save the best checkpoint.

    Validation fidelity is measured against the teacher's own predictions on `val_texts`.
    """
    from tasks.digest import model_digest
    from tasks.inference import predict_logits
    from tasks.modeling import load_classifier, save_classifier
    from tasks.runtime import seed_everything
    from tasks.training import TrainSettings, train_classifier

    seed_everything(seed)
    teacher, tokenizer = load_classifier(teacher_dir)
    val_teacher_preds = predict_logits(teacher, tokenizer, val_texts, max_length=max_length, device=device).argmax(-1)
    student = student_from_teacher(teacher.cpu(), list(cfg.student_layers))
    del teacher
    settings = TrainSettings(
        epochs=cfg.epochs, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
        warmup_fraction=cfg.warmup_fraction, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        patience=cfg.patience, alpha=cfg.alpha, temperature=cfg.temperature, select_metric=cfg.select_metric,
        max_length=max_length, seed=seed,
    )
    result = train_classifier(student, tokenizer, train_texts, np.asarray(train_label_ids), settings,
                              val_texts=val_texts, val_label_ids=np.asarray(val_label_ids),
                              teacher_logits=np.asarray(teacher_logits, dtype=np.float32),
                              val_teacher_preds=val_teacher_preds, device=device, desc="distill", on_epoch=on_epoch)
    out = save_classifier(student.cpu(), tokenizer, out_dir)
    return StudentResult(path=out, digest=model_digest(out), layers=list(cfg.student_layers),
                         parameters=sum(p.numel() for p in student.parameters()), best_epoch=result.best_epoch,
                         best_val_metric=result.best_metric, history=result.history, seconds=result.seconds)


# ---------------------------------------------------------------------------------------------
# Prefect task


@task(name="distill", cache_policy=NO_CACHE)
def distill_task(teacher_dir, splits, soft, cfg, workdir, *, device: str, client=None, run_id: str | None = None):
    """Train the student on the cached soft labels (never retried: training is not idempotent)."""
    from prefect.logging import get_run_logger

    log = get_run_logger()
    label_id = {l: i for i, l in enumerate(splits.labels)}
    train, val = splits["train"], splits["validation"]
    by_id = dict(zip(soft.ids, range(len(soft.ids))))
    teacher_logits = soft.logits[[by_id[i] for i in train["id"]]]  # (N, C), aligned with train rows

    def on_epoch(row):
        log.info("distill epoch %d: loss %.4f, val accuracy %.3f, val fidelity %.3f", row["epoch"],
                 row["train_loss"], row["val_accuracy"], row.get("val_fidelity", float("nan")))
        if client is not None:
            for k, v in row.items():
                if k != "epoch":
                    client.log_metric(run_id, f"student.{k}", v, step=row["epoch"])

    result = distill_student(
        teacher_dir, workdir / "student", train_texts=train["text"].tolist(),
        train_label_ids=train["label"].map(label_id).to_numpy(), teacher_logits=teacher_logits,
        val_texts=val["text"].tolist(), val_label_ids=val["label"].map(label_id).to_numpy(), cfg=cfg.distill, max_length=cfg.runtime.max_length, seed=cfg.seed,
        device=device, on_epoch=on_epoch)
    log.info("student: %d layers %s, %.1fM parameters, best epoch %d (val %s %.3f), %.0f s", len(result.layers),
             result.layers, result.parameters / 1e6, result.best_epoch, cfg.distill.select_metric,
             result.best_val_metric, result.seconds)
    return result

