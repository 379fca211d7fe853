"""The one prediction loop: tokenize -> length-sort -> pad each batch to its longest row -> run -> rows in order."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

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


def run_batched(tokenizer, texts: Sequence[str], run_batch: Callable[[dict[str, np.ndarray]], np.ndarray], *,
                num_labels: int, batch_size: int = 32, max_length: int = 128, keys: Sequence[str] | None = None,
                desc: str | None = None) -> np.ndarray:
    """Logits (N, C) float32 in the order of `texts`, from `run_batch(arrays) -> (B, C)` over length-sorted batches.

    `arrays` are pad_batch's (B, T) int64 arrays (all the tokenizer's keys, or `keys`); a progress bar shows
    when `desc` is given.
    """
    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), num_labels), dtype=np.float32)  # (N, C)
    if not texts:
        return out
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    batches = length_sorted_batches([len(ids) for ids in enc["input_ids"]], batch_size)
    pad_id = tokenizer.pad_token_id or 0
    for idx in tqdm(batches, desc=desc, unit="batch", disable=desc is None or progress_disabled()):
        out[idx] = run_batch(pad_batch(enc, idx, pad_id, keys))  # (B, C)
    return out


def predict_logits(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                   device: str = "cpu", desc: str | None = None) -> np.ndarray:
    """Logits (N, C) float32 of a Hugging Face classifier in the order of `texts`; a progress bar with `desc`."""
    import torch

    def run_batch(arrays: dict[str, np.ndarray]) -> np.ndarray:
        batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
        return model(**batch).logits.float().cpu().numpy()  # (B, C)

    model.eval().to(device)
    with torch.inference_mode():
        return run_batched(tokenizer, texts, run_batch, num_labels=model.config.num_labels, batch_size=batch_size,
                           max_length=max_length, desc=desc)
