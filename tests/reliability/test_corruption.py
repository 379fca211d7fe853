"""Issue 10, item 3: a corrupted or truncated artifact in every store is detected by its digest before use.

Stores: soft labels on S3 (a moto server on 127.0.0.1): shards and the manifest; the MLflow artifact store
(SQLite registry, file artifacts) holding a registered, signed teacher; the same store holding a registered,
signed edge model served by `distill predict --model models:/tiny-edge/1`; and the local model cache both
fetch into. Damage: one flipped byte, a file cut in half, and a valid-JSON edit (the damage a parser cannot
see). tests/distill_gap/softlabels/test_labelling_faults.py covers a flipped shard byte; this file adds
truncation and the manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.config import load_config
from distill_gap.digest import model_digest, sha256_json, tokenizer_digest
from distill_gap.errors import DistillError
from distill_gap.ops.transient import is_transient
from distill_gap.softlabels.labelling import ensure_soft_labels
from distill_gap.softlabels.store import SoftLabelStore
from tests.conftest import LABELS
from tests.helpers import fresh_mlflow_db

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[2]
N, SHARD = 48, 16         # three shards
FP16_ATOL = 4e-3          # fp16 storage (as in test_labelling_faults.py)
PREFIX = "soft-labels/v1"


def _flip(data: bytes) -> bytes:
    at = len(data) // 2
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


# ---------------------------------------------------------------------------------------------------- soft labels


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, review_frame, tmp_path_factory):
    """ensure_soft_labels arguments for a tiny teacher whose logits differ from text to text."""
    from tests.helpers import sharpened_teacher

    rows = review_frame.head(N)
    path = sharpened_teacher(tiny_model_dir, rows["text"].tolist(), tmp_path_factory.mktemp("corruption-teacher"))
    return dict(teacher_dir=str(path), teacher_digest=model_digest(path), tokenizer_digest=tokenizer_digest(path),
                data_digest=sha256_json(rows[["id", "text", "label"]].values.tolist()), ids=rows["id"].tolist(),
                texts=rows["text"].tolist(), labels=list(LABELS), max_length=64, batch_size=16, shard_size=SHARD,
                progress=False)


def _s3():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def _snapshot(bucket: str) -> dict[str, bytes]:
    """Every object of the bucket, key -> bytes."""
    s3 = _s3()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _damage(bucket: str, key: str, how) -> None:
    s3 = _s3()
    s3.put_object(Bucket=bucket, Key=key, Body=how(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def test_truncated_shard_is_refused_without_the_teacher_and_recomputed_with_it(s3_bucket, teacher, tmp_path,
                                                                              caplog):
    store = f"s3://{s3_bucket}/{PREFIX}"
    first = ensure_soft_labels(store, **teacher)
    shard = f"{PREFIX}/{first.key}/shards/part-00001.parquet"
    _damage(s3_bucket, shard, _truncate)
    damaged = _snapshot(s3_bucket)

    # the teacher files are gone: the cut shard is named and nothing is used or rewritten
    with pytest.raises(DistillError) as err:
        ensure_soft_labels(store, **{**teacher, "teacher_dir": str(tmp_path / "gone")})
    assert f"soft-label shard part-00001.parquet in {store}/{first.key}" in str(err.value)
    assert "does not match the sha256 in its manifest" in str(err.value) and "fix:" in str(err.value)
    assert not is_transient(err.value)
    assert _snapshot(s3_bucket) == damaged

    # with the pinned teacher: a warning names the shard, its rows are recomputed, the store is whole again
    with caplog.at_level("WARNING", logger="distill.soft_labels"):
        again = ensure_soft_labels(store, **teacher)
    assert again.hit and again.repaired == ["part-00001.parquet"] and again.labelled == SHARD
    assert any("part-00001.parquet" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(again.logits, first.logits, atol=FP16_ATOL, rtol=0)
    clean = ensure_soft_labels(store, **teacher)
    assert clean.hit and clean.repaired == [] and np.array_equal(clean.logits, again.logits)


@pytest.mark.parametrize("how", [_truncate, _flip], ids=["truncated", "flipped byte"])
def test_damaged_manifest_is_refused_and_nothing_is_overwritten(s3_bucket, teacher, how):
    store = f"s3://{s3_bucket}/{PREFIX}"
    first = ensure_soft_labels(store, **teacher)
    _damage(s3_bucket, f"{PREFIX}/{first.key}/manifest.json", how)
    damaged = _snapshot(s3_bucket)

    with pytest.raises(DistillError) as err:
        ensure_soft_labels(store, **teacher)  # the teacher is there: still nothing is relabelled over it
    message = str(err.value)
    assert f"{store}/{first.key}/manifest.json is not valid JSON" in message
    assert f"fix: delete {store}/{first.key} and run again to relabel" in message
    assert not is_transient(err.value)
    assert _snapshot(s3_bucket) == damaged


def test_edited_shard_digest_in_the_manifest_distrusts_that_shard(s3_bucket, teacher, caplog):
    """A valid-JSON edit of a shard's sha256: the shard no longer matches, so it is recomputed, never used."""
    store = f"s3://{s3_bucket}/{PREFIX}"
    first = ensure_soft_labels(store, **teacher)
    key = f"{PREFIX}/{first.key}/manifest.json"
    _damage(s3_bucket, key, lambda b: b.replace(first.manifest["shards"][2]["sha256"].encode(), b"0" * 64))

    with caplog.at_level("WARNING", logger="distill.soft_labels"):
        again = ensure_soft_labels(store, **teacher)
    assert again.repaired == ["part-00002.parquet"]
    np.testing.assert_allclose(again.logits, first.logits, atol=FP16_ATOL, rtol=0)
    assert SoftLabelStore(store).manifest(first.key)["shards"][2]["sha256"] == first.manifest["shards"][2]["sha256"]


def test_edited_row_count_in_the_manifest_is_a_clear_error(s3_bucket, teacher):
    store = f"s3://{s3_bucket}/{PREFIX}"
    first = ensure_soft_labels(store, **teacher)
    _damage(s3_bucket, f"{PREFIX}/{first.key}/manifest.json",
            lambda b: b.replace(f'"num_examples": {N}'.encode(), f'"num_examples": {N - 1}'.encode()))
    with pytest.raises(DistillError, match="manifest.json"):
        ensure_soft_labels(store, **teacher)


# ---------------------------------------------------------------------------------------------------- MLflow store


@pytest.fixture(scope="module")
def registry(tiny_model_dir, review_frame, tmp_path_factory, mlflow_db_template):
    """tiny-teacher v1 (`distill teacher import`) and tiny-edge v1 (an fp32 edge folder with its scope guard), both signed and logged as
    MLflow models in a SQLite registry with file artifacts, like the pipeline registers them."""
    from distill_gap.registry.pyfunc import link_version, log_model_folder
    from distill_gap.registry.tracking import client_for, experiment_id
    from distill_gap.registry.versions import create_version, sign_and_log
    from distill_gap.kd.teacher import import_teacher
    from tests.helpers import add_scope_guard

    tmp = tmp_path_factory.mktemp("corruption-registry")
    old, old_env = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(tmp)  # .distill/keys (signing) and .distill/models (the predict cache) land here
    try:
        cfg = load_config(ROOT / "configs/tiny.yaml", [f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp)}",
                                                       f"tracking.artifact_location={tmp}/artifacts"])
        import_teacher(cfg, tiny_model_dir, license="apache-2.0", log=lambda *_: None)
        edge = tmp / "edge-src"
        shutil.copytree(tiny_model_dir, edge / "fp32")
        (edge / "edge.json").write_text(json.dumps({
            "format": 1, "primary": "fp32", "labels": LABELS, "max_length": 64, "quantized": False,
            "artifacts": {"fp32": {"path": "fp32", "runtime": "transformers"}}}))
        add_scope_guard(edge, review_frame["text"].head(40).tolist())  # as evaluate writes it, before signing
        client = client_for(cfg.tracking)
        run_id = client.create_run(experiment_id(client, cfg.tracking), run_name="register-edge").info.run_id
        signed = sign_and_log(client, run_id, edge, "edge", cfg.governance)
        logged = log_model_folder(client, run_id, edge, "edge", example_texts=review_frame["text"].head(3).tolist(),
                                  labels=LABELS)
        mv = create_version(client, cfg.edge_model_name, source=logged.model_uri, run_id=run_id,
                            model_id=logged.model_id, governance=cfg.governance,
                            tags={"model.digest": model_digest(edge), **signed})
        link_version(client, logged, cfg.edge_model_name, mv.version)
        client.set_terminated(run_id, "FINISHED")
        yield cfg, client, tmp
    finally:
        os.chdir(old)
        if old_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _stored(client, name: str, rel: str) -> Path:
    """The file `rel` of version 1 of `name` as the MLflow artifact store holds it."""
    from distill_gap.registry.versions import version_folder

    mv = client.get_model_version(name, "1")
    root = client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location.removeprefix("file://")
    return version_folder(Path(root), mv.source) / rel


@contextlib.contextmanager
def _damaged(path: Path, how):
    original = path.read_bytes()
    path.write_bytes(how(original))
    try:
        yield
    finally:
        path.write_bytes(original)


def _swap_labels(data: bytes) -> bytes:
    """A valid-JSON edit that parses and loads fine, and would silently swap two predicted labels."""
    conf = json.loads(data)
    if "id2label" in conf:
        conf["id2label"] = {"0": "positive", "1": "neutral", "2": "negative"}
        conf["label2id"] = {"positive": 0, "neutral": 1, "negative": 2}
    else:
        conf["labels"] = list(reversed(conf["labels"]))
    return json.dumps(conf).encode()


DAMAGE = {"flipped byte": ("model.safetensors", _flip), "truncated": ("model.safetensors", _truncate),
          "edited config": ("config.json", _swap_labels)}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_teacher_in_the_artifact_store_is_refused_naming_the_file(registry, tmp_path, case):
    from distill_gap.registry.tracking import client_for
    from tasks.teacher import resolve_teacher

    cfg, client, _ = registry
    rel, how = DAMAGE[case]
    cache = tmp_path / "models"
    with _damaged(_stored(client, "tiny-teacher", rel), how):
        with pytest.raises(DistillError) as err:
            resolve_teacher(client_for(cfg.tracking), cfg.teacher_model_name, cfg.teacher, cfg.data.labels, cache_root=cache)
    message = str(err.value)
    digest = client.get_model_version("tiny-teacher", "1").tags["model.digest"]
    assert "tiny-teacher version 1: downloaded files have digest" in message
    assert f"registry says {digest[:12]}" in message
    assert f"{rel}: digest differs from the signature" in message, message
    assert "fix: the stored artifact was changed or damaged" in message
    assert not [p for p in cache.glob("*") if p.is_dir()]  # nothing damaged kept for a later run
    assert resolve_teacher(client_for(cfg.tracking), cfg.teacher_model_name, cfg.teacher, cfg.data.labels, cache_root=cache).digest == digest  # restored: fetched and verified


def test_damaged_local_model_cache_is_fetched_again(registry, tmp_path):
    from distill_gap.registry.tracking import client_for
    from tasks.teacher import resolve_teacher

    cfg, _, _ = registry
    ref = resolve_teacher(client_for(cfg.tracking), cfg.teacher_model_name, cfg.teacher, cfg.data.labels, cache_root=tmp_path / "models")
    cached = ref.path / "model.safetensors"
    cached.write_bytes(_truncate(cached.read_bytes()))
    again = resolve_teacher(client_for(cfg.tracking), cfg.teacher_model_name, cfg.teacher, cfg.data.labels, cache_root=tmp_path / "models")
    assert again.path == ref.path and model_digest(again.path) == ref.digest  # re-downloaded, verified


def _predict(registry, rows: Path):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg, _, tmp = registry  # the key pair that signed the version is the operator's trusted key
    return CliRunner().invoke(app, ["predict", "--model", f"models:/{cfg.edge_model_name}/1", "--input", str(rows),
                                    "--tracking-uri", cfg.tracking.uri,
                                    "--public-key", str(tmp / ".distill/keys/signing-key.pub.pem")])


@pytest.fixture()
def rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty .distill/models cache per test
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "r1", "text": "the tablets helped"}\n{"id": "r2", "text": "made me dizzy"}\n')
    return path


EDGE_DAMAGE = {"flipped byte": ("fp32/model.safetensors", _flip), "truncated": ("fp32/model.safetensors", _truncate),
               "edited edge.json": ("edge.json", _swap_labels)}


@pytest.mark.parametrize("case", list(EDGE_DAMAGE))
def test_damaged_edge_version_is_refused_by_predict_before_loading(registry, rows, case):
    cfg, client, _ = registry
    rel, how = EDGE_DAMAGE[case]
    with _damaged(_stored(client, cfg.edge_model_name, rel), how):
        out = _predict(registry, rows)
    assert out.exit_code == 2 and out.stdout == "", out.output
    assert f"{cfg.edge_model_name} version 1: downloaded files have digest" in out.stderr
    assert f"{rel}: digest differs from the signature" in out.stderr, out.stderr
    assert out.stderr.count("error:") == 1 and "Traceback" not in out.output
    cache = rows.parent / ".distill" / "models"
    assert not (cache.exists() and [p for p in cache.iterdir() if p.is_dir()])  # nothing loaded, nothing kept

    fine = _predict(registry, rows)  # the control: restored, the same command labels both rows
    assert fine.exit_code == 0, fine.output
    assert [json.loads(line)["id"] for line in fine.stdout.splitlines()] == ["r1", "r2"]
    assert "digest" in fine.stderr and "verified" in fine.stderr
