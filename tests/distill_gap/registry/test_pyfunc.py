"""distill_gap.registry.pyfunc on a real MLflow SQLite store: a tiny real BERT logged as a pyfunc model (models from code,
signature, input example), registered, fetched back digest-verified by distill_gap.registry.versions.fetch_model and
served by mlflow.pyfunc; data splits logged as dataset inputs of the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from distill_gap.data.splits import Splits, split_digest
from distill_gap.digest import model_digest
from distill_gap.errors import DistillError
from distill_gap.registry.pyfunc import (
    ARTIFACT_KEY, DistillClassifier, LoggedModel, link_version, log_model_folder, log_split_inputs,
    predictions_frame,
)

from tests.conftest import LABELS

NAME = "tiny-student"
PROBS = [f"prob_{label}" for label in LABELS]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def texts(review_frame):
    return review_frame["text"].tolist()[:24]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, texts, tmp_path_factory):
    """The tiny model with a head rescaled so that labels vary from text to text."""
    from tests.helpers import sharpened_teacher

    return sharpened_teacher(tiny_model_dir, texts, tmp_path_factory.mktemp("mm-model") / "student")


@pytest.fixture(scope="module")
def edge_dir(model_dir, texts, tmp_path_factory):
    """An edge folder whose primary artifact is the fp32 transformers copy of the model, with a kNN scope guard."""
    from tests.helpers import add_scope_guard

    edge = tmp_path_factory.mktemp("mm-edge") / "edge"
    shutil.copytree(model_dir, edge / "fp32")
    (edge / "edge.json").write_text(json.dumps({
        "format": 1, "primary": "fp32", "labels": LABELS, "max_length": 64,
        "artifacts": {"fp32": {"path": "fp32", "runtime": "transformers"}}}))
    add_scope_guard(edge, texts)
    return edge


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(client, run_id) on a fresh SQLite store whose experiment keeps artifacts under a file URI; run RUNNING."""
    import mlflow

    from flows.config import TrackingConfig
    from distill_gap.registry.tracking import client_for, experiment_id

    root = tmp_path_factory.mktemp("mlflow")
    tracking = TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", artifact_location=str(root / "artifacts"),
                              experiment="mm")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        client = client_for(tracking)
        run = client.create_run(experiment_id(client, tracking))
        assert run.info.status == "RUNNING"
        yield client, run.info.run_id
        assert mlflow.active_run() is None


@pytest.fixture(scope="module")
def logged(store, model_dir, texts):
    """The model folder logged into the store's run, timed."""
    import time

    client, run_id = store
    start = time.perf_counter()
    out = log_model_folder(client, run_id, model_dir, NAME, example_texts=texts[:3], labels=LABELS)
    print(f"\nlog_model_folder: {time.perf_counter() - start:.2f} s")
    return out


@pytest.fixture(scope="module")
def version(store, logged, model_dir):
    client, run_id = store
    client.create_registered_model(NAME)
    mv = client.create_model_version(NAME, source=logged.source, run_id=run_id, model_id=logged.model_id,
                                     tags={"model.digest": model_digest(model_dir), "model.uri": logged.model_uri})
    link_version(client, logged, NAME, mv.version)
    return mv


# ----------------------------------------------------------------------------------------------------------------
# log_model_folder


def test_logging_keeps_the_run_running_and_links_the_model_as_its_output(store, logged):
    import mlflow

    client, run_id = store
    assert isinstance(logged, LoggedModel) and logged.model_id and logged.model_uri == f"models:/{logged.model_id}"
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.end_time is None
    assert mlflow.active_run() is None
    assert logged.model_id in [o.model_id for o in run.outputs.model_outputs]


def test_logged_model_has_signature_input_example_and_digest(store, logged, model_dir, texts):
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    client, run_id = store
    model = client.get_logged_model(logged.model_id)
    assert model.name == NAME and model.source_run_id == run_id and model.status == LoggedModelStatus.READY
    assert model.tags["model.digest"] == model_digest(model_dir)
    info = mlflow.models.get_model_info(logged.model_uri)
    assert info.signature.inputs.input_names() == ["text"]
    assert [s.type.name for s in info.signature.inputs.inputs] == ["string"]
    assert info.signature.outputs.input_names() == ["label"] + PROBS
    assert [s.type.name for s in info.signature.outputs.inputs] == ["string"] + ["double"] * len(LABELS)
    pyfunc = info.flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code: nothing pickled
    assert "python_model" not in pyfunc and pyfunc["model_code_path"].endswith("registry/pyfunc.py")
    example = Model.load(logged.model_uri).load_input_example(mlflow.artifacts.download_artifacts(logged.model_uri))
    assert example["text"].tolist() == texts[:3]
    requirements = mlflow.pyfunc.get_model_dependencies(logged.model_uri)
    assert any(line.startswith("distill-gap==") for line in Path(requirements).read_text().splitlines())


def test_source_is_exactly_the_model_folder(logged, model_dir, tmp_path):
    """What fetch_model does with a version source: download it, take the folder named by its last component."""
    import mlflow

    mlflow.artifacts.download_artifacts(artifact_uri=logged.source, dst_path=str(tmp_path))
    inner = tmp_path / Path(logged.source.rstrip("/")).name
    assert _files(inner) == _files(model_dir)
    assert logged.source.rstrip("/").endswith(f"/artifacts/{model_dir.name}")


def test_registered_version_is_fetched_digest_verified(store, logged, version, model_dir, tmp_path):
    from distill_gap.registry.versions import fetch_model

    client, run_id = store
    mv = client.get_model_version(NAME, version.version)
    # MLflow 3.17 keeps source and tags as given; the SQLite registry does not store the model_id
    assert mv.source == logged.source and mv.run_id == run_id
    assert mv.tags == {"model.digest": model_digest(model_dir), "model.uri": logged.model_uri}
    ref = fetch_model(client, NAME, version=int(mv.version), cache_root=tmp_path / "cache")
    assert ref.digest == model_digest(model_dir) == model_digest(ref.path)
    assert _files(ref.path) == _files(model_dir)
    model = client.get_logged_model(logged.model_id)
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": str(mv.version)}]


def test_the_registered_model_predicts_through_pyfunc(store, version, model_dir, texts):
    import mlflow

    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier

    client, _ = store
    uri = client.get_model_version(NAME, version.version).tags["model.uri"]
    pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(pd.DataFrame({"text": texts}))
    assert list(out.columns) == ["label"] + PROBS and len(out) == len(texts)
    assert set(out["label"]) <= set(LABELS) and len(set(out["label"])) > 1
    probs = out[PROBS].to_numpy()
    assert probs.dtype == np.float64 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    model, tokenizer = load_classifier(model_dir)
    logits = predict_logits(model, tokenizer, texts).astype(np.float64)  # (N, C)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert out["label"].tolist() == [LABELS[i] for i in logits.argmax(1)]


def test_wrong_labels_are_refused_before_anything_is_logged(store, model_dir, texts):
    client, run_id = store
    before = client.get_run(run_id).outputs.model_outputs
    with pytest.raises(DistillError, match="predicts labels"):
        log_model_folder(client, run_id, model_dir, "wrong", example_texts=texts[:2], labels=LABELS[::-1])
    with pytest.raises(DistillError, match="example texts"):
        log_model_folder(client, run_id, model_dir, "wrong", example_texts=["  "], labels=LABELS)
    assert client.get_run(run_id).outputs.model_outputs == before


def test_an_active_fluent_run_is_used_when_it_is_the_run_and_refused_when_not(store, model_dir, texts):
    import mlflow

    client, run_id = store
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    with mlflow.start_run(run_id=other):
        with pytest.raises(DistillError, match="is active"):
            log_model_folder(client, run_id, model_dir, "x", example_texts=texts[:2], labels=LABELS)
        logged = log_model_folder(client, other, model_dir, "y", example_texts=texts[:2], labels=LABELS)
        assert mlflow.active_run().info.run_id == other
        assert [o.model_id for o in client.get_run(other).outputs.model_outputs] == [logged.model_id]
    assert logged.model_id not in [o.model_id for o in client.get_run(run_id).outputs.model_outputs]


def test_an_edge_folder_logs_into_the_clients_store_whatever_the_global_tracking_uri(store, edge_dir, texts,
                                                                                     tmp_path, monkeypatch):
    import mlflow

    client, run_id = store
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(elsewhere)
    try:
        logged = log_model_folder(client, run_id, edge_dir, "tiny-edge", example_texts=texts[:2], labels=LABELS)
        assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(saved)
    assert not (tmp_path / "elsewhere.db").exists()
    assert client.get_logged_model(logged.model_id).tags["model.digest"] == model_digest(edge_dir)
    assert logged.model_id in [o.model_id for o in client.get_run(run_id).outputs.model_outputs]
    model = mlflow.pyfunc.load_model(logged.model_uri)
    out = model.predict(pd.DataFrame({"text": texts[:5] + ["SELECT * FROM users WHERE id = 1; DROP TABLE users;"]}))
    assert list(out.columns) == ["label"] + PROBS + SCOPE_COLUMNS and np.allclose(out[PROBS].to_numpy().sum(1), 1.0)
    assert out["route"].tolist() == ["model" if s else "fallback" for s in out["in_scope"]]
    assert out.loc[~out["in_scope"].astype(bool), "label"].isna().all()  # abstains by default, as distill predict
    answered = model.predict(pd.DataFrame({"text": texts[:5]}), params={"out_of_scope": "answer"})
    assert answered["label"].notna().all() and (answered["route"] == "model").all()


def test_the_pyfunc_reads_a_rows_region_as_distill_predict_does(store, edge_dir, texts, tmp_path):
    """An edge folder whose scope has regions logs an optional input column for them; through MLflow's pyfunc a row
    naming a region outside the scope abstains whatever its score, a row naming none is judged by its score."""
    import shutil

    import mlflow

    from distill_gap.edge.guard import ScopeGuard

    client, run_id = store
    folder = tmp_path / "regions"
    shutil.copytree(edge_dir, folder)
    regions = {"column": "condition", "trained": ["Pain"], "added": [], "refused": []}
    ScopeGuard("msp", threshold=0.0, tpr=0.95, temperature=1.0, info={"regions": regions}).write(folder)
    logged = log_model_folder(client, run_id, folder, "tiny-regions", example_texts=texts[:2], labels=LABELS)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["text", "condition"]
    out = model.predict(pd.DataFrame({"text": texts[:3], "condition": ["Pain", "Migraine", None]}))
    assert out["in_scope"].tolist() == [True, False, True] and out["route"].tolist() == ["model", "fallback", "model"]
    assert model.predict(pd.DataFrame({"text": texts[:3]}))["in_scope"].tolist() == [True, True, True]
    from distill_gap.registry.pyfunc import region_column

    assert region_column(folder) == "condition" and region_column(edge_dir) is None
    (folder / "scope.json").write_text("{not json")  # damaged: serving refuses it by name; logging does not crash
    assert region_column(folder) is None


# ----------------------------------------------------------------------------------------------------------------
# the pyfunc class itself (no MLflow round trip)


SCOPE_COLUMNS = ["in_scope", "scope_score", "route"]


def test_pyfunc_class_serves_an_edge_folder_and_reads_several_input_forms(edge_dir, texts):
    model = DistillClassifier()
    model.load_context(SimpleNamespace(artifacts={ARTIFACT_KEY: str(edge_dir)}, model_config={"batch_size": 4}))
    assert model.labels == LABELS
    frame = model.predict(None, pd.DataFrame({"text": texts[:6]}))
    for same in (texts[:6], pd.Series(texts[:6]), {"text": texts[:6]}, [{"text": t} for t in texts[:6]]):
        pd.testing.assert_frame_equal(model.predict(None, same), frame)
    one = model.predict(None, texts[0])
    assert len(one) == 1 and one["label"][0] == frame["label"][0]
    empty = model.predict(None, pd.DataFrame({"text": []}))
    assert list(empty.columns) == ["label"] + PROBS + SCOPE_COLUMNS and len(empty) == 0
    with pytest.raises(ValueError, match="'text' column"):
        model.predict(None, pd.DataFrame({"a": ["x"], "b": ["y"]}))


def test_predictions_frame_is_a_softmax_per_row():
    out = predictions_frame(np.array([[0.0, 0.0, np.log(2.0)], [5.0, 1.0, 1.0]]), LABELS)
    assert out["label"].tolist() == ["positive", "negative"]
    np.testing.assert_allclose(out.loc[0, PROBS].to_numpy(float), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(out[PROBS].to_numpy().sum(1), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# log_split_inputs


def test_splits_are_logged_as_dataset_inputs_with_their_digests(store, review_frame):
    client, _ = store
    run_id = client.create_run(client.get_run(store[1]).info.experiment_id).info.run_id
    df = review_frame
    splits = Splits({"train": df.iloc[:120], "validation": df.iloc[120:160], "test": df.iloc[160:220],
                     "ood:rare": df.iloc[220:]}, LABELS, ["condition"])
    log_split_inputs(client, run_id, splits, context="distill",
                     sources={"train": "s3://bucket/data/train.parquet", "test": "builtin:drugreview/test"})
    inputs = {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}
    assert sorted(inputs) == sorted(splits.frames)
    for name, frame in splits.frames.items():
        tags = {t.key: t.value for t in inputs[name].tags}
        assert tags == {"mlflow.data.context": name, "distill.sha256": split_digest(frame),
                        "distill.rows": str(len(frame)), "distill.context": "distill"}
        dataset = inputs[name].dataset
        assert dataset.digest == split_digest(frame)[:16]
        schema = json.loads(dataset.schema)["mlflow_colspec"]
        assert [(c["name"], c["type"]) for c in schema] == [(c, "string") for c in ("id", "text", "label", "condition")]
        assert json.loads(dataset.profile)["num_rows"] == len(frame)
    assert (inputs["train"].dataset.source_type, json.loads(inputs["train"].dataset.source)) == \
        ("s3", {"uri": "s3://bucket/data/train.parquet"})
    assert json.loads(inputs["test"].dataset.source) == {"tags": {"distill.split": "test",
                                                                  "distill.data.uri": "builtin:drugreview/test"}}
    assert inputs["validation"].dataset.source_type == "code"
