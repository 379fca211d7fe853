"""What a redistillation learns from production (issue 22): the rows of a production sample (a drift event's) and the
answers kept by `distill feedback`, as extra training rows.

The pinned teacher labels them through the soft-label store under their own key (the soft-labels stage, beside
distill.augment's rows); a row a person answered also gets that answer as its hard label, every other row learns
from the KD term only. Rows equal to a row of any split are dropped (a production sample that overlaps the test
split must not leak it into training), repeats are dropped, more than `max_rows` are sampled (seeded), and the
rows pass the same Great Expectations suite as the splits before anything is labelled. A production sample is
checked against the digest its drift event recorded: rows that changed or are gone are an error, never a silent
substitute.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import pandas as pd

from distill_gap.data.splits import MISSING_SLICE
from distill_gap.errors import DistillError

COLUMNS = ["id", "text", "label", "source", "weight"]


def _row_id(text: str) -> str:
    return f"production:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def production_rows(redistill, *, feedback_store: str, labels: list[str], exclude: set[str],
                    seed: int, log=None, slice_columns: Sequence[str] = ()) -> pd.DataFrame | None:
    """The production rows of `redistill` (the redistill config section): columns id, text, label (a person's answer
    or ""), source (production | feedback), weight, and each of `slice_columns` (MISSING_SLICE where a row names
    none: the scope's regions are judged on them); attrs["production"] is the sample read ({"uri", "sha256"}, None
    without one). None when it names no source. `exclude` (texts of every split
    and of other extra rows) is extended with every text kept."""
    from distill_gap.monitoring.drift import read_production_rows, sample_digest
    from distill_gap.monitoring.feedback import answered

    if not redistill.production and not redistill.feedback:
        return None
    texts: dict[str, list] = {}  # text -> [label, source, slices], first seen wins, a person's answer always
    sample = None  # the production sample as read now: {"uri", "sha256"}, recorded in the lineage
    if redistill.production:
        try:
            sample = {"uri": redistill.production, "sha256": sample_digest(redistill.production)}
        except DistillError as err:
            if not redistill.production_digest:
                raise
            raise DistillError(f"the production rows this run was started for are gone: {err.problem}",
                               "start the run again from a new drift event, or unset redistill.production_digest "
                               "to learn from the rows there now") from None
        got = sample["sha256"]
        if redistill.production_digest:
            if got != redistill.production_digest:
                raise DistillError(f"the production rows at {redistill.production} changed since the drift event "
                                   f"(sha256 {got[:16]}, the event recorded {redistill.production_digest[:16]})",
                                   "start the run again from a new drift event, or unset redistill.production_digest "
                                   "to learn from the rows there now")
        rows = read_production_rows(redistill.production)
        for text, slices in zip(rows["text"], _slices(rows, slice_columns)):
            texts.setdefault(text.strip(), ["", "production", slices])
    if redistill.feedback:
        fb = answered(feedback_store)
        for text, answer, kind, slices in zip(fb.get("text", []), fb.get("answer", []), fb.get("kind", []),
                                              _slices(fb, slice_columns)):
            entry = texts.setdefault(str(text).strip(), ["", "feedback", slices])
            entry[2] = {**slices, **{k: v for k, v in entry[2].items() if v != MISSING_SLICE}}
            if kind == "human":
                entry[0] = str(answer)
    kept = [(t, lab, src, sl) for t, (lab, src, sl) in texts.items() if t and t not in exclude]
    overlap = sum(1 for t in texts if t in exclude)
    if not texts and not redistill.production:
        return None  # redistill.feedback with nothing stored yet: nothing to add
    if not kept:
        raise DistillError(f"redistill names production rows, but none is left to learn from ({len(texts)} read, "
                           f"{overlap} equal to rows of the data splits or other extra rows)",
                           "point redistill.production at new rows, or add answers with `distill feedback add`")
    if len(kept) > redistill.max_rows:  # answered rows first: a person's label is the scarcest thing here
        order = np.random.default_rng(seed).permutation(len(kept))
        order = sorted(order, key=lambda i: kept[i][1] == "")
        kept = [kept[i] for i in sorted(order[:redistill.max_rows])]
    exclude.update(t for t, *_ in kept)
    if overlap and log is not None:
        log(f"{overlap} production or feedback rows equal rows of the data splits (or other extra rows) and were left "
            "out: training on them would leak evaluation rows")
    bad = sorted({lab for _, lab, *_ in kept if lab and lab not in labels})
    if bad:
        raise DistillError(f"feedback answers {bad} are not labels of this config ({', '.join(labels)})",
                           "the feedback store belongs to another config: set feedback.store to this config's")
    frame = pd.DataFrame([k[:3] for k in kept], columns=["text", "label", "source"])
    frame.insert(0, "id", [_row_id(t) for t in frame["text"]])
    frame["weight"] = float(redistill.weight)
    for col in slice_columns:
        frame[col] = [k[3][col] for k in kept]
    frame = frame[[*COLUMNS, *slice_columns]]
    frame.attrs["overlap"] = overlap
    frame.attrs["production"] = sample
    return frame


def _slices(rows: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, str]]:
    """Per row, {column: value} for each slice column (MISSING_SLICE where the row has no string value)."""
    values = {c: rows[c].tolist() if c in rows else [None] * len(rows) for c in columns}
    return [{c: str(values[c][i]) if isinstance(values[c][i], str) and values[c][i] else MISSING_SLICE
             for c in columns} for i in range(len(rows))]


def hold_out_answers(frame: pd.DataFrame, fraction: float, *, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows to train on, held-out rows): a seeded `fraction` of the rows with a person's answer is held out of
    training, the evidence the new model is judged on there (at least one when fraction > 0 and any was answered)."""
    answered = np.flatnonzero((frame["label"] != "").to_numpy())
    n = min(len(answered), max(1, round(fraction * len(answered)))) if fraction > 0 and len(answered) else 0
    held = np.sort(np.random.default_rng([seed, 7]).choice(answered, size=n, replace=False)) if n else np.array([], int)
    mask = np.zeros(len(frame), dtype=bool)
    mask[held] = True
    return frame[~mask].reset_index(drop=True), frame[mask].reset_index(drop=True)
