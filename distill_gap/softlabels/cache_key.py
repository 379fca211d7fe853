"""The soft-label cache key: sha256 over the canonical JSON of everything that changes the stored logits.

Raw logits are stored (temperature is applied at training time), so temperature is not part of the key.
DESIGN.md, "Identities and keys".
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from distill_gap.digest import sha256_json
from distill_gap.errors import DistillError

KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def cache_key(*, teacher_digest: str, tokenizer_digest: str, data_digest: str, max_length: int,
              labels: Sequence[str], top_k: int | None = None) -> str:
    """sha256 over the canonical JSON of everything that changes the stored logits.

    `top_k` (top-k storage mode) enters the hashed inputs only when it is not None, so full-logit
    keys are the same as before top-k existed, and a top-k entry never answers a full request.
    """
    return sha256_json(cache_key_inputs(teacher_digest=teacher_digest, tokenizer_digest=tokenizer_digest,
                                        data_digest=data_digest, max_length=max_length, labels=labels, top_k=top_k))


def cache_key_inputs(*, teacher_digest: str, tokenizer_digest: str, data_digest: str, max_length: int,
                     labels: Sequence[str], top_k: int | None = None) -> dict:
    """The checked inputs cache_key hashes (also recorded in the manifest as `key_inputs`)."""
    for name, value in (("teacher_digest", teacher_digest), ("tokenizer_digest", tokenizer_digest),
                        ("data_digest", data_digest)):
        if not isinstance(value, str) or not value:
            raise DistillError(f"soft-label cache key needs a non-empty {name}, got {value!r}",
                               "compute it with distill_gap.digest (model_digest / tokenizer_digest / dataset digest)")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise DistillError(f"max_length must be a positive integer, got {max_length!r}", "set data.max_length, e.g. 128")
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels) or not all(isinstance(l, str) for l in labels):
        raise DistillError(f"labels must be a non-empty list of distinct names, got {labels!r}",
                           "set data.labels to the class names in the teacher's output order")
    inputs = {"teacher_digest": teacher_digest, "tokenizer_digest": tokenizer_digest,
              "data_digest": data_digest, "max_length": max_length, "labels": labels}
    if top_k is not None:
        inputs["top_k"] = check_top_k(top_k, len(labels))
    return inputs


def check_top_k(top_k, num_classes: int) -> int:
    """A valid top_k for `num_classes` classes (1 <= k < C), else DistillError."""
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 1 <= int(top_k) < num_classes:
        raise DistillError(f"soft_labels.top_k must be an integer with 1 <= top_k < {num_classes} (the number of "
                           f"classes), got {top_k!r}",
                           "set soft_labels.top_k to a small k (e.g. 16), or leave it unset to store full logits")
    return int(top_k)


def check_key(key: str) -> str:
    """`key` when it has the form of a cache key (64 hex digits), else ValueError (a programming error)."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"not a soft-label cache key (64 hex digits): {key!r}")
    return key
