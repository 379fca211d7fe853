"""One training loop for teacher fine-tuning (hard labels) and student distillation (KD loss)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tasks.inference import length_sorted_batches, predict_logits


@dataclass
class TrainSettings:
    epochs: int
    learning_rate: float
    batch_size: int
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    patience: int = 3
    alpha: float = 1.0  # 1.0 = hard labels only
    temperature: float = 2.0
    select_metric: str = "accuracy"  # or "fidelity" (agreement with the teacher on validation)
    max_length: int = 128
    seed: int = 13


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _val_metrics(model, tokenizer, texts, label_ids, teacher_preds, settings, device) -> dict:
    preds = predict_logits(model, tokenizer, texts, batch_size=64, max_length=settings.max_length, device=device).argmax(-1)
    metrics = {"val_accuracy": float((preds == label_ids).mean())}
    if teacher_preds is not None:
        metrics["val_fidelity"] = float((preds == teacher_preds).mean())
    return metrics


def train_classifier(model, tokenizer, texts: Sequence[str], label_ids: np.ndarray, settings: TrainSettings, *,
                     val_texts: Sequence[str], val_label_ids: np.ndarray, teacher_logits: np.ndarray | None = None,
                     val_teacher_preds: np.ndarray | None = None, device: str = "cpu", desc: str = "train",
                     on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `model` in place; keep the weights of the best validation epoch (early stopping)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from tasks.losses import KDLoss
    from tasks.runtime import progress_disabled, seed_everything

    # 1. deterministic setup: seed, tokenize once, length buckets reshuffled per epoch
    seed_everything(settings.seed)
    rng = np.random.default_rng(settings.seed)
    # we pad pre-tokenized batches on purpose; silence transformers' hint about __call__
    tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
    enc = tokenizer([str(t) for t in texts], truncation=True, max_length=settings.max_length)
    lengths = [len(x) for x in enc["input_ids"]]
    labels_t = torch.tensor(np.array(label_ids), dtype=torch.long)
    teacher_t = None if teacher_logits is None else torch.tensor(np.array(teacher_logits, dtype=np.float32))
    loss_fn = KDLoss(alpha=settings.alpha if teacher_t is not None else 1.0, temperature=settings.temperature)

    # 2. optimizer and schedule: AdamW without decay on biases/LayerNorm, linear warmup then decay
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    steps_per_epoch = math.ceil(len(lengths) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_fraction * total), total)
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()

    # 3. epochs with validation, best-state tracking and early stopping
    metric_key = f"val_{settings.select_metric}"
    best, best_state, best_epoch, stale = -1.0, None, 0, 0
    history: list[dict] = []
    start = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        model.train()
        # length buckets: sort within random chunks, then shuffle the batches
        perm = rng.permutation(len(lengths))
        chunk = settings.batch_size * 16
        batches = []
        for c in range(0, len(perm), chunk):
            part = perm[c:c + chunk]
            batches += [part[b].tolist() for b in length_sorted_batches([lengths[i] for i in part], settings.batch_size)]
        rng.shuffle(batches)
        running = 0.0
        bar = tqdm(batches, desc=f"{desc} epoch {epoch}/{settings.epochs}", unit="batch", disable=progress_disabled())
        for idx in bar:
            batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc.keys()}, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(**batch).logits  # (B, C)
            loss = loss_fn(logits.float(), labels_t[idx].to(device),
                           None if teacher_t is None else teacher_t[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            running += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {"epoch": epoch, "train_loss": running / max(len(batches), 1), "lr": scheduler.get_last_lr()[0]}
        row.update(_val_metrics(model, tokenizer, val_texts, np.asarray(val_label_ids), val_teacher_preds, settings, device))
        history.append(row)
        if on_epoch:
            on_epoch(row)
        score = row.get(metric_key, row["val_accuracy"])
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            stale += 1
            if stale >= settings.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_epoch=best_epoch, best_metric=best, history=history, seconds=time.perf_counter() - start)
