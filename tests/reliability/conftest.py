"""The registered chain (tests/chain.py) and its store, for the tamper suite."""

from tests.chain import chain, mlflow_tracking  # noqa: F401 - the fixtures
