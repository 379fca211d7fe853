"""Issue 23, what the MLflow UI shows: the pipeline run's description and headline metrics, a version's short
markdown description (verdict first), the registered model's word on promotion, the experiment's description
(a real GapReport, a real MLflow SQLite store)."""

from __future__ import annotations

from distill_gap.evaluation.gap_report import GapReport
from distill_gap.registry.presentation import (MODEL_TRAINING as MT, NOTE, describe_model, describe_run,
                                               headline_metrics, mlflow_page, prefect_link, ui_links, version_description)
from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
from tests.helpers import fresh_mlflow_db

EDGE = "student-onnx-int8"
GATES = {"noninferior:accuracy": {"value": 0.01, "threshold": 0.02, "passed": True, "outcome": "pass"},
         "noninferior:slice:condition=Pain": {"value": 0.06, "threshold": 0.03, "passed": False,
                                              "outcome": "insufficient"},
         "noninferior:slice:condition=Anxiety": {"value": 0.0, "threshold": 0.03, "passed": True, "outcome": "pass"}}


def _report() -> GapReport:
    return GapReport(
        models=["teacher", EDGE], threshold=0.02,
        suites={"test": {"teacher": {"n": 325, "accuracy": 0.726}, EDGE: {"n": 325, "accuracy": 0.720}},
                "slice:condition=Pain": {"teacher": {"n": 17, "accuracy": 0.765}, EDGE: {"n": 17, "accuracy": 0.706}},
                "slice:condition=Anxiety": {"teacher": {"n": 20, "accuracy": 0.8}, EDGE: {"n": 20, "accuracy": 0.8}},
                "slice:condition=Acne": {"teacher": {"n": 30, "accuracy": 0.5}, EDGE: {"n": 30, "accuracy": 0.4}}},
        flags=[{"suite": "slice:condition=Pain", "model": EDGE, "gap": -0.059, "n": 17},
               {"suite": "slice:condition=Acne", "model": EDGE, "gap": -0.1, "n": 30},
               {"suite": "slice:condition=Pain", "model": "student", "gap": -0.2, "n": 17}],
        scope={EDGE: {"detector": "mahalanobis", "threshold": 1.234, "tpr": 0.95}},
        ood={"ood:unseen_conditions": {EDGE: {"mahalanobis": {"auroc": 0.61}, "msp": {"auroc": 0.55}}},
             "ood:far": {EDGE: {"mahalanobis": {"auroc": 0.98}}}})


def test_headline_metrics_are_the_four_numbers_people_compare():
    m = headline_metrics(_report(), GATES, EDGE)
    assert m == {"headline.edge_test_accuracy": 0.720, "headline.retention_vs_teacher": 0.720 / 0.726,
                 "headline.worst_critical_slice_accuracy": 0.706,  # Pain, not Acne: Acne is not a critical slice
                 "headline.scope_auroc": 0.61}  # the shipped detector on the worst OOD set
    assert headline_metrics(GapReport(models=["teacher"]), {}, EDGE) == {}  # nothing measured, nothing invented


def test_version_description_reads_verdict_first():
    links = {"Gap report": "http://m/#/gap", "Dossier": "http://m/#/dossier"}
    text = version_description(_report(), GATES, EDGE, kind="INT8 edge model (onnx-int8), 11.2 MB.", links=links)
    parts = text.split("\n\n")
    assert parts[0].startswith("**Verdict: insufficient evidence** for noninferior:slice:condition=Pain")
    assert parts[1].splitlines()[1:] == ["- condition=Acne: -10.0 pts (n=30)", "- condition=Pain: -5.9 pts (n=17)"]
    assert parts[2] == ("Scope: in scope when the mahalanobis score >= 1.23 (keeps 95% of in-distribution rows); "
                        "AUROC 0.61 on unseen_conditions, AUROC 0.98 on far.")
    assert "retention 0.992" in parts[3]
    report = _report()  # a redistilled version's regions: the line says which were added and which not, and why
    report.scope[EDGE]["regions"] = {"column": "condition", "trained": ["Depression", "Pain"], "refused": [
        {"region": "Acne", "outcome": "insufficient", "n": 6, "rows_needed": 140}], "added": [{"region": "Obesity"}]}
    assert version_description(report, GATES, EDGE, kind="", links={}).split("\n\n")[2].endswith(
        " Regions: 2 condition regions from training; added on evidence: Obesity; Acne not added (insufficient on "
        "6 rows, about 140 labelled rows would decide it).")
    assert parts[-1] == "[Gap report](http://m/#/gap) · [Dossier](http://m/#/dossier)"
    failed = {**GATES, "calibration_ece": {"passed": False, "outcome": "fail"}}
    assert version_description(_report(), failed, EDGE, kind="", links={}).startswith(
        "**Verdict: gates FAILED** (calibration_ece)")


def test_run_model_and_experiment_descriptions_in_mlflow(tmp_path, mlflow_db_template):
    from flows.config import TrackingConfig

    tracking = TrackingConfig(uri=fresh_mlflow_db(mlflow_db_template, tmp_path),
                              artifact_location=str(tmp_path / "art"))
    client = client_for(tracking)
    eid = experiment_id(client, tracking)
    assert client.get_experiment(eid).tags[NOTE].startswith("Pipeline runs of distill-gap")
    with mlflow_run(client, experiment_id=eid, run_name="x-pipeline") as run_id:
        links = ui_links("http://127.0.0.1:5000/", eid, evaluate_run="ev1", register_run="reg1",
                         prefect_ui="http://127.0.0.1:4300", flow_run_id="fr-1")
        describe_run(client, run_id, _report(), GATES, EDGE, links=links)
    run = client.get_run(run_id)
    assert run.data.metrics["headline.worst_critical_slice_accuracy"] == 0.706
    note = run.data.tags[NOTE]
    assert note.startswith("**Verdict: insufficient evidence**") and "- condition=Pain: -5.9 pts (n=17)" in note
    assert f"(http://127.0.0.1:5000/#/experiments/{eid}/runs/ev1/artifactPath/evaluation/gap_report.html{MT})" in note
    assert f"(http://127.0.0.1:5000/#/experiments/{eid}/runs/reg1/artifactPath/dossier/dossier.html{MT})" in note
    assert "[Prefect flow run](http://127.0.0.1:4300/runs/flow-run/fr-1)" in note
    # the registered model says how to promote; a description written by hand is left alone
    client.create_registered_model("x-edge")
    describe_model(client, "x-edge", "edge", "x-edge")
    assert "`distill promote --config <config> --version <N>`, not MLflow's" in client.get_registered_model(
        "x-edge").description
    client.update_registered_model("x-edge", description="ours")
    describe_model(client, "x-edge", "edge", "x-edge")
    assert client.get_registered_model("x-edge").description == "ours"


def test_links_inside_mlflow_are_relative_to_its_ui_and_the_prefect_link_says_what_it_assumes():
    """MLflow's UI is one page with hash routes: `#/experiments/...` in a description written into MLflow opens the
    same route on whatever host and port the page was opened (`distill ui --mlflow-port`); pages outside MLflow get
    the absolute tracking.ui_url."""
    links = ui_links("", "7", evaluate_run="ev1", register_run="reg1", prefect_ui="", flow_run_id="fr-1")
    assert links == {"Gap report": "#/experiments/7/runs/ev1/artifactPath/evaluation/gap_report.html" + MT,
                     "Dossier": "#/experiments/7/runs/reg1/artifactPath/dossier/dossier.html" + MT,
                     "Prefect flow run (`distill ui` on its default port 4200)":
                         "http://127.0.0.1:4200/runs/flow-run/fr-1"}
    assert mlflow_page("http://mlflow:5011/", "7", "r1") == "http://mlflow:5011/#/experiments/7/runs/r1" + MT
    assert mlflow_page("", "7", "r1", "a/b.html") == "#/experiments/7/runs/r1/artifactPath/a/b.html" + MT
    # the Prefect UI known at write time (PREFECT_UI_URL, a server's PREFECT_API_URL): linked as it is
    assert prefect_link("https://prefect.example/", "fr-1") == ("Prefect flow run",
                                                                "https://prefect.example/runs/flow-run/fr-1")
    assert prefect_link("", None) is None and prefect_link("http://p", "None") is None  # no flow run, no link
    note = version_description(_report(), GATES, EDGE, kind="", links=links).split("\n\n")[-1]
    assert note.startswith(f"[Gap report](#/experiments/7/runs/ev1/artifactPath/evaluation/gap_report.html{MT}) · ")
    assert note.endswith(" · [Prefect flow run (`distill ui` on its default port 4200)]"
                         "(http://127.0.0.1:4200/runs/flow-run/fr-1)")
