"""`distill predict`: label JSONL rows with an edge model (a registry URI or a local edge folder)."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from flows.cli_common import app, err_console, fail


@app.command()
def predict(model: str = typer.Option(..., "--model", "-m", help="models:/<name>-edge@champion, models:/<name>-edge/3, "
                                      "or an edge folder (offline)"),
            input: str = typer.Option(..., "--input", "-i", help='JSONL rows {"id": ..., "text": ...}; - reads stdin'),
            tracking_uri: str = typer.Option("sqlite:///.distill/mlflow.db", envvar="MLFLOW_TRACKING_URI",
                                             help="the MLflow registry holding the model"),
            artifact: Optional[str] = typer.Option(None, help="an artifact other than the primary one, e.g. int8"),
            batch_size: int = typer.Option(32, min=1, help="texts per forward pass"),
            out_of_scope: str = typer.Option("abstain", help="rows outside the model's evaluated scope: 'abstain' "
                                             "(label null, route 'fallback': send them to the teacher or a human) "
                                             "or 'answer' (label them anyway; in_scope stays false)")):
    """Label JSONL rows with an edge model: one JSON object per row on stdout, messages on stderr.

    Probabilities are calibrated (the temperature fitted on validation). Every row gets `in_scope` and
    `scope_score` from the scope guard the edge model ships (scope.json: a detector fitted on the training rows'
    features, its threshold at 95% in-distribution TPR on validation); out-of-scope rows abstain by default.
    An ONNX artifact (the demo's primary) runs on onnxruntime, tokenizers and numpy alone (distill_gap/edge/lean.py).
    """
    from distill_gap.edge.lean import LEAN_RUNTIME, OUT_OF_SCOPE, artifact_runtime, checked_rows, load_lean
    from distill_gap.edge.lean import stream_rows
    from distill_gap.edge.serving import load_edge, stdout_to_stderr  # light: torch loads with a torch artifact
    from distill_gap.registry.model_uri import resolve_edge
    from distill_gap.errors import DistillError

    out = _real_stdout()
    try:
        if out_of_scope not in OUT_OF_SCOPE:
            raise DistillError(f"--out-of-scope {out_of_scope!r} is not an option", "use abstain or answer")
        rows = checked_rows(input)  # every line checked before the model loads: a bad file prints nothing
        with stdout_to_stderr():  # what libraries print goes to stderr; the rows go to `out`, chunk by chunk
            folder = resolve_edge(model, tracking_uri, log=err_console.print)  # a URI: downloaded, digest verified
            lean = artifact_runtime(folder, artifact) == LEAN_RUNTIME  # onnxruntime + tokenizers + numpy only
            edge = load_lean(folder, artifact) if lean else load_edge(folder, artifact)
            counts = stream_rows(edge, rows, out, batch_size=batch_size, out_of_scope=out_of_scope)
    except DistillError as err:
        fail(err)
    except BrokenPipeError:  # `distill predict ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in {out.fileno(), sys.stdout.fileno()}:
            os.dup2(devnull, fd)
        return
    if out is not sys.stdout:
        out.close()
    guard = edge.guard
    err_console.print(f"{counts['rows']} rows labelled with {edge.artifact} ({edge.runtime})"
                      + (f"; {counts['out_of_scope']} out of scope by the {guard.detector} guard "
                         f"({'routed to fallback' if out_of_scope == 'abstain' else 'answered'})"
                         if guard is not None else "; no scope guard for this artifact: in_scope is null"),
                      highlight=False, markup=False)


def _real_stdout():
    """A text file on this process's stdout that stays there while stdout_to_stderr points fd 1 at stderr (under
    a test runner whose sys.stdout has no file descriptor: sys.stdout itself)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return sys.stdout
    sys.stdout.flush()
    return open(os.dup(fd), "w", encoding="utf-8")
