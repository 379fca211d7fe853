"""Serving an edge model folder (a registry URI is resolved by distill_gap.registry.model_uri): load the
artifact edge.json names, predict rows.

An edge folder holds one or more artifacts of the same classifier (ONNX Runtime INT8, INC INT8, fp32 ONNX,
fp32 transformers) and an edge.json saying which is primary. `distill predict` runs an ONNX artifact with
distill_gap/edge/lean.py (no torch, no transformers) and every other one with this module; the input rows and the
rows answered are lean.py's (numbered_rows, check_answerable, label_rows), so both answer alike.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from distill_gap.edge.folder import EDGE_FILE, read_manifest
from distill_gap.edge.guard import read_guard
from distill_gap.edge.lean import ROW_EXAMPLE, artifact_dir, check_answerable, chosen_artifact, label_rows
from distill_gap.edge.lean import numbered_rows
from distill_gap.edge.lean import OUT_OF_SCOPE, decode_json_line  # noqa: F401  (callers import them here)
from distill_gap.errors import DistillError
from distill_gap.inference.predictor import Predictor, load_predictor
from distill_gap.models.loading import check_no_code


class EdgeModel:
    """One loaded artifact of an edge folder: logits, and rows labelled with calibrated probabilities and the
    scope guard's verdict.

    The guard and the temperature (scope.json) were fitted on the primary artifact's own features and logits, so
    they apply to the primary only; another artifact (`--artifact`) answers with raw probabilities and no scope.
    """

    def __init__(self, folder: Path, artifact: str, runtime: str, labels: list[str], max_length: int,
                 predictor: Predictor):
        self.folder, self.artifact, self.runtime = folder, artifact, runtime
        self.labels, self.max_length = labels, max_length
        self.predictor = predictor
        self.guard = read_guard(folder) if is_primary(folder, artifact) else None  # a damaged guard raises

    def predict_outputs(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, C) float32 and pooled features (N, D) (None when the artifact gives none)."""
        logits, features = self.predictor.predict_outputs([str(t) for t in texts], batch_size=batch_size)
        logits = np.asarray(logits, dtype=np.float32)
        assert logits.shape == (len(texts), len(self.labels)), (logits.shape, len(texts), self.labels)
        return logits, features

    def predict_logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Logits (N, C) float32 in the order of `texts`, C = len(self.labels)."""
        return self.predict_outputs(texts, batch_size)[0]

    def predict_rows(self, rows: Sequence[dict], batch_size: int = 32, out_of_scope: str = "abstain") -> list[dict]:
        """One result per row: {"id", "label", "probabilities": {label: p}, "artifact", "in_scope", "scope_score",
        "route"}; rows need a "text".

        Probabilities are calibrated (softmax of logits / the temperature fitted on validation). A row outside the
        scope gets `label: null, route: "fallback"` (send it to the teacher or a human) unless `out_of_scope` is
        "answer". Without a guard (a non-primary artifact, or `answer` on a folder that ships no scope) rows carry
        `in_scope: null`; the primary artifact of a folder without scope.json abstains from nothing silently: it
        is an error unless the caller asked to answer.
        """
        check_answerable(self.folder, self.guard, is_primary(self.folder, self.artifact), out_of_scope)
        texts = [str(r["text"]) for r in rows]
        logits, features = self.predict_outputs(texts, batch_size)  # (N, C), (N, D)
        return label_rows(rows, logits, features, labels=self.labels, artifact=self.artifact, guard=self.guard,
                          out_of_scope=out_of_scope, truncated=self.truncated(texts))

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Which texts are longer than the model's window (their tokens are cut to max_length)."""
        tokenizer = getattr(self.predictor, "tokenizer", None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False) or not texts:
            return [False] * len(texts)
        enc = tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [bool(e.overflowing) for e in enc.encodings]


def parse_rows(lines: Iterable[bytes | str], source: str = "input") -> list[dict]:
    """Rows {"id", "text"} from JSONL lines, every one checked first: DistillError naming the first bad lines (up to
    five), or when there is no row at all."""
    rows, bad = [], []
    for row in numbered_rows(lines):
        if "error" in row:
            bad.append(f"line {row['line']}: {row['error']}")
        else:
            rows.append({"id": row["id"], "text": row["text"]})
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DistillError(f"{source}: {len(bad)} bad line{'s' if len(bad) > 1 else ''}: " + "; ".join(bad[:5]) + more,
                           f"write one JSON object per line, like {ROW_EXAMPLE}; nothing was predicted")
    if not rows:
        raise DistillError(f"{source} has no rows", f"write one JSON object per line, like {ROW_EXAMPLE}")
    return rows


def is_primary(folder: Path, artifact: str) -> bool:
    try:
        return read_manifest(folder)["primary"] == artifact
    except DistillError:
        return False


def load_edge(folder: str | Path, artifact: str | None = None) -> EdgeModel:
    """Load the primary artifact of an edge folder (or `artifact`) with the runtime edge.json gives it."""
    folder = Path(folder)
    name, spec, manifest = chosen_artifact(folder, artifact)
    labels, max_length = list(manifest["labels"]), int(manifest.get("max_length", 128))
    path = artifact_dir(folder, name, spec)
    check_no_code(path)  # the artifact's own folder: pickle files, auto_map in its config or tokenizer config
    check_no_code(folder)  # and pickle files anywhere else in the edge folder
    predictor = load_predictor(path, runtime=spec["runtime"], max_length=max_length)
    artifact_labels, width = predictor.labels, predictor.num_labels or None
    if (artifact_labels is not None and artifact_labels != labels) or (width is not None and width != len(labels)):
        raise DistillError(f"{folder / EDGE_FILE} lists labels {labels} but artifact {name!r} predicts "
                           f"{artifact_labels or f'{width} classes'}",
                           "the edge folder was assembled from different models; export it again")
    return EdgeModel(folder, name, spec["runtime"], labels, max_length, predictor)


# ----------------------------------------------------------------------------------------------------------------
# output


@contextlib.contextmanager
def stdout_to_stderr():
    """Send what libraries write to stdout (Python or C level) to stderr, so stdout carries only our JSONL."""
    for stream in (sys.stdout, sys.__stdout__):
        if stream is not None:
            stream.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if sys.__stdout__ is not None:
            sys.__stdout__.flush()
        os.dup2(saved, 1)
        os.close(saved)
