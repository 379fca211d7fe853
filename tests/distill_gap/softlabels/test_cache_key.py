"""The soft-label cache key: stable, changed by every input that changes the logits, top_k only when set."""

from __future__ import annotations

import numpy as np
import pytest

from distill_gap.digest import sha256_json
from distill_gap.errors import DistillError
from distill_gap.softlabels.cache_key import cache_key, cache_key_inputs, check_key
from tests.distill_gap.softlabels.keys import key, key_args


def test_key_is_stable_and_hex():
    assert key() == key()
    assert len(key()) == 64 and int(key(), 16) >= 0
    assert check_key(key()) == key()


@pytest.mark.parametrize("change", [
    {"teacher_digest": "T" * 64}, {"tokenizer_digest": "K" * 64}, {"data_digest": "D" * 64},
    {"max_length": 256}, {"labels": ["positive", "neutral", "negative"]}, {"labels": ["negative", "positive"]},
])
def test_key_changes_with_every_input(change):
    assert key(**change) != key()


def test_key_refuses_bad_inputs():
    with pytest.raises(DistillError, match="distinct"):
        key(labels=["a", "a"])
    with pytest.raises(DistillError, match="max_length"):
        key(max_length=0)
    with pytest.raises(DistillError, match="teacher_digest"):
        key(teacher_digest="")


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "../" + "a" * 61, 7])
def test_check_key_refuses_what_is_not_a_key(bad):
    with pytest.raises(ValueError, match="64 hex digits"):
        check_key(bad)


# ------------------------------------------------------------------------------------------- top-k


def test_key_includes_top_k_only_when_set():
    full = cache_key(**key_args())
    assert cache_key(**key_args(), top_k=None) == full
    top16 = cache_key(**key_args(top_k=16))
    assert top16 != full and top16 != cache_key(**key_args(top_k=17))
    assert cache_key(**key_args(top_k=np.int64(16))) == top16


def test_full_key_is_the_pre_top_k_key():
    """The key without top_k is the same sha256 of the same five inputs as before."""
    args = key_args(c=3)
    assert cache_key(**args) == sha256_json(args)
    assert cache_key(**args, top_k=2) == sha256_json({**args, "top_k": 2})
    assert cache_key_inputs(**args, top_k=np.int64(2))["top_k"] == 2


@pytest.mark.parametrize("bad", [0, -1, 200, 201, True, 2.5, "4"])
def test_invalid_top_k_is_refused(bad):
    with pytest.raises(DistillError, match="top_k"):
        cache_key(**key_args(top_k=bad))
