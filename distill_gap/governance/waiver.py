"""A named approver's own signature: on a waiver of insufficient-evidence gates, and on an approval (issue 19).

An approver listed with a public key must sign what they decide: an approval in the Prefect form or by `distill
approve <flow run id>` carries their signed approval Statement (the version's digest, the decision, the comment),
checked before the run goes on and again by `distill verify`; an approver listed by name only is recorded as
unsigned.

A version whose gates did not fail but whose evidence is insufficient is registered and made @challenger only.
@champion then needs a waiver: an in-toto Statement naming the version's digest, the gates waived and why, signed
(DSSE) by the approver's OWN key, whose public key the config lists under approval.approvers. The waiver is
checked before anything moves: the approver is configured with a key, the signature verifies with that key and no
other, the subject is this version's digest, every waived gate is one of the version's insufficient-evidence gates
(a failed gate was never registered and can never be waived; a passed one needs no waiver) and every insufficient
gate is waived. The promote Statement then carries the waiver envelope, and `distill verify` checks it again.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from distill_gap.errors import DistillError
from distill_gap.governance.attestation import statement
from distill_gap.signing import PRIVATE_KEY_NAME, SignatureError, _read_public, ensure_key_pair, key_dir, \
    keyid_of, sign_statement, statement_payload, subject_digests, verify_statement

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


def approval_statement(*, name: str, version: int, digest: str, decision: str, comment: str, approver: str) -> dict:
    return statement("approval", {f"{name}/{version}": digest}, technique="a named approver's decision on @champion",
                     parameters={"decision": decision, "comment": comment}, inputs={f"{name}/{version}": digest},
                     approver={"approver": approver, "decision": decision,
                               "at": datetime.now(timezone.utc).isoformat()})


def _approver_key(governance, approver: str, key_dir_override: str | Path | None):
    folder = Path(key_dir_override) if key_dir_override else approver_key_dir(governance, approver)
    if not (folder / PRIVATE_KEY_NAME).is_file():
        raise DistillError(f"no private key for approver {approver} in {folder}",
                           f"create one with `distill approver-key {approver}`, or pass --key-dir")
    return ensure_key_pair(folder)


def sign_waiver(governance, *, approver: str, key_dir_override: str | Path | None = None, **fields) -> dict:
    """Sign a waiver Statement with the approver's own private key (never created here: it must exist)."""
    return sign_statement(waiver_statement(approver=approver, **fields),
                          _approver_key(governance, approver, key_dir_override))


def sign_approval(governance, *, approver: str, key_dir_override: str | Path | None = None, **fields) -> dict:
    """Sign an approval (or rejection) of a promotion with the approver's own private key."""
    return sign_statement(approval_statement(approver=approver, **fields),
                          _approver_key(governance, approver, key_dir_override))


def has_key(approval_cfg, approver: str) -> bool:
    return any(not isinstance(a, str) and a.name == approver for a in approval_cfg.approvers)


def signed_answer_problem(answer: dict, approval_cfg, *, name: str, version: int, digest: str) -> str | None:
    """Why an answer in the Prefect form (or from `distill approve <flow-run-id>`) of an approver WITH a configured
    key is not acceptable: its `signature` must be their signed approval of this version's digest with the same
    decision and comment. None: acceptable (or the approver has no key: a name-only approver, recorded as such)."""
    who = answer["approver"]
    if not has_key(approval_cfg, who):
        return None
    raw = answer.get("signature") or ""
    if not raw.strip():
        return (f"{who} has a signing key, so the answer must carry their signature: run `distill approve <flow run "
                f"id> --approver {who} --decision {answer.get('decision')}`, or paste the output of `distill approve "
                f"models:/{name}/{version} --approver {who} --decision {answer.get('decision')} --sign-only` into the "
                "form's signature field")
    try:
        envelope = json.loads(raw) if isinstance(raw, str) else raw
        stmt = verify_statement(envelope, [approver_public_key(approval_cfg, who)])
    except (ValueError, SignatureError, DistillError) as err:
        return f"the signature is not {who}'s signed approval: {getattr(err, 'problem', err)}"
    p = stmt["predicate"]
    if subject_digests(stmt).get(f"{name}/{version}") != digest:
        return f"the signature approves another model than {name} v{version} (digest {digest[:12]})"
    if p.get("step") != "approval" or p["parameters"].get("decision") != answer.get("decision") or \
            p["parameters"].get("comment", "") != answer.get("comment", "") or p["approver"]["approver"] != who:
        return "the signed decision, comment or approver differ from the answer"
    return None


def verify_recorded_approval(approver: dict, *, tags: dict, name: str, version: int) -> list[tuple[str, bool, str]]:
    """`distill verify`'s check of a promote Statement's approver: a signed approval verifies with the public key
    the Statement records, over this version's digest; a name-only approval is named as unsigned."""
    if approver is None or "waiver" in approver or approver.get("decision") == "rollback":
        return []
    who = approver.get("approver", "")
    if who.startswith("policy:"):
        return [("approval", True, f"no approver asked ({who})")]
    if not approver.get("signature"):
        return [("approval", True, f"approved by {who} by name only (unsigned: give this approver a key, "
                                   "approval.approvers[].public_key)")]
    try:
        stmt = verify_statement(approver["signature"], [approver["public_key"]])
    except (SignatureError, KeyError) as err:
        return [("approval", False, f"{who}'s signature does not verify: {getattr(err, 'problem', err)}")]
    ok = subject_digests(stmt).get(f"{name}/{version}") == tags.get("model.digest")
    return [("approval", ok, f"signed by approver {who} (key {keyid_of(approver['public_key'])[:16]})"
                             + ("" if ok else "; but over another digest than this version's"))]


def check_waiver(envelope: dict, approval_cfg, *, name: str, version: int, tags: dict) -> dict:
    """The verified waiver as an approval ({"approver", "decision", "comment", "at", "waived", "waiver"}), or a
    DistillError naming what is wrong; nothing is changed either way."""
    claimed = ((envelope or {}).get("signatures") or [{}])[0].get("keyid")
    try:
        payload = statement_payload(envelope)
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
