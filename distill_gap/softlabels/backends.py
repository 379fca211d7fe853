"""Soft-label store backends: bytes in, bytes out, paths relative to the store root (a folder or an S3 prefix).

Both offer `put_new`, a create-only write (hard link / O_EXCL on file://, `If-None-Match: *` on s3://):
the store writes every shard and the manifest with it, so concurrent writers never overwrite each other.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Protocol

from distill_gap.errors import DistillError


class Backend(Protocol):
    """What SoftLabelStore needs of a place to keep objects."""

    uri: str

    def get(self, rel: str) -> bytes | None: ...
    def put(self, rel: str, data: bytes) -> None: ...
    def put_new(self, rel: str, data: bytes) -> bool: ...   # False when the object already exists
    def list(self, under: str = "") -> list[str]: ...       # every object below `under`, recursively


class FileBackend:
    """A folder; every write goes through a temp file in the same folder (atomic)."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"file://{root.as_posix()}"

    def get(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def _temp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        os.replace(self._temp(path, data), path)

    def put_new(self, rel: str, data: bytes) -> bool:
        path = self.root / rel
        tmp = self._temp(path, data)
        try:
            os.link(tmp, path)          # atomic and fails if `path` exists
            return True
        except FileExistsError:
            return False
        except OSError:
            # No hard links on this file system: O_EXCL still makes creation exclusive.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, under: str = "") -> list[str]:
        base = self.root / under
        if not base.is_dir():
            return []
        return [p.relative_to(self.root).as_posix() for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".")]


class S3Backend:
    """A bucket prefix; credentials, region and endpoint come from the standard AWS env/config."""

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from distill_gap.ops.s3 import s3_client

            self._client = s3_client(connect_timeout=10, read_timeout=120)  # credentials resolved now
        return self._client

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _errors(self, action: str):
        """Errors a user can fix as DistillError (distill_gap/ops/s3.py); the cause is kept so retries can see it."""
        from distill_gap.ops.s3 import s3_errors

        return s3_errors(self.uri, action, setting="soft_labels.store",
                         endpoint=lambda: self._client.meta.endpoint_url if self._client else None)

    def get(self, rel: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors(f"get {rel}"):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as err:
                # get (not head): NoSuchKey and NoSuchBucket stay distinguishable.
                if err.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return None
                raise
            return obj["Body"].read()

    def put(self, rel: str, data: bytes) -> None:
        with self._errors(f"put {rel}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def put_new(self, rel: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(f"create {rel}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, IfNoneMatch="*")
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    return False
                raise

    def list(self, under: str = "") -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        if under:
            under = under.rstrip("/") + "/"
        names: list[str] = []
        with self._errors("list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start + under):
                names += [obj["Key"][len(start):] for obj in page.get("Contents", [])]
        return names


def open_backend(uri: str, what: str = "soft-label store", setting: str = "soft_labels.store") -> Backend:
    """The backend of a store URI: s3://bucket/prefix, file://path or a plain path (made absolute). `what` and
    `setting` name the store in errors (the feedback store uses this too)."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise DistillError(f"{what} {uri!r} names no bucket", f"set {setting} to s3://bucket/prefix")
        return S3Backend(bucket, prefix.strip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://"):]          # file://rel/path -> rel/path, file:///abs -> /abs
    elif "://" in uri:
        raise DistillError(f"{what} {uri!r} has an unsupported scheme",
                           f"set {setting} to file://path (or a plain path) or s3://bucket/prefix")
    if not uri:
        raise DistillError(f"{what} path is empty", f"set {setting} to file://path or s3://bucket/prefix")
    return FileBackend(Path(uri).expanduser().resolve())
