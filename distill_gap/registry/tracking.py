"""MLflow tracking: the store, the experiment, and the one lifecycle of every MLflow run this project opens.

`mlflow_run` is that lifecycle: a run is created, its id handed to the body, and it ends FINISHED, or FAILED
when the body raises anything (an exception, KeyboardInterrupt, SystemExit from SIGTERM): never left RUNNING
by a live process. (A process killed outright is found by distill_gap.registry.crash_recovery.) The pipeline
run, each stage's nested run, promote-edge, rollback and the teacher bootstrap and import all use it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from distill_gap.ops.liveness import process_tags

# what a stage run copies from its pipeline run, so that a stage run can be found by config, trigger or model
INHERITED_TAGS = ("config.digest", "trigger.reason", "model.name")


def tracking_uri(tracking) -> str:
    """MLFLOW_TRACKING_URI wins over the config; a local sqlite path gets its folder created."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def client_for(tracking):
    """An MlflowClient on the configured store (tracking and registry)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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


# MLflow 3's UI opens an experiment without this tag in its GenAI mode (an empty Traces page, no model registry in
# the sidebar); this project trains models (issue 23)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client, tracking) -> str:
    """The id of tracking.experiment, created (with its artifact location, kind and description) when missing."""
    from distill_gap.registry.presentation import EXPERIMENT_DESCRIPTION, NOTE

    tags = {**EXPERIMENT_KIND, NOTE: EXPERIMENT_DESCRIPTION}
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is not None:
        for key, value in tags.items():  # an experiment made before these tags (or by hand): a description of
            if key not in exp.tags:      # the user's own stays
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if not tracking_uri(tracking).startswith(("http://", "https://", "databricks")):
        location = Path(tracking.artifact_location).resolve().as_uri()
    return client.create_experiment(tracking.experiment, artifact_location=location, tags=tags)


def code_version() -> str:
    """The git commit of this checkout (+dirty), else the installed package version."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"distill-gap=={version('distill-gap')}"


@contextlib.contextmanager
def mlflow_run(client, *, experiment_id: str | None = None, parent_run_id: str | None = None, run_name: str,
               tags: dict | None = None) -> Iterator[str]:
    """Open an MLflow run and yield its id; FINISHED when the body returns, FAILED when it raises anything.

    With `parent_run_id` the run is nested: it lives in the parent's experiment, carries `mlflow.parentRunId`
    and the parent's INHERITED_TAGS (`tags` win over them). Otherwise `experiment_id` is required.
    """
    tags = dict(tags or {})
    if parent_run_id is not None:
        parent = client.get_run(parent_run_id)
        experiment_id = experiment_id or parent.info.experiment_id
        inherited = {k: parent.data.tags[k] for k in INHERITED_TAGS if k in parent.data.tags}
        tags = {"mlflow.parentRunId": parent_run_id, **inherited, **tags}
    if experiment_id is None:
        raise ValueError("mlflow_run needs an experiment_id or a parent_run_id")
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def pipeline_run(client, cfg, *, trigger_reason: str, flow_run_id: str | None) -> Iterator[str]:
    """The one MLflow run of a pipeline run (an `mlflow_run`): the full config as params and as config/config.json,
    its digest, the trigger, the Prefect flow run and this process's identity (for crash recovery) as tags."""
    import json
    import tempfile

    from mlflow.entities import Param

    tags = {"distill.stage": "pipeline", "config.digest": cfg.digest(), "trigger.reason": trigger_reason,
            "code.version": code_version(), "prefect.flow_run_id": str(flow_run_id or ""), "model.name": cfg.name,
            **process_tags()}
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name=f"{cfg.name}-pipeline",
                    tags=tags) as run_id:
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(cfg.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
            client.log_artifacts(run_id, tmp, "config")
        yield run_id
