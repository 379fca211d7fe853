"""Fixtures for the library's tests: an MLflow SQLite store per module, a copy of the session's migrated template
(tests/conftest.py: mlflow_db_template)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="module")
def mlflow_tracking(tmp_path_factory, mlflow_db_template):
    """A TrackingConfig on a fresh store of this module (a copy of the migrated database, artifacts beside it),
    with MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI unset while the module runs."""
    from flows.config import TrackingConfig

    tmp = tmp_path_factory.mktemp("mlflow")
    shutil.copy(mlflow_db_template, tmp / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        yield TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=str(tmp / "mlartifacts"))
