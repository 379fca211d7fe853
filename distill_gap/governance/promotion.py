"""Promotion: gates passed -> @challenger; @champion moves on passed gates and, when approval.required, a named
approver's answer in the Prefect UI. Idempotent, attested, reversible (`distill rollback`).

Following mlops-stacks: aliases only (no stages); a second promotion of the same version changes nothing.
The promote stage (tasks/promote.py) runs `promote` with `request_approval` as its approver.
"""

from __future__ import annotations

import getpass
import time
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from distill_gap.errors import DistillError
from distill_gap.governance.attestation import promote_statement, record
from distill_gap.governance.dossier import require_current_review
from distill_gap.monitoring.events import GATES_FAILED, MODEL_PROMOTED, emit
from distill_gap.registry.tracking import experiment_id, mlflow_run

CHAMPION, CHALLENGER = "champion", "challenger"


def aliases(client, name: str) -> dict[str, int]:
    """alias -> version of a registered model ({} when it does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        return {}


# ---------------------------------------------------------------------------------------------
# approval in the Prefect UI


def approval_input_type():
    """The form the Prefect UI shows on the paused run (a RunInput; the server validates it against its schema)."""
    from prefect.input import RunInput

    class ApprovalInput(RunInput):
        approver: str = Field(min_length=1, description="your name, recorded in the registry and the attestation")
        decision: Literal["approve", "reject"] = Field(description="approve moves @champion; reject leaves it")
        comment: str = Field("", description="why (recorded)")
        signature: str = Field("", description="approvers with a signing key: the output of `distill approve "
                                               "models:/<name>/<version> --approver <you> --decision <d> --sign-only`")

    return ApprovalInput


def answer_problem(answer: dict, approval_cfg, *, name: str, version: int, digest: str) -> str | None:
    """Why an answer cannot be accepted (None: it can): a blank name, a name not among the approvers, or an approver
    with a signing key whose answer does not carry their signature of this decision on this version."""
    from distill_gap.governance.waiver import signed_answer_problem

    who, approvers = (answer.get("approver") or "").strip(), approval_cfg.approver_names
    if not who:
        return "the approver's name is blank"
    if approvers and who not in approvers:
        return f"'{who}' is not an approver (approval.approvers: {', '.join(approvers)})"
    return signed_answer_problem({**answer, "approver": who}, approval_cfg, name=name, version=version, digest=digest)


def request_approval(approval_cfg, *, name: str, version: int, summary: str, digest: str = "",
                     log: Callable = print) -> dict:
    """Pause the flow run until a named approver answers; ask again on an unacceptable answer; fail on timeout."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run

    form = approval_input_type()
    deadline = time.monotonic() + approval_cfg.timeout_seconds
    attempt = 0
    while (remaining := int(deadline - time.monotonic())) > 0:
        attempt += 1
        log(f"waiting up to {remaining} s for approval of {name} v{version}: answer on flow run {flow_run.get_id()} in "
            f"the Prefect UI, or `distill approve {flow_run.get_id()} --approver <name> --decision approve`")
        try:
            answer = pause_flow_run(
                wait_for_input=form.with_initial_data(description=f"### Promote {name} v{version} to @champion?\n\n"
                                                                  f"{summary}"),
                timeout=remaining, poll_interval=approval_cfg.poll_seconds, key=f"approval-{version}-{attempt}")
        except FlowPauseTimeout:
            break
        answer = {k: getattr(answer, k) for k in ("approver", "decision", "comment", "signature")}
        problem = answer_problem(answer, approval_cfg, name=name, version=version, digest=digest)
        if problem is None:
            return signed_record(answer, approval_cfg)
        log(f"approval refused: {problem}; asking again")
    raise DistillError(f"no approval for {name} v{version} within approval.timeout_seconds="
                       f"{approval_cfg.timeout_seconds}: nothing was promoted",
                       f"run `distill promote --config <config> --version {version}` when an approver is available, "
                       "or raise approval.timeout_seconds")


def signed_record(answer: dict, approval_cfg) -> dict:
    """An accepted answer as the promote Statement records it: a signed one with the envelope and the approver's
    public key (so that `distill verify` checks it again), a name-only one without."""
    from distill_gap.governance.waiver import approver_public_key, has_key

    who = answer["approver"].strip()
    out = {k: answer.get(k, "") for k in ("decision", "comment")}
    out.update(approver=who, at=datetime.now(timezone.utc).isoformat())
    if has_key(approval_cfg, who):
        out.update(signature=json.loads(answer["signature"]), public_key=approver_public_key(approval_cfg, who))
    return out


def _read_flow_run(client, flow_run_id: str):
    """The flow run `flow_run_id` names, or a DistillError naming the problem (not an id, no such run)."""
    from uuid import UUID

    from prefect.exceptions import ObjectNotFound

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise DistillError(f"{flow_run_id!r} is not a flow run id", "copy the id the paused run printed") from None
    try:
        return client.read_flow_run(run_id)
    except ObjectNotFound:
        raise DistillError(f"no flow run {flow_run_id} on the Prefect API at {client.api_url}",
                           "copy the id the paused run printed, and point PREFECT_API_URL at the server it ran "
                           "on") from None


def paused_version(flow_run_id: str) -> int | None:
    """The version a paused promotion asks about (its pause key is approval-<version>-<attempt>); None otherwise."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = _read_flow_run(client, flow_run_id).state
    key = (state.state_details.pause_key or "") if state is not None and state.is_paused() else ""
    parts = key.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[0] == "approval" and parts[1].isdigit() else None


def answer_run(flow_run_id: str, answer: dict) -> None:
    """Resume a paused promotion with an answer; the API validates it against the form's schema (as the UI does)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus

    with get_client(sync_client=True) as client:
        run = _read_flow_run(client, flow_run_id)
        if run.state is None or not run.state.is_paused():
            raise DistillError(f"flow run {flow_run_id} is not waiting for approval (state {run.state.name if run.state else None})",
                               "only a paused promotion can be answered; check the run in the Prefect UI")
        response = client.resume_flow_run(run.id, run_input=answer)
    if response.status != SetStateStatus.ACCEPT:
        reason = getattr(response.details, "reason", "") or str(response.status)
        raise DistillError(f"answer refused: {reason}", "answer with --approver <name> --decision approve|reject; "
                           "the run keeps waiting")


# ---------------------------------------------------------------------------------------------
# alias moves


def _record(client, run_id: str, governance, *, name: str, mv, action: str, approver: dict | None,
            before: dict, after: dict, reason: str) -> str:
    """Sign and log the promote Statement before the alias moves: an alias never moves without its evidence."""
    gates = {"passed": mv.tags.get("gates.passed") == "true", "attestation.uri": mv.tags.get("attestation.uri")}
    stmt = promote_statement(name=name, version=int(mv.version), digest=mv.tags.get("model.digest", ""),
                             action=action, approver=approver, aliases_before=before, aliases_after=after,
                             gates=gates, reason=reason, context={"mlflow_run_id": run_id})
    return record(client, run_id, governance, stmt)


def _move_challenger(client, run_id: str, governance, *, name: str, mv, before: dict) -> None:
    """@challenger moves with its own signed promote Statement (verify trusts no alias without one)."""
    version = int(mv.version)
    uri = _record(client, run_id, governance, name=name, mv=mv, action="challenger", approver=None, before=before,
                  after={**before, CHALLENGER: version}, reason="registered: @challenger until @champion moves")
    client.set_model_version_tag(name, str(version), "challenger.attestation.uri", uri)
    client.set_registered_model_alias(name, CHALLENGER, version)


def promotion_lock(name: str, timeout_seconds: float = 600):
    """One promotion step of `name` at a time, across processes and machines: a Prefect global concurrency limit
    with one slot (created on first use). Two deliveries of the same request then see each other's result."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = f"distill-promote-{name}"
    with get_client(sync_client=True) as c:
        try:
            c.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            try:
                c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:
                pass
    return concurrency(limit, occupy=1, timeout_seconds=timeout_seconds, strict=True)


def _handled(client, name: str, request_id: str | None):
    """The version a promotion request (an event id, a pipeline run) was already carried out on, if any."""
    if not request_id:
        return None
    done = client.search_model_versions(f"name='{name}' and tags.`promotion.request_id` = '{request_id}'")
    return done[0] if done else None


def waiver_command(name: str, version: int, gates: list[str]) -> str:
    """The command a named approver runs to waive insufficient-evidence gates (never a failed one)."""
    return (f"distill approve models:/{name}/{version} --approver <name> --waive {','.join(gates) or '<gate>'} "
            "--reason '<why the gap is acceptable>'")


def promote(client, version: int, *, name: str, approval_required: bool, governance, run_id: str,
            approve: Callable[[str], dict] | None = None, request_id: str | None = None, waiver: dict | None = None,
            log: Callable = print) -> dict:
    """Move @challenger then @champion to `version` of `name` (<name>-edge); a no-op when it already is @champion.

    `approve(summary, digest)` returns the approver's answer (required when approval.required). `request_id` (the id of
    the event that asked for this promotion) makes a redelivered request a no-op, even one that arrives after a
    newer version was promoted; the check-and-move steps hold `promotion_lock`, so two deliveries at once cannot
    both act.
    """
    mv = client.get_model_version(name, str(version))
    require_current_review(mv.tags, name, version)
    insufficient = mv.tags.get("gates.outcome") == "insufficient"
    with promotion_lock(name):
        before = aliases(client, name)
        if insufficient and waiver is None:  # registered, but not shown good enough: @challenger only
            if before.get(CHALLENGER) != version and before.get(CHAMPION) != version:
                _move_challenger(client, run_id, governance, name=name, mv=mv, before=before)
            thin = [g for g in (mv.tags.get("gates.insufficient") or "").split(",") if g]
            log(f"{name} v{version}: insufficient evidence for {', '.join(thin) or 'some gates'}; "
                f"it is @challenger, @champion stays at "
                f"{('v' + str(before[CHAMPION])) if CHAMPION in before else 'no version'}. A named approver may waive "
                f"those gates: {waiver_command(name, version, thin)}")
            return {"changed": before.get(CHALLENGER) != version, "champion": before.get(CHAMPION),
                    "challenger": version, "reason": "insufficient evidence: a waiver is needed"}
        if mv.tags.get("gates.passed") != "true" and not insufficient:
            emit(GATES_FAILED, name, {"version": version, "failed": mv.description})
            log(f"{name} v{version}: gates failed, @champion stays at "
                f"{('v' + str(before[CHAMPION])) if CHAMPION in before else 'no version'}")
            return {"changed": False, "champion": before.get(CHAMPION), "reason": "gates failed"}
        if (done := _handled(client, name, request_id)) is not None:
            log(f"promotion request {request_id} was already carried out on {name} v{done.version}: nothing changed")
            return {"changed": False, "champion": before.get(CHAMPION), "reason": "request already handled"}
        if before.get(CHAMPION) == version:  # idempotent: a second run (or a redelivered event) changes nothing
            log(f"{name} v{version} is already @champion: nothing changed")
            return {"changed": False, "champion": version, "reason": "already champion"}
        if before.get(CHALLENGER) != version:
            _move_challenger(client, run_id, governance, name=name, mv=mv, before=before)
    approval = waiver  # a verified waiver (distill_gap/governance/waiver.py) is the named approver's answer
    if approval_required and approval is None:  # outside the lock: a person may take hours
        if approve is None:
            raise DistillError(f"approval.required is set but {name} v{version} has no approver",
                               "promote inside a Prefect flow run (distill run / distill promote), which asks in the UI")
        approval = approve(mv.description or "", mv.tags.get("model.digest", ""))
        if approval["decision"] != "approve":
            client.set_model_version_tag(name, str(version), "promotion.rejected_by", approval["approver"])
            _record(client, run_id, governance, name=name, mv=mv, action="reject", approver=approval,
                    before=before, after=aliases(client, name), reason=approval.get("comment", ""))
            log(f"{name} v{version} rejected by {approval['approver']}: @champion not moved")
            return {"changed": False, "champion": before.get(CHAMPION), "reason": "rejected", "approval": approval}
    approver = approval or {"approver": "policy: gates passed, approval not required", "decision": "approve",
                            "comment": "", "at": datetime.now(timezone.utc).isoformat()}
    with promotion_lock(name):
        before = aliases(client, name)  # again: another delivery may have acted while this one waited
        if (done := _handled(client, name, request_id)) is not None or before.get(CHAMPION) == version:
            log(f"{name} v{version}: promoted meanwhile by another delivery of the request: nothing changed")
            return {"changed": False, "champion": before.get(CHAMPION), "reason": "request already handled"}
        after = {**before, CHAMPION: version}
        uri = _record(client, run_id, governance, name=name, mv=mv, action="promote", approver=approver,
                      before=before, after=after, reason=approver.get("comment", ""))
        for k, v in {"promotion.approver": approver["approver"], "promotion.at": approver["at"],
                     "promotion.comment": approver.get("comment", ""), "promotion.attestation.uri": uri,
                     "promotion.previous": str(before.get(CHAMPION, "")),
                     **({"promotion.request_id": request_id} if request_id else {})}.items():
            client.set_model_version_tag(name, str(version), k, v)
        client.set_registered_model_alias(name, CHAMPION, version)
    emit(MODEL_PROMOTED, name, {"version": version, "previous": before.get(CHAMPION),
                                "approver": approver["approver"], "request_id": request_id})
    republish(client, name, version, governance, log)
    log(f"{name} v{version} is now @champion (approver: {approver['approver']})")
    return {"changed": True, "champion": version, "previous": before.get(CHAMPION), "approval": approver,
            "attestation_uri": uri}


def waive_and_promote(client, cfg, *, name: str, version: int, approver: str, waived: list[str], reason: str,
                      key_dir_override: str | Path | None = None, log=print) -> dict:
    """Sign the waiver with the approver's key, check it, record it (an MLflow `waiver` run with the envelope and
    tags on the version), then promote: @champion moves, and the promote Statement carries the waiver."""
    from mlflow.exceptions import MlflowException

    from distill_gap.governance.waiver import check_waiver, sign_waiver

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise DistillError(f"{name} has no version {version}", "list the versions with `distill lineage` or the "
                           "MLflow UI") from None
    require_current_review(mv.tags, name, version)  # nothing signed for a version whose review has expired
    envelope = sign_waiver(cfg.governance, approver=approver, key_dir_override=key_dir_override, name=name,
                           version=version, digest=mv.tags.get("model.digest", ""), waived=waived, reason=reason)
    approval = check_waiver(envelope, cfg.approval, name=name, version=version, tags=mv.tags)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name=f"{name}-waiver",
                    tags={"distill.stage": "waiver", "waiver.approver": approver}) as run_id:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "waiver.dsse.json").write_text(json.dumps(envelope, indent=2))
            client.log_artifacts(run_id, tmp, "waiver")
        uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/waiver/waiver.dsse.json"
        client.set_model_version_tag(name, str(version), "promotion.waiver", ",".join(waived))
        client.set_model_version_tag(name, str(version), "promotion.waiver.uri", uri)
        result = promote(client, version, name=name, approval_required=cfg.approval.required,
                         governance=cfg.governance, run_id=run_id, waiver=approval, log=log)
    return {**result, "waiver_uri": uri, "waived": waived, "approver": approver}


def republish(client, name: str, version: int, governance, log: Callable = print) -> None:
    """The dossier again after an alias move (its approver, waiver and aliases changed). The move itself is already
    recorded by the signed promote Statement, so a failure here is reported, not raised."""
    from distill_gap.governance.dossier import publish

    try:
        publish(client, client.get_model_version(name, str(version)), governance, log=log)
    except Exception as err:  # noqa: BLE001 - the dossier can be compiled again with `distill dossier`
        log(f"warning: the dossier of {name} v{version} was not republished ({getattr(err, 'problem', err)}); "
            f"`distill dossier models:/{name}/{version}` compiles it from the records")


def rollback(client, name: str, to: int, *, reason: str, by: str | None, governance, tracking) -> dict:
    """Move @champion back to an earlier version that passed its gates; record who, why, and a signed Statement."""
    from mlflow.exceptions import MlflowException

    if not reason.strip():
        raise DistillError("a rollback needs a reason", "pass --reason '<what went wrong>'")
    try:
        mv = client.get_model_version(name, str(to))
    except MlflowException:
        raise DistillError(f"{name} has no version {to}", "list the versions in the MLflow UI (`distill ui`)") from None
    if mv.tags.get("gates.passed") != "true" and not mv.tags.get("promotion.waiver"):
        raise DistillError(f"{name} v{to} did not pass its gates and no approver waived them, so it can never be "
                           "@champion", "roll back to a version whose gates.passed tag is true, or one with a waiver")
    before = aliases(client, name)
    if before.get(CHAMPION) == to:
        return {"changed": False, "champion": to}
    who = by or getpass.getuser()
    with mlflow_run(client, experiment_id=experiment_id(client, tracking), run_name=f"{name}-rollback",
                    tags={"distill.stage": "rollback", "rollback.by": who, "rollback.reason": reason}) as run_id:
        after = {**before, CHAMPION: to}
        approver = {"approver": who, "decision": "rollback", "comment": reason,
                    "at": datetime.now(timezone.utc).isoformat()}
        uri = _record(client, run_id, governance, name=name, mv=mv, action="rollback", approver=approver,
                      before=before, after=after, reason=reason)
        for k, v in {"rollback.by": who, "rollback.reason": reason, "rollback.at": approver["at"],
                     "rollback.from": str(before.get(CHAMPION, "")), "rollback.attestation.uri": uri}.items():
            client.set_model_version_tag(name, str(to), k, v)
        client.set_registered_model_alias(name, CHAMPION, to)
    republish(client, name, to, governance)
    return {"changed": True, "champion": to, "previous": before.get(CHAMPION), "by": who, "attestation_uri": uri}
