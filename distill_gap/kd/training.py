"""One training loop for teacher fine-tuning and student distillation; the loss object says which.

Per optimizer step: the loss (HardLabelLoss, or DistillationLoss on cached teacher logits with optional
per-example weights and hidden-state / attention-map matching against the teacher run online),
gradient accumulation and clipping, warmup then linear or cosine decay. Per epoch: validation metrics,
best-state tracking and early stopping. A non-finite loss stops training with the epoch, step and example
ids. The loop takes flat arguments and has no defaults for the knobs: its callers pass them from the config.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.inference.batching import length_sorted_batches, pad_batch, predict_logits


class TrainingLoss(Protocol):
    """What the loop needs of a loss (distill_gap.kd.losses.HardLabelLoss, DistillationLoss): an nn.Module
    whose parameters (if any) train with the model."""

    needs_hidden_states: bool   # the loop asks model and teacher for hidden states
    needs_attentions: bool      # ... and for attention maps

    def set_step(self, step: int, total_steps: int) -> None: ...   # before each batch: schedules follow the step

    def epoch_metrics(self) -> dict[str, float]: ...               # logged with each epoch row

    def __call__(self, outputs, labels, *, teacher_logits, teacher_outputs, attention_mask, weight): ...


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    examples_per_second: float = 0.0


def _val_metrics(model, tokenizer, texts, label_ids, teacher_preds, max_length: int, device) -> dict:
    preds = predict_logits(model, tokenizer, texts, batch_size=64, max_length=max_length, device=device).argmax(-1)
    metrics = {"val_accuracy": float((preds == label_ids).mean()),
               # the mean of the per-class recalls of the classes validation holds: a checkpoint that buys accuracy by
               # answering the majority class more often scores lower (the release gates check each class's recall)
               "val_balanced_accuracy": float(np.mean([(preds[label_ids == c] == c).mean()
                                                       for c in np.unique(label_ids)]))}
    if teacher_preds is not None:
        metrics["val_fidelity"] = float((preds == teacher_preds).mean())
    return metrics


def train_classifier(model, tokenizer, texts: Sequence[str], label_ids: np.ndarray, loss_fn: TrainingLoss, *,
                     epochs: int, learning_rate: float, batch_size: int, warmup_fraction: float, weight_decay: float,
                     max_grad_norm: float, patience: int, lr_schedule: str, grad_accumulation: int,
                     select_metric: str, max_length: int, seed: int, val_texts: Sequence[str],
                     val_label_ids: np.ndarray, fix_if_not_finite: str, teacher_logits: np.ndarray | None = None,
                     val_teacher_preds: np.ndarray | None = None, teacher_model=None, weights: np.ndarray | None = None,
                     example_ids: Sequence[str] | None = None, device: str = "cpu", desc: str = "train",
                     on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `model` in place with `loss_fn`; keep the weights of the best validation epoch (early stopping).

    The caller seeds torch (seed_everything) before building the model and the loss: their initialisation
    and this loop's dropout draw from that one stream. `seed` orders the batches. `teacher_logits` (N, C)
    and `weights` (N,) are per-example inputs of the loss; `teacher_model` runs alongside (no gradient)
    when the loss needs its hidden states or attention maps. `select_metric` is "accuracy", "balanced_accuracy"
    or "fidelity" (agreement with `val_teacher_preds`); `lr_schedule` "linear" or "cosine" after the warmup;
    `fix_if_not_finite` is the fix of the DistillError raised when the loss is not finite.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from distill_gap.ops.runtime import progress_disabled

    # 1. deterministic setup: tokenize once, length buckets reshuffled per epoch from `seed`
    rng = np.random.default_rng(seed)
    enc = tokenizer([str(t) for t in texts], truncation=True, max_length=max_length)
    pad_id = tokenizer.pad_token_id or 0
    lengths = [len(x) for x in enc["input_ids"]]
    example_ids = [str(i) for i in example_ids] if example_ids is not None else [str(i) for i in range(len(lengths))]
    labels_t = torch.tensor(np.array(label_ids), dtype=torch.long)
    teacher_t = None if teacher_logits is None else torch.tensor(np.array(teacher_logits, dtype=np.float32))
    weights_t = None if weights is None else torch.tensor(np.asarray(weights, dtype=np.float32))
    need_hidden, need_attn = loss_fn.needs_hidden_states, loss_fn.needs_attentions
    if (need_hidden or need_attn) and teacher_model is None:
        raise DistillError(f"{desc}: the loss matches hidden states or attention maps, but no teacher model was given",
                           "pass teacher_model (the teacher runs alongside the student)")
    if teacher_model is not None:
        teacher_model.to(device).eval()

    # 2. optimizer and schedule: AdamW without decay on biases/LayerNorm (the loss's projections train too)
    model.to(device).train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss_fn.to(device)
    params += [(f"loss.{n}", p) for n, p in loss_fn.named_parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": weight_decay},
                                   {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=learning_rate)
    batches_per_epoch = math.ceil(len(lengths) / batch_size)
    total = math.ceil(batches_per_epoch / grad_accumulation) * epochs
    make_schedule = get_cosine_schedule_with_warmup if lr_schedule == "cosine" else get_linear_schedule_with_warmup
    scheduler = make_schedule(optimizer, int(warmup_fraction * total), total)
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()

    # 3. epochs with validation, best-state tracking and early stopping
    metric_key = f"val_{select_metric}"
    best, best_state, best_epoch, stale, step, seen = -1.0, None, 0, 0, 0, 0
    history: list[dict] = []
    start = time.perf_counter()
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        # length buckets: sort within random chunks, then shuffle the batches
        perm = rng.permutation(len(lengths))
        chunk = batch_size * 16
        batches = []
        for c in range(0, len(perm), chunk):
            part = perm[c:c + chunk]
            batches += [part[b].tolist() for b in length_sorted_batches([lengths[i] for i in part], batch_size)]
        rng.shuffle(batches)
        running = 0.0
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(batches, desc=f"{desc} epoch {epoch}/{epochs}", unit="batch", disable=progress_disabled())
        for b, idx in enumerate(bar):
            batch = {k: torch.from_numpy(v).to(device) for k, v in pad_batch(enc, idx, pad_id).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                out = model(**batch, output_hidden_states=need_hidden, output_attentions=need_attn)
                t_out = None
                if need_hidden or need_attn:
                    with torch.no_grad():
                        t_out = teacher_model(**batch, output_hidden_states=need_hidden, output_attentions=need_attn)
            loss_fn.set_step(step, total)
            loss = loss_fn(out, labels_t[idx].to(device),
                           teacher_logits=None if teacher_t is None else teacher_t[idx].to(device),
                           teacher_outputs=t_out, attention_mask=batch["attention_mask"],
                           weight=None if weights_t is None else weights_t[idx].to(device))
            if not torch.isfinite(loss):
                raise DistillError(
                    f"{desc}: the loss is {loss.item()} at epoch {epoch}, optimizer step {step + 1}, batch {b + 1} "
                    f"(example ids {[example_ids[i] for i in idx][:16]}); training stopped, no checkpoint kept",
                    fix_if_not_finite)
            (loss / grad_accumulation).backward()
            if (b + 1) % grad_accumulation == 0 or b + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            running += loss.item()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds += time.perf_counter() - epoch_start
        row = {"epoch": epoch, "train_loss": running / max(len(batches), 1), "lr": scheduler.get_last_lr()[0],
               **loss_fn.epoch_metrics(), "train_examples_per_s": seen / max(train_seconds, 1e-9)}
        row.update(_val_metrics(model, tokenizer, val_texts, np.asarray(val_label_ids), val_teacher_preds, max_length,
                                device))
        history.append(row)
        if on_epoch:
            on_epoch(row)
        score = row.get(metric_key, row["val_accuracy"])
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_epoch=best_epoch, best_metric=best, history=history, seconds=time.perf_counter() - start,
                       steps=step, examples_per_second=seen / max(train_seconds, 1e-9))
