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

from distill_gap.edge.folder import EDGE_FILE, read_manifest, read_scope
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


class EdgeModel:
    """One loaded artifact of an edge folder: logits and labelled probabilities for texts."""

    def __init__(self, folder: Path, artifact: str, runtime: str, labels: list[str], max_length: int,
                 predictor: Predictor):
        self.folder, self.artifact, self.runtime = folder, artifact, runtime
        self.labels, self.max_length = labels, max_length
        self.predictor = predictor
        # the scope threshold was computed for the primary artifact; other artifacts carry no scope
        self.scope = read_scope(folder) if is_primary(folder, artifact) else None

    def predict_logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Logits (N, C) float32 in the order of `texts`, C = len(self.labels)."""
        logits = np.asarray(self.predictor.predict_logits([str(t) for t in texts], batch_size=batch_size),
                            dtype=np.float32)
        assert logits.shape == (len(texts), len(self.labels)), (logits.shape, len(texts), self.labels)
        return logits

    def predict_rows(self, rows: Sequence[dict], batch_size: int = 32) -> list[dict]:
        """One result per row: {"id", "label", "probabilities": {label: p}, "artifact"}; rows need a "text"."""
        from scipy.special import softmax

        logits = self.predict_logits([r["text"] for r in rows], batch_size)  # (N, C)
        probs = softmax(logits.astype(np.float64), axis=-1)  # (N, C), float64 so each row sums to 1 in JSON
        out = [{"id": row.get("id"), "label": self.labels[int(p.argmax())],
                "probabilities": {label: float(v) for label, v in zip(self.labels, p)}, "artifact": self.artifact}
               for row, p in zip(rows, probs)]
        if self.scope is not None:  # MSP of the raw logits against the threshold fitted on validation
            for row, p in zip(out, probs):
                row["in_scope"] = bool(p.max() >= self.scope["threshold"])
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
