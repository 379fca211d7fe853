"""`distill lineage` and `distill verify`: an edge model traced to its teacher and data from the records alone.

lineage reads the registry tags (never the aliases, which move): edge -> student -> soft labels -> teacher
version -> data digests, with run ids and links. verify downloads every link afresh, recomputes every digest
and checks every signature (model folders: sigstore model-signing; step Statements: DSSE), naming the broken link.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill_gap.digest import model_digest, sha256_json
from distill_gap.errors import DistillError
from distill_gap.registry.model_uri import parse_model_uri
from distill_gap.registry.versions import resolve_version, version_folder


def _version(client, uri: str):
    """The registry version a `models:/name@alias` or `models:/name/N` URI names."""
    name, alias, version = parse_model_uri(uri)
    return resolve_version(client, name, alias=alias, version=version)


def _name_version(ref: str) -> tuple[str, int]:
    name, _, version = ref.rpartition("/")
    return name, int(version)


def _pipeline_run_id(client, run_id: str | None) -> str | None:
    """The pipeline's parent run of a stage run (the run itself when it has no parent)."""
    if not run_id:
        return None
    return client.get_run(run_id).data.tags.get("mlflow.parentRunId") or run_id


# ---------------------------------------------------------------------------------------------
# lineage


def lineage(client, uri: str, *, mlflow_ui: str = "http://127.0.0.1:5000",
            prefect_ui: str = "http://127.0.0.1:4200") -> dict:
    """The chain of a registered edge (or student) version down to the data digests, from tags and run records."""
    mv = _version(client, uri)
    name, tags = mv.name, mv.tags
    missing = [k for k in ("parent", "teacher.version", "teacher.digest", "data.digest") if k not in tags]
    if missing:
        raise DistillError(f"{name} v{mv.version} has no lineage tags {missing}",
                           "lineage exists for versions registered by `distill run`; pass a <name>-edge or "
                           "<name>-student version")

    def version_link(n, v):
        return f"{mlflow_ui}/#/models/{n}/versions/{v}"

    def run_link(run_id):
        if not run_id:
            return None
        return f"{mlflow_ui}/#/experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}"

    def node(mv, role):
        return {"role": role, "name": mv.name, "version": int(mv.version), "digest": mv.tags.get("model.digest"),
                "run_id": mv.run_id, "link": version_link(mv.name, mv.version), "run_link": run_link(mv.run_id),
                "aliases": list(mv.aliases), "owner": mv.tags.get("owner"), "signed": "signature.uri" in mv.tags}

    chain = [node(mv, "edge" if name.endswith("-edge") else "student")]
    if name.endswith("-edge"):
        chain[0].update(primary=tags.get("edge.primary"), quantized=tags.get("edge.quantized"),
                        candidate=tags.get("quantization.candidate"), gates_passed=tags.get("gates.passed"),
                        promotion={k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")})
        sname, sversion = _name_version(tags["parent"])
        chain.append(node(client.get_model_version(sname, str(sversion)), "student"))
    pipeline_run = _pipeline_run_id(client, mv.run_id)
    prun = client.get_run(pipeline_run) if pipeline_run else None
    chain.append({"role": "soft labels", "uri": tags.get("soft_labels.uri"), "key": tags.get("soft_labels.key")})
    tname, tversion = tags["teacher.name"], int(tags["teacher.version"])
    teacher = client.get_model_version(tname, str(tversion))
    tnode = node(teacher, "teacher")
    tnode.update(license=teacher.tags.get("license"), recorded_digest=tags["teacher.digest"],
                 license_override=tags.get("license.override_reason"))
    try:
        now = {a: int(v) for a, v in client.get_registered_model(tname).aliases.items()}
    except Exception:  # noqa: BLE001 - the alias state is context, not lineage
        now = {}
    tnode["aliases_now"] = now  # where the aliases point today (they may have moved since)
    chain.append(tnode)
    data = {"role": "data", "digest": tags["data.digest"], "splits": {}}
    if prun is not None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(pipeline_run, "lineage/inputs.json", tmp)
                data["splits"] = json.loads(Path(path).read_text())["data"]
            except Exception as err:  # noqa: BLE001 - report, do not hide
                data["problem"] = f"lineage/inputs.json not readable: {err}"
        data["datasets"] = [{"name": d.dataset.name, "sha256": {t.key: t.value for t in d.tags}.get("distill.sha256"),
                             "rows": {t.key: t.value for t in d.tags}.get("rows")}
                            for d in prun.inputs.dataset_inputs] if prun.inputs else []
    chain.append(data)
    return {"uri": uri, "name": name, "version": int(mv.version), "chain": chain,
            "pipeline_run": {"run_id": pipeline_run, "link": run_link(pipeline_run),
                             "trigger_reason": (prun.data.tags.get("trigger.reason") if prun else tags.get("trigger.reason")),
                             "prefect_flow_run": (f"{prefect_ui}/runs/flow-run/{prun.data.tags['prefect.flow_run_id']}"
                                                  if prun and prun.data.tags.get("prefect.flow_run_id") else None)},
            "config_digest": tags.get("config.digest"), "code_version": tags.get("code.version"),
            "attestation_uri": tags.get("attestation.uri")}


# ---------------------------------------------------------------------------------------------
# verify


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


def trusted_keys(public_keys: list[str] | None, key_dir: str | Path | None) -> tuple[list[str], str]:
    """The public keys signatures must come from: --public-key files, else the local key pair's public key."""
    if public_keys:
        pems = []
        for p in public_keys:
            if not Path(p).is_file():
                raise DistillError(f"public key file not found: {p}", "pass the PEM file of the signing public key")
            pems.append(Path(p).read_text())
        return pems, f"--public-key {', '.join(public_keys)}"
    pub = Path(key_dir or os.environ.get("DISTILL_KEY_DIR") or ".distill/keys") / "signing-key.pub.pem"
    if pub.is_file():
        return [pub.read_text()], f"local key {pub}"
    return [], "the keys recorded in the registry (no --public-key and no local key: trust on the registry)"


def _download(client, uri: str, dst: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                    tracking_uri=client._tracking_client.tracking_uri))


def _verify_model(result: Verification, client, mv, trusted: list[str], tmp: Path) -> None:
    """Download the version afresh; recompute its digest; check its folder signature (naming changed files)."""
    from distill_gap.signing import SignatureError, verify_folder

    link = f"{mv.name} v{mv.version}"
    expected = mv.tags.get("model.digest")
    dst = tmp / f"{mv.name}-{mv.version}"
    dst.mkdir()
    try:
        _download(client, mv.source, dst)
    except Exception as err:  # noqa: BLE001 - a missing artifact is a broken link, named
        result.add(link, False, f"files not downloadable from {mv.source}: {err}")
        return
    folder = version_folder(dst, mv.source)
    got = model_digest(folder) if folder.is_dir() else None
    result.add(f"{link} digest", got == expected,
               f"sha256 {str(got)[:16]} {'=' if got == expected else '!='} model.digest tag {str(expected)[:16]}")
    sig_uri = mv.tags.get("signature.uri")
    if not sig_uri:
        result.add(f"{link} signature", False, "not signed (no signature.uri tag)")
        return
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


def _verify_attestations(result: Verification, client, tags: dict, trusted: list[str], tmp: Path,
                         expect: dict[str, str]) -> dict[str, dict]:
    """Every step Statement: signature by a trusted key, and subjects equal to the digests the registry holds."""
    from distill_gap.signing import SignatureError, subject_digests, verify_statement

    uri = tags.get("attestation.uri")
    if not uri:
        result.add("attestations", False, "no attestation.uri tag")
        return {}
    try:
        folder = _download(client, uri, tmp / "attestations.d")
    except Exception as err:  # noqa: BLE001
        result.add("attestations", False, f"not downloadable from {uri}: {err}")
        return {}
    keys = trusted or [tags.get("signing.public_key", "")]
    statements = {}
    for path in sorted(folder.glob("*.dsse.json")):
        step = path.name.removesuffix(".dsse.json")
        try:
            stmt = verify_statement(json.loads(path.read_text()), keys)
        except (SignatureError, ValueError) as err:
            result.add(f"attestation {step}", False, getattr(err, "problem", str(err)))
            continue
        statements[step] = stmt
        subjects = subject_digests(stmt)
        wrong = [f"{n}: statement {subjects[n][:12]} != registry {d[:12]}" for n, d in expect.items()
                 if n in subjects and subjects[n] != d]
        result.add(f"attestation {step}", not wrong, "signature verified" + ("; " + "; ".join(wrong) if wrong else
                                                                             f", subjects {', '.join(subjects)}"))
    for step in ("soft-labels", "distill", "quantize", "evaluate"):
        if step not in statements and not any(c.link == f"attestation {step}" for c in result.checks):
            result.add(f"attestation {step}", False, f"missing from {uri}")
    return statements


def _verify_soft_labels(result: Verification, tags: dict, statements: dict) -> None:
    """The soft-label entry: every shard re-hashed against its manifest; the manifest against its Statement."""
    from distill_gap.softlabels.maintenance import verify_entry
    from distill_gap.softlabels.store import SoftLabelStore

    uri, key = tags.get("soft_labels.uri"), tags.get("soft_labels.key")
    store_uri = uri.rsplit("/", 1)[0]
    try:
        checked = verify_entry(store_uri, key)
        bad = [f"{s['name']}: {s['problem']}" for s in checked["shards"] if not s["ok"]]
        result.add("soft labels shards", checked["ok"], checked.get("problem") or
                   ("; ".join(bad) if bad else f"{len(checked['shards'])} shards match the manifest"))
        manifest = SoftLabelStore(store_uri).manifest(key)
        stmt = statements.get("soft-labels")
        if stmt is not None and manifest is not None:
            from distill_gap.signing import subject_digests

            want = subject_digests(stmt).get(f"soft-labels/{key}")
            got = sha256_json(manifest)
            result.add("soft labels manifest", got == want,
                       f"sha256 {got[:16]} {'=' if got == want else '!='} attested {str(want)[:16]}")
    except DistillError as err:
        result.add("soft labels", False, f"{uri}: {err.problem}")


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


def verify(client, uri: str, *, public_keys: list[str] | None = None, key_dir: str | Path | None = None,
           log: Callable[[str], None] | None = None) -> Verification:
    """Recompute every digest and check every signature of the chain behind a registered version."""
    trusted, source = trusted_keys(public_keys, key_dir)
    mv = _version(client, uri)
    result = Verification(uri=f"{mv.name} v{mv.version}", key_source=source)
    tags = mv.tags
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        # 1. the models: edge, its parent student, the teacher version it was made from (not the alias)
        versions = [mv]
        if mv.name.endswith("-edge") and "parent" in tags:
            sname, sversion = _name_version(tags["parent"])
            versions.append(client.get_model_version(sname, str(sversion)))
        teacher = client.get_model_version(tags["teacher.name"], tags["teacher.version"])
        versions.append(teacher)
        for v in versions:
            if log:
                log(f"checking {v.name} v{v.version}")
            _verify_model(result, client, v, trusted, tmp)
        result.add("teacher digest recorded", teacher.tags.get("model.digest") == tags.get("teacher.digest"),
                   f"{teacher.name} v{teacher.version} model.digest {teacher.tags.get('model.digest', '')[:16]} vs "
                   f"teacher.digest tag {tags.get('teacher.digest', '')[:16]}")
        # 2. the step Statements: signed, and about exactly these digests
        expect = {f"{v.name}": v.tags.get("model.digest", "") for v in versions[:2]}
        statements = _verify_attestations(result, client, tags, trusted, tmp, expect)
        distill = statements.get("distill")
        if distill is not None:
            inputs = {i["name"]: i["digest"]["sha256"] for i in distill["predicate"]["inputs"]}
            t_key = f"{tags['teacher.name']}/{tags['teacher.version']}"
            result.add("distill input teacher", inputs.get(t_key) == tags.get("teacher.digest"),
                       f"attested {str(inputs.get(t_key))[:16]} vs teacher.digest {tags.get('teacher.digest', '')[:16]}")
        # 3. the soft labels in their store
        _verify_soft_labels(result, tags, statements)
        # 4. the data digests recorded by the pipeline run add up to data.digest
        run_id = _pipeline_run_id(client, mv.run_id)
        try:
            splits = json.loads(Path(client.download_artifacts(run_id, "lineage/inputs.json", str(tmp))).read_text())["data"]
            got = sha256_json(splits)
            result.add("data digests", got == tags.get("data.digest"),
                       f"{len(splits)} split digests hash to {got[:16]} vs data.digest {tags.get('data.digest', '')[:16]}")
        except Exception as err:  # noqa: BLE001
            result.add("data digests", False, f"lineage/inputs.json of run {run_id} not readable: {err}")
        # 5. a waived version: the approver's signature on the waiver, as the signed promote Statement names it
        from distill_gap.governance.waiver import verify_recorded_waiver

        keys = trusted or [tags.get("signing.public_key", "")]
        for link, ok, detail in verify_recorded_waiver(client, mv, trusted=keys, download=_download, tmp=tmp):
            result.add(link, ok, detail)
        if tags.get("promotion.attestation.uri") and not tags.get("promotion.waiver.uri"):  # a signed approval
            _verify_approval(result, client, mv, keys, tmp)
        # 6. the published dossier of an edge version: signed, about this digest, saying what the records say
        if mv.name.endswith("-edge"):
            from distill_gap.governance.dossier import check_published

            for link, ok, detail in check_published(client, mv, keys, tmp):
                result.add(link, ok, detail)
    return result
