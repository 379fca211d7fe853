"""Registry model URIs (`models:/name@alias`, `models:/name/N`): parsed, opened on exactly the store named, and
resolved to a local edge folder (downloaded, digest- and signature-verified), as `distill predict`, lineage and the
drift monitor need them; a tracking server that does not answer is named as such after a bounded wait."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from distill_gap.edge.folder import EDGE_FILE
from distill_gap.errors import DistillError
from distill_gap.registry.tracking import use_store
from distill_gap.registry.versions import RegistryUnreachable, fetch_model, resolve_version, unreachable

DEFAULT_CACHE_ROOT = ".distill/models"
DEFAULT_KEY_DIR = ".distill/keys"  # governance.key_dir's default: where the pipeline's signing key pair lives
REGISTRY_TIMEOUT_S = 10.0  # how long a tracking server may take to answer before it counts as down
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


def registry_client(tracking_uri: str, *, timeout_s: float = REGISTRY_TIMEOUT_S):
    """An MlflowClient on exactly `tracking_uri` (a missing local SQLite file is an error, never created); a
    tracking server that does not answer within `timeout_s` is RegistryUnreachable, not a 250 s hang."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise DistillError(f"no MLflow store at {tracking_uri}",
                           "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store the pipeline registered into")
    probe_server(tracking_uri, timeout_s)
    from mlflow import MlflowClient

    use_store(tracking_uri)  # a version's source may be a logged model (models:/m-...), resolved in this store
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def probe_server(tracking_uri: str, timeout_s: float) -> None:
    """For an http(s) tracking URI: wait at most `timeout_s` for any HTTP answer from its /health endpoint (a
    server that restarts gets a few tries); RegistryUnreachable when none comes."""
    import time
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            left = max(0.5, deadline - time.monotonic())
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=left).close()
            return
        except urllib.error.HTTPError:  # it answered (a proxy's 401 or 404 too): reachable
            return
        except (urllib.error.URLError, OSError, ValueError) as err:
            if time.monotonic() + 1.0 >= deadline:
                raise unreachable(tracking_uri, getattr(err, "reason", err)) from None
            time.sleep(1.0)


def trusted_public_keys(public_keys: list[str] | None, key_dir: str | Path | None,
                        trust_registry: bool = False) -> tuple[list[str], str]:
    """(PEM texts, where they came from) of the keys a version's signature must come from: --public-key files,
    else the local key pair's public key (key_dir, $DISTILL_KEY_DIR, .distill/keys); the key the registry itself
    records only when the caller says so (an empty list: each version's own key)."""
    if public_keys:
        pems = []
        for p in public_keys:
            if not Path(p).is_file():
                raise DistillError(f"public key file not found: {p}", "pass the PEM file of the signing public key")
            pems.append(Path(p).read_text())
        return pems, f"--public-key {', '.join(public_keys)}"
    pub = Path(key_dir or os.environ.get("DISTILL_KEY_DIR") or DEFAULT_KEY_DIR) / "signing-key.pub.pem"
    if pub.is_file():
        return [pub.read_text()], f"local key {pub}"
    if trust_registry:
        return [], ("WARNING: trusting the key recorded in the registry itself (--trust-registry-key): whoever can "
                    "write the registry can sign for it")
    raise DistillError(f"no trusted public key to check the model's signature with: no --public-key and no local key "
                       f"at {pub}", "pass --public-key <the pipeline's signing-key.pub.pem> or --key-dir <folder>; "
                       "or, knowingly, --trust-registry-key to trust the key the registry records")


def resolve_edge(uri_or_path: str | Path, tracking_uri: str, *, cache_root: str | Path = DEFAULT_CACHE_ROOT,
                 log: Callable[[str], None] | None = None, public_keys: list[str] | None = None,
                 timeout_s: float = REGISTRY_TIMEOUT_S, check_alias: Callable[..., None] | None = None) -> Path:
    """A local edge folder: as is; a registry URI: downloaded into the cache and verified before first use (its
    digest, and its signature by one of `public_keys` when given; see fetch_model). `check_alias(client, mv, alias)`
    may refuse the version an alias points to before anything is fetched. A pinned version is served from the local
    verified cache when the tracking server cannot be reached, with a note through `log`."""
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
    try:
        client = registry_client(tracking_uri, timeout_s=timeout_s)
        # resolve once, then fetch that version: an alias moved in between cannot mix two versions; a missing one is
        # named with what the model does have (resolve_version)
        mv = resolve_version(client, name, alias=alias, version=version)
        if alias and check_alias is not None:
            check_alias(client, mv, alias)
        ref = fetch_model(client, name, version=int(mv.version), cache_root=cache_root, public_keys=public_keys,
                          mv=mv)
    except RegistryUnreachable as err:
        return _cached_while_unreachable(err, tracking_uri, name, version, cache_root, log)
    if log:
        signed = "signature and digest" if public_keys is not None else "digest"
        log(f"{name} v{ref.version}{f' (@{alias})' if alias else ''}: {signed} {ref.digest[:12]} verified")
    return ref.path


def _cached_while_unreachable(err: RegistryUnreachable, tracking_uri: str, name: str, version: int | None,
                              cache_root: str | Path, log: Callable[[str], None] | None) -> Path:
    """The local verified copy of a pinned version while the tracking server is down; an alias cannot be resolved."""
    from distill_gap.registry.model_cache import cached_version

    if version is None:
        raise DistillError(err.problem, "start the tracking server or check the network and --tracking-uri; an alias "
                           "needs the registry, a pinned version (models:/<name>/<N>) is served from the local "
                           "verified cache") from None
    found = cached_version(Path(cache_root), tracking_uri, name, version)
    if found is None:
        raise DistillError(err.problem, f"start the tracking server or check the network and --tracking-uri; no "
                           f"verified copy of {name} v{version} is in the local cache {cache_root} to serve meanwhile"
                           ) from None
    folder, marker = found
    if log:
        log(f"note: {err.problem}; serving {name} v{version} from the local verified cache ({folder}, digest "
            f"{marker['digest'][:12]}, signature verified {marker.get('verified_at', '')})")
    return folder
