"""Registration of a pipeline run's student and edge model: signed MLflow models, versions with every lineage tag,
and a description that states the gap to the teacher and the verdict. What it writes is staged for rollback."""

from __future__ import annotations

from distill_gap.outcomes import FAIL, INSUFFICIENT, PASS, by_outcome, overall_outcome
from distill_gap.ops.failpoints import failpoint
from distill_gap.registry.tracking import code_version
from distill_gap.registry.versions import Staged, create_version, sign_and_log, unstage

# Every student/edge version carries these tags (DESIGN.md, registry); a version is created
# with all of them at once so that none can exist without its lineage.
LINEAGE_TAGS = (
    "teacher.name", "teacher.version", "teacher.digest", "data.digest", "soft_labels.uri",
    "soft_labels.key", "config.digest", "code.version", "parent", "gates.passed", "gates.outcome",
    "attestation.uri",
)


def _describe_spec(student) -> str:
    spec = getattr(student, "spec", None) or {"kind": "layers", "layers": student.layers}
    return ", ".join(f"{k} {v}" for k, v in spec.items())


def gap_summary(report, gates: dict, edge_name: str) -> str:
    """Two lines for a version description: the gap against the teacher and the verdict."""
    test = report.suites["test"]
    edge_acc, teacher_acc = test[edge_name]["accuracy"], test["teacher"]["accuracy"]
    worst = [f"{s.removeprefix('slice:')} {g * 100:+.1f} pts" for s, g in report.worst_slices(edge_name) if g < 0]
    failed, thin = by_outcome(gates, FAIL), by_outcome(gates, INSUFFICIENT)
    verdict = (f"Verdict: gates FAILED: {', '.join(failed)}." if failed else
               f"Verdict: insufficient evidence for {', '.join(thin)} (@challenger only until a named approver "
               "waives them)." if thin else "Verdict: all gates passed.")
    return (f"Gap vs the teacher: test accuracy {edge_acc:.3f} vs {teacher_acc:.3f} "
            f"(retention {edge_acc / max(teacher_acc, 1e-9):.3f})"
            + (f"; largest slice losses: {', '.join(worst)}" if worst else "") + ". " + verdict)


def _replaces(client, edge_model_name: str) -> dict[str, str]:
    """replaces.version / replaces.teacher: the edge model's @champion when this version was made (a redistillation
    after drift or a teacher change shows both teachers in its lineage); nothing when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(edge_model_name, "champion")
    except MlflowException:
        return {}
    t = mv.tags
    return {"replaces.version": str(mv.version),
            **({"replaces.teacher": f"{t['teacher.name']}/{t['teacher.version']}"} if t.get("teacher.name") else {})}


def register_models(client, run_id: str, *, config_digest: str, governance, labels: list[str],
                    student_model_name: str, edge_model_name: str, teacher, data_digest: str, soft, student, edge, report, gates: dict,
                    example_texts: list[str], attestation_uri: str, trigger_reason: str = "manual",
                    license_override: str | None = None, staged: Staged | None = None, model_card=None,
                    publish_dossier=None, links: dict[str, str] | None = None, log=print) -> dict:
    """Register the student and the edge model, signed and logged as MLflow models, with every lineage tag.

    `model_card(client, edge, name=, tags=, governance=)` writes the edge folder's model card before it is signed;
    `publish_dossier(client, version, governance, edge_folder=, staged=, log=)` publishes the new edge version's
    dossier (both from distill_gap.governance.dossier, passed in by the register stage: the registry does not
    import governance). `links` (name -> URL: the gap report, the dossier) end each version's description.

    No alias moves here: promotion (challenger, approval, champion) is the promote stage's step
    (distill_gap.governance.promotion). Everything written is recorded in `staged`; when this raises (an exception,
    SIGTERM), what it wrote is removed before re-raising.
    """
    staged = staged if staged is not None else Staged()
    try:
        return _register(client, run_id, config_digest=config_digest, governance=governance, labels=list(labels),
                         student_model_name=student_model_name, edge_model_name=edge_model_name, teacher=teacher, data_digest=data_digest, soft=soft, student=student,
                         edge=edge, report=report, gates=gates, example_texts=example_texts,
                         attestation_uri=attestation_uri, trigger_reason=trigger_reason,
                         license_override=license_override, staged=staged, model_card=model_card,
                         publish_dossier=publish_dossier, links=links or {}, log=log)
    except BaseException:
        removed = unstage(client, staged, log)
        log(f"registration interrupted; removed what it had written: {', '.join(removed) or 'nothing'}")
        raise


def _register(client, run_id: str, *, config_digest: str, governance, labels: list[str], student_model_name: str,
              edge_model_name: str, teacher, data_digest: str, soft, student, edge, report, gates: dict,
              example_texts: list[str], attestation_uri: str, trigger_reason: str, license_override: str | None,
              staged: Staged, model_card, publish_dossier, links: dict[str, str], log) -> dict:
    from distill_gap.registry.presentation import describe_model, headline_metrics, version_description
    from distill_gap.registry.pyfunc import link_version, log_model_folder

    outcome = overall_outcome(gates)
    passed = outcome == PASS
    edge_digest = edge.digest  # taken once, after evaluate completed the folder (scope.json, reference.json)
    lineage = {
        "teacher.name": teacher.name, "teacher.version": teacher.version, "teacher.digest": teacher.digest,
        "teacher.license": teacher.tags.get("license", ""),
        "data.digest": data_digest, "soft_labels.uri": soft.uri, "soft_labels.key": soft.key,
        "config.digest": config_digest, "code.version": code_version(), "gates.passed": str(passed).lower(),
        "gates.outcome": outcome,
        "gates.insufficient": ",".join(by_outcome(gates, INSUFFICIENT)),
        "attestation.uri": attestation_uri, "trigger.reason": trigger_reason,
        "intended_use": governance.intended_use, "not_for": "\n".join(governance.not_for),
        **({"license.override_reason": license_override} if license_override else {}),
    }
    replaces = _replaces(client, edge_model_name)  # the edge champion this version would replace, and its teacher
    aug = getattr(soft, "extra", None)  # the extra rows' own entry (distill.augment, redistill)
    if aug is not None:
        lineage.update({"extra.key": aug.soft.key, "extra.digest": aug.digest, "extra.rows": str(len(aug.frame)),
                        **({"production.sha256": aug.production["sha256"], "production.uri": aug.production["uri"]}
                           if aug.production else {})})
    test = report.suites["test"]
    summary = gap_summary(report, gates, edge.report_name)
    # 1. student version: signed, logged as an MLflow model (signature + input example), all tags at once
    signed = sign_and_log(client, run_id, student.path, "student", governance, staged)
    logged = log_model_folder(client, run_id, student.path, "student", example_texts=example_texts, labels=labels)
    staged.logged_models.append(logged.model_id)
    kind = (f"Fp32 student of {teacher.name} v{teacher.version} ({_describe_spec(student)}); the verdict is this "
            f"run's, for the {edge_model_name} version quantized from it"
            + (f"; hard-label baseline {test['student-hard']['accuracy']:.3f}" if "student-hard" in test else "") + ".")
    sv = create_version(client, student_model_name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id,
                        governance=governance, staged=staged,
                        description=version_description(report, gates, "student", kind=kind, links=links),
                        tags={**lineage, **signed, "parent": f"{teacher.name}/{teacher.version}",
                              "model.digest": student.digest})
    link_version(client, logged, student_model_name, sv.version)
    describe_model(client, student_model_name, "student", edge_model_name)
    failpoint("register.student-registered")
    # 2. edge version, parent = the student version it was quantized from; its model card (README.md, outside the
    # digest, inside the folder signature) is compiled from the signed Statements like the dossier
    edge_tags = {"parent": f"{student_model_name}/{sv.version}", "model.digest": edge_digest,
                 "edge.primary": edge.primary, "edge.quantized": str(edge.quantized).lower(),
                 "quantization.candidate": (edge.tuning or {}).get("best") or "none"}
    if model_card is not None:
        model_card(client, edge, name=edge_model_name, tags={**lineage, **edge_tags}, governance=governance)
    signed = sign_and_log(client, run_id, edge.path, "edge", governance, staged)
    logged = log_model_folder(client, run_id, edge.path, "edge", example_texts=example_texts, labels=labels)
    staged.logged_models.append(logged.model_id)
    kind = f"INT8 edge model ({edge.primary})" if edge.quantized else "Edge model, NOT quantized (fp32 student)"
    kind = (f"{kind} of {student_model_name} v{sv.version}, {edge.artifacts[edge.primary]['size_bytes'] / 1e6:.1f} "
            f"MB: {edge.reason}.")
    ev = create_version(client, edge_model_name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id,
                        governance=governance, staged=staged,
                        description=version_description(report, gates, edge.report_name, kind=kind, links=links),
                        tags={**lineage, **signed, **edge_tags, **replaces})
    link_version(client, logged, edge_model_name, ev.version)
    describe_model(client, edge_model_name, "edge", edge_model_name)
    for key, value in headline_metrics(report, gates, edge.report_name).items():  # versions compare by these
        client.log_metric(run_id, key, value, model_id=logged.model_id)
    if publish_dossier is not None:
        publish_dossier(client, client.get_model_version(edge_model_name, str(ev.version)), governance,
                        edge_folder=edge.path, staged=staged, log=log)
    log(f"registered {student_model_name} v{sv.version} and {edge_model_name} v{ev.version}: {summary}")
    return {"student": {"name": student_model_name, "version": int(sv.version)},
            "edge": {"name": edge_model_name, "version": int(ev.version), "digest": edge_digest},
            "gates_passed": passed, "gates_outcome": outcome, "attestation_uri": attestation_uri}
