"""Issue 10, item 6: bad data stops at validation, with a message naming the row or column, and nothing
downstream runs. Each case runs the real distill-pipeline flow on configs/tiny.yaml (a real Prefect API,
MLflow on SQLite, soft labels on a moto S3 server on 127.0.0.1) with a pinned teacher that is ready to label.

What "nothing downstream" means here: no stage after `validate` in MLflow (no soft-labels run), no object in
the soft-label bucket, the teacher never fetched (no local model cache), no split logged as a run input, no
student or edge version, and no MLflow run left RUNNING. A teacher that does not fit the data's labels or the
licence policy stops the run before any soft label. (The bad-input cases of tests/flows/test_pipeline.py live
here now, once: a missing file, empty text, the teacher's label count and licence.)
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pytest

from flows.config import load_config
from distill_gap.errors import DistillError
from distill_gap.registry.tracking import client_for
from tests.helpers import fresh_mlflow_db

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
N = 30  # rows per good file: r0 .. r29
ONE_MB = 1_000_000


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, s3_endpoint, prefect_api, tiny_model_dir, mlflow_db_template):
    """A working directory with an empty soft-label bucket, a SQLite MLflow store and a pinned tiny teacher.

    The teacher is imported (not bootstrapped): these runs must stop before it is used, so it only has to be
    a real, registered, labelling-ready teacher.
    """
    import boto3

    from distill_gap.kd.teacher import import_teacher

    tmp = tmp_path_factory.mktemp("bad-data")
    old = os.getcwd()
    os.chdir(tmp)
    bucket = f"distill-bad-data-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    base = [f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp)}", f"soft_labels.store=s3://{bucket}/labels",
            "soft_labels.engine=onnxruntime"]
    cfg = load_config(ROOT / "configs/tiny.yaml", base)
    import_teacher(cfg, tiny_model_dir, license="apache-2.0", pin=True, log=lambda *_: None)
    yield tmp, base, bucket
    os.chdir(old)


def _rows(n: int = N) -> dict[str, list]:
    labels = ("negative", "neutral", "positive")
    return {"id": [f"r{i}" for i in range(n)], "text": [f"review {i} of a drug that helped a bit" for i in range(n)],
            "label": [labels[i % 3] for i in range(n)], "condition": ["Pain"] * n}


def _csv(tmp: Path, name: str, rows: dict) -> Path:
    path = tmp / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _changed(column: str, at: dict[int, object]) -> dict:
    rows = _rows()
    rows[column] = [at.get(i, v) for i, v in enumerate(rows[column])]
    return rows


def _non_utf8(tmp: Path) -> tuple[Path, int]:
    """A CSV whose row r6 holds the raw bytes ff fe inside its text (latin-1 'ÿþ'); returns (path, byte offset)."""
    raw = pd.DataFrame(_rows()).to_csv(index=False).encode()
    raw = raw.replace(b"review 6 of a drug", b"review 6 \xff\xfe of a drug")
    path = tmp / "latin1.csv"
    path.write_bytes(raw)
    return path, raw.index(b"\xff")


def _case(name: str, tmp: Path) -> tuple[list[str], list[str]]:
    """(config overrides, fragments the error must contain) for one kind of bad data."""
    train = lambda rows, file: [f"data.train={_csv(tmp, file, rows)}"]  # noqa: E731
    if name == "missing file":
        return [f"data.train={tmp / 'nowhere' / 'train.csv'}"], ["data file not found", "nowhere/train.csv"]
    if name == "empty text":  # an empty CSV cell reads as a missing value
        return train(_changed("text", {0: ""}), "empty-text.csv"), ["column 'text' has missing values", "id r0"]
    if name == "missing column":
        rows = {k: v for k, v in _rows().items() if k != "label"}
        return train(rows, "no-label.csv"), ["column 'label' is missing from", "no-label.csv", "'text'"]
    if name == "NaN":
        return train(_changed("label", {7: float("nan")}), "nan.csv"), ["column 'label' has missing values", "id r7"]
    if name == "wrong dtype":  # the text column names a numeric column (e.g. the rating): every cell a number
        rows = _changed("text", {i: str(i % 10 + 1) for i in range(N)})
        return train(rows, "numeric-text.csv"), ["column 'text' holds only numbers", "numeric-text.csv",
                                                 "id, text and label must hold strings"]
    if name == "empty split":
        empty = _csv(tmp, "empty-test.csv", {k: [] for k in _rows()})
        return [*train(_rows(), "good.csv"), f"data.test={empty}"], ["split 'test'", "empty-test.csv", "has no rows"]
    if name == "unseen labels":
        rows = _changed("label", {4: "very positive", 9: "very positive"})
        return train(rows, "unseen.csv"), ["outside the label set", "'very positive'", "r4", "r9",
                                           "add the missing labels to data.labels"]
    if name == "duplicated ids":
        return train(_changed("id", {17: "r3"}), "dup-ids.csv"), ["column 'id'", "'r3'", "dup-ids.csv"]
    if name == "1 MB text":
        huge = ("this drug helped a little " * (ONE_MB // 26 + 1))[:ONE_MB]
        return train(_changed("text", {5: huge}), "huge.csv"), [
            "column 'text' has values longer than 100000 characters", "id r5", "huge.csv"]
    if name == "non-UTF-8 bytes":
        path, offset = _non_utf8(tmp)
        # header = line 1, r0 = line 2, so r6 is on line 8
        return [f"data.train={path}"], [f"{path} is not UTF-8 text", "byte 0xff", f"offset {offset}", "line 8"]
    raise AssertionError(name)


CASES = ["missing file", "empty text", "missing column", "NaN", "wrong dtype", "empty split", "unseen labels", "duplicated ids", "1 MB text",
         "non-UTF-8 bytes"]


def _objects(bucket: str) -> list[str]:
    import boto3

    return [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]


def _pipeline_runs(client, cfg):
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.distill.stage = 'pipeline'",
                              order_by=["attributes.start_time DESC"])


def _versions(client, name: str) -> int:
    return len(client.search_model_versions(f"name='{name}'"))


@pytest.mark.parametrize("case", CASES)
def test_bad_data_stops_at_validation_and_nothing_downstream_runs(workspace, case):
    from flows.pipeline import distill_pipeline

    tmp, base, bucket = workspace
    overrides, fragments = _case(case, Path(tmp))
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        *base, "data.test=null", "data.validation=null", "data.holdout=null", "data.text_column=text",
        "data.label_column=label", "data.id_column=id", *overrides])
    client = client_for(cfg.tracking)
    runs_before = len(_pipeline_runs(client, cfg))
    versions_before = {n: _versions(client, n) for n in ("tiny-teacher", "tiny-student", "tiny-edge")}

    with pytest.raises(DistillError) as err:
        distill_pipeline(cfg, trigger_reason=f"reliability: {case}")

    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n  fix: " in message  # the one error type, with what to do

    # the run: FAILED, with exactly one stage (validate), FAILED, and no data logged as its input
    runs = _pipeline_runs(client, cfg)
    assert len(runs) == runs_before + 1
    run = runs[0]
    assert run.info.status == "FAILED" and run.data.tags["trigger.reason"] == f"reliability: {case}"
    stages = client.search_runs([run.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {r.data.tags["distill.stage"]: r.info.status for r in stages} == {"validate": "FAILED"}
    assert not client.get_run(run.info.run_id).inputs.dataset_inputs
    # nothing downstream: no soft label written, the teacher never fetched, no model registered
    assert _objects(bucket) == []
    assert not (Path(tmp) / ".distill" / "models").exists()
    assert {n: _versions(client, n) for n in versions_before} == versions_before
    # nothing left RUNNING anywhere in the experiment
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert not client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")


def test_cli_names_the_undecodable_byte_without_a_traceback(workspace):
    """`distill run` on a non-UTF-8 file: exit 2, one message naming the file, byte offset and line."""
    from typer.testing import CliRunner

    from flows.cli import app

    tmp, base, bucket = workspace
    path, offset = _non_utf8(Path(tmp))
    args = ["run", "--config", str(ROOT / "configs/tiny.yaml")]
    for o in [*base, f"data.train={path}", "data.test=null", "data.validation=null", "data.holdout=null",
              "data.text_column=text", "data.label_column=label", "data.id_column=id"]:
        args += ["--set", o]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    assert f"{path} is not UTF-8 text: byte 0xff at offset {offset} (line 8)" in result.stderr
    assert "Traceback" not in result.output and "UnicodeDecodeError" not in result.output
    assert result.stderr.count("error:") == 1 and "fix: re-encode the file as UTF-8" in result.stderr
    assert _objects(bucket) == []


# A teacher that does not fit the data or the policy: not bad data, so validation passes, and the run stops when
# the teacher is checked, before any soft label (these cases moved here from tests/flows/test_pipeline.py).
TEACHER_CASES = {
    "teacher label count": (lambda tmp: [f"data.train={_csv(tmp, 'two-labels.csv', _two_label_rows())}",
                                         "data.labels=[negative, positive]"], "predicts 3 labels"),
    "teacher licence not allowed": (lambda tmp: [f"data.train={_csv(tmp, 'good.csv', _rows(60))}",
                                                 "governance.allowed_licenses=[mit]"],
                                    "licence 'apache-2.0', which is not in governance.allowed_licenses"),
}


def _two_label_rows() -> dict[str, list]:
    rows = _rows()
    rows["label"] = [("negative", "positive")[i % 2] for i in range(N)]
    return rows


@pytest.mark.parametrize("case", list(TEACHER_CASES))
def test_a_teacher_that_does_not_fit_stops_before_soft_labels(workspace, case):
    from flows.pipeline import distill_pipeline

    tmp, base, bucket = workspace
    overrides, message = TEACHER_CASES[case]
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        *base, "data.test=null", "data.validation=null", "data.holdout=null", "data.text_column=text",
        "data.label_column=label", "data.id_column=id", *overrides(Path(tmp))])
    client = client_for(cfg.tracking)
    versions_before = {n: _versions(client, n) for n in ("tiny-teacher", "tiny-student", "tiny-edge")}

    with pytest.raises(DistillError) as err:
        distill_pipeline(cfg, trigger_reason=f"reliability: {case}")
    assert message in str(err.value) and "\n  fix: " in str(err.value)

    run = _pipeline_runs(client, cfg)[0]
    assert run.info.status == "FAILED" and run.data.tags["trigger.reason"] == f"reliability: {case}"
    stages = {r.data.tags["distill.stage"]: r.info.status for r in client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    assert "soft-labels" not in stages and "RUNNING" not in stages.values(), stages
    assert _objects(bucket) == []  # no soft label
    assert {n: _versions(client, n) for n in versions_before} == versions_before
