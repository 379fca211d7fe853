"""One training loop for teacher fine-tuning (hard labels) and student distillation (KD loss).

Per optimizer step: alpha (schedule), the KD loss on cached teacher logits with optional
per-example weights, optional hidden-state / attention-map matching against the teacher run
online, gradient accumulation and clipping, warmup then linear or cosine decay. Per epoch:
validation metrics, best-state tracking and early stopping. A non-finite loss stops training
with the epoch, step and example ids.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.inference.batching import length_sorted_batches, pad_batch, predict_logits


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
    alpha_end: float | None = None  # alpha at the last step when alpha_schedule is linear/cosine
    alpha_schedule: str = "constant"
    temperature: float = 2.0
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | js
    select_metric: str = "accuracy"  # or "fidelity" (agreement with the teacher on validation)
    lr_schedule: str = "linear"  # or "cosine"
    grad_accumulation: int = 1
    hidden_loss: str = "none"  # none | mse | cosine (needs the teacher model online)
    hidden_weight: float = 1.0
    layer_map: list[tuple[int, int]] | None = None
    attention_loss: bool = False
    attention_weight: float = 1.0
    max_length: int = 128
    seed: int = 13


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    examples_per_second: float = 0.0


def _val_metrics(model, tokenizer, texts, label_ids, teacher_preds, settings, device) -> dict:
    preds = predict_logits(model, tokenizer, texts, batch_size=64, max_length=settings.max_length, device=device).argmax(-1)
    metrics = {"val_accuracy": float((preds == label_ids).mean())}
    if teacher_preds is not None:
        metrics["val_fidelity"] = float((preds == teacher_preds).mean())
    return metrics


def _hidden_dims(model) -> list[int]:
    """Width of each hidden state (embeddings first): the config's hidden size, num_layers + 1 times."""
    cfg = model.config
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim")
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers")
    return [width] * (layers + 1)


def _use_eager_attention(model) -> None:
    """Attention maps need the eager implementation (SDPA does not return them)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"


def _layer_losses(settings: TrainSettings, model, teacher_model):
    """(HiddenStateLoss | None, AttentionKLLoss | None, checked layer map) for the student/teacher pair."""
    from distill_gap.kd.losses import AttentionKLLoss, HiddenStateLoss
    from distill_gap.kd.students import check_layer_map, default_layer_map

    if settings.hidden_loss == "none" and not settings.attention_loss:
        return None, None, None
    if teacher_model is None:
        raise DistillError("distill.hidden_loss / attention_loss need the teacher model during training",
                           "pass the teacher (distill_student does) or set hidden_loss: none, attention_loss: false")
    s_dims, t_dims = _hidden_dims(model), _hidden_dims(teacher_model)
    n_s, n_t = len(s_dims) - 1, len(t_dims) - 1
    layer_map = check_layer_map(settings.layer_map if settings.layer_map is not None else default_layer_map(n_s, n_t),
                                n_s, n_t)
    hidden = HiddenStateLoss(s_dims, t_dims, layer_map, kind=settings.hidden_loss) if settings.hidden_loss != "none" else None
    attention = None
    if settings.attention_loss:
        pairs = [(s - 1, t - 1) for s, t in layer_map if s > 0 and t > 0]   # attention maps have no embeddings entry
        if not pairs:
            raise DistillError(f"distill.layer_map {layer_map} has no pair of transformer layers for attention matching",
                               "add (student, teacher) pairs with both indices >= 1")
        s_heads = model.config.num_attention_heads
        t_heads = teacher_model.config.num_attention_heads
        if s_heads != t_heads:
            raise DistillError(f"attention-map matching needs equal head counts: student {s_heads}, teacher {t_heads}",
                               "build the student with the teacher's num_heads, or set distill.attention_loss: false")
        attention = AttentionKLLoss(pairs, num_student_layers=n_s, num_teacher_layers=n_t)
        _use_eager_attention(model)
        _use_eager_attention(teacher_model)
    return hidden, attention, layer_map


def train_classifier(model, tokenizer, texts: Sequence[str], label_ids: np.ndarray, settings: TrainSettings, *,
                     val_texts: Sequence[str], val_label_ids: np.ndarray, teacher_logits: np.ndarray | None = None,
                     val_teacher_preds: np.ndarray | None = None, device: str = "cpu", desc: str = "train",
                     on_epoch: Callable[[dict], None] | None = None, example_ids: Sequence[str] | None = None,
                     weights: np.ndarray | None = None, teacher_model=None) -> TrainResult:
    """Train `model` in place; keep the weights of the best validation epoch (early stopping).

    `teacher_logits` (N, C) turn on the KD term; `weights` (N,) weight each example in both loss
    terms; `teacher_model` is needed only for hidden-state or attention matching.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from distill_gap.kd.losses import KDLoss, alpha_schedule
    from distill_gap.ops.runtime import progress_disabled, seed_everything

    # 1. deterministic setup: seed, tokenize once, length buckets reshuffled per epoch
    seed_everything(settings.seed)
    rng = np.random.default_rng(settings.seed)
    enc = tokenizer([str(t) for t in texts], truncation=True, max_length=settings.max_length)
    pad_id = tokenizer.pad_token_id or 0
    lengths = [len(x) for x in enc["input_ids"]]
    example_ids = [str(i) for i in example_ids] if example_ids is not None else [str(i) for i in range(len(lengths))]
    labels_t = torch.tensor(np.array(label_ids), dtype=torch.long)
    teacher_t = None if teacher_logits is None else torch.tensor(np.array(teacher_logits, dtype=np.float32))
    weights_t = None if weights is None else torch.tensor(np.asarray(weights, dtype=np.float32))
    alpha0 = settings.alpha if teacher_t is not None else 1.0
    alpha1 = settings.alpha_end if settings.alpha_end is not None and teacher_t is not None else alpha0
    loss_fn = KDLoss(alpha=alpha0, temperature=settings.temperature, divergence=settings.divergence)
    hidden_fn, attention_fn, _ = _layer_losses(settings, model, teacher_model)
    if teacher_model is not None:
        teacher_model.to(device).eval()

    # 2. optimizer and schedule: AdamW without decay on biases/LayerNorm (projections train too)
    model.to(device).train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if hidden_fn is not None:
        hidden_fn.to(device)
        params += [(f"projection.{n}", p) for n, p in hidden_fn.named_parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
                                   {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=settings.learning_rate)
    batches_per_epoch = math.ceil(len(lengths) / settings.batch_size)
    total = math.ceil(batches_per_epoch / settings.grad_accumulation) * settings.epochs
    make_schedule = get_cosine_schedule_with_warmup if settings.lr_schedule == "cosine" else get_linear_schedule_with_warmup
    scheduler = make_schedule(optimizer, int(settings.warmup_fraction * total), total)
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    need_hidden, need_attn = hidden_fn is not None, attention_fn is not None

    # 3. epochs with validation, best-state tracking and early stopping
    metric_key = f"val_{settings.select_metric}"
    best, best_state, best_epoch, stale, step, seen = -1.0, None, 0, 0, 0, 0
    history: list[dict] = []
    start = time.perf_counter()
    train_seconds = 0.0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        # length buckets: sort within random chunks, then shuffle the batches
        perm = rng.permutation(len(lengths))
        chunk = settings.batch_size * 16
        batches = []
        for c in range(0, len(perm), chunk):
            part = perm[c:c + chunk]
            batches += [part[b].tolist() for b in length_sorted_batches([lengths[i] for i in part], settings.batch_size)]
        rng.shuffle(batches)
        running = 0.0
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(batches, desc=f"{desc} epoch {epoch}/{settings.epochs}", unit="batch", disable=progress_disabled())
        for b, idx in enumerate(bar):
            batch = {k: torch.from_numpy(v).to(device) for k, v in pad_batch(enc, idx, pad_id).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                out = model(**batch, output_hidden_states=need_hidden, output_attentions=need_attn)
                t_out = None
                if need_hidden or need_attn:
                    with torch.no_grad():
                        t_out = teacher_model(**batch, output_hidden_states=need_hidden, output_attentions=need_attn)
            loss_fn.alpha = alpha_schedule(settings.alpha_schedule, alpha0, alpha1, step, max(total - 1, 1)) \
                if settings.alpha_schedule != "constant" else alpha0
            loss = loss_fn(out.logits.float(), labels_t[idx].to(device),
                           None if teacher_t is None else teacher_t[idx].to(device),
                           weight=None if weights_t is None else weights_t[idx].to(device))
            mask = batch["attention_mask"]
            if need_hidden:
                loss = loss + settings.hidden_weight * hidden_fn(tuple(h.float() for h in out.hidden_states),
                                                                 tuple(h.float() for h in t_out.hidden_states), mask)
            if need_attn:
                loss = loss + settings.attention_weight * attention_fn(out.attentions, t_out.attentions, mask)
            if not torch.isfinite(loss):
                raise DistillError(
                    f"{desc}: the loss is {loss.item()} at epoch {epoch}, optimizer step {step + 1}, batch {b + 1} "
                    f"(example ids {[example_ids[i] for i in idx][:16]}); training stopped, no checkpoint kept",
                    "lower the learning rate (distill.learning_rate), check those examples and the teacher logits "
                    "(soft_labels.dtype: float32 if they overflow), or lower hidden_weight / attention_weight")
            (loss / settings.grad_accumulation).backward()
            if (b + 1) % settings.grad_accumulation == 0 or b + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_([p for _, p in params], settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            running += loss.item()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds += time.perf_counter() - epoch_start
        row = {"epoch": epoch, "train_loss": running / max(len(batches), 1), "lr": scheduler.get_last_lr()[0],
               "alpha": float(loss_fn.alpha), "train_examples_per_s": seen / max(train_seconds, 1e-9)}
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
    return TrainResult(best_epoch=best_epoch, best_metric=best, history=history, seconds=time.perf_counter() - start,
                       steps=step, examples_per_second=seen / max(train_seconds, 1e-9))
