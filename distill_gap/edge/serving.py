"""Serving an edge model folder (a registry URI is resolved by distill_gap.registry.model_uri): load the
artifact edge.json names, predict rows.

An edge folder holds one or more artifacts of the same classifier (ONNX Runtime INT8, INC INT8, fp32 ONNX,
fp32 transformers) and an edge.json saying which is primary. `distill predict` is built on this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from distill_gap.edge.folder import EDGE_FILE, read_manifest
from distill_gap.edge.guard import SCOPE_FILE, read_guard, softmax
from distill_gap.errors import DistillError
from distill_gap.inference.predictor import Predictor, load_predictor
from distill_gap.models.loading import check_no_code

_ROW_EXAMPLE = '{"id": "r1", "text": "the tablets helped"}'
_MAX_REPORTED = 5  # bad input lines named in one error


# ----------------------------------------------------------------------------------------------------------------
# the artifacts edge.json names


def _artifact_dir(folder: Path, name: str, spec: dict) -> Path:
    path = (folder / spec["path"]).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise DistillError(f"{folder / EDGE_FILE}: artifact {name!r} points outside the edge folder ({spec['path']})",
                           "artifact paths are relative to the edge folder")
    if not path.is_dir():
        raise DistillError(f"artifact {name!r} is listed in {folder / EDGE_FILE} but {path} does not exist",
                           "the edge folder is incomplete; fetch or export it again, or choose another --artifact")
    return path


OUT_OF_SCOPE = ("abstain", "answer")  # what predictions do with rows the guard puts outside the evaluated scope


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

    @property
    def scope(self) -> dict | None:  # kept for callers that only ask whether a scope ships
        return None if self.guard is None else {"detector": self.guard.detector, "threshold": self.guard.threshold}

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
        if out_of_scope not in OUT_OF_SCOPE:
            raise DistillError(f"out_of_scope={out_of_scope!r} is not an option", f"use one of {list(OUT_OF_SCOPE)}")
        if self.guard is None and out_of_scope == "abstain" and is_primary(self.folder, self.artifact):
            raise DistillError(f"{self.folder} ships no {SCOPE_FILE}: without its scope guard no row can be "
                               "checked against what the model was evaluated on",
                               "run the pipeline again (evaluate writes the guard), or pass --out-of-scope answer "
                               "to label every row without a scope check")
        logits, features = self.predict_outputs([r["text"] for r in rows], batch_size)  # (N, C), (N, D)
        if self.guard is None:
            probs, scores, inside = softmax(logits), [None] * len(rows), [None] * len(rows)
        else:
            probs = self.guard.probabilities(logits)  # (N, C) float64, calibrated: each row sums to 1 in JSON
            raw = self.guard.score(logits, features)
            scores, inside = [float(v) for v in raw], [bool(v) for v in self.guard.in_scope(raw)]
        out = []
        for row, p, score, ok in zip(rows, probs, scores, inside):
            answer = ok is not False or out_of_scope == "answer"
            out.append({"id": row.get("id"), "label": self.labels[int(p.argmax())] if answer else None,
                        "probabilities": {label: float(v) for label, v in zip(self.labels, p)},
                        "artifact": self.artifact, "in_scope": ok, "scope_score": score,
                        "route": "model" if answer else "fallback"})
        return out


def is_primary(folder: Path, artifact: str) -> bool:
    try:
        return read_manifest(folder)["primary"] == artifact
    except DistillError:
        return False


def load_edge(folder: str | Path, artifact: str | None = None) -> EdgeModel:
    """Load the primary artifact of an edge folder (or `artifact`) with the runtime edge.json gives it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    artifacts = manifest["artifacts"]
    name = artifact or manifest["primary"]
    if name not in artifacts:
        raise DistillError(f"{folder} has no artifact {name!r}",
                           f"choose one of {sorted(artifacts)} (primary: {manifest['primary']})")
    spec = artifacts[name]
    labels, max_length = list(manifest["labels"]), int(manifest.get("max_length", 128))
    path = _artifact_dir(folder, name, spec)
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
# JSONL input rows


def decode_json_line(line: bytes | str) -> tuple[dict | None, str | None]:
    """One JSONL line as an object, or why it is not one (not UTF-8, not JSON, not an object)."""
    try:
        row = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    return row, None


def parse_rows(lines: Iterable[bytes | str], source: str = "input") -> list[dict]:
    """Rows {"text", "id"?} from JSONL lines, all checked before any is used; blank lines are skipped.

    Raises DistillError naming the line numbers of the first bad lines, or when there is no row at all.
    """
    rows, bad, n_bad = [], [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row, problem = decode_json_line(line)
        if problem is None:
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                problem = 'no "text" (a non-empty string)' if "text" not in row else '"text" must be a non-empty string'
            elif row.get("id") is not None and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
                problem = '"id" must be a string or an integer'
            else:
                rows.append({"id": row.get("id"), "text": row["text"]})
        if problem:
            n_bad += 1
            if len(bad) < _MAX_REPORTED:
                bad.append(f"line {number}: {problem}")
    if n_bad:
        more = f" (and {n_bad - len(bad)} more)" if n_bad > len(bad) else ""
        raise DistillError(f"{source}: {n_bad} bad line{'s' if n_bad > 1 else ''}: " + "; ".join(bad) + more,
                           f"write one JSON object per line, like {_ROW_EXAMPLE}; nothing was predicted")
    if not rows:
        raise DistillError(f"{source} has no rows", f"write one JSON object per line, like {_ROW_EXAMPLE}")
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """parse_rows over a JSONL file, or standard input for '-'."""
    if str(path) == "-":
        return parse_rows(sys.stdin.buffer, "standard input")
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"input file {path} does not exist", "pass a JSONL file, or --input - to read stdin")
    with open(path, "rb") as f:
        return parse_rows(f, str(path))


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
