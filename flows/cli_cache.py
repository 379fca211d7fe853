"""`distill cache ...`: inspect, verify and clean the soft-label store of a config."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from flows.cli_common import ConfigOpt, SetOpt, fail, load_cfg, app, console, err_console

cache_app = typer.Typer(help="Inspect, verify and clean the soft-label store of a config.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _store(config: Path, overrides: Optional[list[str]]) -> str:
    return load_cfg(config, overrides).soft_labels.store


@cache_app.command("ls")
def cache_ls(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """List the complete cache entries, newest first."""
    from distill_gap.softlabels.maintenance import list_entries
    from distill_gap.errors import DistillError

    try:
        store = _store(config, set)
        entries = list_entries(store)
    except DistillError as err:
        fail(err)
    table = Table(title=f"soft labels in {store}")
    table.add_column("key", no_wrap=True, min_width=16)
    for col in ("created", "examples", "classes", "dtype", "shards", "teacher"):
        table.add_column(col)
    for e in entries:
        t = e.get("teacher") or {}
        table.add_row(e["key"][:16], str(e.get("created_at", ""))[:19], str(e.get("num_examples")),
                      str(e.get("num_classes")), str(e.get("dtype")), str(e.get("shards")),
                      f"{t.get('name', '?')} v{t.get('version', '?')}")
    console.print(table)


@cache_app.command("show")
def cache_show(key: str = typer.Argument(..., help="a cache key or a unique prefix of 8+ characters"),
               config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Print the manifest of one entry."""
    import json

    from distill_gap.softlabels.maintenance import show_entry
    from distill_gap.errors import DistillError

    try:
        manifest = show_entry(_store(config, set), key)
    except DistillError as err:
        fail(err)
    console.print_json(json.dumps(manifest, default=str))


@cache_app.command("verify")
def cache_verify(key: str = typer.Argument(..., help="a cache key or a unique prefix of 8+ characters"),
                 config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Re-hash every shard of an entry against its manifest; exit 1 on any mismatch."""
    from distill_gap.softlabels.maintenance import verify_entry
    from distill_gap.errors import DistillError

    try:
        result = verify_entry(_store(config, set), key)
    except DistillError as err:
        fail(err)
    for shard in result["shards"]:
        mark = Text("ok", style="green") if shard["ok"] else Text("BAD ", style="red") + Text(shard.get("problem", ""))
        console.print(f"{shard['name']}  {mark}")
    if not result["ok"]:
        err_console.print(Text(f"entry {result['key']} is damaged", style="bold red") + Text(": the next run recomputes the bad shards"))
        raise typer.Exit(1)
    console.print(f"entry {result['key']}: all {len(result['shards'])} shards verified")


@cache_app.command("gc")
def cache_gc(keep: int = typer.Option(..., "--keep", min=0, help="newest complete entries to keep"),
             config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
             dry_run: bool = typer.Option(False, help="say what would be deleted, delete nothing")):
    """Delete old entries; never one that a registered model version references (soft_labels.key)."""
    from distill_gap.softlabels.maintenance import gc_entries, referenced_keys
    from distill_gap.errors import DistillError
    from distill_gap.registry.tracking import client_for

    try:
        cfg = load_cfg(config, set)
        result = gc_entries(cfg.soft_labels.store, keep=keep, referenced=referenced_keys(client_for(cfg.tracking)),
                            dry_run=dry_run)
    except DistillError as err:
        fail(err)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(result['deleted'])}, kept {len(result['kept']) + len(result['kept_referenced'])} "
                  f"({len(result['kept_referenced'])} referenced by registered model versions)")
    for key in result["deleted"]:
        console.print(f"  {verb} {key}")


