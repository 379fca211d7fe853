"""Feedback records (distill_gap/monitoring/feedback.py, `distill feedback`): answers to abstained rows, checked and
stored all or nothing, on a folder, on S3 (moto server) and through the command on a real SQLite registry."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from distill_gap.errors import DistillError
from distill_gap.monitoring.feedback import answered, append_feedback, read_feedback

from tests.conftest import LABELS, ROOT


def _rec(i, answer="negative", kind="human", **kw):
    return {"id": f"r-{i}", "text": f"the tablets made me dizzy, day {i}", "answer": answer, "answered_by": "nurse.kim",
            "kind": kind, "answered_at": "2026-12-02T10:00:00Z", "edge_version": 1, "condition": "Pain", **kw}


def _registered(wanted):
    return sorted(v for v in wanted if v != 1)  # only v1 exists


def _append(store, rows, now=None):
    return append_feedback(store, rows, [f"f.jsonl line {i}" for i in range(1, len(rows) + 1)], labels=LABELS,
                           edge_versions=_registered, now=now)


def test_a_file_is_stored_once_and_read_back(tmp_path):
    store = f"file://{tmp_path}/feedback"
    rows = [_rec(i) for i in range(3)] + [_rec(3, "positive", "teacher", answered_by="demo-teacher/1",
                                               answered_at=1764669600)]
    first = _append(store, rows)
    assert first.written == 4 and first.skipped == 0 and first.part.startswith("part-") and first.part.endswith(".jsonl")
    again = _append(store, rows)  # the same file sent twice: stored once
    assert again.part is None and again.written == 0 and again.skipped == 4
    df = read_feedback(store)
    assert len(df) == 4 and df["condition"].tolist() == ["Pain"] * 4
    assert str(df["answered_at"].dt.tz) == "UTC"
    assert df["answered_at"].iloc[3] == datetime(2025, 12, 2, 10, 0, tzinfo=timezone.utc)  # epoch seconds read
    # a person's answer beside the teacher's for one id: both kept, the person's is the one trained on
    _append(store, [_rec(3, "neutral", "human")])
    one = answered(store)
    assert len(read_feedback(store)) == 5 and len(one) == 4
    assert one.set_index("id").loc["r-3", ["answer", "kind"]].tolist() == ["neutral", "human"]
    assert len(list((tmp_path / "feedback").glob("part-*.jsonl"))) == 2


def test_bad_records_are_named_by_line_and_nothing_is_written(tmp_path):
    store = f"file://{tmp_path}/feedback"
    rows = [_rec(0), {"id": "r-1", "text": "x"}, _rec(2, "maybe"), _rec(3, kind="robot"), _rec(4, edge_version="v2"),
            _rec(5, answered_at="yesterday")]
    with pytest.raises(DistillError, match=r"4 bad feedback records: f.jsonl line 2: no 'answer', 'answered_by', "
                                           r"'kind', 'answered_at', 'edge_version'; f.jsonl line 3: answer 'maybe' is "
                                           r"not one of the labels negative, neutral, positive; f.jsonl line 4: kind "
                                           r"'robot' is not human or teacher; f.jsonl line 5: edge_version 'v2'") as err:
        _append(store, rows)
    assert "answered_by" in err.value.fix
    with pytest.raises(DistillError, match="timestamp that is neither ISO 8601 nor an epoch number: f.jsonl line 1: "
                                           "'yesterday'") as err:
        _append(store, [_rec(5, answered_at="yesterday")])
    assert '"answered_at"' in err.value.fix
    with pytest.raises(DistillError, match=r"2 records naming an edge version that is not registered: f.jsonl line 1: "
                                           r"edge_version 7; f.jsonl line 2: edge_version 9"):
        _append(store, [_rec(0, edge_version=7), _rec(1, edge_version=9), _rec(2)])
    with pytest.raises(DistillError, match="holds no records"):
        _append(store, [])
    assert read_feedback(store).empty and not (tmp_path / "feedback").exists()
    with pytest.raises(DistillError, match="feedback store 'ftp://x' has an unsupported scheme") as err:
        _append("ftp://x", [_rec(0)])
    assert "feedback.store" in err.value.fix


def test_contradictory_answers_for_one_id_are_refused_in_the_file_and_against_the_store(tmp_path):
    store = f"file://{tmp_path}/feedback"
    with pytest.raises(DistillError, match=r"1 contradictory answers: f.jsonl line 3: id 'r-1' answered 'positive' by "
                                           r"human, but f.jsonl line 2 says 'negative'"):
        _append(store, [_rec(0), _rec(1), _rec(1, "positive")])
    _append(store, [_rec(0), _rec(1)])
    with pytest.raises(DistillError, match=r"id 'r-0' answered 'neutral' by human, but .* \(stored\) says 'negative'") \
            as err:
        _append(store, [_rec(0, "neutral"), _rec(5)])
    assert "a stored answer stays" in err.value.fix
    changed_text = {**_rec(1), "text": "another review entirely"}
    with pytest.raises(DistillError, match="for another text"):
        _append(store, [changed_text])
    assert len(read_feedback(store)) == 2  # nothing of the refused files


def test_an_s3_prefix_through_moto(s3_bucket):
    store = f"s3://{s3_bucket}/feedback/demo"
    assert _append(store, [_rec(i) for i in range(5)]).written == 5
    assert _append(store, [_rec(i) for i in range(7)]).written == 2
    assert sorted(read_feedback(store)["id"]) == [f"r-{i}" for i in range(7)]


def test_the_command_checks_versions_in_the_registry(tmp_path, tiny_model_dir, mlflow_db_template, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.config import load_config
    from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
    from distill_gap.registry.versions import create_version
    from tests.helpers import fresh_mlflow_db, log_model_dir

    overrides = [f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp_path)}", f"feedback.store={tmp_path}/fb",
                 f"tracking.artifact_location={tmp_path}/artifacts", f"governance.key_dir={tmp_path}/keys"]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    client = client_for(cfg.tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name="register") as run_id:
        create_version(client, cfg.edge_model_name, source=log_model_dir(client, run_id, tiny_model_dir, "m"),
                       run_id=run_id, governance=cfg.governance, tags={})
    sets = [a for o in overrides for a in ("--set", o)]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(_rec(i)) + "\n" for i in range(3)))
    bad.write_text(json.dumps(_rec(9, edge_version=4)) + "\n")
    runner = CliRunner()
    out = runner.invoke(app, ["feedback", "add", str(bad), "--config", str(ROOT / "configs/tiny.yaml"), *sets])
    assert out.exit_code == 2 and "edge_version 4" in out.output and "not registered" in out.output, out.output
    out = runner.invoke(app, ["feedback", "add", str(good), "--config", str(ROOT / "configs/tiny.yaml"), *sets])
    assert out.exit_code == 0 and f"stored 3 feedback records in {tmp_path}/fb" in out.output, out.output
    out = runner.invoke(app, ["feedback", "show", "--config", str(ROOT / "configs/tiny.yaml"), *sets])
    assert out.exit_code == 0 and "3 records, 3 rows answered" in out.output and "negative" in out.output, out.output
    out = runner.invoke(app, ["feedback", "add", str(tmp_path / "none.jsonl"), "--config",
                              str(ROOT / "configs/tiny.yaml"), *sets])
    assert out.exit_code == 2 and "does not exist" in out.output
