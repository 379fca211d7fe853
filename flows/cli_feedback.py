"""`distill feedback ...`: keep the answers to the rows the edge model abstained on (distill_gap/monitoring/feedback.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flows.cli_common import ConfigOpt, SetOpt, app, console, fail, load_cfg

feedback_app = typer.Typer(help="Keep the answers a person or the teacher gave to rows the edge model abstained on.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


def _read_file(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a JSONL or Parquet file and where each came from (`file line n` / `file row n`)."""
    from distill_gap.errors import DistillError
    from distill_gap.monitoring.drift import parse_jsonl

    if not path.is_file():
        raise DistillError(f"feedback file {path} does not exist", "pass a JSONL or Parquet file of feedback records")
    if path.suffix.lower() in (".parquet", ".pq"):
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors have no common base
            raise DistillError(f"cannot read {path} as Parquet: {err}", "write the file with pandas.to_parquet or "
                               "pass JSONL") from None
        rows = [{k: (None if v is pd.NaT else v) for k, v in r.items()} for r in frame.to_dict("records")]
        return rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)]
    rows, numbers = parse_jsonl(path.read_bytes(), str(path))
    return rows, [f"{path} line {i}" for i in numbers]


def _missing_versions(client, name: str):
    def missing(wanted: set[int]) -> list[int]:
        """The versions of `wanted` the registry does not have (resolve_version: a registry that cannot be reached
        is that error, never "not registered")."""
        from distill_gap.errors import DistillError
        from distill_gap.ops.transient import is_transient
        from distill_gap.registry.versions import resolve_version

        gone = []
        for v in sorted(wanted):
            try:
                resolve_version(client, name, version=v)
            except DistillError as err:
                if is_transient(err):
                    raise
                gone.append(v)
        return gone
    return missing


@feedback_app.command("add")
def feedback_add(path: Path = typer.Argument(..., help="JSONL (or Parquet) feedback records"),
                 config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Check a file of answers (labels, edge versions, contradictions) and store it, all or nothing."""
    from distill_gap.errors import DistillError
    from distill_gap.monitoring.feedback import append_feedback
    from distill_gap.registry.tracking import client_for

    try:
        cfg = load_cfg(config, set)
        rows, where = _read_file(path)
        done = append_feedback(cfg.feedback.store, rows, where, labels=list(cfg.data.labels),
                               edge_versions=_missing_versions(client_for(cfg.tracking), cfg.edge_model_name))
    except DistillError as err:
        fail(err)
    skipped = f"; {done.skipped} already stored, skipped" if done.skipped else ""
    if done.part is None:
        console.print(f"nothing new: all {done.skipped} records are already stored in {done.store}")
    else:
        console.print(f"stored {done.written} feedback records in {done.store}/{done.part}{skipped}")


@feedback_app.command("show")
def feedback_show(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Count the stored answers: by edge version, kind and answer."""
    from distill_gap.errors import DistillError
    from distill_gap.monitoring.feedback import read_feedback

    try:
        store = load_cfg(config, set).feedback.store
        df = read_feedback(store)
    except DistillError as err:
        fail(err)
    if df.empty:
        console.print(f"no feedback stored in {store}")
        return
    table = Table(title=f"feedback in {store}: {len(df)} records, {df['id'].nunique()} rows answered")
    for col in ("edge version", "kind", "answer", "records", "latest"):
        table.add_column(col)
    for (version, kind, answer), g in df.groupby(["edge_version", "kind", "answer"]):
        table.add_row(str(version), kind, answer, str(len(g)), str(g["answered_at"].max())[:19])
    console.print(table)
