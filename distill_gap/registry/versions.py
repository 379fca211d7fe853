"""Registry versions: created with all their tags at once, signed, staged for rollback, resolved and fetched
digest-verified into a local folder."""

from __future__ import annotations

import shutil
import tempfile
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


class RegistryUnreachable(DistillError):
    """The tracking server does not answer (a lost connection, a timeout): not a missing name or version."""


def lost_connection(err: BaseException) -> bool:
    """Whether a failed or timed-out connection appears along `err`'s chain (by type, as ops/transient.py reads it;
    MLflow's REST client raises its MlflowException while handling requests' error)."""
    import requests

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ if err.__cause__ is not None or err.__suppress_context__ else err.__context__
    return False


def unreachable(tracking_uri: str, err: BaseException | str) -> RegistryUnreachable:
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return RegistryUnreachable(f"cannot reach the tracking server at {tracking_uri}: {reason}",
                               "start it or check the network and --tracking-uri (MLFLOW_TRACKING_URI); a pinned "
                               "version (models:/<name>/<N>) is served from the local verified cache meanwhile")


def unreachable_or(err: BaseException, client, other: DistillError) -> DistillError:
    """RegistryUnreachable naming the server when `err` is a lost connection, else `other`."""
    return unreachable(client._tracking_client.tracking_uri, err) if lost_connection(err) else other


def resolve_version(client, name: str, *, alias: str | None = None, version: int | None = None):
    """The registry version `name` has under `version`, else under `alias`; a DistillError when it has none,
    RegistryUnreachable when the tracking server does not answer."""
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if lost_connection(err):
            raise unreachable(client._registry_uri, err) from err  # transient (distill_gap/ops/transient.py)
        what = f"version {version}" if version is not None else f"alias '@{alias}'"
        raise DistillError(
            f"registered model '{name}' has no {what} in the MLflow registry at {client._registry_uri}",
            _what_exists(client, name),
        ) from err  # the cause stays: a registry that cannot be reached is transient (distill_gap/ops/transient.py)


def _what_exists(client, name: str) -> str:
    """The fix for a missing version or alias: what the model has (so a typo is seen at once), or how to create it."""
    from mlflow.exceptions import MlflowException

    create = ("run `distill run --config <config>` to register it (a teacher: `distill teacher bootstrap --config "
              "<config>` or `distill teacher import PATH --config <config>`)")
    try:
        model = client.get_registered_model(name)
        numbers = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return f"no model named '{name}' is registered there; {create}"
    if not numbers:
        return f"'{name}' has no versions yet; {create}"
    shown = ", ".join(map(str, numbers[-10:])) + (f" (and {len(numbers) - 10} earlier)" if len(numbers) > 10 else "")
    aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted((model.aliases or {}).items())) or "none"
    return f"'{name}' has versions {shown}; aliases: {aliases}"


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
                cache_root: str | Path = ".distill/models", public_keys: list[str] | None = None,
                mv=None) -> ModelRef:
    """A registered model folder in the local cache, verified before first use: its digest against the
    `model.digest` tag and, with `public_keys`, its model-signing signature by one of those keys ([]: the key the
    registry itself records, which the caller chose knowingly). `mv`: the version, when already resolved.

    Each download goes to a folder of this process's own and is renamed into place whole, so concurrent cold
    starts never share one; a marker beside the folder remembers what was checked (distill_gap.registry.model_cache),
    so later calls cost nothing while the files stay as they were.
    """
    from distill_gap.registry import model_cache as cache

    mv = mv or resolve_version(client, name, alias=alias, version=version)
    expected = mv.tags.get("model.digest")
    if not expected:
        raise DistillError(f"{name} version {mv.version} has no model.digest tag",
                           "re-register it with `distill teacher import`")
    root = Path(cache_root)
    local = root / expected
    record = {"tracking_uri": client._tracking_client.tracking_uri, "name": name, "version": int(mv.version)}
    marker = cache.read_marker(root, expected)
    signature = (marker or {}).get("signature")
    checked = cache.unchanged(root, expected, marker) and (public_keys is None
                                                           or _signed_by(signature, public_keys, mv))
    if not checked:
        if _digest_matches(local, expected):  # in place from an earlier run without a marker for these checks
            signature = _verified_signature(client, mv, local, public_keys) if public_keys is not None else None
        else:
            cache.discard(local)  # damaged or half there: out of the way, atomically
            local, signature = _download(client, mv, root, expected, public_keys)
    if not checked or record not in marker.get("versions", []):
        cache.write_marker(root, expected, signature=signature, version=record)
    return ModelRef(name=name, version=int(mv.version), digest=expected, path=local, run_id=mv.run_id, alias=alias,
                    tags=dict(mv.tags))


def _digest_matches(folder: Path, expected: str) -> bool:
    from distill_gap.digest import model_digest

    try:
        return folder.is_dir() and model_digest(folder) == expected
    except (FileNotFoundError, OSError):
        return False


def _download(client, mv, root: Path, expected: str, public_keys: list[str] | None) -> tuple[Path, dict | None]:
    """Download `mv` into a folder of this process's own, check it there, rename it into place: (folder, signature)."""
    import mlflow

    from distill_gap.digest import model_digest
    from distill_gap.registry import model_cache as cache

    tmp = cache.download_dir(root, expected)
    try:
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp),
                                                tracking_uri=client._tracking_client.tracking_uri)
        except Exception as err:  # noqa: BLE001 - MLflow wraps a lost server in MlflowException, a file store in OSError
            raise unreachable_or(err, client, DistillError(
                f"{mv.name} version {mv.version}: its files cannot be downloaded from {mv.source} "
                f"({str(err).splitlines()[0][:300] if str(err) else type(err).__name__})",
                "check the artifact store the registry points to, or re-register the model")) from None
        inner = version_folder(tmp, mv.source)
        got = model_digest(inner) if inner.is_dir() else "nothing"
        if got != expected:
            detail = signature_problem(client, mv, inner) if inner.is_dir() else None
            raise DistillError(f"{mv.name} version {mv.version}: downloaded files have digest {got[:12]}, registry says "
                               f"{expected[:12]}" + (f"; {detail}" if detail else ""),
                               "the stored artifact was changed or damaged; re-register the model")
        signature = _verified_signature(client, mv, inner, public_keys) if public_keys is not None else None
        local, _ = cache.install(inner, root, expected)  # another process's copy of the same digest wins as well
        return local, signature
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pem_sha256(pem: str) -> str:
    import hashlib

    return hashlib.sha256(pem.strip().encode()).hexdigest()


def _signed_by(signature: dict | None, public_keys: list[str], mv) -> bool:
    """Whether a marker's signature check was made with one of the keys trusted now."""
    keys = public_keys or [mv.tags.get("signing.public_key") or ""]
    return bool(signature) and signature.get("public_key_sha256") in {_pem_sha256(k) for k in keys if k}


def _verified_signature(client, mv, folder: Path, public_keys: list[str]) -> dict:
    """The signature check of `folder` by one of `public_keys` ([]: the key the registry records), as the marker
    records it; DistillError when the version is unsigned or no trusted key verifies it."""
    sig_uri, recorded = mv.tags.get("signature.uri"), mv.tags.get("signing.public_key")
    if not sig_uri:
        raise DistillError(f"{mv.name} version {mv.version} is not signed (no signature.uri tag): only a signed "
                           "version is served", "register it through the pipeline, which signs every version")
    keys = list(public_keys) or ([recorded] if recorded else [])
    if not keys:
        raise DistillError(f"{mv.name} version {mv.version} records no signing.public_key to verify its "
                           "signature with", "pass --public-key <the pipeline's signing-key.pub.pem>")
    problem = _signature_check(client, mv, folder, keys)
    if isinstance(problem, str):
        raise DistillError(f"{mv.name} version {mv.version}: its signature does not verify with the trusted "
                           f"key{'s' if len(keys) > 1 else ''}: {problem}",
                           "serve a version signed by a key you trust (--public-key), or find out who changed or "
                           "re-signed this one (`distill verify`); re-register it through the pipeline")
    return problem


def _signature_check(client, mv, folder: Path, keys: list[str]) -> dict | str:
    """{"public_key_sha256", "uri"} of the first key in `keys` whose signature check of `folder` passes, or why none
    does (the first key's reason, temporary paths replaced by the stored ones)."""
    import mlflow

    from distill_gap.signing import SignatureError, verify_folder

    sig_uri = mv.tags["signature.uri"]
    with tempfile.TemporaryDirectory(prefix="distill-check-") as tmp:
        try:
            sig = mlflow.artifacts.download_artifacts(artifact_uri=sig_uri, dst_path=tmp,
                                                      tracking_uri=client._tracking_client.tracking_uri)
        except Exception as err:  # noqa: BLE001 - a signature that cannot be fetched verifies nothing
            reason = str(err).splitlines()[0][:200] if str(err) else repr(err)
            return f"the signature {sig_uri} cannot be downloaded ({reason})"
        problems = []
        for pem in keys:
            try:
                verify_folder(folder, pem, sig)
                return {"public_key_sha256": _pem_sha256(pem), "uri": sig_uri}
            except SignatureError as err:  # names each changed, missing or extra file; temporary paths are not news
                problems.append(err.problem.replace(str(folder), f"the stored folder {mv.source}")
                                .replace(str(sig), sig_uri))
            except DistillError as err:  # a trusted "key" that is no EC public key
                problems.append(err.problem)
        return problems[0]


def signature_problem(client, mv, folder: Path) -> str | None:
    """Why a downloaded version folder fails its signature by the key the registry records ('<file>: digest differs
    ...'), else None.

    None also when the version is unsigned or its signature cannot be read: this only explains a refusal that
    the whole-folder digest has already made.
    """
    public_pem = mv.tags.get("signing.public_key")
    if not (mv.tags.get("signature.uri") and public_pem):
        return None
    try:
        problem = _signature_check(client, mv, folder, [public_pem])
    except Exception:  # noqa: BLE001 - a diagnosis that fails leaves the refusal as it was
        return None
    return problem if isinstance(problem, str) and "cannot be downloaded" not in problem else None
