"""Cache-key arguments shared by the soft-label store tests (digests made of one repeated character)."""

from __future__ import annotations

from distill_gap.softlabels.cache_key import cache_key


def key(**change):
    args = dict(teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, max_length=128,
                labels=["negative", "neutral", "positive"])
    return cache_key(**{**args, **change})


def key_args(c=200, **change):
    return {**dict(teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, max_length=128,
                   labels=[f"class-{i}" for i in range(c)]), **change}
