"""MLflow tracking and registry: runs, model versions with lineage tags, teacher resolution."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from distill_gap.errors import DistillError
from distill_gap.evaluation.gates import GatesFailed

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
    use_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def use_store(uri: str) -> None:
    """Point MLflow's global tracking and registry URIs at `uri` (models:/ and runs:/ URIs resolve there).

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would then override every later config in this
    process (a worker running several configs, a test session): the variables stay as the user set them.
    """
    import mlflow

    user_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in user_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


def ownership_tags(governance) -> dict:
    """`owner` and the review cadence: on every registered model; versions also get their review.due date."""
    from datetime import date, timedelta

    return {"owner": governance.owner, "review.cadence_days": str(governance.review_days),
            "review.due": (date.today() + timedelta(days=governance.review_days)).isoformat()}


def create_version(client, name: str, *, source: str, run_id: str, tags: dict, governance, description: str = "",
                   model_id: str | None = None, staged: "Staged | None" = None):
    """Register a model version with all its tags in one call (no version without lineage or owner)."""
    from mlflow.exceptions import MlflowException

    owner = ownership_tags(governance)
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, tags={k: owner[k] for k in ("owner", "review.cadence_days")})
            if staged is not None:
                staged.models.append(name)
        except MlflowException as exc:  # a concurrent run created it between the two calls: use theirs
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    tags = {k: str(v) for k, v in {**owner, **tags}.items()}
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description,
                                     model_id=model_id)
    if staged is not None:
        staged.versions.append((name, str(mv.version)))
    return mv


@dataclass
class Staged:
    """What the register step wrote, so that a failure or a transaction rollback removes all of it."""

    versions: list[tuple[str, str]] = field(default_factory=list)   # (registered model, version)
    models: list[str] = field(default_factory=list)                 # registered models this step created
    logged_models: list[str] = field(default_factory=list)          # MLflow logged-model ids
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (run id, artifact path)

    def describe(self) -> str:
        return ", ".join(f"{n} v{v}" for n, v in self.versions) or "nothing"


def unstage(client, staged: Staged, log=print) -> list[str]:
    """Delete what `staged` records, newest first; each step tolerates what is already gone. Returns what went."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    removed = []

    def attempt(what: str, fn, *args):
        try:
            fn(*args)
            removed.append(what)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
                log(f"rollback: could not remove {what}: {exc.message}")
        except OSError as exc:
            log(f"rollback: could not remove {what}: {exc}")

    for name, version in reversed(staged.versions):
        attempt(f"{name} v{version}", client.delete_model_version, name, version)
    for name in staged.models:
        if not client.search_model_versions(f"name='{name}'"):
            attempt(f"registered model {name}", client.delete_registered_model, name)
    for model_id in staged.logged_models:
        try:
            location = client.get_logged_model(model_id).artifact_location
            attempt(f"logged model {model_id} files", get_artifact_repository(location).delete_artifacts)
        except MlflowException:
            pass
        attempt(f"logged model {model_id}", client.delete_logged_model, model_id)
    for run_id, path in staged.artifacts:
        root = client.get_run(run_id).info.artifact_uri
        attempt(f"{path} of run {run_id}", get_artifact_repository(root).delete_artifacts, path)
    return removed


def sign_and_log(client, run_id: str, folder: Path, role: str, governance, staged: Staged | None = None) -> dict:
    """Sign a model folder (sigstore model-signing, local key) and log the bundle; return its registry tags."""
    import tempfile

    from distill_gap.governance.attestation import signing_key
    from distill_gap.governance.signing import sign_folder

    key = signing_key(governance)
    with tempfile.TemporaryDirectory() as tmp:
        sign_folder(folder, key, Path(tmp) / f"{role}.sig")
        client.log_artifacts(run_id, tmp, "signatures")
    if staged is not None:
        staged.artifacts.append((run_id, f"signatures/{role}.sig"))
    return {"signature.uri": f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/signatures/{role}.sig",
            "signing.keyid": key.keyid, "signing.public_key": key.public_pem}


def check_teacher_license(teacher, governance) -> str | None:
    """Refuse a teacher whose licence is not allowed, unless an override reason is recorded (returned)."""
    license = (teacher.tags.get("license") or "").strip()
    allowed = {a.lower() for a in governance.allowed_licenses}
    if license.lower() in allowed:
        return None
    if governance.license_override_reason:
        return governance.license_override_reason
    what = f"licence '{license}'" if license else "no licence tag"
    raise DistillError(
        f"teacher {teacher.name} v{teacher.version} has {what}, which is not in governance.allowed_licenses "
        f"{sorted(allowed)}",
        "distill a teacher with an allowed licence, add this licence to governance.allowed_licenses after review, "
        "or set governance.license_override_reason='<why>' (recorded on the run, the versions and the attestation)")


@contextlib.contextmanager
def stage_run(client, parent_run_id: str, stage: str):
    """A nested MLflow run for one pipeline stage; FAILED when the stage raises, never left RUNNING."""
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name.removesuffix('-pipeline')}-{stage}",
                            tags={"mlflow.parentRunId": parent_run_id, "distill.stage": stage,
                                  **{k: parent.data.tags[k] for k in ("config.digest", "trigger.reason", "model.name")
                                     if k in parent.data.tags}})
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


@dataclass
class ModelRef:
    """A registry version resolved to a verified local folder."""

    name: str
    version: int
    digest: str
    path: Path
    run_id: str | None
    alias: str | None = None
    tags: dict = field(default_factory=dict)

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


def version_folder(downloaded: Path, source: str) -> Path:
    """The model folder inside a downloaded version source: an MLflow pyfunc model (the folder is its `model`
    artifact, distill_gap.registry.pyfunc) or a plain artifact folder (named by the source's last component)."""
    import yaml

    mlmodel = downloaded / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        path = (flavor.get("artifacts") or {}).get("model", {}).get("path")
        if path:
            return downloaded / path
    return downloaded / Path(source.rstrip("/")).name


def fetch_model(client, name: str, *, alias: str | None = None, version: int | None = None,
                cache_root: str | Path = ".distill/models") -> ModelRef:
    """Download a registered model folder (cached by digest) and verify it against its digest tag."""
    import mlflow

    from distill_gap.digest import model_digest

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
        inner = version_folder(tmp, mv.source)
        got = model_digest(inner)
        if got != expected:
            detail = signature_problem(client, mv, inner)  # which files changed, from the folder's signature
            shutil.rmtree(tmp, ignore_errors=True)
            raise DistillError(f"{name} version {mv.version}: downloaded files have digest {got[:12]}, registry says "
                               f"{expected[:12]}" + (f"; {detail}" if detail else ""),
                               "the stored artifact was changed or damaged; re-register the model")
        shutil.rmtree(local, ignore_errors=True)
        inner.rename(local)
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelRef(name=name, version=int(mv.version), digest=expected, path=local, run_id=mv.run_id, alias=alias,
                    tags=dict(mv.tags))


def signature_problem(client, mv, folder: Path) -> str | None:
    """Why a downloaded version folder fails its signature ('<file>: digest differs ...'), else None.

    None also when the version is unsigned or its signature cannot be read: this only explains a refusal that
    the whole-folder digest has already made.
    """
    import tempfile

    import mlflow

    from distill_gap.governance.signing import SignatureError, verify_folder

    sig_uri, public_pem = mv.tags.get("signature.uri"), mv.tags.get("signing.public_key")
    if not (sig_uri and public_pem):
        return None
    with tempfile.TemporaryDirectory(prefix="distill-check-") as tmp:
        try:
            sig = mlflow.artifacts.download_artifacts(artifact_uri=sig_uri, dst_path=tmp,
                                                      tracking_uri=client._tracking_client.tracking_uri)
            verify_folder(folder, public_pem, sig)
        except SignatureError as err:  # names each changed, missing or extra file; the temporary paths are not news
            return err.problem.replace(str(folder), f"the stored folder {mv.source}").replace(str(sig), sig_uri)
        except Exception:  # noqa: BLE001 - a diagnosis that fails leaves the refusal as it was
            return None
    return None


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

    from distill_gap.ops.crash_recovery import process_tags

    run = client.create_run(experiment_id(client, cfg.tracking), run_name=f"{cfg.name}-pipeline", tags={
        "distill.stage": "pipeline", "config.digest": cfg.digest(), "trigger.reason": trigger_reason,
        "code.version": code_version(), "prefect.flow_run_id": str(flow_run_id or ""), "model.name": cfg.name,
        **process_tags()})
    params = [Param(k, str(v)[:6000]) for k, v in _flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        client.log_artifacts(run.info.run_id, tmp, "config")
    return run.info.run_id


def gap_summary(report, gates: dict, edge_name: str) -> str:
    """Two lines for a version description: the gap against the teacher and the verdict."""
    test = report.suites["test"]
    edge_acc, teacher_acc = test[edge_name]["accuracy"], test["teacher"]["accuracy"]
    worst = [f"{s.removeprefix('slice:')} {g * 100:+.1f} pts" for s, g in report.worst_slices(edge_name) if g < 0]
    failed = [k for k, g in gates.items() if not g["passed"]]
    return (f"Gap vs the teacher: test accuracy {edge_acc:.3f} vs {teacher_acc:.3f} "
            f"(retention {edge_acc / max(teacher_acc, 1e-9):.3f})"
            + (f"; largest slice losses: {', '.join(worst)}" if worst else "") + ". "
            + ("Verdict: all gates passed." if not failed else f"Verdict: gates FAILED: {', '.join(failed)}."))


def register_models(client, run_id: str, cfg, *, teacher, data_digest: str, soft, student, edge, report, gates: dict,
                    example_texts: list[str], attestation_uri: str, trigger_reason: str = "manual",
                    license_override: str | None = None, staged: Staged | None = None, log=print) -> dict:
    """Register the student and the edge model, signed and logged as MLflow models, with every lineage tag.

    No alias moves here: promotion (challenger, approval, champion) is tasks.promote's step. Everything written
    is recorded in `staged`; when this raises (an exception, SIGTERM), what it wrote is removed before re-raising.
    """
    staged = staged if staged is not None else Staged()
    try:
        return _register(client, run_id, cfg, teacher=teacher, data_digest=data_digest, soft=soft, student=student,
                         edge=edge, report=report, gates=gates, example_texts=example_texts,
                         attestation_uri=attestation_uri, trigger_reason=trigger_reason,
                         license_override=license_override, staged=staged, log=log)
    except BaseException:
        removed = unstage(client, staged, log)
        log(f"registration interrupted; removed what it had written: {', '.join(removed) or 'nothing'}")
        raise


def _register(client, run_id: str, cfg, *, teacher, data_digest: str, soft, student, edge, report, gates: dict,
              example_texts: list[str], attestation_uri: str, trigger_reason: str, license_override: str | None,
              staged: Staged, log) -> dict:
    from distill_gap.ops.failpoints import failpoint
    from distill_gap.digest import model_digest
    from distill_gap.registry.pyfunc import link_version, log_model_folder

    passed = all(g["passed"] for g in gates.values())
    edge_digest = model_digest(edge.path)
    lineage = {
        "teacher.name": teacher.name, "teacher.version": teacher.version, "teacher.digest": teacher.digest,
        "teacher.license": teacher.tags.get("license", ""),
        "data.digest": data_digest, "soft_labels.uri": soft.uri, "soft_labels.key": soft.key,
        "config.digest": cfg.digest(), "code.version": code_version(), "gates.passed": str(passed).lower(),
        "attestation.uri": attestation_uri, "trigger.reason": trigger_reason,
        **({"license.override_reason": license_override} if license_override else {}),
    }
    test = report.suites["test"]
    labels = list(cfg.data.labels)
    summary = gap_summary(report, gates, edge.report_name)
    # 1. student version: signed, logged as an MLflow model (signature + input example), all tags at once
    signed = sign_and_log(client, run_id, student.path, "student", cfg.governance, staged)
    logged = log_model_folder(client, run_id, student.path, "student", example_texts=example_texts, labels=labels)
    staged.logged_models.append(logged.model_id)
    sv = create_version(client, cfg.student_model_name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id,
                        governance=cfg.governance, staged=staged, description=(
        f"Student of {teacher.name} v{teacher.version} ({_describe_spec(student)}), test accuracy "
        f"{test['student']['accuracy']:.3f} (teacher {test['teacher']['accuracy']:.3f}"
        + (f", hard-label baseline {test['student-hard']['accuracy']:.3f}" if "student-hard" in test else "") + ")."),
        tags={**lineage, **signed, "parent": f"{teacher.name}/{teacher.version}", "model.digest": student.digest})
    link_version(client, logged, cfg.student_model_name, sv.version)
    failpoint("register.student-registered")
    # 2. edge version, parent = the student version it was quantized from
    signed = sign_and_log(client, run_id, edge.path, "edge", cfg.governance, staged)
    logged = log_model_folder(client, run_id, edge.path, "edge", example_texts=example_texts, labels=labels)
    staged.logged_models.append(logged.model_id)
    kind = f"INT8 edge model ({edge.primary})" if edge.quantized else "Edge model, NOT quantized (fp32 student)"
    ev = create_version(client, cfg.edge_model_name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id,
                        governance=cfg.governance, staged=staged, description=(
        f"{kind} of {cfg.student_model_name} v{sv.version}, {edge.artifacts[edge.primary]['size_bytes'] / 1e6:.1f} MB "
        f"(student {test['student']['accuracy']:.3f}). {summary} {edge.reason}."),
        tags={**lineage, **signed, "parent": f"{cfg.student_model_name}/{sv.version}", "model.digest": edge_digest,
              "edge.primary": edge.primary, "edge.quantized": str(edge.quantized).lower(),
              "quantization.candidate": (edge.tuning or {}).get("best") or "none"})
    link_version(client, logged, cfg.edge_model_name, ev.version)
    log(f"registered {cfg.student_model_name} v{sv.version} and {cfg.edge_model_name} v{ev.version}: {summary}")
    return {"student": {"name": cfg.student_model_name, "version": int(sv.version)},
            "edge": {"name": cfg.edge_model_name, "version": int(ev.version), "digest": edge_digest},
            "gates_passed": passed, "attestation_uri": attestation_uri}


# ---------------------------------------------------------------------------------------------
# Prefect task


@task(name="attest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def attest_task(client, run_id: str, governance, statement: dict | None) -> str | None:
    """Sign one step's in-toto Statement and log it to the pipeline run (attestations/<step>.dsse.json)."""
    from distill_gap.governance.attestation import record

    return None if statement is None else record(client, run_id, governance, statement)


@task(name="register", cache_policy=NO_CACHE)
def register_task(client, run_id: str, cfg, **kwargs) -> dict:
    """Register the signed student and edge versions with their lineage tags (no alias moves).

    Inside the pipeline's release transaction: what it staged is removed again (`unregister`) when a later gate
    fails.
    """
    from prefect.logging import get_run_logger
    from prefect.transactions import get_transaction

    staged = Staged()
    out = register_models(client, run_id, cfg, log=get_run_logger().info, staged=staged, **kwargs)
    txn = get_transaction()
    if txn is not None:
        txn.set("staged", staged)
        txn.set("client", client)
    return out


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


def release_check(client, cfg, registered: dict, gates: dict, *, run_id: str, cache_root: str | Path, log=print) -> dict:
    """The last gate, after registration staged the versions: every quality gate passed, and the edge version
    as stored in the registry has the digest that was evaluated. Raises GatesFailed otherwise."""
    from distill_gap.monitoring.watches import GATES_FAILED, emit

    edge = registered["edge"]
    failed = {k: g for k, g in gates.items() if not g["passed"]}
    try:
        ref = fetch_model(client, edge["name"], version=edge["version"], cache_root=cache_root)
        if ref.digest != edge["digest"]:
            raise DistillError(f"{edge['name']} v{edge['version']} carries digest {ref.digest[:12]}, but "
                               f"{edge['digest'][:12]} was evaluated", "re-run the pipeline")
    except DistillError as exc:
        failed["registry_roundtrip"] = {"passed": False, "value": 0.0, "threshold": 1.0, "detail": exc.problem}
    client.set_tag(run_id, "gates.passed", str(not failed).lower())
    if not failed:
        return {"passed": True, "edge": edge}
    why = "; ".join(f"{k} {g['value']:.3f} (threshold {g['threshold']:.3f}): {g.get('detail', '')}"
                    for k, g in failed.items())
    emit(GATES_FAILED, edge["name"], {"version": None, "failed": list(failed), "evidence": why, "mlflow_run_id": run_id})
    log(f"release gate: {len(failed)} gate(s) failed ({why}); rolling back the staged versions")
    raise GatesFailed(
        f"{edge['name']}: gates failed ({why}); the staged versions were rolled back, nothing is registered",
        "read the gap report (Prefect artifact <name>-gap-report, MLflow evaluate run) and change the student, "
        "the quantization, or the evaluate.* thresholds")


@task(name="release-gate", cache_policy=NO_CACHE)
def release_task(client, cfg, registered: dict, gates: dict, *, run_id: str, cache_root: str | Path) -> dict:
    from prefect.logging import get_run_logger

    return release_check(client, cfg, registered, gates, run_id=run_id, cache_root=cache_root,
                         log=get_run_logger().warning)
