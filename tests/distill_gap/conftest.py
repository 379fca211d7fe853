"""Fixtures for the library's tests: an MLflow SQLite store per module, copied from one migrated per session."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory):
    """An empty MLflow SQLite database, created once: its migrations take ~10 s on 2 cores, a copy opens in ~0.2 s."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}").search_registered_models()
    return path


@pytest.fixture(scope="module")
def mlflow_tracking(tmp_path_factory, _migrated_mlflow_db):
    """A TrackingConfig on a fresh store of this module (a copy of the migrated database, artifacts beside it),
    with MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI unset while the module runs."""
    from flows.config import TrackingConfig

    tmp = tmp_path_factory.mktemp("mlflow")
    shutil.copy(_migrated_mlflow_db, tmp / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        yield TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=str(tmp / "mlartifacts"))
