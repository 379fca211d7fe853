"""Stress suites: seeded perturbations of test texts (typos, casing, whitespace, punctuation, truncation, negation,
domain-word swaps) and how a model's predictions move under them (accuracy drop, flip rate).
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.evaluation.inputs import check_labels, same_length

TYPO_RATE = 0.10  # share of words given one character swap or drop (at least one word per text)
PUNCT_RATE = 0.10  # share of words followed by inserted punctuation (at least one)
AUXILIARIES = frozenset(
    "am is are was were be been do does did have has had can could will would shall should may might must".split())
# Drug-review domain words and stand-ins with the same meaning (all lower case; case is restored per word)
DOMAIN_SYNONYMS = {
    "medicine": ("medication", "drug"), "medicines": ("medications", "drugs"),
    "medication": ("medicine", "drug"), "medications": ("medicines", "drugs"),
    "drug": ("medication", "medicine"), "drugs": ("medications", "medicines"),
    "med": ("medicine",), "meds": ("medicines", "medications"),
    "pill": ("tablet", "capsule"), "pills": ("tablets", "capsules"),
    "tablet": ("pill",), "tablets": ("pills",), "capsule": ("pill",), "capsules": ("pills",),
    "doctor": ("physician", "doc"), "doctors": ("physicians",), "doc": ("doctor",),
    "physician": ("doctor",), "dose": ("dosage",), "doses": ("dosages",), "dosage": ("dose",),
    "prescription": ("script",), "prescribed": ("given",), "pharmacist": ("chemist",),
    "symptoms": ("complaints",), "treatment": ("therapy",),
}
_DOMAIN_RE = re.compile(r"\b(" + "|".join(sorted(DOMAIN_SYNONYMS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_PUNCT = ".,!?;:"


def _rng(seed: int, variant: str, text: str) -> np.random.Generator:
    # seeded per text, so a text's variant does not depend on which other texts share the batch
    return np.random.default_rng([seed, zlib.crc32(variant.encode()), zlib.crc32(text.encode())])


def _pick(rng: np.random.Generator, candidates: list[int], rate: float) -> list[int]:
    if not candidates:
        return []
    k = max(1, int(round(rate * len(candidates))))
    return sorted(rng.choice(candidates, size=min(k, len(candidates)), replace=False).tolist())


def _typos(text: str, rng) -> str:
    parts = re.split(r"(\s+)", text)
    words = [i for i, w in enumerate(parts) if sum(ch.isalpha() for ch in w) >= 2]
    for i in _pick(rng, words, TYPO_RATE):
        w = parts[i]
        letters = [j for j, ch in enumerate(w) if ch.isalpha()]
        swaps = [j for j in letters[:-1] if w[j + 1].isalpha() and w[j] != w[j + 1]]
        if swaps and rng.random() < 0.5:
            j = swaps[rng.integers(len(swaps))]
            parts[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        else:
            j = letters[rng.integers(len(letters))]
            parts[i] = w[:j] + w[j + 1:]
    return "".join(parts)


def _casing(text: str, rng) -> str:
    parts = re.split(r"(\s+)", text)
    out = [w.upper() if rng.random() < 0.5 else w.lower() for w in parts]
    if out == parts:  # guarantee a change where the text has letters
        for i, w in enumerate(parts):
            if any(ch.isalpha() for ch in w):
                out[i] = w.lower() if w != w.lower() else w.upper()
                break
    return "".join(out)


def _whitespace(text: str, rng) -> str:
    runs = [" ", "  ", "   ", "\t", " \n ", "\n"]
    parts = re.split(r"\s+", text.strip())
    out = parts[0]
    for w in parts[1:]:
        out += runs[rng.integers(len(runs))] + w
    return " " * int(rng.integers(1, 3)) + out + " " * int(rng.integers(1, 3))


def _punctuation(text: str, rng) -> str:
    parts = re.split(r"(\s+)", text)
    # drop half of the existing punctuation marks, then add marks after ~10% of the words
    parts = ["".join(ch for ch in w if ch not in _PUNCT or rng.random() < 0.5) for w in parts]
    words = [i for i, w in enumerate(parts) if w and not w.isspace()]
    marks = [".", ",", "!", "?", "...", "!!", ";"]
    for i in _pick(rng, words, PUNCT_RATE):
        parts[i] += marks[rng.integers(len(marks))]
    return "".join(parts)


def _truncation(text: str, rng) -> str:
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)])


def _negation(text: str, rng) -> str:
    words = text.split(" ")
    norm = [re.sub(r"[^a-z']", "", w.lower()) for w in words]
    for i, w in enumerate(norm):
        if w in AUXILIARIES and (i + 1 == len(norm) or norm[i + 1] not in ("not", "never")):
            return " ".join(words[: i + 1] + ["not"] + words[i + 1:])
    first = words[0] if words else ""
    keep_case = first in ("I",) or first.startswith("I'") or first.isupper()
    body = text if keep_case or not text else text[0].lower() + text[1:]
    return "I do not think " + body


def _domain_swap(text: str, rng) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        options = DOMAIN_SYNONYMS[word.lower()]
        new = options[rng.integers(len(options))]
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _DOMAIN_RE.sub(swap, text)


STRESS_VARIANTS = {"typos": _typos, "casing": _casing, "whitespace": _whitespace, "punctuation": _punctuation,
                   "truncation": _truncation, "negation": _negation, "domain_swap": _domain_swap}


def stress_variants(texts: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """variant name -> perturbed texts (same length and order), deterministic for a seed.

    typos, casing, whitespace, punctuation and domain_swap keep the label; truncation keeps the first half of
    the words; negation ("not" after the first auxiliary verb, else an "I do not think " prefix) may flip it, so
    read it by flip rate (sensitivity), not by accuracy on the old label. A text without a domain word comes back
    unchanged from domain_swap.
    """
    texts = list(texts)
    if not texts:
        raise DistillError("no texts to perturb (0 rows)", "skip empty suites before building stress variants")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DistillError(f"{len(bad)} texts are not strings (first at row {bad[0]}: {texts[bad[0]]!r})",
                           "drop or fill missing texts (NaN) in the suite before building stress variants")
    return {name: [fn(t, _rng(seed, name, t)) for t in texts] for name, fn in STRESS_VARIANTS.items()}


def stress_result(clean_pred, stressed_pred, truth) -> dict:
    """{"n", "clean_accuracy", "stressed_accuracy", "accuracy_drop" (clean - stressed), "flip_rate"}."""
    c, s = check_labels(clean_pred, "clean_pred"), check_labels(stressed_pred, "stressed_pred")
    y = check_labels(truth, "truth")
    n = same_length(clean_pred=c, stressed_pred=s, truth=y)
    clean_acc, stressed_acc = float(np.mean(c == y)), float(np.mean(s == y))
    return {"n": n, "clean_accuracy": clean_acc, "stressed_accuracy": stressed_acc,
            "accuracy_drop": clean_acc - stressed_acc, "flip_rate": float(np.mean(c != s))}
