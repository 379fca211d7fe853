"""The one prediction loop: tokenize -> length-sort -> pad each batch to its longest row -> run -> rows in order."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.ops.runtime import progress_disabled


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length, so padding per batch stays small."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def pad_batch(enc: Mapping[str, Sequence[Sequence[int]]], idx: Sequence[int], pad_token_id: int,
              keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Rows `idx` of a pre-tokenized encoding as right-padded (B, T) int64 arrays, T = longest row.

    `input_ids` is padded with `pad_token_id`, every other key (attention_mask, token_type_ids)
    with 0. A key in `keys` that the encoding lacks (token_type_ids for some exports) comes back as
    zeros. Much cheaper than `tokenizer.pad`, which re-validates every row in Python.
    """
    ids = enc["input_ids"]
    width = max(len(ids[i]) for i in idx)
    out = {}
    for k in keys or list(enc.keys()):
        arr = np.full((len(idx), width), pad_token_id if k == "input_ids" else 0, dtype=np.int64)
        if k in enc:
            rows = enc[k]
            for r, i in enumerate(idx):
                arr[r, :len(rows[i])] = rows[i]
        out[k] = arr
    return out


# What a run_batch callable returns: logits (B, C), or (logits (B, C), pooled features (B, D)).
BatchOutput = np.ndarray | tuple[np.ndarray, np.ndarray]


def run_batched_outputs(tokenizer, texts: Sequence[str], run_batch: Callable[[dict[str, np.ndarray]], BatchOutput],
                        *, num_labels: int, num_features: int | None = None, batch_size: int = 32,
                        max_length: int = 128, keys: Sequence[str] | None = None,
                        desc: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits (N, C), features (N, D) or None) float32 in the order of `texts`, over length-sorted batches.

    `run_batch(arrays)` returns logits (B, C) or a tuple (logits (B, C), features (B, D)); features are None when
    it returns logits alone. `num_features`: D when the runtime knows it, so that no texts still give (0, D)
    features (None: no texts give None). `arrays` are pad_batch's (B, T) int64 arrays (all the tokenizer's keys,
    or `keys`); a progress bar shows when `desc` is given.
    """
    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    logits = np.zeros((len(texts), num_labels), dtype=np.float32)  # (N, C)
    features = None if num_features is None else np.zeros((len(texts), num_features), dtype=np.float32)  # (N, D)
    if not texts:
        return logits, features
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    batches = length_sorted_batches([len(ids) for ids in enc["input_ids"]], batch_size)
    pad_id = tokenizer.pad_token_id or 0
    with_features = None  # whether run_batch returns features: the same answer for every batch
    for idx in tqdm(batches, desc=desc, unit="batch", disable=desc is None or progress_disabled()):
        out = run_batch(pad_batch(enc, idx, pad_id, keys))
        assert with_features in (None, isinstance(out, tuple)), "run_batch returned features for some batches only"
        with_features = isinstance(out, tuple)
        if not with_features:
            logits[idx] = out  # (B, C)
            continue
        logits[idx], batch_features = out  # (B, C), (B, D)
        if features is None:
            features = np.zeros((len(texts), batch_features.shape[-1]), dtype=np.float32)
        features[idx] = batch_features
    return logits, features if with_features else None


def run_batched(tokenizer, texts: Sequence[str], run_batch: Callable[[dict[str, np.ndarray]], BatchOutput], *,
                num_labels: int, batch_size: int = 32, max_length: int = 128, keys: Sequence[str] | None = None,
                desc: str | None = None) -> np.ndarray:
    """Logits (N, C) float32 in the order of `texts` (run_batched_outputs without the features)."""
    return run_batched_outputs(tokenizer, texts, run_batch, num_labels=num_labels, batch_size=batch_size,
                               max_length=max_length, keys=keys, desc=desc)[0]


def _model_inputs(model, arrays: dict[str, np.ndarray], device: str) -> dict:
    """The arrays the model's forward takes, as tensors on `device`: a tokenizer may give more (a BERT tokenizer's
    token_type_ids to DistilBERT or ModernBERT, which have no token types)."""
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items() if takes_any or k in params}


def predict_logits(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                   device: str = "cpu", desc: str | None = None) -> np.ndarray:
    """Logits (N, C) float32 of a Hugging Face classifier in the order of `texts`; a progress bar with `desc`."""
    import torch

    def run_batch(arrays: dict[str, np.ndarray]) -> np.ndarray:
        batch = _model_inputs(model, arrays, device)
        return model(**batch).logits.float().cpu().numpy()  # (B, C)

    model.eval().to(device)
    with torch.inference_mode():
        return run_batched(tokenizer, texts, run_batch, num_labels=model.config.num_labels, batch_size=batch_size,
                           max_length=max_length, desc=desc)


def classifier_head(model):
    """The final Linear that produces a classifier's logits: the last torch.nn.Linear in `model.modules()` with
    out_features == config.num_labels (BERT's `classifier`, RoBERTa's `classifier.out_proj`)."""
    import torch

    num_labels = int(model.config.num_labels)
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise DistillError(f"{type(model).__name__} has no torch.nn.Linear with {num_labels} outputs (its labels) "
                           "to read pooled features from", "use a sequence classifier whose head ends in a Linear")
    return heads[-1]


def predict_outputs(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                    device: str = "cpu", desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C), pooled features (N, D)) float32 of a Hugging Face classifier in the order of `texts`.

    The features are the input of classifier_head (BERT: the pooler's tanh output; DistilBERT: the ReLU'd
    pre_classifier output; RoBERTa: tanh(dense)), read by a forward pre-hook that is removed afterwards.
    """
    import torch

    head = classifier_head(model)
    seen: list = []
    handle = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))

    def run_batch(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        seen.clear()
        batch = _model_inputs(model, arrays, device)
        logits = model(**batch).logits.float().cpu().numpy()  # (B, C)
        features = seen[-1]
        if features.dim() != 2:  # e.g. GPT-2's head scores every token, then picks one: no pooled input
            raise DistillError(f"{type(model).__name__} applies its head to {tuple(features.shape)} inputs, not to "
                               "one pooled vector per text", "use a classifier with a pooled head (BERT-like)")
        return logits, features.float().cpu().numpy()  # (B, C), (B, D)

    model.eval().to(device)
    try:
        with torch.inference_mode():
            out = run_batched_outputs(tokenizer, texts, run_batch, num_labels=model.config.num_labels,
                                      num_features=head.in_features, batch_size=batch_size, max_length=max_length,
                                      desc=desc)
    finally:
        handle.remove()
    return out
