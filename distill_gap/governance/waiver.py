"""A named approver's signed waiver of insufficient-evidence gates (issue 19).

A version whose gates did not fail but whose evidence is insufficient is registered and made @challenger only.
@champion then needs a waiver: an in-toto Statement naming the version's digest, the gates waived and why, signed
(DSSE) by the approver's OWN key, whose public key the config lists under approval.approvers. The waiver is
checked before anything moves: the approver is configured with a key, the signature verifies with that key and no
other, the subject is this version's digest, every waived gate is one of the version's insufficient-evidence gates
(a failed gate was never registered and can never be waived; a passed one needs no waiver) and every insufficient
gate is waived. The promote Statement then carries the waiver envelope, and `distill verify` checks it again.
"""

from __future__ import annotations

import base64
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from distill_gap.errors import DistillError
from distill_gap.governance.attestation import statement
from distill_gap.governance.dossier import require_current_review
from distill_gap.signing import PRIVATE_KEY_NAME, SignatureError, _read_public, ensure_key_pair, key_dir, \
    keyid_of, sign_statement, subject_digests, verify_statement

APPROVERS_DIR = "approvers"  # <governance key_dir>/approvers/<name>/: an approver's own key pair


def approver_key_dir(governance, approver: str) -> Path:
    if not approver.strip() or "/" in approver or approver.startswith("."):
        raise DistillError(f"approver name {approver!r} cannot name a key folder", "use a plain name, e.g. alice")
    return key_dir(governance) / APPROVERS_DIR / approver


def create_approver_key(governance, approver: str):
    """The approver's own EC key pair (created on first call); add its public key to approval.approvers."""
    return ensure_key_pair(approver_key_dir(governance, approver))


def approver_public_key(approval_cfg, approver: str) -> str:
    """The configured public key (PEM) of `approver`; a clear error when they are not an approver with a key."""
    for a in approval_cfg.approvers:
        if not isinstance(a, str) and a.name == approver:
            try:
                return _read_public(a.public_key)
            except (OSError, ValueError, DistillError) as err:
                raise DistillError(f"cannot read the public key of approver {approver} ({a.public_key}): {err}",
                                   "fix approval.approvers[].public_key in the config") from None
    names = [a if isinstance(a, str) else a.name for a in approval_cfg.approvers]
    raise DistillError(f"{approver!r} is not an approver with a signing key (approval.approvers: "
                       f"{', '.join(names) or 'none'})",
                       f"create a key with `distill approver-key {approver}` and add {{name: {approver}, public_key: "
                       "<its public.pem>}} to approval.approvers")


def waiver_statement(*, name: str, version: int, digest: str, waived: list[str], reason: str,
                     approver: str) -> dict:
    return statement("waiver", {f"{name}/{version}": digest}, technique="waiver of insufficient-evidence gates",
                     parameters={"waived": list(waived), "reason": reason}, inputs={f"{name}/{version}": digest},
                     approver={"approver": approver, "decision": "waive",
                               "at": datetime.now(timezone.utc).isoformat()})


def sign_waiver(governance, *, approver: str, key_dir_override: str | Path | None = None, **fields) -> dict:
    """Sign a waiver Statement with the approver's own private key (never created here: it must exist)."""
    folder = Path(key_dir_override) if key_dir_override else approver_key_dir(governance, approver)
    if not (folder / PRIVATE_KEY_NAME).is_file():
        raise DistillError(f"no private key for approver {approver} in {folder}",
                           f"create one with `distill approver-key {approver}`, or pass --key-dir")
    return sign_statement(waiver_statement(approver=approver, **fields), ensure_key_pair(folder))


def check_waiver(envelope: dict, approval_cfg, *, name: str, version: int, tags: dict) -> dict:
    """The verified waiver as an approval ({"approver", "decision", "comment", "at", "waived", "waiver"}), or a
    DistillError naming what is wrong; nothing is changed either way."""
    claimed = ((envelope or {}).get("signatures") or [{}])[0].get("keyid")
    try:
        payload = json.loads(base64.b64decode(envelope["payload"]))
        approver = payload["predicate"]["approver"]["approver"]
    except (KeyError, TypeError, ValueError) as err:
        raise DistillError(f"not a waiver envelope ({type(err).__name__}: {err})", "sign it with `distill approve`") \
            from None
    public_key = approver_public_key(approval_cfg, approver)
    try:
        stmt = verify_statement(envelope, [public_key])
    except SignatureError as err:
        raise DistillError(f"the waiver is not signed by {approver}'s configured key (key {claimed}): {err.problem}",
                           f"sign with {approver}'s own key, or fix approval.approvers") from None
    digest = tags.get("model.digest", "")
    if subject_digests(stmt).get(f"{name}/{version}") != digest:
        raise DistillError(f"the waiver names another model than {name} v{version} (digest {digest[:12]})",
                           "sign a waiver for this version")
    waived = list(stmt["predicate"]["parameters"]["waived"])
    insufficient = [g for g in (tags.get("gates.insufficient") or "").split(",") if g]
    if tags.get("gates.outcome") != "insufficient":
        raise DistillError(f"{name} v{version} has gate outcome {tags.get('gates.outcome', 'unknown')!r}: only "
                           "insufficient evidence can be waived (a failed gate never)", "nothing to waive")
    wrong = [g for g in waived if g not in insufficient]
    if wrong:
        raise DistillError(f"{', '.join(wrong)}: not an insufficient-evidence gate of {name} v{version} (those are: "
                           f"{', '.join(insufficient)}); a failed gate can never be waived, a passed one needs no "
                           "waiver", "waive exactly the gates the verdict lists as insufficient")
    missing = [g for g in insufficient if g not in waived]
    if missing:
        raise DistillError(f"the waiver leaves {', '.join(missing)} unwaived", "waive every insufficient gate, or "
                           "gather the rows the verdict asks for")
    reason = stmt["predicate"]["parameters"]["reason"]
    if not str(reason).strip():
        raise DistillError("a waiver needs a reason", "pass --reason '<why the gap is acceptable>'")
    at = stmt["predicate"]["approver"]["at"]
    return {"approver": approver, "decision": "approve", "comment": f"waiver of {', '.join(waived)}: {reason}",
            "at": at, "waived": waived, "waiver": envelope,
            "public_key": public_key}  # in the signed promote Statement


def verify_recorded_waiver(client, mv, *, trusted: list[str], download, tmp: Path) -> list[tuple[str, bool, str]]:
    """`distill verify`'s checks of a waived version: the promote Statement (signed by a trusted key) carries the
    approver's public key and the waiver; the waiver logged at promotion.waiver.uri is that same envelope, signed
    by that approver, over this version's digest, waiving exactly the gates its tags name. [(link, ok, detail)]"""
    tags = mv.tags
    if not tags.get("promotion.waiver.uri"):
        return []
    checks = []
    try:
        logged = json.loads(download(client, tags["promotion.waiver.uri"], tmp / "waiver.d").read_text())
        promote_env = json.loads(download(client, tags["promotion.attestation.uri"], tmp / "promote.d").read_text())
        approver = verify_statement(promote_env, trusted)["predicate"]["approver"] if trusted else None
    except Exception as err:  # noqa: BLE001 - any download or signature problem is a broken link, named
        return [("waiver", False, f"waiver or promote Statement not verifiable: {getattr(err, 'problem', err)}")]
    if approver is None:
        return [("waiver", False, "no trusted key to verify the promote Statement that names the approver's key")]
    if approver.get("waiver") != logged:
        checks.append(("waiver", False, "the waiver at promotion.waiver.uri is not the one in the signed promote "
                                        "Statement"))
        return checks
    try:
        stmt = verify_statement(logged, [approver["public_key"]])
    except (SignatureError, KeyError) as err:
        return [("waiver", False, f"the waiver does not verify with {approver.get('approver')}'s key: "
                                  f"{getattr(err, 'problem', err)}")]
    subject = subject_digests(stmt).get(f"{mv.name}/{mv.version}")
    waived = ",".join(stmt["predicate"]["parameters"]["waived"])
    ok = subject == tags.get("model.digest") and waived == tags.get("promotion.waiver")
    checks.append(("waiver", ok, f"signed by approver {approver.get('approver')} (key {keyid_of(approver['public_key'])[:16]}), "
                                 f"waives {waived}" + ("" if ok else f"; subject or gates differ from the version "
                                                                     f"(digest {str(subject)[:12]}, tags {tags.get('promotion.waiver')})")))
    return checks


def waive_and_promote(client, cfg, *, name: str, version: int, approver: str, waived: list[str], reason: str,
                      key_dir_override: str | Path | None = None, log=print) -> dict:
    """Sign the waiver with the approver's key, check it, record it (an MLflow `waiver` run with the envelope and
    tags on the version), then promote: @champion moves, and the promote Statement carries the waiver."""
    from mlflow.exceptions import MlflowException

    from distill_gap.governance.promotion import promote
    from distill_gap.registry.tracking import experiment_id, mlflow_run

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
