"""Store backends: create-only puts on file:// and s3:// (moto on loopback), URI parsing, S3 errors a user can fix."""

from __future__ import annotations

import pytest

from distill_gap.errors import DistillError
from distill_gap.ops.transient import is_transient
from distill_gap.softlabels.backends import FileBackend, S3Backend, open_backend
from distill_gap.softlabels.store import SoftLabelStore

KEY = "ab" * 32


def test_s3_manifest_uses_if_none_match(s3_bucket):
    """The S3 backend's create-only put really refuses an existing object (not a read-then-write race)."""
    store = SoftLabelStore(f"s3://{s3_bucket}")
    backend = store._backend
    assert backend.put_new("x/manifest.json", b"first") is True
    assert backend.put_new("x/manifest.json", b"second") is False
    assert backend.get("x/manifest.json") == b"first"


def test_file_backend_put_new_is_create_only_and_leaves_no_temp_files(tmp_path):
    backend = open_backend(f"file://{tmp_path}")
    assert isinstance(backend, FileBackend)
    assert backend.put_new("k/manifest.json", b"first") is True
    assert backend.put_new("k/manifest.json", b"second") is False
    backend.put("k/shards/part-00000.parquet", b"shard")
    assert backend.get("k/manifest.json") == b"first" and backend.get("k/missing") is None
    assert sorted(backend.list()) == ["k/manifest.json", "k/shards/part-00000.parquet"]
    assert backend.list("k/shards") == ["k/shards/part-00000.parquet"]
    assert sorted(p.name for p in (tmp_path / "k").rglob("*") if p.is_file()) == ["manifest.json", "part-00000.parquet"]


def test_store_uri_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SoftLabelStore("file://.distill/soft-labels").uri == f"file://{tmp_path}/.distill/soft-labels"
    assert SoftLabelStore(f"file://{tmp_path}/abs").uri == f"file://{tmp_path}/abs"
    assert SoftLabelStore("s3://bucket/a/b/").uri == "s3://bucket/a/b"
    assert SoftLabelStore("s3://bucket").uri == "s3://bucket"
    assert isinstance(open_backend("s3://bucket/p"), S3Backend)
    with pytest.raises(DistillError, match="unsupported scheme"):
        SoftLabelStore("gs://bucket/x")
    with pytest.raises(DistillError, match="names no bucket"):
        SoftLabelStore("s3:///x")


# ------------------------------------------------------------------------------------ S3 errors


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(DistillError, match="bucket 'no-such-bucket' does not exist") as err:
        SoftLabelStore("s3://no-such-bucket/p").manifest(KEY)
    assert "aws s3 mb s3://no-such-bucket" in str(err.value)
    assert not is_transient(err.value)


def test_unreachable_endpoint_is_a_clear_transient_error(s3_endpoint, monkeypatch):
    import socket

    with socket.socket() as s:                   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(DistillError, match=f"cannot reach http://127.0.0.1:{port}") as err:
        SoftLabelStore("s3://bucket/p").list_keys()
    assert "AWS_ENDPOINT_URL" in str(err.value)
    assert is_transient(err.value), "a connection failure should be retried by the task"


def test_missing_credentials_are_a_clear_error(s3_endpoint, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DistillError, match="no usable AWS credentials") as err:
        SoftLabelStore("s3://bucket/p").manifest(KEY)
    assert "AWS_ACCESS_KEY_ID" in str(err.value)
    assert not is_transient(err.value), "missing credentials are not retried"
