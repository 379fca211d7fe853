"""Registry versions: created with all their tags at once, signed, staged for rollback, resolved and fetched
digest-verified into a local folder."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill_gap.errors import DistillError


def ownership_tags(governance) -> dict:
    """`owner` and the review cadence: on every registered model; versions also get their review.due date."""
    from datetime import date, timedelta

    return {"owner": governance.owner, "review.cadence_days": str(governance.review_days),
            "review.due": (date.today() + timedelta(days=governance.review_days)).isoformat()}


def create_version(client, name: str, *, source: str, run_id: str, tags: dict, governance, description: str = "",
                   model_id: str | None = None, staged: "Staged | None" = None):
    """Register a model version with all its tags in one call (no version without lineage or owner)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    owner = ownership_tags(governance)
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

    from distill_gap.signing import sign_folder, signing_key

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
    """The registry version `name` has under `version`, else under `alias`; a DistillError when it has none."""
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        what = f"version {version}" if version is not None else f"alias '@{alias}'"
        raise DistillError(
            f"registered model '{name}' has no {what} in the MLflow registry at {client._registry_uri}",
            "run `distill teacher bootstrap --config <config>` or `distill teacher import PATH --config <config>` first",
        ) from err  # the cause stays: a registry that cannot be reached is transient (distill_gap/ops/transient.py)


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

    from distill_gap.signing import SignatureError, verify_folder

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
