"""MLflow tracking and registry: runs, model versions with lineage tags, teacher resolution."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import DistillError

# Every student/edge version carries these tags (DESIGN.md, registry); a version is created
# with all of them at once so that none can exist without its lineage.
LINEAGE_TAGS = (
    "teacher.name", "teacher.version", "teacher.digest", "data.digest", "soft_labels.uri",
    "soft_labels.key", "config.digest", "code.version", "parent", "gates.passed", "attestation.uri",
)


def tracking_uri(tracking) -> str:
    """MLFLOW_TRACKING_URI wins over the config; a local sqlite path gets its folder created."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def client_for(tracking):
    """An MlflowClient on the configured store, with the experiment created if missing."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, tracking) -> str:
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not tracking_uri(tracking).startswith(("http://", "https://", "databricks")):
        location = Path(tracking.artifact_location).resolve().as_uri()
    return client.create_experiment(tracking.experiment, artifact_location=location)


def code_version() -> str:
    """The git commit of this checkout (+dirty), else the installed package version."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"distill-gap=={version('distill-gap')}"


def log_model_dir(client, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
    """Upload a model folder as run artifacts; return the artifact URI used as the version source."""
    client.log_artifacts(run_id, str(local_dir), artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def create_version(client, name: str, *, source: str, run_id: str, tags: dict, description: str = ""):
    """Register a model version with all its tags in one call (no version without lineage)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    tags = {k: str(v) for k, v in tags.items()}
    return client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description)


@dataclass
class ModelRef:
    """A registry version resolved to a verified local folder."""

    name: str
    version: int
    digest: str
    path: Path
    run_id: str | None
    alias: str | None = None

    def summary(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def resolve_version(client, name: str, *, alias: str | None = None, version: int | None = None):
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {version}" if version is not None else f"alias '@{alias}'"
        raise DistillError(
            f"registered model '{name}' has no {what} in the MLflow registry at {client._registry_uri}",
            "run `distill teacher bootstrap --config <config>` or `distill teacher import PATH --config <config>` first",
        ) from None


def fetch_model(client, name: str, *, alias: str | None = None, version: int | None = None,
                cache_root: str | Path = ".distill/models") -> ModelRef:
    """Download a registered model folder (cached by digest) and verify it against its digest tag."""
    import mlflow

    from tasks.digest import model_digest

    mv = resolve_version(client, name, alias=alias, version=version)
    expected = mv.tags.get("model.digest")
    if not expected:
        raise DistillError(f"{name} version {mv.version} has no model.digest tag", "re-register it with `distill teacher import`")
    local = Path(cache_root) / expected
    if not (local.is_dir() and model_digest(local) == expected):
        tmp = Path(cache_root) / f".{expected}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=client._tracking_client.tracking_uri)
        inner = tmp / Path(mv.source.rstrip("/")).name
        got = model_digest(inner)
        if got != expected:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DistillError(f"{name} version {mv.version}: downloaded files have digest {got[:12]}, registry says {expected[:12]}",
                               "the stored artifact was changed or damaged; re-register the model")
        shutil.rmtree(local, ignore_errors=True)
        inner.rename(local)
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelRef(name=name, version=int(mv.version), digest=expected, path=local, run_id=mv.run_id, alias=alias)


def _describe_spec(student) -> str:
    spec = getattr(student, "spec", None) or {"kind": "layers", "layers": student.layers}
    return ", ".join(f"{k} {v}" for k, v in spec.items())


# ---------------------------------------------------------------------------------------------
# the pipeline's MLflow run and the register stage


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def start_pipeline_run(client, cfg, *, trigger_reason: str, flow_run_id: str | None) -> str:
    """One MLflow run per pipeline run, with the full config as params and its digest as a tag."""
    import json
    import tempfile

    from mlflow.entities import Param

    run = client.create_run(experiment_id(client, cfg.tracking), run_name=f"{cfg.name}-pipeline", tags={
        "distill.stage": "pipeline", "config.digest": cfg.digest(), "trigger.reason": trigger_reason,
        "code.version": code_version(), "prefect.flow_run_id": str(flow_run_id or ""), "model.name": cfg.name})
    params = [Param(k, str(v)[:6000]) for k, v in _flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        client.log_artifacts(run.info.run_id, tmp, "config")
    return run.info.run_id


def attestation_statement(*, subjects: dict[str, str], predicate_type: str, predicate: dict) -> dict:
    """An in-toto Statement v1 (unsigned here; signing is added by the lineage issue)."""
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in subjects.items()],
        "predicateType": predicate_type,
        "predicate": predicate,
    }


def register_models(client, run_id: str, cfg, *, teacher, data_digest: str, soft, student, edge,
                    report, gates: dict, log=print) -> dict:
    """Register the student and the edge model with their lineage tags; move `champion` only on passed gates."""
    import json
    import tempfile

    from tasks.digest import model_digest

    passed = all(g["passed"] for g in gates.values())
    edge_dir = edge.path
    edge_digest = model_digest(edge_dir)
    # 1. the attestation of this run: what went in, what came out, the evidence
    statement = attestation_statement(
        subjects={f"{cfg.student_model_name}": student.digest, f"{cfg.edge_model_name}": edge_digest},
        predicate_type="https://distill-gap.dev/compression/v1",
        predicate={"teacher": {"name": teacher.name, "version": teacher.version, "digest": teacher.digest},
                   "data": {"digest": data_digest}, "soft_labels": {"uri": soft.uri, "key": soft.key},
                   "config": cfg.model_dump(mode="json"), "config_digest": cfg.digest(), "code_version": code_version(),
                   "results": {"test": report.suites.get("test", {}), "flags": report.flags}, "gates": gates,
                   "quantization": {"primary": edge.primary, "quantized": edge.quantized, "reason": edge.reason,
                                    "errors": edge.errors, "tuning": edge.tuning,
                                    "artifacts": {n: {k: a[k] for k in ("digest", "size_bytes", "parity", "check")}
                                                  for n, a in edge.artifacts.items()}},
                   "approver": None})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "statement.json").write_text(json.dumps(statement, indent=2, default=str))
        client.log_artifacts(run_id, tmp, "attestation")
    attestation_uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/attestation/statement.json"
    lineage = {
        "teacher.name": teacher.name, "teacher.version": teacher.version, "teacher.digest": teacher.digest,
        "data.digest": data_digest, "soft_labels.uri": soft.uri, "soft_labels.key": soft.key,
        "config.digest": cfg.digest(), "code.version": code_version(), "gates.passed": str(passed).lower(),
        "attestation.uri": attestation_uri,
    }
    test = report.suites["test"]
    # 2. student version
    student_src = log_model_dir(client, run_id, student.path, "student")
    sv = create_version(client, cfg.student_model_name, source=student_src, run_id=run_id, description=(
        f"Student of {teacher.name} v{teacher.version} ({_describe_spec(student)}), test accuracy "
        f"{test['student']['accuracy']:.3f} (teacher {test['teacher']['accuracy']:.3f}"
        + (f", hard-label baseline {test['student-hard']['accuracy']:.3f}" if "student-hard" in test else "") + ")"),
        tags={**lineage, "parent": f"{teacher.name}/{teacher.version}", "model.digest": student.digest})
    # 3. edge version, parent = the student version it was quantized from
    edge_src = log_model_dir(client, run_id, edge_dir, "edge")
    edge_name = edge.report_name
    failed_gates = [k for k, g in gates.items() if not g["passed"]]
    kind = f"INT8 edge model ({edge.primary})" if edge.quantized else "Edge model, NOT quantized (fp32 student)"
    ev = create_version(client, cfg.edge_model_name, source=edge_src, run_id=run_id, description=(
        f"{kind} of {cfg.student_model_name} v{sv.version}: test accuracy {test[edge_name]['accuracy']:.3f} "
        f"(student {test['student']['accuracy']:.3f}), {edge.artifacts[edge.primary]['size_bytes'] / 1e6:.1f} MB. "
        f"{edge.reason}. Gates {'passed' if passed else 'FAILED: ' + ', '.join(failed_gates)}."),
        tags={**lineage, "parent": f"{cfg.student_model_name}/{sv.version}", "model.digest": edge_digest,
              "edge.primary": edge.primary, "edge.quantized": str(edge.quantized).lower(),
              "quantization.candidate": (edge.tuning or {}).get("best") or "none"})
    # 4. promotion: only past passed gates
    if passed:
        client.set_registered_model_alias(cfg.edge_model_name, "champion", ev.version)
        log(f"{cfg.edge_model_name} v{ev.version} is now @champion")
    else:
        failed = [k for k, g in gates.items() if not g["passed"]]
        log(f"gates failed ({', '.join(failed)}): {cfg.edge_model_name} v{ev.version} registered, @champion not moved")
    client.set_tag(run_id, "gates.passed", str(passed).lower())
    return {"student": {"name": cfg.student_model_name, "version": int(sv.version)},
            "edge": {"name": cfg.edge_model_name, "version": int(ev.version), "champion": passed},
            "gates_passed": passed, "attestation_uri": attestation_uri}


# ---------------------------------------------------------------------------------------------
# Prefect task


@task(name="register", cache_policy=NO_CACHE)
def register_task(client, run_id: str, cfg, **kwargs) -> dict:
    """Register student and edge versions with lineage tags; promote only when gates passed."""
    from prefect.logging import get_run_logger

    return register_models(client, run_id, cfg, log=get_run_logger().info, **kwargs)
