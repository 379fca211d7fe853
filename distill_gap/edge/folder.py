"""The edge folder format, the one module that names its files: edge.json (which artifacts, which is primary),
scope.json (the OOD threshold of the primary) and reference.json (the drift monitor's reference profile)."""

from __future__ import annotations

import json
from pathlib import Path

from distill_gap.errors import DistillError
from distill_gap.inference.predictor import RUNTIMES

EDGE_FILE = "edge.json"
SCOPE_FILE = "scope.json"
REFERENCE_FILE = "reference.json"
EDGE_FORMAT = 1


def read_manifest(folder: str | Path) -> dict:
    """edge.json of `folder`, checked: format, labels, artifacts with a known runtime, primary among them."""
    path = Path(folder) / EDGE_FILE
    fix = "re-run the quantize stage, which writes edge.json next to the artifacts"
    if not path.is_file():
        raise DistillError(f"{path} does not exist: {folder} is not an edge model folder", fix)
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DistillError(f"{path} is not valid JSON ({err})", fix) from None
    problems = []
    if not isinstance(manifest, dict):
        raise DistillError(f"{path} must hold a JSON object, got {type(manifest).__name__}", fix)
    if manifest.get("format") != EDGE_FORMAT:
        problems.append(f"format is {manifest.get('format')!r}, this version reads format {EDGE_FORMAT}")
    labels = manifest.get("labels")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(l, str) and l for l in labels)):
        problems.append("labels must be a list of at least two label names")
    if not (isinstance(manifest.get("max_length", 128), int) and manifest.get("max_length", 128) >= 2):
        problems.append("max_length must be an integer >= 2")
    artifacts = manifest.get("artifacts")
    if not (isinstance(artifacts, dict) and artifacts):
        problems.append("artifacts must map artifact names to {\"path\": ..., \"runtime\": ...}")
        artifacts = {}
    for name, spec in artifacts.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("path"), str) and spec.get("runtime") in RUNTIMES):
            problems.append(f"artifacts.{name} needs a path and a runtime in {list(RUNTIMES)}")
    if artifacts and manifest.get("primary") not in artifacts:
        problems.append(f"primary {manifest.get('primary')!r} is not one of the artifacts {sorted(artifacts)}")
    if problems:
        raise DistillError(f"{path} is malformed: " + "; ".join(problems), fix)
    return manifest


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write edge.json (indented; paths and other objects as strings)."""
    path = Path(folder) / EDGE_FILE
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def read_scope(folder: str | Path) -> dict | None:
    """scope.json of `folder` (the primary artifact's OOD threshold), or None when the edge model ships none."""
    path = Path(folder) / SCOPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_scope(folder: str | Path, scope: dict) -> Path:
    """Write scope.json; it ships with the edge model (part of its digest), so `distill predict` adds in_scope."""
    path = Path(folder) / SCOPE_FILE
    path.write_text(json.dumps(scope, indent=2, default=str))
    return path


def read_reference(folder: str | Path) -> dict:
    """reference.json of `folder`: the drift monitor's reference profile."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        raise DistillError(f"{folder} ships no {REFERENCE_FILE}",
                           "re-run the pipeline: the evaluate stage writes it next to the edge artifacts")
    return json.loads(path.read_text())


def write_reference(folder: str | Path, profile: dict) -> Path:
    """Write reference.json (the reference profile of validation + test predictions)."""
    path = Path(folder) / REFERENCE_FILE
    path.write_text(json.dumps(profile))
    return path
