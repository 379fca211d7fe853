"""The local model cache (`.distill/models/<digest>/`): registry versions downloaded once, installed atomically, and
the checks they passed remembered in a marker beside each folder, so that later uses cost nothing.

Layout under the cache root:

    <digest>/                  the version's folder, renamed into place whole (never written in place)
    <digest>.verified.json     what was checked: the files' sizes and mtimes when it was, the signature (key id, when)
                               and the registry versions (store, name, version) that carry this digest
    .<digest[:16]>-XXXX/       a download in progress: one per process, so concurrent cold starts never share one

A folder whose files still have the sizes and mtimes its marker recorded is taken as verified; any change sends it
back through the full check (digest, then signature), and a damaged one is moved aside and fetched again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

MARKER_SUFFIX = ".verified.json"


def fingerprint(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file under `folder`: cheap to take, changes with any edit."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(folder))] = [st.st_size, st.st_mtime_ns]
    return out


def marker_path(cache_root: Path, digest: str) -> Path:
    return Path(cache_root) / f"{digest}{MARKER_SUFFIX}"


def read_marker(cache_root: Path, digest: str) -> dict | None:
    """The marker of `digest`, or None when there is none or it cannot be read (then everything is checked again)."""
    try:
        marker = json.loads(marker_path(cache_root, digest).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("digest") == digest else None


def unchanged(cache_root: Path, digest: str, marker: dict | None) -> bool:
    """Whether the cached folder of `digest` is exactly as it was when `marker` was written."""
    folder = Path(cache_root) / digest
    return marker is not None and folder.is_dir() and marker.get("fingerprint") == fingerprint(folder)


def write_marker(cache_root: Path, digest: str, *, signature: dict | None, version: dict) -> dict:
    """Record the cached folder of `digest` as verified (its fingerprint now, `signature`: {"keyid", "uri"} or None
    when only the digest was checked), adding `version` ({"tracking_uri", "name", "version"}); atomic."""
    old = read_marker(cache_root, digest) or {}
    versions = [v for v in old.get("versions", []) if v != version] + [version]
    if signature is None and old.get("signature") and unchanged(cache_root, digest, old):
        signature = old["signature"]  # a digest-only caller keeps what an earlier signature check established
    marker = {"digest": digest, "fingerprint": fingerprint(Path(cache_root) / digest), "signature": signature,
              "verified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions}
    path = marker_path(cache_root, digest)
    fd, tmp = tempfile.mkstemp(dir=cache_root, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(marker, f, indent=1)
    os.replace(tmp, path)
    return marker


def download_dir(cache_root: Path, digest: str) -> Path:
    """A new, empty folder of this process's own for one download of `digest`."""
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{digest[:16]}-"))


def discard(folder: Path) -> None:
    """Remove a folder that must not be used, first renaming it out of the way (atomic: no reader sees it half gone)."""
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name[:16]}-discarded-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        folder.rename(aside)
    except OSError:  # another process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def install(downloaded: Path, cache_root: Path, digest: str) -> tuple[Path, bool]:
    """Rename a checked download into place as `<cache_root>/<digest>`: (the folder, whether ours was installed).
    When another process installed the same digest first, theirs is kept (the same content) and ours dropped."""
    local = Path(cache_root) / digest
    try:
        os.rename(downloaded, local)
        return local, True
    except OSError:
        if not local.is_dir():
            raise
        shutil.rmtree(downloaded, ignore_errors=True)
        return local, False


def cached_version(cache_root: Path, tracking_uri: str, name: str, version: int) -> tuple[Path, dict] | None:
    """(folder, marker) of the cached copy of `name` v`version` from the registry at `tracking_uri` whose signature
    was verified and whose files are unchanged since; None when there is none."""
    want = {"tracking_uri": tracking_uri, "name": name, "version": int(version)}
    root = Path(cache_root)
    for path in sorted(root.glob(f"*{MARKER_SUFFIX}")) if root.is_dir() else []:
        digest = path.name.removesuffix(MARKER_SUFFIX)
        marker = read_marker(root, digest)
        if marker and marker.get("signature") and want in marker.get("versions", []) and \
                unchanged(root, digest, marker):
            return root / digest, marker
    return None
