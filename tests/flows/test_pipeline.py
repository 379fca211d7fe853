"""The whole flow on configs/tiny.yaml: a real Prefect API (test harness), MLflow on SQLite,
soft labels on a moto S3 server on 127.0.0.1. Bad input stops the run and leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from flows.config import load_config
from tasks.errors import DistillError
from tasks.registry import LINEAGE_TAGS, client_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, s3_endpoint, prefect_api):
    """A working directory with a bucket for soft labels, a SQLite MLflow store and a pinned tiny teacher."""
    import boto3

    from tasks.teacher import bootstrap_teacher

    tmp = tmp_path_factory.mktemp("pipeline")
    old = os.getcwd()
    os.chdir(tmp)
    boto3.client("s3").create_bucket(Bucket="distill-soft")
    base = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", "soft_labels.store=s3://distill-soft/labels",
            "soft_labels.engine=onnxruntime"]
    bootstrap_teacher(load_config(ROOT / "configs/tiny.yaml", base), log=lambda *_: None)
    yield tmp, base
    os.chdir(old)


def _config(workspace, *overrides):
    _, base = workspace
    return load_config(ROOT / "configs/tiny.yaml", [*base, *overrides])


def _versions(client, name):
    return client.search_model_versions(f"name='{name}'")


def _manifests():
    import boto3

    objs = boto3.client("s3").list_objects_v2(Bucket="distill-soft", Prefix="labels/").get("Contents", [])
    return sorted(o["Key"] for o in objs if o["Key"].endswith("manifest.json"))


def test_pipeline_end_to_end_then_cache_hit(workspace):
    from prefect.client.orchestration import get_client

    from flows.pipeline import distill_pipeline

    cfg = _config(workspace)
    first = distill_pipeline(cfg)
    client = client_for(cfg.tracking)

    # every model evaluated on its own, on test and the OOD set
    test = first["report"]["suites"]["test"]
    assert set(test) == {"teacher", "student", "student-int8", "student-onnx", "student-onnx-int8"}
    assert all(0.0 <= m["accuracy"] <= 1.0 and "macro_f1" in m for m in test.values())
    assert "fidelity" in test["student-int8"]

    # quantization: INC autotune trials recorded, the primary INT8 artifact named, the gate evaluated
    e = first["edge"]
    assert e["quantized"] and e["primary"] in ("int8", "onnx-int8") and not e["errors"]
    assert "quantization" in first["gates"] and first["gates"]["quantization"]["passed"] == e["quantized"]
    assert "ood:unseen_conditions" in first["report"]["suites"]

    # soft labels computed once, in S3, with the manifest last
    assert not first["soft_labels"]["hit"] and first["soft_labels"]["uri"].startswith("s3://distill-soft/labels/")
    assert _manifests() == [f"labels/{first['soft_labels']['key']}/manifest.json"]
    import boto3

    manifest = json.loads(boto3.client("s3").get_object(Bucket="distill-soft", Key=_manifests()[0])["Body"].read())
    # the teacher labelled through ONNX Runtime (engine onnxruntime), shards as mapped tasks
    assert manifest["produced_by"]["engine"] == "onnxruntime" and manifest["produced_by"]["task_runner"] == "local"

    # registry: student and edge versions carrying every lineage tag
    student = client.get_model_version("tiny-student", str(first["registered"]["student"]["version"]))
    edge = client.get_model_version("tiny-edge", str(first["registered"]["edge"]["version"]))
    for mv in (student, edge):
        assert set(LINEAGE_TAGS) <= set(mv.tags), set(LINEAGE_TAGS) - set(mv.tags)
        assert mv.tags["teacher.name"] == "tiny-teacher" and mv.tags["teacher.version"] == "1"
        assert mv.tags["config.digest"] == cfg.digest()
        assert mv.tags["soft_labels.key"] == first["soft_labels"]["key"]
    assert edge.tags["parent"] == f"tiny-student/{student.version}"
    assert edge.tags["edge.primary"] == e["primary"] and edge.tags["edge.quantized"] == "true"
    assert edge.tags["quantization.candidate"] in ("static", "dynamic")
    assert edge.tags["gates.passed"] == str(first["registered"]["gates_passed"]).lower()
    if first["registered"]["gates_passed"]:
        assert client.get_model_version_by_alias("tiny-edge", "champion").version == edge.version

    # the MLflow run finished, with the config digest; the gap report is a Prefect artifact
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["config.digest"] == cfg.digest()
    assert "student-int8.test.accuracy" in run.data.metrics
    trials = client.get_metric_history(first["run_id"], "quantize.trial_accuracy")
    assert 1 <= len(trials) <= 2  # tiny.yaml: candidates [static, dynamic], max_trials 2
    local = client.download_artifacts(first["run_id"], "quantization/edge.json", str(Path(workspace[0])))
    manifest_edge = json.loads(Path(local).read_text())
    assert manifest_edge["primary"] == e["primary"] and manifest_edge["tuning"]["trials"]
    assert {"int8", "onnx", "onnx-int8"} <= set(manifest_edge["artifacts"])

    async def _artifact():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-gap-report"])))

    import asyncio

    arts = asyncio.run(_artifact())
    assert arts and "student-int8" in arts[0].data

    # second run: same key -> cache hit, teacher not run, a new student version with the same lineage
    second = distill_pipeline(cfg)
    assert second["soft_labels"]["hit"] and second["soft_labels"]["key"] == first["soft_labels"]["key"]
    assert second["registered"]["student"]["version"] == first["registered"]["student"]["version"] + 1
    assert len(_manifests()) == 1


def _bad_csv(workspace, name, rows):
    tmp, _ = workspace
    path = Path(tmp) / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def _rows(n=30, labels=("negative", "neutral", "positive")):
    return {"id": [f"r{i}" for i in range(n)], "text": [f"review {i} of a drug" for i in range(n)],
            "label": [labels[i % len(labels)] for i in range(n)], "condition": ["Pain"] * n}


BAD_INPUTS = {
    "missing file": (lambda ws: ["data.train=/nonexistent/train.csv"], "data file not found"),
    "missing column": (lambda ws: [f"data.train={_bad_csv(ws, 'nocol.csv', {k: v for k, v in _rows().items() if k != 'text'})}"],
                       "column 'text' is missing"),
    "label outside the set": (lambda ws: [f"data.train={_bad_csv(ws, 'badlabel.csv', {**_rows(), 'label': ['great'] * 30})}"],
                              "outside the label set"),
    "empty text": (lambda ws: [f"data.train={_bad_csv(ws, 'empty.csv', {**_rows(), 'text': [''] + _rows()['text'][1:]})}"],
                   "column 'text'"),
    "teacher label count": (lambda ws: [f"data.train={_bad_csv(ws, 'two.csv', _rows(labels=('negative', 'positive')))}",
                                        "data.labels=[negative, positive]"], "predicts 3 labels"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_a_clear_error_and_leaves_nothing(workspace, case):
    from flows.pipeline import distill_pipeline

    overrides, message = BAD_INPUTS[case]
    cfg = _config(workspace, "data.test=null", "data.validation=null", "data.holdout=null", "data.text_column=text",
                  "data.label_column=label", "data.id_column=id", *overrides(workspace))
    client = client_for(cfg.tracking)
    before = {n: len(_versions(client, n)) for n in ("tiny-student", "tiny-edge")}
    manifests = _manifests()
    with pytest.raises(DistillError) as err:
        distill_pipeline(cfg)
    assert message in str(err.value)
    assert "fix" in str(err.value)
    assert {n: len(_versions(client, n)) for n in before} == before  # no registry version
    assert _manifests() == manifests  # no cache manifest
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.status == "FAILED"  # never left RUNNING


def test_cli_prints_one_clear_message_without_traceback(workspace):
    from typer.testing import CliRunner

    from flows.cli import app

    _, base = workspace
    args = ["run", "--config", str(ROOT / "configs/tiny.yaml")]
    for o in [*base, "data.train=/nonexistent/train.csv"]:
        args += ["--set", o]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "data file not found" in result.output and "Traceback" not in result.output
