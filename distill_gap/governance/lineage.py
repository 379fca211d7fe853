"""`distill lineage`: an edge model traced to its teacher and data from the records alone.

lineage reads the registry tags (never the aliases, which move): edge -> student -> soft labels -> teacher
version -> data digests, with run ids and links. `distill verify` (distill_gap/governance/verify.py) checks them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from distill_gap.errors import DistillError
from distill_gap.registry.model_uri import parse_model_uri
from distill_gap.registry.presentation import mlflow_ui_url
from distill_gap.registry.versions import resolve_version


def _version(client, uri: str):
    """The registry version a `models:/name@alias` or `models:/name/N` URI names."""
    name, alias, version = parse_model_uri(uri)
    return resolve_version(client, name, alias=alias, version=version)


def _name_version(ref: str) -> tuple[str, int]:
    name, _, version = ref.rpartition("/")
    return name, int(version)


def _linked(client, ref: str, tag: str, mv):
    """The registry version a lineage tag names; a DistillError naming the broken link when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        name, version = _name_version(ref)
        return client.get_model_version(name, str(version))
    except (ValueError, MlflowException):
        raise DistillError(f"{mv.name} v{mv.version}: its {tag} tag names {ref!r}, which is not in the registry",
                           f"the lineage is broken there; `distill verify models:/{mv.name}/{mv.version}` lists "
                           "every link") from None


def _attested_splits(client, uri: str | None, tmp: Path) -> dict[str, str]:
    """The split digests the evaluate Statement names (its payload read, not verified: `distill verify` does that)."""
    from distill_gap.governance.dossier import download
    from distill_gap.signing import statement_payload

    if not uri:
        return {}
    try:
        stmt = statement_payload(json.loads(download(client, f"{uri.rstrip('/')}/evaluate.dsse.json", tmp).read_text()))
    except Exception:  # noqa: BLE001 - no Statement: the recorded file is all there is
        return {}
    if (stmt.get("predicate") or {}).get("step") != "evaluate":
        return {}
    return {i["name"].removeprefix("data/"): i["digest"]["sha256"] for i in stmt["predicate"].get("inputs", [])
            if i["name"].startswith("data/")}


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
        return mlflow_ui_url(mlflow_ui, f"models/{n}/versions/{v}")

    def run_link(run_id):
        if not run_id:
            return None
        return mlflow_ui_url(mlflow_ui, f"experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}")

    def node(mv, role):
        return {"role": role, "name": mv.name, "version": int(mv.version), "digest": mv.tags.get("model.digest"),
                "run_id": mv.run_id, "link": version_link(mv.name, mv.version), "run_link": run_link(mv.run_id),
                "aliases": list(mv.aliases), "owner": mv.tags.get("owner"), "signed": "signature.uri" in mv.tags}

    chain = [node(mv, "edge" if name.endswith("-edge") else "student")]
    if name.endswith("-edge"):
        chain[0].update(primary=tags.get("edge.primary"), quantized=tags.get("edge.quantized"),
                        candidate=tags.get("quantization.candidate"), gates_passed=tags.get("gates.passed"),
                        gates_outcome=tags.get("gates.outcome") or ("pass" if tags.get("gates.passed") == "true"
                                                                    else "fail"),
                        promotion={k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")})
        chain.append(node(_linked(client, tags["parent"], "parent", mv), "student"))
    pipeline_run = _pipeline_run_id(client, mv.run_id)
    prun = client.get_run(pipeline_run) if pipeline_run else None
    chain.append({"role": "soft labels", "uri": tags.get("soft_labels.uri"), "key": tags.get("soft_labels.key"),
                  **({"extra": {"key": tags["extra.key"], "digest": tags.get("extra.digest"),
                                "rows": int(tags.get("extra.rows") or 0),
                                **({"production": {"uri": tags.get("production.uri"),
                                                   "sha256": tags["production.sha256"]}}
                                   if tags.get("production.sha256") else {})}} if tags.get("extra.key") else {})})
    tname, tversion = tags["teacher.name"], int(tags["teacher.version"])
    teacher = _linked(client, f"{tname}/{tversion}", "teacher.version", mv)
    tnode = node(teacher, "teacher")
    tnode.update(license=teacher.tags.get("license"), recorded_digest=tags["teacher.digest"],
                 license_override=tags.get("license.override_reason"))
    try:
        now = {a: int(v) for a, v in client.get_registered_model(tname).aliases.items()}
    except Exception:  # noqa: BLE001 - the alias state is context, not lineage
        now = {}
    tnode["aliases_now"] = now  # where the aliases point today (they may have moved since)
    if tags.get("replaces.version"):  # the champion this version was made to replace, and the teacher it came from
        tnode["replaces"] = {"version": int(tags["replaces.version"]), "teacher": tags.get("replaces.teacher")}
    chain.append(tnode)
    data = {"role": "data", "digest": tags["data.digest"], "splits": {}}
    if prun is not None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(pipeline_run, "lineage/inputs.json", tmp)
                data["splits"] = json.loads(Path(path).read_text())["data"]
            except Exception as err:  # noqa: BLE001 - report, do not hide
                data["problem"] = f"lineage/inputs.json not readable: {err}"
            attested = _attested_splits(client, tags.get("attestation.uri"), Path(tmp))
        if attested:  # the signed evaluate Statement is the source; the unsigned file and the tag are checked against it
            differ = sorted(k for k in set(attested) | set(data["splits"]) if attested.get(k) != data["splits"].get(k))
            if differ:
                data["problem"] = (f"lineage/inputs.json differs from the signed evaluate Statement for "
                                   f"{', '.join(differ)}: showing the attested digests; run `distill verify`")
            data["splits"] = attested
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
