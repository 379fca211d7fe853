"""Fixtures for the library's tests: an MLflow SQLite store per module (tests/chain.py: mlflow_tracking, a copy of
the session's migrated template), shared with tests/reliability."""

from tests.chain import mlflow_tracking  # noqa: F401 - the fixture
