"""What every `distill` command shares: the Typer apps, the consoles, the --config/--set options, config loading
and the one-line error exit (a DistillError prints its problem and fix, exit 2, no traceback)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(help="distill-gap: accountable distillation and quantization for edge models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
teacher_app = typer.Typer(help="Bootstrap or import the teacher and pin it in the MLflow registry.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
# markup off: paths, names and reasons users type are printed as they are ("[/]" in a path, "[bold]" in a reason);
# colour comes from style= or rich.text.Text, never from markup in a message
console = Console(soft_wrap=True, markup=False, highlight=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)

ConfigOpt = typer.Option(..., "--config", "-c", help="pipeline YAML, e.g. configs/demo.yaml")
SetOpt = typer.Option(None, "--set", "-s", help="override a key: --set distill.temperature=4 (repeatable)")


def load_cfg(config: Path, overrides: Optional[list[str]]):
    from flows.config import load_config

    return load_config(config, overrides or [])


def fail(err: Exception) -> None:
    err_console.print(Text("error: ", style="bold red") + Text(str(err)))
    raise typer.Exit(code=2)


def on_sigterm(signum, _frame) -> None:
    """SIGTERM (a worker cancelling, `kill`, a node draining): one clear message, then exit 128+signal."""
    err_console.print(Text("stopped: ", style="bold red") + Text(f"signal {signum}. A flow run in progress is marked Crashed in Prefect "
                      "and FAILED in MLflow; a half-done registration is removed.\n  fix: run the same command again; "
                      "the soft labels already stored are reused"))
    try:  # what Prefect has logged reaches its API before the process goes
        from prefect.logging.handlers import APILogHandler

        APILogHandler.flush()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)  # no traceback; the ephemeral API server dies with this process (distill_gap/ops/prefect_server.py)


