"""Soft-label cache: key identity, file:// and s3:// stores (moto on loopback), the teacher pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_gap.digest import model_digest, sha256_json, tokenizer_digest
from distill_gap.errors import DistillError
from tasks.soft_labels import (SoftLabelStore, cache_key, ensure_soft_labels, is_transient,
                               retry_on_transient_store_error, teacher_logits)
from tests.conftest import LABELS
from tests.helpers import sharpened_teacher

FP16_ATOL = 4e-3   # logits of the sharp teacher are within about +-5; fp16 spacing there is <= 2**-8
N = 96             # rows of review_frame labelled per test: three shards of 32, and fast


@pytest.fixture(scope="module")
def rows(review_frame):
    return review_frame.head(N)


@pytest.fixture(scope="module")
def sharp_teacher_dir(tiny_model_dir, rows, tmp_path_factory):
    """The tiny teacher with logits that differ ~1 from text to text (tests.helpers.sharpened_teacher)."""
    return sharpened_teacher(tiny_model_dir, rows["text"].tolist(), tmp_path_factory.mktemp("sharp-teacher"))


@pytest.fixture(scope="module")
def teacher(sharp_teacher_dir, rows):
    """Arguments for ensure_soft_labels: the teacher, its digests, the review rows."""
    return dict(teacher_dir=sharp_teacher_dir, teacher_digest=model_digest(sharp_teacher_dir),
                tokenizer_digest=tokenizer_digest(sharp_teacher_dir),
                data_digest=sha256_json(rows[["id", "text", "label"]].values.tolist()),
                ids=rows["id"].tolist(), texts=rows["text"].tolist(), labels=list(LABELS),
                max_length=64, batch_size=16, shard_size=32, teacher_meta={"name": "tiny", "version": "1"})


@pytest.fixture(scope="module")
def reference_logits(sharp_teacher_dir, rows):
    """Per-example fp32 logits, one unpadded forward pass per text, in frame order."""
    import torch

    from distill_gap.models.loading import load_classifier

    model, tok = load_classifier(sharp_teacher_dir)
    model.eval()
    with torch.inference_mode():
        rows = [model(**tok(t, truncation=True, max_length=64, return_tensors="pt")).logits[0].numpy()
                for t in rows["text"]]
    return np.stack(rows)


def _key(**change):
    args = dict(teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, max_length=128,
                labels=["negative", "neutral", "positive"])
    return cache_key(**{**args, **change})


def _entry_files(tmp_path):
    return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())


def _random_entry(n=100, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return [f"ex-{i}" for i in range(n)], rng.normal(size=(n, c)).astype(np.float32) * 4


META = {"teacher": {"name": "t"}}


# ---------------------------------------------------------------------------------------- key


def test_key_is_stable_and_hex():
    assert _key() == _key()
    assert len(_key()) == 64 and int(_key(), 16) >= 0


@pytest.mark.parametrize("change", [
    {"teacher_digest": "T" * 64}, {"tokenizer_digest": "K" * 64}, {"data_digest": "D" * 64},
    {"max_length": 256}, {"labels": ["positive", "neutral", "negative"]}, {"labels": ["negative", "positive"]},
])
def test_key_changes_with_every_input(change):
    assert _key(**change) != _key()


def test_key_refuses_bad_inputs():
    with pytest.raises(DistillError, match="distinct"):
        _key(labels=["a", "a"])
    with pytest.raises(DistillError, match="max_length"):
        _key(max_length=0)
    with pytest.raises(DistillError, match="teacher_digest"):
        _key(teacher_digest="")


# ------------------------------------------------------------------------------ store round trip


@pytest.fixture(params=["file", "s3"])
def store_uri(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/store"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/soft-labels/v1"


@pytest.mark.parametrize("dtype,atol", [("float16", 5e-3), ("float32", 0.0)])
def test_write_then_read_round_trip(store_uri, dtype, atol):
    store = SoftLabelStore(store_uri)
    ids, logits = _random_entry()
    key = _key()
    assert store.manifest(key) is None and store.list_keys() == []

    manifest = store.write(key, ids, logits, dtype=dtype, shard_size=30, meta=META)

    assert store.manifest(key) == manifest
    assert [s["rows"] for s in manifest["shards"]] == [30, 30, 30, 10]
    assert [s["name"] for s in manifest["shards"]][0] == "part-00000.parquet"
    assert manifest["num_examples"] == 100 and manifest["num_classes"] == 3 and manifest["dtype"] == dtype
    assert manifest["teacher"] == {"name": "t"} and manifest["created_at"].endswith("+00:00")
    got_ids, got = store.read(key)
    assert got_ids == ids and got.dtype == np.float32
    np.testing.assert_allclose(got, logits, atol=atol, rtol=1e-3 if atol else 0)
    assert store.list_keys() == [key]


def test_file_store_layout_and_parquet_schema(tmp_path):
    import pyarrow.parquet as pq

    store = SoftLabelStore(str(tmp_path))          # a plain path works too
    ids, logits = _random_entry(n=10)
    store.write(_key(), ids, logits, shard_size=8, meta=META)
    assert _entry_files(tmp_path) == [f"{_key()}/manifest.json", f"{_key()}/shards/part-00000.parquet",
                                      f"{_key()}/shards/part-00001.parquet"]
    table = pq.read_table(tmp_path / _key() / "shards" / "part-00000.parquet")
    assert str(table.schema.field("id").type) == "string"
    assert str(table.schema.field("logits").type) == "fixed_size_list<element: halffloat>[3]"
    assert store.uri == f"file://{tmp_path}"


def test_manifest_is_create_only(store_uri):
    """A second write under the same key changes nothing: the first complete entry stands."""
    store = SoftLabelStore(store_uri)
    ids, first = _random_entry(seed=1)
    _, second = _random_entry(seed=2)
    key = _key()
    m1 = store.write(key, ids, first, shard_size=40, meta=META)

    m2 = store.write(key, ids, second, shard_size=40, meta={"teacher": {"name": "other"}})

    assert m2 == m1 and store.manifest(key) == m1
    np.testing.assert_allclose(store.read(key)[1], first, atol=5e-3, rtol=1e-3)


def test_s3_manifest_uses_if_none_match(s3_bucket):
    """The S3 backend's create-only put really refuses an existing object (not a read-then-write race)."""
    store = SoftLabelStore(f"s3://{s3_bucket}")
    backend = store._backend
    assert backend.put_new("x/manifest.json", b"first") is True
    assert backend.put_new("x/manifest.json", b"second") is False
    assert backend.get("x/manifest.json") == b"first"


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_corrupted_shard_is_detected(store_uri, damage):
    store = SoftLabelStore(store_uri)
    ids, logits = _random_entry()
    key = _key()
    store.write(key, ids, logits, shard_size=40, meta=META)
    rel = f"{key}/shards/part-00001.parquet"
    data = store._backend.get(rel)
    if damage == "flip":
        data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    elif damage == "truncate":
        data = data[:-20]
    if damage == "missing":
        if store_uri.startswith("file://"):
            (store._backend.root / rel).unlink()
        else:
            store._backend.client.delete_object(Bucket=store._backend.bucket, Key=store._backend._key(rel))
    else:
        store._backend.put(rel, data)

    with pytest.raises(DistillError, match="part-00001.parquet") as err:
        store.read(key)
    assert "delete" in str(err.value)


# ------------------------------------------------------------------------------- teacher pass


def test_teacher_logits_restores_input_order(sharp_teacher_dir, rows, reference_logits):
    texts = rows["text"].tolist()
    lengths = [len(t) for t in texts]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True), "sorting must matter"
    # The reference rows differ from each other by far more than the tolerance, so a shuffle would show.
    spread = np.abs(reference_logits[:, None] - reference_logits[None]).max(-1)   # (N, N)
    assert np.median(spread[~np.eye(len(texts), dtype=bool)]) > 0.1

    got = teacher_logits(sharp_teacher_dir, texts, batch_size=16, max_length=64, progress=False)

    assert got.shape == (len(texts), len(LABELS)) and got.dtype == np.float32
    # The rescaled head amplifies fp32 rounding of the pooled output (and so of padding) to ~3e-4.
    np.testing.assert_allclose(got, reference_logits, atol=1e-3, rtol=0)


def test_teacher_logits_of_nothing(tiny_model_dir):
    assert teacher_logits(tiny_model_dir, [], progress=False).shape == (0, len(LABELS))


# ------------------------------------------------------------------------------ ensure_soft_labels


def test_miss_then_hit_without_the_teacher(store_uri, teacher, tmp_path, reference_logits):
    first = ensure_soft_labels(store_uri, **teacher)
    assert first.hit is False and first.labelled == len(teacher["ids"])
    assert first.uri == f"{SoftLabelStore(store_uri).uri}/{first.key}"
    assert first.manifest["key_inputs"]["labels"] == LABELS and first.manifest["teacher"]["version"] == "1"
    np.testing.assert_allclose(first.logits, reference_logits, atol=FP16_ATOL)

    # The teacher folder is gone: a hit must not need it.
    gone = {**teacher, "teacher_dir": tmp_path / "no-such-teacher"}
    second = ensure_soft_labels(store_uri, **gone)

    assert second.hit is True and second.labelled == 0 and second.key == first.key
    assert np.array_equal(second.logits, first.logits), "a miss and a hit must give identical numbers"
    assert second.manifest == first.manifest

    # Rows follow the ids asked for, in any order or subset.
    subset = teacher["ids"][::-3]
    third = ensure_soft_labels(store_uri, **{**gone, "ids": subset, "texts": ["x"] * len(subset)})
    assert third.hit and np.array_equal(third.logits, first.logits[::-3])


def test_hit_that_does_not_cover_the_ids_is_refused(tmp_path, teacher):
    ensure_soft_labels(tmp_path, **teacher)
    with pytest.raises(DistillError, match="lacks 1 of"):
        ensure_soft_labels(tmp_path, **{**teacher, "ids": teacher["ids"][:5] + ["not-an-id"],
                                        "texts": teacher["texts"][:6]})


def test_interrupted_entry_resumes_from_its_verified_shards(tmp_path, teacher):
    first = ensure_soft_labels(tmp_path, **teacher)
    entry = tmp_path / first.key
    (entry / "manifest.json").unlink()                       # as if the run died before the manifest
    (entry / "shards" / "part-00002.parquet").unlink()       # ... and before shard 2

    again = ensure_soft_labels(tmp_path, **teacher)

    assert again.hit is False and again.labelled == 32       # only the missing shard was labelled
    assert again.manifest["produced_by"]["reused_shards"] == 2
    np.testing.assert_allclose(again.logits, first.logits, atol=FP16_ATOL)


@pytest.mark.parametrize("labels,match", [
    (["negative", "positive"], "predicts 3 labels"),
    (["positive", "neutral", "negative"], "names and order must match"),
])
def test_label_mismatch_raises_and_writes_nothing(tmp_path, teacher, labels, match):
    store = tmp_path / "store"
    with pytest.raises(DistillError, match=match) as err:
        ensure_soft_labels(store, **{**teacher, "labels": labels})
    assert "re-bootstrap or re-import the teacher with data.labels" in str(err.value)
    assert str(labels) in str(err.value) and str(LABELS) in str(err.value)
    assert not store.exists() and SoftLabelStore(store).list_keys() == []


def test_label_names_compare_case_insensitively(tmp_path, teacher):
    result = ensure_soft_labels(tmp_path, **{**teacher, "labels": [l.upper() for l in LABELS],
                                             "ids": teacher["ids"][:8], "texts": teacher["texts"][:8]})
    assert result.logits.shape == (8, 3)


def test_teacher_that_is_not_the_pinned_one_is_refused(tmp_path, teacher):
    with pytest.raises(DistillError, match="pinned teacher"):
        ensure_soft_labels(tmp_path, **{**teacher, "teacher_digest": "0" * 64})
    assert list(tmp_path.iterdir()) == []


def test_bad_example_lists_are_refused(tmp_path, teacher):
    with pytest.raises(DistillError, match="not unique"):
        ensure_soft_labels(tmp_path, **{**teacher, "ids": ["a", "a"], "texts": ["x", "y"]})
    with pytest.raises(DistillError, match="2 ids but 1 texts"):
        ensure_soft_labels(tmp_path, **{**teacher, "ids": ["a", "b"], "texts": ["x"]})


# ------------------------------------------------------------------------------------ S3 errors


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(DistillError, match="bucket 'no-such-bucket' does not exist") as err:
        SoftLabelStore("s3://no-such-bucket/p").manifest(_key())
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
        SoftLabelStore("s3://bucket/p").manifest(_key())
    assert "AWS_ACCESS_KEY_ID" in str(err.value)


def test_store_uri_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SoftLabelStore("file://.distill/soft-labels").uri == f"file://{tmp_path}/.distill/soft-labels"
    assert SoftLabelStore(f"file://{tmp_path}/abs").uri == f"file://{tmp_path}/abs"
    assert SoftLabelStore("s3://bucket/a/b/").uri == "s3://bucket/a/b"
    assert SoftLabelStore("s3://bucket").uri == "s3://bucket"
    with pytest.raises(DistillError, match="unsupported scheme"):
        SoftLabelStore("gs://bucket/x")
    with pytest.raises(DistillError, match="names no bucket"):
        SoftLabelStore("s3:///x")


# ------------------------------------------------------------------------------ retry condition


def test_retry_condition_retries_only_transient_store_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from prefect.states import Failed

    def failed(exc):
        return Failed(data=exc)

    def client_error(code):
        return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")

    def wrapped(cause):
        try:
            raise cause
        except Exception as err:
            try:
                raise DistillError("store trouble", "fix it") from err
            except DistillError as wrapped_err:
                return wrapped_err

    retry = retry_on_transient_store_error
    assert retry(None, None, failed(EndpointConnectionError(endpoint_url="http://x")))
    assert retry(None, None, failed(wrapped(EndpointConnectionError(endpoint_url="http://x"))))
    assert retry(None, None, failed(client_error("SlowDown")))
    assert not retry(None, None, failed(client_error("NoSuchBucket")))
    assert not retry(None, None, failed(wrapped(client_error("AccessDenied"))))
    assert not retry(None, None, failed(DistillError("labels differ", "re-import the teacher")))
    assert not retry(None, None, failed(ValueError("bug")))


def test_manifest_json_is_readable_by_other_tools(tmp_path):
    store = SoftLabelStore(tmp_path)
    ids, logits = _random_entry(n=5)
    store.write(_key(), ids, logits, meta={"key_inputs": dict(
        teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, max_length=128,
        labels=["negative", "neutral", "positive"]), "teacher": {"name": "t"}})
    manifest = json.loads((tmp_path / _key() / "manifest.json").read_text())
    assert cache_key(**manifest["key_inputs"]) == manifest["key"] == _key()
    assert set(manifest) >= {"key", "key_inputs", "teacher", "dtype", "num_examples", "num_classes", "shards",
                             "created_at", "format_version"}
    with pytest.raises(ValueError, match="does not hash to the key"):
        store.write(_key(max_length=7), ids, logits, meta={"key_inputs": manifest["key_inputs"]})


def test_fp16_overflow_is_refused(tmp_path):
    ids, logits = _random_entry(n=4)
    logits[0, 0] = 1e6
    with pytest.raises(DistillError, match="float32"):
        SoftLabelStore(tmp_path).write(_key(), ids, logits, meta=META)
    assert SoftLabelStore(tmp_path).write(_key(), ids, logits, dtype="float32", meta=META)["dtype"] == "float32"
