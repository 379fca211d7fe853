"""Feedback: the answers to rows the scope guard sent to a fallback, kept so that redistillation can learn them.

When the edge model abstains (a row out of scope), the caller routes the row to a fallback: a person, or the teacher.
Its answer comes back as a feedback record, one JSON object per line:

    {"id": "r-1", "text": "...", "answer": "negative", "answered_by": "nurse.kim", "kind": "human",
     "answered_at": "2026-12-02T10:00:00Z", "edge_version": 3}

`answer` is one of the config's labels, `kind` is `human` or `teacher`, `answered_at` is ISO 8601 or epoch seconds,
`edge_version` the <name>-edge version that abstained (it must exist in the registry). Other keys (slice columns
such as `condition`) are kept.

The store is a folder or an S3 prefix (`feedback.store`). `append_feedback` checks a whole file first (every
problem named by line, first 5 of each kind) against the labels, the registry's versions and every record already
stored, then writes it as one new part, create-only (`part-<UTC time>-<sha256 prefix>.jsonl`): nothing half-written,
nothing overwritten. A record already stored (same id, kind and answer) is skipped and counted, so sending a file
twice stores it once. Two answers of one kind for one id that disagree (text or answer) are refused, in the file or
against the store; a person's answer and the teacher's for one id may differ (the person's wins when read).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Sequence

import pandas as pd

from distill_gap.errors import DistillError

REQUIRED = ("id", "text", "answer", "answered_by", "kind", "answered_at", "edge_version")
KINDS = ("human", "teacher")
EXAMPLE = ('{"id": "r-1", "text": "...", "answer": "negative", "answered_by": "nurse.kim", "kind": "human", '
           '"answered_at": "2026-12-02T10:00:00Z", "edge_version": 3}')


@dataclass
class Appended:
    """What append_feedback did: the part written (None when every record was already stored) and the counts."""

    part: str | None
    written: int
    skipped: int          # already stored, or repeated in the file (same id, kind and answer)
    store: str


def _problems(what: str, found: list[str], fix: str) -> DistillError:
    from distill_gap.monitoring.drift import bad_lines

    return bad_lines(found, len(found), what, fix)


def check_records(rows: list[dict], where: list[str], *, labels: Sequence[str]) -> pd.DataFrame:
    """The records as a frame (answered_at in UTC, edge_version an int), or a DistillError naming every bad line."""
    from distill_gap.monitoring.drift import parse_timestamps

    bad = []
    for row, at in zip(rows, where):
        missing = [k for k in REQUIRED if row.get(k) is None or (isinstance(row.get(k), str) and not row[k].strip())]
        if missing:
            bad.append(f"{at}: no {', '.join(repr(k) for k in missing)}")
        elif not isinstance(row["text"], str) or not isinstance(row["id"], (str, int)):
            bad.append(f"{at}: \"id\" must be a string and \"text\" a string")
        elif row["answer"] not in labels:
            bad.append(f"{at}: answer {row['answer']!r} is not one of the labels {', '.join(labels)}")
        elif row["kind"] not in KINDS:
            bad.append(f"{at}: kind {row['kind']!r} is not human or teacher")
        elif isinstance(row["edge_version"], bool) or not str(row["edge_version"]).isdigit() \
                or int(row["edge_version"]) < 1:
            bad.append(f"{at}: edge_version {row['edge_version']!r} is not a version number (1, 2, ...)")
    if bad:
        raise _problems("bad feedback records", bad, f"write one JSON object per line with {', '.join(REQUIRED)}, "
                                                     f"like {EXAMPLE}")
    df = pd.DataFrame(rows)
    df["id"] = df["id"].astype(str)
    df["edge_version"] = df["edge_version"].astype(int)
    df["answered_at"] = parse_timestamps(df["answered_at"], where, "answered_at")
    return df


def _conflicts(df: pd.DataFrame, where: list[str]) -> list[str]:
    """Lines whose id already has, with the same kind, a different text or answer earlier in `df`."""
    first: dict[tuple[str, str], int] = {}
    found = []
    for i, (rid, kind, text, answer) in enumerate(zip(df["id"], df["kind"], df["text"], df["answer"])):
        j = first.setdefault((rid, kind), i)
        if j != i and (df["text"].iloc[j], df["answer"].iloc[j]) != (text, answer):
            found.append(f"{where[i]}: id {rid!r} answered {answer!r} by {kind}, but {where[j]} says "
                         f"{df['answer'].iloc[j]!r}" + ("" if df["text"].iloc[j] == text else " for another text"))
    return found


def read_feedback(store: str) -> pd.DataFrame:
    """Every stored record (the parts in name order, i.e. oldest first); an empty frame when there are none."""
    from distill_gap.softlabels.backends import open_backend

    from distill_gap.monitoring.drift import parse_jsonl

    backend = open_backend(store, "feedback store", "feedback.store")
    rows = [row for rel in sorted(r for r in backend.list("") if r.endswith(".jsonl"))
            for row in parse_jsonl(backend.get(rel) or b"", f"{store}/{rel}")[0]]
    if not rows:
        return pd.DataFrame(columns=list(REQUIRED))
    df = pd.DataFrame(rows)
    df["id"] = df["id"].astype(str)
    df["answered_at"] = pd.to_datetime(df["answered_at"], utc=True, format="ISO8601")
    return df


def answered(store: str) -> pd.DataFrame:
    """One answer per id for training: a person's where there is one, else the teacher's; the latest of a kind."""
    df = read_feedback(store)
    if df.empty:
        return df
    df = df.assign(_human=(df["kind"] == "human").astype(int)).sort_values(["_human", "answered_at"], kind="stable")
    return df.drop_duplicates("id", keep="last").drop(columns="_human").sort_values("answered_at").reset_index(drop=True)


def append_feedback(store: str, rows: list[dict], where: list[str], *, labels: Sequence[str],
                    edge_versions: Callable[[set[int]], list[int]], now: datetime | None = None) -> Appended:
    """Check `rows` (read from a file: `where` names each row's line) and write the new ones as one part.

    `edge_versions(wanted)` returns those of `wanted` that are not registered (it raises when the registry cannot be
    read). Nothing is written unless every record passes."""
    from distill_gap.softlabels.backends import open_backend

    if not rows:
        raise DistillError("the feedback file holds no records", f"write one JSON object per line, like {EXAMPLE}")
    df = check_records(rows, where, labels=labels)
    unknown = edge_versions(set(df["edge_version"]))
    if unknown:
        lines = [f"{where[i]}: edge_version {v}" for i, v in enumerate(df["edge_version"]) if v in unknown]
        raise _problems("records naming an edge version that is not registered", lines,
                        "edge_version is the registry version of the edge model that abstained (`distill lineage "
                        "models:/<name>-edge@champion` shows it)")
    stored = read_feedback(store)
    old_where = [f"{store} (stored)"] * len(stored)
    both = pd.concat([stored[list(REQUIRED)], df[list(REQUIRED)]], ignore_index=True) if len(stored) else df
    conflicts = _conflicts(both, old_where + list(where))
    if conflicts:
        raise _problems("contradictory answers", conflicts,
                        "one id gets one answer per kind: correct or remove those lines (a stored answer stays)")
    seen = set(zip(stored["id"], stored["kind"])) if len(stored) else set()
    keep, skipped = [], 0
    for i, key in enumerate(zip(df["id"], df["kind"])):
        if key in seen:
            skipped += 1
        else:
            seen.add(key)
            keep.append(i)
    if not keep:
        return Appended(part=None, written=0, skipped=skipped, store=store)
    out = df.iloc[keep].copy()
    out["answered_at"] = out["answered_at"].map(lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    body = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in out.to_dict("records")).encode()
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")
    part = f"part-{stamp}-{hashlib.sha256(body).hexdigest()[:12]}.jsonl"
    if not open_backend(store, "feedback store", "feedback.store").put_new(part, body):
        raise DistillError(f"{store}/{part} exists already", "run the command again (a part name is unique per run)")
    return Appended(part=part, written=len(out), skipped=skipped, store=store)
