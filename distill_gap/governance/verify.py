"""`distill verify`: every link behind a registered version downloaded afresh, re-hashed and its signature checked,
and the records checked against each other by content, never by name (issue 20).

- models (edge, its parent student, the teacher version): digest recomputed, model-signing bundle verified;
- step Statements: signature by a trusted key, predicate type and step read from the signed payload (a Statement
  copied over another step's file is BROKEN), every step the lineage requires present exactly once, made by this
  version's pipeline run, and each subject equal to the artifact it claims (edge, student, each quantized artifact
  inside the edge folder, the soft-label manifest, the promoted version);
- lineage facts (data digests, soft-label key, teacher) come from the signed Statements; tags and the unsigned
  lineage/inputs.json are cross-checked against them;
- an alias is trusted only with a signed promote Statement that moved exactly it to exactly this version, and never
  on a version whose gates failed;
- the waiver, the approval and the published dossier (distill_gap.governance.waiver, .dossier).

A missing link (a deleted `parent` tag, a version that does not exist) is a BROKEN row, never skipped, never a
traceback. Trusted keys are the operator's (--public-key files, the local key pair); trusting the key the registry
itself records is an explicit choice (`trust_registry=True`, `--trust-registry-key`), named in the result.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill_gap.digest import model_digest, sha256_json
from distill_gap.errors import DistillError
from distill_gap.governance.dossier import download as _download
from distill_gap.governance.lineage import _name_version, _pipeline_run_id
from distill_gap.registry.model_uri import parse_model_uri
from distill_gap.registry.model_uri import trusted_public_keys as trusted_keys  # one trust rule for verify and predict
from distill_gap.registry.versions import resolve_version, version_folder

REQUIRED_STEPS = ("soft-labels", "distill", "quantize", "evaluate")  # every pipeline-made version has these


@dataclass
class Check:
    link: str
    ok: bool
    detail: str


@dataclass
class Verification:
    uri: str
    checks: list[Check] = field(default_factory=list)
    key_source: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, link: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(link, ok, detail))


def _get_version(result: Verification, client, ref: str, link: str):
    """A registry version named by a tag ("name/version"), or None and a BROKEN row naming the missing link."""
    from mlflow.exceptions import MlflowException

    try:
        name, version = _name_version(ref)
        return client.get_model_version(name, str(version))
    except (ValueError, MlflowException) as err:
        result.add(link, False, f"{ref!r} names no registry version ({getattr(err, 'message', err)})")
        return None


def _verify_model(result: Verification, client, mv, trusted: list[str], tmp: Path) -> Path | None:
    """Download the version afresh; recompute its digest; check its folder signature (naming changed files).
    Returns the downloaded folder."""
    from distill_gap.signing import SignatureError, verify_folder

    link = f"{mv.name} v{mv.version}"
    expected = mv.tags.get("model.digest")
    dst = tmp / f"{mv.name}-{mv.version}"
    dst.mkdir()
    try:
        _download(client, mv.source, dst)
    except Exception as err:  # noqa: BLE001 - a missing artifact is a broken link, named
        result.add(link, False, f"files not downloadable from {mv.source}: {err}")
        return None
    folder = version_folder(dst, mv.source)
    got = model_digest(folder) if folder.is_dir() else None
    result.add(f"{link} digest", got == expected,
               f"sha256 {str(got)[:16]} {'=' if got == expected else '!='} model.digest tag {str(expected)[:16]}")
    sig_uri = mv.tags.get("signature.uri")
    if not sig_uri:
        result.add(f"{link} signature", False, "not signed (no signature.uri tag)")
        return folder
    keys = trusted or [mv.tags.get("signing.public_key", "")]
    try:
        sig = _download(client, sig_uri, tmp / f"{mv.name}-{mv.version}.sig.d")
        problems = []
        for pem in keys:
            try:
                verify_folder(folder, pem, sig)
                problems = []
                break
            except SignatureError as err:
                problems.append(err.problem)
        result.add(f"{link} signature", not problems,
                   "model-signing bundle verified: every file matches" if not problems else "; ".join(problems))
    except Exception as err:  # noqa: BLE001
        result.add(f"{link} signature", False, f"signature bundle not readable at {sig_uri}: {err}")
    return folder


def _verify_attestations(result: Verification, client, mv, keys: list[str], tmp: Path, expect: dict[str, str],
                         pipeline_run: str | None, edge_folder: Path | None) -> dict[str, dict]:
    """Every step Statement, by content: signed by a trusted key, of the step its payload names (in the file of
    that name), each required step once, made by this version's pipeline run, subjects equal to what they claim."""
    from distill_gap.governance.attestation import PREDICATE_TYPE
    from distill_gap.signing import SignatureError, subject_digests, verify_statement

    uri = mv.tags.get("attestation.uri")
    if not uri:
        result.add("attestations", False, "no attestation.uri tag")
        return {}
    try:
        folder = _download(client, uri, tmp / "attestations.d")
    except Exception as err:  # noqa: BLE001
        result.add("attestations", False, f"not downloadable from {uri}: {err}")
        return {}
    artifacts = _edge_artifacts(edge_folder)
    statements: dict[str, dict] = {}
    for path in sorted(folder.glob("*.dsse.json")):
        try:
            stmt = verify_statement(json.loads(path.read_text()), keys)
        except (SignatureError, ValueError) as err:
            result.add(f"attestation {path.name.removesuffix('.dsse.json')}", False, getattr(err, "problem", str(err)))
            continue
        pred = stmt.get("predicate") or {}
        step, link = pred.get("step"), f"attestation {path.name.removesuffix('.dsse.json')}"
        if stmt.get("predicateType") != PREDICATE_TYPE:
            result.add(link, False, f"{path.name} is not a step Statement (predicate type {stmt.get('predicateType')})")
            continue
        if path.name != f"{step}.dsse.json":
            result.add(link, False, f"{path.name} holds the signed Statement of step {step!r}: copied or renamed")
            continue
        made_by = (pred.get("produced_by") or {}).get("mlflow_run_id")
        problems = []
        if step != "promote" and pipeline_run and made_by and made_by != pipeline_run:
            problems.append(f"made by run {made_by}, not by this version's pipeline run {pipeline_run}")
        subjects = subject_digests(stmt)
        claims = {**expect, **{f"edge/{n}": d for n, d in artifacts.items()}}
        if step == "promote":
            claims = {f"{mv.name}/{mv.version}": mv.tags.get("model.digest", "")}
            if f"{mv.name}/{mv.version}" not in subjects:
                problems.append(f"it promotes {', '.join(subjects)}, not {mv.name}/{mv.version}")
        problems += [f"{n}: statement {subjects[n][:12]} != {d[:12]}" for n, d in claims.items()
                     if n in subjects and subjects[n] != d]
        statements[step] = stmt
        result.add(link, not problems, "; ".join(problems) if problems else
                   f"signature verified, subjects {', '.join(subjects)}")
    required = [*REQUIRED_STEPS, *(["export"] if "onnx" in artifacts else [])]
    for step in required:
        if step not in statements and not any(c.link == f"attestation {step}" for c in result.checks):
            result.add(f"attestation {step}", False, f"missing from {uri}")
    return statements


def _edge_artifacts(edge_folder: Path | None) -> dict[str, str]:
    """Each artifact of a downloaded edge folder -> its digest recomputed from its files (what quantize attests)."""
    if edge_folder is None or not (edge_folder / "edge.json").is_file():
        return {}
    try:
        arts = json.loads((edge_folder / "edge.json").read_text()).get("artifacts") or {}
        return {n: model_digest(edge_folder / a["path"]) for n, a in arts.items()
                if isinstance(a, dict) and (edge_folder / str(a.get("path", ""))).is_dir()}
    except (ValueError, OSError, FileNotFoundError):
        return {}


def _verify_lineage_facts(result: Verification, client, mv, statements: dict, tmp: Path,
                          pipeline_run: str | None) -> None:
    """Data digests, soft-label key and teacher as the signed Statements attest them; the tags and the unsigned
    lineage/inputs.json must agree."""
    tags = mv.tags
    signed_data = {}
    for step in ("distill", "evaluate"):
        for i in (statements.get(step) or {}).get("predicate", {}).get("inputs", []):
            if i["name"].startswith("data/"):
                signed_data[i["name"].removeprefix("data/")] = i["digest"]["sha256"]
    if "evaluate" in statements:
        got = sha256_json(signed_data)
        result.add("data digests", got == tags.get("data.digest"),
                   f"{len(signed_data)} split digests attested by the evaluate Statement hash to {got[:16]} vs "
                   f"data.digest tag {tags.get('data.digest', '')[:16]}")
    try:
        recorded = json.loads(Path(client.download_artifacts(pipeline_run, "lineage/inputs.json",
                                                             str(tmp))).read_text())["data"]
        if signed_data:
            differ = sorted(k for k in set(recorded) | set(signed_data) if recorded.get(k) != signed_data.get(k))
            result.add("lineage/inputs.json", not differ, "agrees with the signed Statements" if not differ else
                       f"differs from the signed Statements for {', '.join(differ)}")
    except Exception as err:  # noqa: BLE001
        result.add("lineage/inputs.json", False, f"not readable from run {pipeline_run}: {err}")
    soft = statements.get("soft-labels")
    if soft is not None:
        keys = [s["name"].removeprefix("soft-labels/") for s in soft.get("subject", [])]
        result.add("soft-label key", tags.get("soft_labels.key") in keys,
                   f"attested {', '.join(k[:16] for k in keys)} vs soft_labels.key tag {tags.get('soft_labels.key', '')[:16]}")
    distill = statements.get("distill")
    if distill is not None:
        inputs = {i["name"]: i["digest"]["sha256"] for i in distill["predicate"]["inputs"]}
        t_key = f"{tags.get('teacher.name')}/{tags.get('teacher.version')}"
        result.add("distill input teacher", inputs.get(t_key) == tags.get("teacher.digest"),
                   f"attested {t_key}: {str(inputs.get(t_key))[:16]} vs teacher.digest {tags.get('teacher.digest', '')[:16]}")


def _verify_soft_labels(result: Verification, tags: dict, statements: dict) -> None:
    """The soft-label entries: the training split's (the soft_labels.key tag) and every other entry the signed
    soft-labels Statement names (the extra rows: distill.augment's, redistill's): every shard re-hashed against its manifest, the manifest
    against its Statement."""
    from distill_gap.signing import subject_digests

    uri, key = tags.get("soft_labels.uri"), tags.get("soft_labels.key")
    if not uri or not key:
        result.add("soft labels", False, "no soft_labels.uri / soft_labels.key tag")
        return
    store_uri = uri.rsplit("/", 1)[0]
    stmt = statements.get("soft-labels")
    attested = {n.removeprefix("soft-labels/"): d for n, d in (subject_digests(stmt) if stmt else {}).items()
                if n.startswith("soft-labels/")}
    _verify_entry(result, "soft labels", store_uri, key, attested.get(key), stmt is not None)
    for other in sorted(set(attested) - {key}):
        _verify_entry(result, "extra soft labels", store_uri, other, attested[other], True)


def _verify_entry(result: Verification, what: str, store_uri: str, key: str, want: str | None, attested: bool) -> None:
    from distill_gap.softlabels.maintenance import verify_entry
    from distill_gap.softlabels.store import SoftLabelStore

    try:
        checked = verify_entry(store_uri, key)
        bad = [f"{s['name']}: {s['problem']}" for s in checked["shards"] if not s["ok"]]
        result.add(f"{what} shards", checked["ok"], checked.get("problem") or
                   ("; ".join(bad) if bad else f"{len(checked['shards'])} shards match the manifest"))
        manifest = SoftLabelStore(store_uri).manifest(key)
        if attested and manifest is not None:
            got = sha256_json(manifest)
            result.add(f"{what} manifest", got == want,
                       f"sha256 {got[:16]} {'=' if got == want else '!='} attested {str(want)[:16]}")
    except DistillError as err:
        result.add(what, False, f"{store_uri}/{key}: {err.problem}")


def alias_check(client, mv, alias: str, keys: list[str], tmp: Path) -> tuple[bool, str]:
    """(trusted, why) for `alias` on version `mv`: trusted only with the signed promote Statement that moved exactly
    it to exactly this version, and never on a version whose gates failed (a champion also needs them passed, or
    waived). Used by verify and by `distill predict` before it serves an alias."""
    from distill_gap.signing import SignatureError, subject_digests, verify_statement

    tags = mv.tags
    outcome = tags.get("gates.outcome") or ("pass" if tags.get("gates.passed") == "true" else "fail")
    if outcome == "fail":
        return False, (f"{mv.name} v{mv.version} is @{alias} although its gates failed: the alias was moved by hand "
                       "(MLflow UI or client)")
    if alias == "champion" and outcome != "pass" and not tags.get("promotion.waiver"):
        return False, (f"{mv.name} v{mv.version} is @champion with insufficient evidence and no waiver: the alias was "
                       "moved by hand (MLflow UI or client)")
    records = ("promotion.attestation.uri", "rollback.attestation.uri", f"{alias}.attestation.uri")
    for n, uri in enumerate(dict.fromkeys(tags[k] for k in records if tags.get(k))):
        try:
            stmt = verify_statement(json.loads(_download(client, uri, tmp / f"alias-{n}.d").read_text()), keys)
        except (SignatureError, ValueError, OSError):
            continue  # unsigned or by another key: not evidence
        except Exception:  # noqa: BLE001 - not downloadable: try the next record
            continue
        after = (stmt["predicate"].get("results") or {}).get("aliases_after") or {}
        if subject_digests(stmt).get(f"{mv.name}/{mv.version}") == tags.get("model.digest") and \
                str(after.get(alias)) == str(mv.version):
            return True, (f"moved to v{mv.version} by a signed promote Statement "
                          f"({stmt['predicate']['parameters'].get('action')})")
    return False, (f"no signed promote Statement moved @{alias} to {mv.name} v{mv.version}: the alias was moved by "
                   "hand (MLflow UI or client); promote with `distill promote` or roll back")


def verify(client, uri: str, *, public_keys: list[str] | None = None, key_dir: str | Path | None = None,
           trust_registry: bool = False, log: Callable[[str], None] | None = None) -> Verification:
    """Recompute every digest and check every signature of the chain behind a registered version."""
    trusted, source = trusted_keys(public_keys, key_dir, trust_registry)
    name, alias, version = parse_model_uri(uri)
    mv = resolve_version(client, name, alias=alias, version=version)
    result = Verification(uri=f"{mv.name} v{mv.version}", key_source=source)
    tags = mv.tags
    keys = trusted or [tags.get("signing.public_key", "")]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if alias:
            result.add(f"@{alias}", *alias_check(client, mv, alias, keys, tmp))
        # 1. the models: edge, its parent student, the teacher version it was made from (not the alias)
        versions, edge_folder = [mv], None
        if mv.name.endswith("-edge") and not tags.get("parent"):
            result.add("parent (the student)", False, "no parent tag: the student's checks cannot run")
        elif mv.name.endswith("-edge"):
            student = _get_version(result, client, tags["parent"], "parent (the student)")
            versions += [student] if student is not None else []
        teacher = _get_version(result, client, f"{tags.get('teacher.name')}/{tags.get('teacher.version')}",
                               "teacher version")
        for v in versions + ([teacher] if teacher is not None else []):
            if log:
                log(f"checking {v.name} v{v.version}")
            folder = _verify_model(result, client, v, trusted, tmp)
            edge_folder = folder if v is mv and mv.name.endswith("-edge") else edge_folder
        if teacher is not None:
            result.add("teacher digest recorded", teacher.tags.get("model.digest") == tags.get("teacher.digest"),
                       f"{teacher.name} v{teacher.version} model.digest {teacher.tags.get('model.digest', '')[:16]} vs "
                       f"teacher.digest tag {tags.get('teacher.digest', '')[:16]}")
        # 2. the step Statements, by content; 3. the lineage facts they attest
        pipeline_run = _pipeline_run_id(client, mv.run_id)
        expect = {v.name: v.tags.get("model.digest", "") for v in versions}
        statements = _verify_attestations(result, client, mv, keys, tmp, expect, pipeline_run, edge_folder)
        _verify_lineage_facts(result, client, mv, statements, tmp, pipeline_run)
        _verify_soft_labels(result, tags, statements)
        # 4. a waived version: the approver's signature on the waiver; an approved one: the approver's signature
        from distill_gap.governance.waiver import verify_recorded_waiver

        for link, ok, detail in verify_recorded_waiver(client, mv, trusted=keys, download=_download, tmp=tmp):
            result.add(link, ok, detail)
        if tags.get("promotion.attestation.uri") and not tags.get("promotion.waiver.uri"):
            _verify_approval(result, client, mv, keys, tmp)
        # 5. the published dossier of an edge version: signed, about this digest, saying what the records say
        if mv.name.endswith("-edge"):
            from distill_gap.governance.dossier import check_published

            for link, ok, detail in check_published(client, mv, keys, tmp, edge_folder=edge_folder):
                result.add(link, ok, detail)
    return result


def _verify_approval(result: Verification, client, mv, keys: list[str], tmp: Path) -> None:
    """The approver named by the signed promote Statement: their own signature over this digest, when they have a
    key (a name-only approval is reported as unsigned)."""
    from distill_gap.governance.waiver import verify_recorded_approval
    from distill_gap.signing import SignatureError, verify_statement

    uri = mv.tags["promotion.attestation.uri"]
    try:
        stmt = verify_statement(json.loads(_download(client, uri, tmp / "promote-approval.d").read_text()), keys)
    except (SignatureError, ValueError) as err:
        result.add("approval", False, f"the promote Statement at {uri} does not verify: {getattr(err, 'problem', err)}")
        return
    except Exception as err:  # noqa: BLE001 - not downloadable: a broken link, named
        result.add("approval", False, f"the promote Statement is not downloadable from {uri}: {err}")
        return
    for link, ok, detail in verify_recorded_approval(stmt["predicate"].get("approver"), tags=mv.tags, name=mv.name,
                                                     version=int(mv.version)):
        result.add(link, ok, detail)
