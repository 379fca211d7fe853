"""The evaluate stage on real tiny models: one prediction per model feeds the report, the edge folder's scope and
drift reference, and the sizes; the report is published to Prefect and MLflow."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from distill_gap.data.splits import Splits
from distill_gap.digest import folder_bytes
from distill_gap.edge.folder import read_reference
from distill_gap.edge.guard import read_guard
from distill_gap.evaluation.gap_report import scope_record
from distill_gap.inference.predictor import load_predictor
from distill_gap.monitoring.drift import reference_profile
from flows.config import DriftConfig, EvaluateConfig, ScopeConfig
from tasks.evaluate import evaluate, publish_report
from tests.conftest import LABELS
from tests.helpers import spread_classifier

EDGE = "student-fp32-edge"


@pytest.fixture(scope="module")
def evaluated(review_frame, tiny_model_dir, tmp_path_factory):
    """teacher, student and an edge folder (fp32 primary) evaluated once, with a model that cannot be loaded."""
    tmp = tmp_path_factory.mktemp("evaluate")
    texts = review_frame["text"].tolist()
    frame = pd.DataFrame({"id": review_frame["id"], "text": texts, "label": [LABELS[i % 3] for i in range(len(texts))],
                          "site": ["a" if i % 2 else "b" for i in range(len(texts))]})
    splits = Splits({"train": frame.iloc[:40], "validation": frame.iloc[40:100], "test": frame.iloc[100:180],
                     "ood:far": frame.iloc[180:220].assign(text=lambda f: f["text"].str.upper())}, LABELS, ["site"])
    student = spread_classifier(tiny_model_dir, texts[:40], tmp / "student", max_length=32)
    edge_folder = tmp / "edge"
    shutil.copytree(student, edge_folder / "fp32")
    models = {"teacher": tiny_model_dir, "student": student, EDGE: edge_folder / "fp32", "gone": tmp / "missing"}
    ev = EvaluateConfig(batch_size=16, bootstrap_samples=20, stress_rows=16)  # few resamples: not what is tested
    report = evaluate(models, splits, ev, DriftConfig(sample_size=30), ScopeConfig(detector="mahalanobis+lexical", train_rows=40),
                      seed=0, max_length=32, device="cpu", edge_model=EDGE, edge_folder=edge_folder)
    return {"report": report, "splits": splits, "models": models, "edge_folder": edge_folder}


def test_every_model_scored_and_a_model_that_cannot_be_loaded_is_listed(evaluated):
    report = evaluated["report"]
    assert report.models == ["teacher", "student", EDGE]
    assert {"test", "ood:far", "slice:site=a"} <= set(report.suites) and report.seconds > 0
    assert set(report.calibration) == set(report.scope) == set(report.models)
    assert {m for by_model in report.stress.values() for m in by_model} == set(report.models)
    assert [m["model"] for m in report.not_evaluated] == ["gone"]
    assert report.not_evaluated[0]["reason"].startswith("could not be loaded: ")
    assert report.sizes == {name: folder_bytes(path) for name, path in evaluated["models"].items()}
    assert report.sizes["gone"] == 0 and report.sizes[EDGE] == report.sizes["student"] > 0



def test_every_compressed_model_is_compared_with_the_teacher_on_the_same_rows(evaluated):
    report = evaluated["report"]
    assert set(report.noninferiority) == {"student", EDGE, "teacher"}  # teacher: against the majority answer
    (base,) = report.noninferiority["teacher"]
    assert base["check"] == "accuracy vs majority class" and base["n"] == len(evaluated["splits"]["test"])
    assert base["model"] == pytest.approx(report.metric("test", "teacher"))
    checks = {c["check"]: c for c in report.noninferiority[EDGE]}
    assert set(checks) == {"accuracy", *(f"recall:{label}" for label in LABELS)}
    assert all(c["n"] > 0 and c["outcome"] in ("pass", "fail", "insufficient") for c in checks.values())
    assert checks["accuracy"]["n"] == len(evaluated["splits"]["test"])
    assert checks["accuracy"]["teacher"] == pytest.approx(report.metric("test", "teacher"))
    assert report.to_dict()["noninferiority"] == report.noninferiority


def test_the_edge_folder_gets_the_scope_and_the_reference_of_the_same_predictions(evaluated):
    report, splits, folder = evaluated["report"], evaluated["splits"], evaluated["edge_folder"]
    guard = read_guard(folder)
    assert guard.detector == "mahalanobis+lexical" and guard.threshold == pytest.approx(report.scope[EDGE]["threshold"])
    assert guard.info == json.loads(json.dumps(scope_record(report, EDGE, splits), default=str))
    assert guard.temperature == pytest.approx(report.calibration[EDGE]["temperature"])
    assert guard.stats["means"].shape == (3, 32)  # the training rows' own pooled features (hidden size 32)
    words = {w for t in splits["train"]["text"] for w in re.findall(r"\w+", t.lower())}
    assert 0 < len(guard.stats["lexicon_buckets"]) <= len(words)  # the training rows' words, hashed
    assert set(guard.standardise) == {"mahalanobis", "lexical"}
    assert set(report.ood["ood:far"][EDGE]) == {"msp", "energy", "mahalanobis", "knn", "lexical", "mahalanobis+lexical",
                                                "hist"}
    reference = read_reference(folder)
    # what the flow computed before: the edge model loaded again and run over validation + test, scored by the guard
    texts = [*splits["validation"]["text"], *splits["test"]["text"]]
    again, features = load_predictor(folder / "fp32", max_length=32).predict_outputs(texts, batch_size=16)
    expected = reference_profile(texts, again, LABELS, scope_threshold=guard.threshold,
                                 scope_scores=guard.score(again, features, texts), sample_size=30, seed=0)
    assert reference["n"] == len(texts) == 140 and reference["scope"]["score"] == "guard"
    assert reference["scope"]["out_of_scope_share"] == pytest.approx(expected["scope"]["out_of_scope_share"], abs=0.01)
    assert reference["predicted_counts"] == expected["predicted_counts"] and reference["text"] == expected["text"]
    np.testing.assert_allclose(reference["scope_score"], expected["scope_score"], atol=1e-3)


def test_publish_report_writes_the_verdict_and_the_table_to_prefect(evaluated, prefect_api):
    """The MLflow side (markdown, JSON and HTML under evaluation/) is checked by the pipeline test."""
    from prefect.artifacts import Artifact

    report = evaluated["report"]
    gates = {"retention_vs_teacher": {"value": 0.5, "threshold": 0.97, "passed": False, "detail": "tiny models"}}
    data = publish_report(report, gates, "evaltest", edge=EDGE)
    assert data["gates"] == gates and data["models"] == report.models and data["seconds"] == report.seconds
    md = Artifact.get("evaltest-gap-report").data
    assert md.startswith("**Verdict: 1 gate(s) FAILED: retention_vs_teacher**") and "not evaluated" in md
    table = Artifact.get("evaltest-gap-table").data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {(r["suite"], r["model"]) for r in rows} >= {("test", EDGE), ("slice:site=a", "teacher")}
    numbers = [v for r in rows for k, v in r.items() if isinstance(v, float)]
    assert numbers and all(v == round(v, 3) for v in numbers)  # 3 decimals for people; the JSON keeps every digit
    edge_test = next(r for r in rows if (r["suite"], r["model"]) == ("test", EDGE))
    assert edge_test["accuracy"] == round(report.metric("test", EDGE), 3)
    assert md.index("**Verdict") < md.index(f"`{EDGE}` vs the teacher")  # the shipped model's table follows
