"""Batched inference for Hugging Face classifiers: length-sorted batches, dynamic padding."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length, so padding per batch stays small."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def predict_logits(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                   device: str = "cpu", desc: str | None = None) -> np.ndarray:
    """Logits (N, C) float32 in the order of `texts`; a progress bar when `desc` is given."""
    import torch
    from tqdm.auto import tqdm

    from tasks.runtime import progress_disabled

    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)  # (N, C)
    if not texts:
        return out
    # we pad pre-tokenized batches on purpose; silence transformers' hint about __call__
    tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    batches = length_sorted_batches([len(ids) for ids in enc["input_ids"]], batch_size)
    model.eval().to(device)
    with torch.inference_mode():
        for idx in tqdm(batches, desc=desc, unit="batch", disable=desc is None or progress_disabled()):
            batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc.keys()}, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            out[idx] = model(**batch).logits.float().cpu().numpy()  # (B, C)
    return out
