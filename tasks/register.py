"""The register stage: the signed student and edge versions staged with their lineage tags
(distill_gap.registry.registration), then the release gate; a failed gate rolls the staging back."""

from __future__ import annotations

from pathlib import Path

from prefect.cache_policies import NO_CACHE

from tasks import step

from distill_gap.errors import DistillError
from distill_gap.evaluation.gates import failed_evidence, gates_failed
from distill_gap.outcomes import FAIL, PASS, by_outcome, overall_outcome
from distill_gap.monitoring.events import GATES_FAILED, emit
from distill_gap.governance.attestation import ATTESTATION_DIR
from distill_gap.governance.dossier import publish, write_model_card
from distill_gap.registry.presentation import describe_run, stage_run_id as find_stage_run
from distill_gap.registry.registration import register_models
from distill_gap.registry.versions import Staged, check_teacher_license, fetch_model, unstage


def release_check(client, registered: dict, gates: dict, *, run_id: str, cache_root: str | Path, log=print) -> dict:
    """The last gate, after registration staged the versions: every quality gate passed, and the edge version
    as stored in the registry has the digest that was evaluated. Raises GatesFailed otherwise."""
    edge = registered["edge"]
    failed = by_outcome(gates, FAIL)  # insufficient evidence registers the version: @challenger, waiver for more
    try:
        ref = fetch_model(client, edge["name"], version=edge["version"], cache_root=cache_root)
        if ref.digest != edge["digest"]:
            raise DistillError(f"{edge['name']} v{edge['version']} carries digest {ref.digest[:12]}, but "
                               f"{edge['digest'][:12]} was evaluated", "re-run the pipeline")
    except DistillError as exc:
        failed["registry_roundtrip"] = {"passed": False, "value": 0.0, "threshold": 1.0, "detail": exc.problem}
    outcome = FAIL if failed else overall_outcome(gates)  # `failed` may hold registry_roundtrip, not in `gates`
    client.set_tag(run_id, "gates.passed", str(outcome == PASS).lower())
    client.set_tag(run_id, "gates.outcome", outcome)
    if not failed:
        return {"passed": True, "edge": edge, "outcome": outcome}
    error = gates_failed(edge["name"], failed)
    emit(GATES_FAILED, edge["name"], {"version": None, "failed": list(failed), "evidence": failed_evidence(failed),
                                      "mlflow_run_id": run_id})
    log(f"release gate: {len(failed)} gate(s) failed ({failed_evidence(failed)}); rolling back the staged versions")
    raise error


def attestation_uri(run) -> str:
    """Where the pipeline run's Statements are (the run's artifact folder attestations/), a tag on every version."""
    return f"{run.client.get_run(run.run_id).info.artifact_uri.rstrip('/')}/{ATTESTATION_DIR}"


@step("register", cache_policy=NO_CACHE)
def register_task(run, *, teacher, splits, soft, student, edge, report, gates: dict) -> dict:
    """Register the signed student and edge versions with their lineage tags (no alias moves), in the run's
    `register` stage.

    Inside the pipeline's release transaction: what it staged is removed again (`unregister`) when a later gate
    fails.
    """
    from prefect.logging import get_run_logger
    from prefect.transactions import get_transaction

    staged = Staged()
    evaluate_run = find_stage_run(run.client, run.run_id, "evaluate")
    with run.stage("register") as stage_run_id:
        links = run.links(evaluate_run=evaluate_run, register_run=stage_run_id)
        out = register_models(
            run.client, stage_run_id, config_digest=run.config_digest, governance=run.governance, labels=splits.labels,
            student_model_name=run.student_model_name, edge_model_name=run.edge_model_name, teacher=teacher,
            data_digest=splits.digest(), soft=soft, student=student, edge=edge, report=report, gates=gates,
            example_texts=splits["test"]["text"].head(3).tolist(), attestation_uri=attestation_uri(run),
            trigger_reason=run.trigger_reason, license_override=check_teacher_license(teacher, run.governance),
            staged=staged, model_card=write_model_card, publish_dossier=publish, links=links,
            log=get_run_logger().info)
    txn = get_transaction()
    if txn is not None:
        txn.set("staged", staged)
        txn.set("client", run.client)
    link_dossier(run, stage_run_id, out["edge"])
    describe_run(run.client, run.run_id, report, gates, edge.report_name, links=links)  # now with the dossier
    return out


def link_dossier(run, stage_run_id: str, edge: dict) -> None:
    """The dossier in the Prefect UI: a link artifact to the page in the MLflow UI at tracking.ui_url (its artifact
    viewer)."""
    from prefect.artifacts import create_link_artifact

    create_link_artifact(
        key=f"{run.name}-dossier", link_text=f"Dossier of {edge['name']} v{edge['version']}",
        link=run.mlflow_url(stage_run_id, "dossier/dossier.html"),
        description=f"scope, gates, lineage and approver of {edge['name']} v{edge['version']}; also "
                    f"`distill dossier models:/{edge['name']}/{edge['version']} --html dossier.html`")


@register_task.on_rollback
def unregister(txn) -> None:
    """Rollback hook: delete the versions, logged models and signatures that the register task staged."""
    from prefect.logging import get_logger

    staged = txn.get("staged", None)
    if staged is None:
        return
    log = get_logger("distill.register").warning
    removed = unstage(txn.get("client"), staged, log)
    log(f"rolled back the registration: removed {', '.join(removed) or 'nothing'}")


@step("release-gate", cache_policy=NO_CACHE)
def release_task(run, registered: dict, gates: dict) -> dict:
    """The release gate as a task: inside the release transaction, so that GatesFailed rolls the staging back."""
    from prefect.logging import get_run_logger

    with run.stage("release"):  # FAILED in MLflow when the gate refuses, beside the pipeline run's gates.passed=false
        return release_check(run.client, registered, gates, run_id=run.run_id, cache_root=run.workdir / "release",
                             log=get_run_logger().warning)
