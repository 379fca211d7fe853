"""The registered chain (tests/chain.py) for the lineage, verify and dossier tests."""

from tests.chain import chain  # noqa: F401 - the fixture
