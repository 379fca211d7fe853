"""Which demo edge version a benchmark measures: `models:/demo-edge@champion`, else `@challenger`.

`make demo` on the demo data registers its edge version @challenger only: on 260 test rows the critical slices are
insufficient evidence, and @champion needs a named approver's signed waiver (`distill approve --waive`). The guard,
the artifacts and the digests of that version are what would ship; the benchmarks say which alias they measured.
"""

from __future__ import annotations

from pathlib import Path


def demo_edge_version(tracking_uri: str, name: str = "demo-edge") -> tuple[str, object] | None:
    """(alias, ModelVersion) of `<name>@champion` when that alias exists, else of `@challenger`; None when the
    store, the model or both aliases are missing."""
    from mlflow.exceptions import MlflowException

    from distill_gap.registry.model_uri import registry_client

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return None  # no store yet: opening one would create an empty database
    client = registry_client(tracking_uri)
    for alias in ("champion", "challenger"):
        try:
            return alias, client.get_model_version_by_alias(name, alias)
        except MlflowException:  # no such model or alias
            continue
    return None


def demo_edge_uri(tracking_uri: str, name: str = "demo-edge") -> str | None:
    """`models:/<name>@champion`, else `models:/<name>@challenger`, else None (no demo run yet)."""
    found = demo_edge_version(tracking_uri, name)
    return f"models:/{name}@{found[0]}" if found else None
