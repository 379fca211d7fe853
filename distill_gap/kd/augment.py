"""Teacher-labelled augmentation: extra training texts that only the teacher labels.

Distillation can learn from text the teacher labels, not only from labelled rows. Two sources:

- seeded edits of the training texts (`copies` per text; copy k of a row uses methods[k % len(methods)]): `delete`
  drops each word with probability `rate`, `swap` swaps round(rate * words) random adjacent pairs, `crop` cuts
  ceil(rate * words) words off the two ends. Each (row, copy) draws from its own generator (seed, row id, copy), so
  a row's augmentations do not depend on the others or on row order. Texts under 3 words are not edited;
- unlabelled in-domain texts from a file (`unlabelled`: CSV, JSONL or Parquet; a path or an s3:// URI).

A text equal to any row of any split (train, validation, test, holdout, OOD sets) or to an earlier extra text is
dropped: nothing of the evaluation sets leaks into training, and no text is labelled twice. The rows get their own
ids (`<row id>~<method><k>`, `unlabelled:<sha256 prefix>`) and their own digest (the soft-label cache key's data
digest), so their teacher logits are a separate, content-addressed cache entry.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from distill_gap.errors import DistillError

METHODS = ("delete", "swap", "crop")
MIN_WORDS = 3


def edit_text(text: str, method: str, rng: np.random.Generator, rate: float) -> str:
    """One seeded edit of `text` (words split on whitespace, joined by one space)."""
    words = text.split()
    n = len(words)
    if n < MIN_WORDS:
        return text
    if method == "delete":
        keep = rng.random(n) >= rate
        if not keep.any():
            keep[rng.integers(n)] = True
        words = [w for w, k in zip(words, keep) if k]
    elif method == "swap":
        for i in rng.integers(0, n - 1, size=max(1, round(rate * n))):
            words[i], words[i + 1] = words[i + 1], words[i]
    elif method == "crop":
        cut = min(n - 1, math.ceil(rate * n))
        head = int(rng.integers(0, cut + 1))
        words = words[head:n - (cut - head)]
    else:
        raise DistillError(f"unknown augmentation method {method!r}", f"use one of {', '.join(METHODS)}")
    return " ".join(words)


def augment_rows(ids: Sequence[str], texts: Sequence[str], *, copies: int, methods: Sequence[str], rate: float,
                 seed: int, exclude: set[str]) -> pd.DataFrame:
    """Seeded edits of the training texts: columns id, text, source (the method). `exclude` (texts that must not
    appear) is extended with every text kept."""
    rows = []
    for row_id, text in zip(ids, texts):
        for k in range(copies):
            method = methods[k % len(methods)]
            rng = np.random.default_rng([seed, zlib.crc32(str(row_id).encode("utf-8", "surrogatepass")), k])
            new = edit_text(str(text), method, rng, rate)
            if new and new not in exclude:
                exclude.add(new)
                rows.append({"id": f"{row_id}~{method}{k}", "text": new, "source": method})
    return pd.DataFrame(rows, columns=["id", "text", "source"])


def unlabelled_rows(uri: str, *, text_column: str, max_rows: int, seed: int, exclude: set[str]) -> pd.DataFrame:
    """In-domain texts without labels from a CSV / JSONL / Parquet file: columns id, text, source ("unlabelled").
    Blank texts, texts of any split and repeats are dropped; more than `max_rows` left are sampled (seeded)."""
    from distill_gap.data.splits import read_table

    frame = read_table(uri)
    if text_column not in frame.columns:
        raise DistillError(f"distill.augment.unlabelled {uri} has no column {text_column!r} (columns: "
                           f"{', '.join(map(str, frame.columns[:10]))})",
                           "set distill.augment.text_column to the column that holds the texts")
    texts = frame[text_column]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DistillError(f"distill.augment.unlabelled {uri}: {len(bad)} rows whose {text_column!r} is not a "
                           f"string (first at row {bad[0] + 1})",
                           "give every row a text, or remove those rows")
    kept = list(dict.fromkeys(t.strip() for t in texts if t.strip() and t.strip() not in exclude))
    if len(kept) > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(kept), size=max_rows, replace=False))
        kept = [kept[i] for i in pick]
    exclude.update(kept)
    ids = [f"unlabelled:{hashlib.sha256(t.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}" for t in kept]
    return pd.DataFrame({"id": ids, "text": kept, "source": "unlabelled"}, columns=["id", "text", "source"])


def extra_texts(augment, splits_frames: dict[str, pd.DataFrame], *, seed: int,
                exclude: set[str] | None = None) -> pd.DataFrame | None:
    """The augmentation rows of `augment` (the distill.augment config section) for the training split of
    `splits_frames`, deduplicated against every split (and `exclude`, which is extended with every text kept); None
    when augmentation is off. Columns id, text, label (empty: the teacher's logits are the only label), source,
    weight (1)."""
    if not augment.copies and not augment.unlabelled:
        return None
    exclude = exclude if exclude is not None else set()
    exclude.update(str(t) for df in splits_frames.values() for t in df["text"])
    train = splits_frames["train"]
    parts = []
    if augment.copies:
        parts.append(augment_rows(train["id"].astype(str).tolist(), train["text"].tolist(), copies=augment.copies,
                                  methods=list(augment.methods), rate=augment.rate, seed=seed, exclude=exclude))
    if augment.unlabelled:
        parts.append(unlabelled_rows(augment.unlabelled, text_column=augment.text_column,
                                     max_rows=augment.max_unlabelled, seed=seed, exclude=exclude))
    frame = pd.concat(parts, ignore_index=True)
    if frame.empty:
        raise DistillError("distill.augment produced no text: every edit or unlabelled text equals a row of a split "
                           "(or the training texts are under 3 words)",
                           "raise distill.augment.copies or rate, or give distill.augment.unlabelled new texts")
    clash = set(frame["id"]) & {str(i) for df in splits_frames.values() for i in df["id"]}
    if clash:
        raise DistillError(f"augmentation ids collide with data ids, e.g. {sorted(clash)[0]!r}",
                           "data ids must not contain '~' followed by an augmentation method name")
    return frame.assign(label="", weight=1.0)[["id", "text", "label", "source", "weight"]]


@dataclass
class ExtraRows:
    """Rows beyond the training split (distill.augment's, redistill's production rows and feedback answers) with their
    teacher logits (the soft-label entry under their own key)."""

    frame: pd.DataFrame   # id, text, label (a person's answer, or empty: KD term only), source, weight
    digest: str           # split_digest of the rows: the data digest of their soft-label cache key
    soft: Any             # distill_gap.softlabels.labelling.SoftLabels of these rows
    production: dict | None = None  # redistill.production: {"uri", "sha256"} of the production sample they came from

    def logits(self) -> np.ndarray:
        """(N, C) teacher logits aligned with `frame` rows."""
        by_id = {i: n for n, i in enumerate(self.soft.ids)}
        return self.soft.logits[[by_id[i] for i in self.frame["id"]]]

    def scope_rows(self, labels: list[str]) -> pd.DataFrame | None:
        """The production and feedback rows (not augmentations: edited copies of training texts) as id, text,
        label: a person's answer, else the teacher's argmax. None without any."""
        keep = self.frame["source"].isin(["production", "feedback"]).to_numpy()
        if not keep.any():
            return None
        teacher = np.asarray(labels)[self.logits().argmax(-1)]
        label = np.where(self.frame["label"].to_numpy() != "", self.frame["label"].to_numpy(), teacher)
        return pd.DataFrame({"id": self.frame["id"], "text": self.frame["text"], "label": label})[keep] \
            .reset_index(drop=True)

    def summary(self) -> dict:
        return {"rows": len(self.frame), "digest": self.digest, "key": self.soft.key, "uri": self.soft.uri,
                "cache_hit": self.soft.hit, "by_source": _counts(self.frame["source"]),
                "answered": int((self.frame["label"] != "").sum()), "production": self.production}


def _counts(values: Iterable[str]) -> dict[str, int]:
    return {k: int(v) for k, v in pd.Series(list(values)).value_counts().sort_index().items()}
