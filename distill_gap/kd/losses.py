"""Training losses as small nn.Modules (torchtune's kd_losses style).

`KDLoss` works in log space in float32, so probabilities that underflow to 0 (logits like +-1e4, fp16
teacher logits) never produce NaN. Intermediate-layer losses (`HiddenStateLoss`, `AttentionKLLoss`) take
the tuples HF models return with `output_hidden_states=True` / `output_attentions=True`. The training
loop (distill_gap.kd.training) takes one of two objectives: `HardLabelLoss` (teacher fine-tune, hard-label
baseline) or `DistillationLoss` (KDLoss with its alpha schedule plus the hidden-state and attention terms).
No knob (alpha, temperature, divergence, schedule, hidden-state kind, weights) has a default here: the
config schema holds the only ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIVERGENCES = ("forward_kl", "reverse_kl", "js")
ALPHA_SCHEDULES = ("constant", "linear", "cosine")
HIDDEN_STATE_KINDS = ("mse", "cosine")


# Per-example divergences on log-probabilities (B, C) -> (B,). Log-probs are clamped to the dtype's
# finite minimum so that a -inf (masked) logit gives 0 * finite = 0 instead of 0 * inf = NaN.

def _finite_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.clamp(min=torch.finfo(logp.dtype).min)


def _kl_per_example(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c), per row."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _js_per_example(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """0.5 KL(p || m) + 0.5 KL(q || m) with log m = logsumexp(log p, log q) - log 2, per row."""
    logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2.0)
    return 0.5 * _kl_per_example(logp, logm) + 0.5 * _kl_per_example(logq, logm)


def _normalized_weight(weight: torch.Tensor | None, student_logits: torch.Tensor) -> torch.Tensor:
    """(B,) example weights summing to 1: `weight` normalized by its sum, or uniform when None."""
    b = student_logits.shape[0]
    if weight is None:
        return torch.full((b,), 1.0 / b, device=student_logits.device)
    if weight.shape != (b,):
        raise ValueError(f"weight must have shape ({b},) (one per example), got {tuple(weight.shape)}")
    if not torch.isfinite(weight).all() or (weight < 0).any() or weight.sum() <= 0:
        raise ValueError("weight must be finite and non-negative with a positive sum")
    return weight.float() / weight.float().sum()


NO_LABEL = -1  # a training row without a hard label (teacher-labelled augmentation): only the KD term learns it


def _weighted_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on hard labels, the `w`-weighted sum over examples (w sums to 1: a weighted mean). Rows labelled
    NO_LABEL are left out and the weights renormalised over the others; a batch without a labelled row gives 0."""
    labelled = labels != NO_LABEL
    ce = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none")
    if bool(labelled.all()):
        return (w * ce).sum()
    w = w * labelled
    total = w.sum()
    return (w * ce).sum() / total if total > 0 else (ce * 0.0).sum()


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student logits "
                         f"{tuple(student_logits.shape)}; both must be (B, C) over the same label set")
    if student_logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(student_logits.shape)}")


class KDLoss(nn.Module):
    """alpha * CE(hard labels) + (1 - alpha) * T^2 * divergence(teacher_T, student_T).

    Args:
        alpha: weight of the hard-label cross-entropy, in [0, 1]. A plain attribute: set it between
            steps to follow a schedule (see `alpha_schedule`).
        temperature: softening temperature T > 0 applied to both logit sets.
        divergence: "forward_kl" (KL(teacher || student), the classic KD term), "reverse_kl"
            (KL(student || teacher)) or "js" (Jensen-Shannon).

    Shapes: student_logits (B, C), labels (B,) int64 class ids, teacher_logits (B, C) or None,
    weight (B,) non-negative or None. With teacher_logits None (or alpha == 1) the loss is plain
    cross-entropy. With `weight`, both terms are weighted means over examples (weights normalized by
    their sum), e.g. to up-weight rare or critical examples; uniform weights equal no weights.

    Raises:
        ValueError: alpha outside [0, 1], T <= 0, unknown divergence, mismatched logit shapes, or a
            weight that is not (B,), has negative/non-finite entries, or sums to 0.
    """

    def __init__(self, alpha: float, temperature: float, divergence: str):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.alpha = alpha
        self.temperature = temperature
        self.divergence = divergence

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: torch.Tensor | None = None, *, weight: torch.Tensor | None = None) -> torch.Tensor:
        # 1. checks: alpha is re-checked because a schedule may have set it since __init__
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        w = _normalized_weight(weight, student_logits)  # (B,), sums to 1

        # 2. hard-label term
        ce = _weighted_cross_entropy(student_logits, labels, w)
        if teacher_logits is None or self.alpha == 1.0:
            return ce

        # 3. soft-label term, per example then the same weighted mean
        _check_logits(student_logits, teacher_logits)
        t = self.temperature
        logq = _finite_log_softmax(student_logits, t)  # (B, C) student
        logp = _finite_log_softmax(teacher_logits, t)  # (B, C) teacher
        if self.divergence == "forward_kl":
            div = _kl_per_example(logp, logq)
        elif self.divergence == "reverse_kl":
            div = _kl_per_example(logq, logp)
        else:
            div = _js_per_example(logp, logq)
        return self.alpha * ce + (1.0 - self.alpha) * (t * t) * (w * div).sum()


def alpha_schedule(kind: str, alpha_start: float, alpha_end: float, step: int, total_steps: int) -> float:
    """The KDLoss alpha at `step` of `total_steps`, moving from alpha_start to alpha_end.

    "constant" returns alpha_start; "linear" interpolates; "cosine" follows half a cosine. Steps past
    total_steps stay at alpha_end.

    Raises:
        ValueError: unknown kind, an alpha outside [0, 1], total_steps <= 0 or step < 0.
    """
    if kind not in ALPHA_SCHEDULES:
        raise ValueError(f"kind must be one of {ALPHA_SCHEDULES}, got {kind!r}")
    for name, a in (("alpha_start", alpha_start), ("alpha_end", alpha_end)):
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {a}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if kind == "constant":
        return float(alpha_start)
    frac = min(step / total_steps, 1.0)
    if kind == "linear":
        return float(alpha_start + (alpha_end - alpha_start) * frac)
    return float(alpha_end + (alpha_start - alpha_end) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _check_layer_map(layer_map, n_student: int | None, n_teacher: int | None, what: str) -> list[tuple[int, int]]:
    pairs = [tuple(p) for p in layer_map]
    if not pairs:
        raise ValueError("layer_map must name at least one (student_layer, teacher_layer) pair")
    for p in pairs:
        if len(p) != 2 or not all(isinstance(i, int) for i in p):
            raise ValueError(f"layer_map entries must be (student_layer, teacher_layer) int pairs, got {p}")
        s, t = p
        if s < 0 or t < 0:
            raise ValueError(f"layer_map pair {p} has a negative layer; use explicit indices >= 0")
        if n_student is not None and s >= n_student:
            raise ValueError(f"layer_map pair {p}: student layer {s} out of range, the student has "
                             f"{n_student} {what} (valid 0..{n_student - 1})")
        if n_teacher is not None and t >= n_teacher:
            raise ValueError(f"layer_map pair {p}: teacher layer {t} out of range, the teacher has "
                             f"{n_teacher} {what} (valid 0..{n_teacher - 1})")
    return pairs


def _token_mask(attention_mask: torch.Tensor | None, b: int, length: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(b, length, device=device)
    if attention_mask.shape != (b, length):
        raise ValueError(f"attention_mask must be ({b}, {length}), got {tuple(attention_mask.shape)}")
    return attention_mask.float()


class HiddenStateLoss(nn.Module):
    """Match student hidden states to teacher hidden states for each (student_layer, teacher_layer) pair.

    A learned nn.Linear maps the student width to the teacher width where they differ (identity
    otherwise); the per-token distance ("mse": mean squared error over the hidden dim, "cosine":
    1 - cosine similarity) is averaged over non-padding tokens, then over pairs.

    Args:
        student_dims: width of each student hidden state, index 0 = embeddings (len = layers + 1).
        teacher_dims: the same for the teacher.
        layer_map: (student_layer, teacher_layer) index pairs into those hidden states.
        kind: "mse" or "cosine".

    Shapes: student_hidden / teacher_hidden are tuples of (B, L, H) tensors as HF returns with
    `output_hidden_states=True`; attention_mask (B, L) with 1 for real tokens (None = all tokens).
    Student and teacher must share the tokenization (same L). Returns a scalar (0.0 if no real token).

    Raises:
        ValueError: empty/negative/out-of-range layer_map or unknown kind (at construction); a
            hidden-state count, width or (B, L) that does not match (at forward).
    """

    def __init__(self, student_dims: list[int], teacher_dims: list[int], layer_map: list[tuple[int, int]],
                 kind: str):
        super().__init__()
        if kind not in HIDDEN_STATE_KINDS:
            raise ValueError(f"kind must be one of {HIDDEN_STATE_KINDS}, got {kind!r}")
        if not student_dims or not teacher_dims:
            raise ValueError("student_dims and teacher_dims must list one width per hidden state")
        self.student_dims, self.teacher_dims = list(student_dims), list(teacher_dims)
        self.layer_map = _check_layer_map(layer_map, len(student_dims), len(teacher_dims), "hidden states")
        self.kind = kind
        self.projections = nn.ModuleList(
            nn.Identity() if student_dims[s] == teacher_dims[t] else nn.Linear(student_dims[s], teacher_dims[t])
            for s, t in self.layer_map)

    def forward(self, student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        for side, states, dims in (("student", student_hidden, self.student_dims),
                                   ("teacher", teacher_hidden, self.teacher_dims)):
            if len(states) != len(dims):
                raise ValueError(f"got {len(states)} {side} hidden states but {side}_dims lists {len(dims)}; "
                                 f"pass the full tuple from output_hidden_states=True (embeddings first)")
        b, length = student_hidden[0].shape[:2]
        mask = _token_mask(attention_mask, b, length, student_hidden[0].device)  # (B, L)
        n_tokens = mask.sum()
        losses = []
        for (s, t), proj in zip(self.layer_map, self.projections):
            hs, ht = student_hidden[s], teacher_hidden[t]
            if hs.shape != (b, length, self.student_dims[s]) or ht.shape != (b, length, self.teacher_dims[t]):
                raise ValueError(f"pair {(s, t)}: student {tuple(hs.shape)} / teacher {tuple(ht.shape)} do not match "
                                 f"(B, L) = {(b, length)} with widths {self.student_dims[s]} / {self.teacher_dims[t]}")
            hs = proj(hs.float())  # (B, L, H_teacher)
            ht = ht.float()
            if self.kind == "mse":
                per_token = (hs - ht).pow(2).mean(-1)  # (B, L)
            else:
                per_token = 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)  # (B, L)
            losses.append((per_token * mask).sum() / n_tokens.clamp(min=1.0))
        return torch.stack(losses).mean()


class AttentionKLLoss(nn.Module):
    """KL(teacher attention || student attention) per query row, TinyBERT/MiniLM-style.

    For each (student_layer, teacher_layer) pair the KL between attention probability rows is
    averaged over heads and non-padding queries, then over pairs. Head counts must match.

    Args:
        layer_map: (student_layer, teacher_layer) index pairs into the attention tuples (index 0 =
            first transformer layer; there is no embeddings entry).
        num_student_layers / num_teacher_layers: optional layer counts, to reject out-of-range
            indices at construction; indices are always checked against the tuples at forward.

    Shapes: student_attn / teacher_attn are tuples of (B, heads, L, L) probability tensors as HF
    returns with `output_attentions=True`; attention_mask (B, L) with 1 for real tokens (None = all).
    Returns a scalar (0.0 if no real token).

    Raises:
        ValueError: empty, negative or out-of-range layer_map; mismatched heads or (B, L, L).
    """

    def __init__(self, layer_map: list[tuple[int, int]], num_student_layers: int | None = None,
                 num_teacher_layers: int | None = None):
        super().__init__()
        self.layer_map = _check_layer_map(layer_map, num_student_layers, num_teacher_layers, "attention layers")

    def forward(self, student_attn: tuple[torch.Tensor, ...], teacher_attn: tuple[torch.Tensor, ...],
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        _check_layer_map(self.layer_map, len(student_attn), len(teacher_attn), "attention layers")
        b, _, length, _ = student_attn[0].shape
        mask = _token_mask(attention_mask, b, length, student_attn[0].device)  # (B, L) over queries
        losses = []
        for s, t in self.layer_map:
            a_s, a_t = student_attn[s].float(), teacher_attn[t].float()  # (B, heads, L, L)
            if a_s.shape[1] != a_t.shape[1]:
                raise ValueError(f"pair {(s, t)}: student layer {s} has {a_s.shape[1]} heads but teacher layer {t} "
                                 f"has {a_t.shape[1]}; attention KL needs equal head counts")
            if a_s.shape != a_t.shape or a_s.shape[0] != b or a_s.shape[2:] != (length, length):
                raise ValueError(f"pair {(s, t)}: student {tuple(a_s.shape)} / teacher {tuple(a_t.shape)} must both "
                                 f"be (B, heads, L, L) with (B, L) = {(b, length)}")
            # padded keys carry exact zeros: clamp before the log so 0 * log(0) stays 0, not NaN
            tiny = torch.finfo(torch.float32).tiny
            kl = (a_t * (a_t.clamp(min=tiny).log() - a_s.clamp(min=tiny).log())).sum(-1)  # (B, heads, L)
            n_rows = mask.sum() * a_s.shape[1]
            losses.append((kl * mask[:, None, :]).sum() / n_rows.clamp(min=1.0))
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# Objectives of the training loop: what it calls per batch (see distill_gap.kd.training.TrainingLoss)


class HardLabelLoss(nn.Module):
    """Cross-entropy on the hard labels, a (weighted) mean over examples: the teacher fine-tune's objective and
    the hard-label baseline's. It reads no teacher output and follows no schedule.

    Call: outputs (an HF output with .logits (B, C)), labels (B,) int64, weight (B,) or None; the
    teacher_logits / teacher_outputs / attention_mask of the loop's common call are not used.
    """

    needs_hidden_states = False
    needs_attentions = False

    def set_step(self, step: int, total_steps: int) -> None:
        """Nothing follows the optimizer steps."""

    def epoch_metrics(self) -> dict[str, float]:
        """alpha 1.0 (all weight on the hard labels): the same history columns as a KD student's."""
        return {"alpha": 1.0}

    def forward(self, outputs, labels: torch.Tensor, *, teacher_logits: torch.Tensor | None = None,
                teacher_outputs=None, attention_mask: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = outputs.logits.float()
        return _weighted_cross_entropy(logits, labels, _normalized_weight(weight, logits))


class DistillationLoss(nn.Module):
    """The KD student's objective: `kd` on the cached teacher logits with its alpha on a schedule, plus
    hidden_weight * `hidden` and attention_weight * `attention` against the teacher run online.

    Args:
        kd: the logit loss; its alpha is the schedule's start.
        alpha_end: alpha at the last optimizer step of a linear/cosine schedule (None: kd.alpha throughout).
        alpha_schedule: "constant", "linear" or "cosine" (see `alpha_schedule`).
        hidden, hidden_weight: the hidden-state term (None: none) and its weight.
        attention, attention_weight: the attention-map term (None: none) and its weight.

    Call: outputs (HF output: .logits (B, C), with .hidden_states / .attentions when this loss needs
    them), labels (B,), teacher_logits (B, C), teacher_outputs (the teacher's HF output on the same
    batch, or None when no layer term is set), attention_mask (B, L), weight (B,) or None. The
    learned hidden-state projections are this module's parameters: the loop trains them with the model.

    Raises:
        ValueError: unknown alpha_schedule, alpha_end outside [0, 1], or teacher outputs missing at forward
            while a layer term needs them.
    """

    def __init__(self, kd: KDLoss, *, alpha_end: float | None, alpha_schedule: str,
                 hidden: HiddenStateLoss | None, hidden_weight: float, attention: AttentionKLLoss | None,
                 attention_weight: float):
        super().__init__()
        if alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {alpha_schedule!r}")
        if alpha_end is not None and not 0.0 <= alpha_end <= 1.0:
            raise ValueError(f"alpha_end must be in [0, 1], got {alpha_end}")
        self.kd, self.hidden, self.attention = kd, hidden, attention
        self.alpha_start = kd.alpha
        self.alpha_end = kd.alpha if alpha_end is None else alpha_end
        self.schedule = alpha_schedule
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden is not None

    @property
    def needs_attentions(self) -> bool:
        return self.attention is not None

    def set_step(self, step: int, total_steps: int) -> None:
        """Move alpha along its schedule to optimizer step `step` (0-based) of `total_steps`; the last one reaches
        alpha_end."""
        if self.schedule != "constant":
            self.kd.alpha = alpha_schedule(self.schedule, self.alpha_start, self.alpha_end, step,
                                           max(total_steps - 1, 1))

    def epoch_metrics(self) -> dict[str, float]:
        """The current alpha, logged with each epoch."""
        return {"alpha": float(self.kd.alpha)}

    def forward(self, outputs, labels: torch.Tensor, *, teacher_logits: torch.Tensor | None,
                teacher_outputs=None, attention_mask: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        if (self.hidden is not None or self.attention is not None) and teacher_outputs is None:
            raise ValueError("hidden-state / attention matching needs the teacher's outputs on the same batch")
        loss = self.kd(outputs.logits.float(), labels, teacher_logits, weight=weight)
        if self.hidden is not None:
            loss = loss + self.hidden_weight * self.hidden(tuple(h.float() for h in outputs.hidden_states),
                                                           tuple(h.float() for h in teacher_outputs.hidden_states),
                                                           attention_mask)
        if self.attention is not None:
            loss = loss + self.attention_weight * self.attention(outputs.attentions, teacher_outputs.attentions,
                                                                 attention_mask)
        return loss
