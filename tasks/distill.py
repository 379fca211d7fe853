"""Stage: distill the teacher into the student on the cached soft labels; optionally a hard-label baseline of the
same student and budget. The stage builds the student and its loss from the distill config section and hands
both to the training loop (distill_gap.kd.training), which knows nothing of the config."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.errors import DistillError
from distill_gap.governance.attestation import distill_statement
from distill_gap.ops.failpoints import failpoint
from tasks.attest import attest_task

_log = logging.getLogger("distill.distill")
# the fix of the DistillError the training loop raises on a non-finite loss
NOT_FINITE_FIX = ("lower the learning rate (distill.learning_rate), check those examples and the teacher logits "
                  "(soft_labels.dtype: float32 if they overflow), or lower hidden_weight / attention_weight")


def student_spec(distill_cfg) -> dict:
    """The distill_gap.kd.students.build_student spec of the distill config section."""
    s = distill_cfg.student
    if s.kind == "layers":
        return ({"kind": "layers", "every": s.every} if s.every
                else {"kind": "layers", "layers": list(distill_cfg.student_layers)})
    if s.kind == "config":
        return {"kind": "config", "num_layers": s.num_layers, "hidden_size": s.hidden_size, "num_heads": s.num_heads,
                "intermediate_size": s.intermediate_size}
    if not s.path:
        raise DistillError("distill.student.kind is pretrained but distill.student.path is not set",
                           "set distill.student.path to a local model folder that shares the teacher's tokenizer")
    return {"kind": "pretrained", "path": s.path}


@dataclass
class StudentResult:
    """A trained student: its folder and digest, how it was built and trained, and the hard-label baseline."""

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
    vocab: dict | None = None    # distill.vocab.trim: tokens kept of the teacher's (distill_gap.kd.vocab)
    pruning: dict | None = None  # distill.prune: heads and FFN neurons removed before training (distill_gap.kd.pruning)

    def summary(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["baseline"] = self.baseline.summary() if self.baseline else None
        return d


def student_seed(distill_cfg, seed: int) -> int:
    """The seed the student trains with: distill.seed, else the run's `seed`."""
    return seed if distill_cfg.seed is None else distill_cfg.seed


def example_weights(teacher_logits: np.ndarray, critical: np.ndarray | None, *, critical_weight: float,
                    uncertainty_weight: float) -> np.ndarray | None:
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


def critical_rows(train, critical_slices: dict[str, list]) -> np.ndarray | None:
    """(N,) bool: training rows in any of data.critical_slices (column -> values); None when none are set."""
    critical = None
    for column, values in critical_slices.items():
        hit = train[column].astype(str).isin([str(v) for v in values]).to_numpy()
        critical = hit if critical is None else critical | hit
    return critical


def _layer_map(distill_cfg, student, teacher) -> list[tuple[int, int]]:
    """distill.layer_map (or the evenly spaced default), checked against both models' hidden states."""
    from distill_gap.kd.students import check_layer_map, default_layer_map, hidden_widths

    n_s, n_t = len(hidden_widths(student)) - 1, len(hidden_widths(teacher)) - 1
    layer_map = distill_cfg.layer_map if distill_cfg.layer_map is not None else default_layer_map(n_s, n_t)
    return check_layer_map(layer_map, n_s, n_t)


def kd_loss(distill_cfg, student, teacher):
    """The student's DistillationLoss from the distill section: KDLoss (alpha, its schedule, temperature,
    divergence) plus the hidden-state and attention-map terms, which need `teacher` (else None).

    Hidden-state projections between different widths draw their initialisation from torch's generator, and
    attention matching switches both models to eager attention: build it after seeding, right before training.
    """
    from distill_gap.kd.losses import AttentionKLLoss, DistillationLoss, HiddenStateLoss, KDLoss
    from distill_gap.kd.students import hidden_widths, use_eager_attention

    kd = KDLoss(distill_cfg.alpha, distill_cfg.temperature, distill_cfg.divergence)
    hidden = attention = None
    if distill_cfg.hidden_loss != "none" or distill_cfg.attention_loss:
        layer_map = _layer_map(distill_cfg, student, teacher)
        if distill_cfg.hidden_loss != "none":
            hidden = HiddenStateLoss(hidden_widths(student), hidden_widths(teacher), layer_map,
                                     kind=distill_cfg.hidden_loss)
        if distill_cfg.attention_loss:
            pairs = [(s - 1, t - 1) for s, t in layer_map if s > 0 and t > 0]  # attention maps have no embeddings entry
            if not pairs:
                raise DistillError(f"distill.layer_map {layer_map} has no pair of transformer layers for attention "
                                   "matching", "add (student, teacher) pairs with both indices >= 1")
            s_heads, t_heads = student.config.num_attention_heads, teacher.config.num_attention_heads
            if s_heads != t_heads:
                raise DistillError(f"attention-map matching needs equal head counts: student {s_heads}, teacher "
                                   f"{t_heads}", "build the student with the teacher's num_heads, or set "
                                   "distill.attention_loss: false")
            attention = AttentionKLLoss(pairs, num_student_layers=len(hidden_widths(student)) - 1,
                                        num_teacher_layers=len(hidden_widths(teacher)) - 1)
            use_eager_attention(student)
            use_eager_attention(teacher)
    return DistillationLoss(kd, alpha_end=distill_cfg.alpha_end, alpha_schedule=distill_cfg.alpha_schedule,
                            hidden=hidden, hidden_weight=distill_cfg.hidden_weight, attention=attention,
                            attention_weight=distill_cfg.attention_weight)


def distill_student(teacher_dir: str | Path, out_dir: str | Path, *, train_texts, train_label_ids, teacher_logits,
                    val_texts, val_label_ids, distill_cfg, max_length: int, seed: int, device: str, on_epoch=None,
                    train_ids=None, weights=None, hard_labels_only: bool = False,
                    desc: str = "distill") -> StudentResult:
    """Build the student and its loss, train it (KD, or hard labels only for the baseline), save the best checkpoint.

    Validation fidelity is measured against the teacher's own predictions on `val_texts`. Every
    configuration error (student spec, tokenizer, layer map, head counts) is raised before training.
    The hard-label baseline keeps the budget and drops every teacher term (and the example weights).
    """
    import torch

    from distill_gap.digest import model_digest
    from distill_gap.inference.batching import predict_logits
    from distill_gap.kd.losses import HardLabelLoss
    from distill_gap.kd.students import build_student
    from distill_gap.kd.training import train_classifier
    from distill_gap.models.loading import load_classifier, model_labels, save_classifier
    from distill_gap.ops.runtime import seed_everything

    d = distill_cfg
    seed_everything(seed)
    teacher, tokenizer = load_classifier(teacher_dir)
    spec = student_spec(d)
    student = build_student(teacher.cpu(), tokenizer, spec, labels=model_labels(teacher))
    pruning, sample = None, list(train_texts)[:d.prune.sample]
    if d.prune.hidden:  # a narrower copy, initialised from the student's most important dimensions and heads
        from distill_gap.kd.pruning import narrow

        student, pruning = narrow(student, tokenizer, sample, hidden=d.prune.hidden, max_length=max_length)
    if d.prune.heads or d.prune.ffn:  # before training: distillation recovers what the removed parts carried
        from distill_gap.kd.pruning import prune

        cut = prune(student, tokenizer, sample, heads=d.prune.heads, ffn=d.prune.ffn, max_length=max_length)
        pruning = cut if pruning is None else {**pruning, **cut,
                                               "parameters": [pruning["parameters"][0], cut["parameters"][1]]}
    if d.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    uses_teacher_model = not hard_labels_only and (d.hidden_loss != "none" or d.attention_loss)
    if uses_teacher_model:
        _layer_map(d, student, teacher)  # a bad map fails before the teacher predicts
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
    # re-seeded: the loss's projections, then the loop's dropout, draw from the seed whatever the student took
    seed_everything(seed)
    loss_fn = HardLabelLoss() if hard_labels_only else kd_loss(d, student, teacher_model)
    result = train_classifier(
        student, tokenizer, train_texts, np.asarray(train_label_ids), loss_fn, epochs=d.epochs,
        learning_rate=d.learning_rate, batch_size=d.batch_size, warmup_fraction=d.warmup_fraction,
        weight_decay=d.weight_decay, max_grad_norm=d.max_grad_norm, patience=d.patience, lr_schedule=d.lr_schedule,
        grad_accumulation=d.grad_accumulation, select_metric="accuracy" if hard_labels_only else d.select_metric,
        max_length=max_length, seed=seed, val_texts=val_texts, val_label_ids=np.asarray(val_label_ids),
        fix_if_not_finite=NOT_FINITE_FIX, teacher_logits=teacher_logits, val_teacher_preds=val_teacher_preds,
        teacher_model=teacher_model, weights=None if hard_labels_only else weights, example_ids=train_ids,
        device=device, desc=desc, on_epoch=on_epoch)
    student, vocab = student.cpu(), None
    if d.vocab.trim:  # after training: the loop (and a teacher run online) saw the teacher's ids
        from distill_gap.kd.vocab import trim_vocabulary, write_record

        student, tokenizer, vocab = trim_vocabulary(student, tokenizer, train_texts, floor=d.vocab.min_tokens)
    out = save_classifier(student, tokenizer, out_dir)
    if vocab is not None:
        write_record(out, vocab)
        vocab = {k: v for k, v in vocab.items() if k != "kept_teacher_ids"}  # the mapping stays in the folder
    return StudentResult(path=out, digest=model_digest(out), layers=list(spec.get("layers") or []),
                         parameters=sum(p.numel() for p in student.parameters()), best_epoch=result.best_epoch,
                         best_val_metric=result.best_metric, history=result.history, seconds=result.seconds,
                         spec=spec, hard_labels_only=hard_labels_only, examples_per_second=result.examples_per_second,
                         vocab=vocab, pruning=pruning)


def distill(teacher_dir, splits, soft, distill_cfg, workdir: Path, *, critical_slices: dict[str, list],
            max_length: int, seed: int, device: str, client=None, run_id: str | None = None,
            log: logging.Logger = _log) -> StudentResult:
    """Train the student on the cached soft labels (rare-case weights from `critical_slices`), logging each epoch
    to the MLflow run `run_id`; with distill.baseline also the hard-label student (result.baseline). `seed` is the
    run's; distill.seed, when set, seeds the student instead (the splits and soft labels stay the run's)."""
    seed = student_seed(distill_cfg, seed)
    label_id = {l: i for i, l in enumerate(splits.labels)}
    train, val = splits["train"], splits["validation"]
    by_id = dict(zip(soft.ids, range(len(soft.ids))))
    teacher_logits = soft.logits[[by_id[i] for i in train["id"]]]  # (N, C), aligned with train rows
    critical = critical_rows(train, critical_slices)
    weights = example_weights(teacher_logits, critical, critical_weight=distill_cfg.critical_weight,
                              uncertainty_weight=distill_cfg.uncertainty_weight)
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
                  val_label_ids=val["label"].map(label_id).to_numpy(), distill_cfg=distill_cfg,
                  max_length=max_length, seed=seed, device=device, train_ids=train["id"].tolist())
    kd_rows = dict(common)
    extra = getattr(soft, "extra", None)
    if extra is not None:  # extra rows: a person's answer is the hard label, else the teacher's logits are the only one
        from distill_gap.kd.losses import NO_LABEL

        extra_logits = extra.logits()
        n = len(extra.frame)
        hard = extra.frame["label"].map(lambda v: label_id[v] if v else NO_LABEL).to_numpy()
        kd_rows.update(train_texts=common["train_texts"] + extra.frame["text"].tolist(),
                       train_label_ids=np.concatenate([common["train_label_ids"], hard]),
                       teacher_logits=np.concatenate([teacher_logits, extra_logits]),
                       train_ids=common["train_ids"] + extra.frame["id"].tolist())
        extra_weights = example_weights(extra_logits, None, critical_weight=1.0,
                                        uncertainty_weight=distill_cfg.uncertainty_weight)
        extra_weights = (np.ones(n, np.float32) if extra_weights is None else extra_weights) * \
            extra.frame["weight"].to_numpy(np.float32)
        if weights is not None or not np.all(extra_weights == 1.0):
            weights = np.concatenate([np.ones(len(train), np.float32) if weights is None else weights, extra_weights])
        log.info("extra rows: %d beside %d training rows (%s); %d with a person's answer, the rest KD term only", n,
                 len(train), ", ".join(f"{k} {v}" for k, v in extra.summary()["by_source"].items()),
                 int((hard != NO_LABEL).sum()))
    result = distill_student(teacher_dir, workdir / "student", on_epoch=on_epoch_for("student"), weights=weights,
                             **kd_rows)
    log.info("student %s: %.1fM parameters, best epoch %d (val %s %.3f), %.0f s, %.0f examples/s", result.spec,
             result.parameters / 1e6, result.best_epoch, distill_cfg.select_metric, result.best_val_metric,
             result.seconds, result.examples_per_second)
    if result.pruning:
        p = result.pruning
        log.info("pruned before training: width %d -> %d, heads kept per layer %s, FFN width %d -> %d, parameters "
                 "%.2fM -> %.2fM", *p.get("hidden_width") or [0, 0], p["heads_kept"], *p["ffn_width"],
                 p["parameters"][0] / 1e6, p["parameters"][1] / 1e6)
    if result.vocab:
        log.info("vocabulary trimmed: %d of the teacher's %d tokens kept for %d training texts (floor %d)",
                 result.vocab["kept"], result.vocab["teacher_vocab_size"], result.vocab["texts"],
                 result.vocab["floor"])
        if client is not None:
            client.log_metric(run_id, "student.vocab_tokens", result.vocab["kept"])
    if distill_cfg.baseline:
        result.baseline = distill_student(teacher_dir, workdir / "student-hard", on_epoch=on_epoch_for("student_hard"),
                                          hard_labels_only=True, desc="hard-label baseline", **common)
        log.info("hard-label baseline: best epoch %d (val accuracy %.3f), %.0f s", result.baseline.best_epoch,
                 result.baseline.best_val_metric, result.baseline.seconds)
    return result


# ---------------------------------------------------------------------------------------------
# Prefect task


@step("distill", cache_policy=NO_CACHE)
def distill_task(run, distill_cfg, teacher, soft, splits, *, critical_slices: dict[str, list], max_length: int,
                 seed: int) -> StudentResult:
    """Train the student on the cached soft labels in the run's `distill` stage, then attest the step (never
    retried: training is not idempotent)."""
    from prefect.logging import get_run_logger

    with run.stage("distill") as stage_run_id:
        student = distill(teacher.path, splits, soft, distill_cfg, run.workdir, critical_slices=critical_slices,
                          max_length=max_length, seed=seed, device=run.device, client=run.client,
                          run_id=stage_run_id, log=get_run_logger())
    attest_task(run, distill_statement(distill_cfg, seed=student_seed(distill_cfg, seed),
                                       student_model_name=run.student_model_name,
                                       student=student, soft=soft, teacher=teacher, splits=splits,
                                       context=run.context))
    return student
