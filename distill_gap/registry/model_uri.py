"""Registry model URIs (`models:/name@alias`, `models:/name/N`): parsed, opened on exactly the store named, and
resolved to a local edge folder (downloaded and digest-verified), as `distill predict`, lineage and the drift
monitor need them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from distill_gap.edge.folder import EDGE_FILE
from distill_gap.errors import DistillError
from distill_gap.registry.tracking import use_store
from distill_gap.registry.versions import fetch_model, resolve_version

DEFAULT_CACHE_ROOT = ".distill/models"
_URI_FORMS = ("models:/<name>@<alias> (e.g. models:/demo-edge@champion) "
              "or models:/<name>/<version> (e.g. models:/demo-edge/3)")
_URI = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[1-9][0-9]*))$")


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """(name, alias, version) of `models:/name@alias` or `models:/name/N`; exactly one of alias/version is set."""
    m = _URI.match(uri.strip())
    if m is None:
        raise DistillError(f"{uri!r} is not a registry model URI", f"use {_URI_FORMS}, or the path of an edge folder")
    version = m["version"]
    return m["name"], m["alias"], int(version) if version else None


def registry_client(tracking_uri: str):
    """An MlflowClient on exactly `tracking_uri` (a missing local SQLite file is an error, never created)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise DistillError(f"no MLflow store at {tracking_uri}",
                           "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store the pipeline registered into")
    from mlflow import MlflowClient

    use_store(tracking_uri)  # a version's source may be a logged model (models:/m-...), resolved in this store
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_edge(uri_or_path: str | Path, tracking_uri: str, *, cache_root: str | Path = DEFAULT_CACHE_ROOT,
                 log: Callable[[str], None] | None = None) -> Path:
    """A local edge folder: as is; a registry URI: downloaded (cached by digest) and verified against model.digest."""
    text = str(uri_or_path)
    if not text.startswith("models:"):
        folder = Path(text)
        if not folder.is_dir():
            raise DistillError(f"{text} is neither a registry model URI nor an existing folder",
                               f"use {_URI_FORMS}, or the path of an edge folder (one with {EDGE_FILE})")
        if not (folder / EDGE_FILE).is_file():
            raise DistillError(f"{folder} is not an edge model folder (no {EDGE_FILE})",
                               "point to the edge folder written by the quantize stage")
        return folder
    name, alias, version = parse_model_uri(text)
    client = registry_client(tracking_uri)
    try:
        # resolve once, then fetch that version: an alias moved in between cannot mix two versions
        mv = resolve_version(client, name, alias=alias, version=version)
    except DistillError as err:
        raise DistillError(err.problem, f"check the name and {'alias' if alias else 'version'} in the MLflow registry "
                           "(`distill ui`); `distill run --config <config>` registers <name>-edge and moves @champion "
                           "when the gates pass") from None
    ref = fetch_model(client, name, version=int(mv.version), cache_root=cache_root)  # digest checked before use
    if log:
        log(f"{name} v{ref.version}{f' (@{alias})' if alias else ''}: digest {ref.digest[:12]} verified")
    return ref.path
