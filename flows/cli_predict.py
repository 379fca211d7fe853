"""`distill predict`: label JSONL rows with an edge model (a registry URI or a local edge folder), streaming."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from flows.cli_common import app, err_console


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
                                             "or 'answer' (label them anyway; in_scope stays false)"),
            strict: bool = typer.Option(False, "--strict", help="stop at the first line that cannot be predicted "
                                        '(default: an error record {"id", "line", "error"} for it, and go on)'),
            allow_failed_artifact: bool = typer.Option(False, "--allow-failed-artifact", help="serve an artifact "
                                                       "that did not pass its checks (edge.json), with a warning"),
            public_key: Optional[list[str]] = typer.Option(None, "--public-key", help="trusted signing public key "
                                                           "(PEM, repeatable); default: the local key pair's"),
            key_dir: Optional[Path] = typer.Option(None, "--key-dir", help="folder of the local key pair (default "
                                                   "$DISTILL_KEY_DIR or .distill/keys)"),
            trust_registry_key: bool = typer.Option(False, "--trust-registry-key", help="no key of your own: trust "
                                                    "the key the registry records (warned)"),
            allow_untrusted_alias: bool = typer.Option(False, "--allow-untrusted-alias", help="serve an alias that no "
                                                       "signed promote Statement moved there (warned)"),
            registry_timeout: float = typer.Option(10.0, min=0.5, help="seconds the tracking server may take to "
                                                   "answer before it counts as down")):
    """Label JSONL rows with an edge model: one JSON object per row on stdout, in input order, messages on stderr.

    Rows are read, predicted and written in chunks of 256, so memory stays flat and the first rows come out at once.
    A line that cannot be predicted (not JSON, no text, a lone surrogate) gets {"id", "line", "error"} instead, or
    stops the run with --strict; a text longer than the model's window is cut to it and flagged "truncated": true.
    A registry version is verified before its first use (digest and signature by a trusted key; remembered in the
    local cache), and only an artifact that passed its checks is served. Probabilities are calibrated; every row
    gets `in_scope` and `scope_score` from the edge model's scope guard, and out-of-scope rows abstain by default.
    An ONNX artifact runs on onnxruntime, tokenizers and numpy alone (distill_gap/edge/lean.py).
    """
    from distill_gap.edge.lean import LEAN_RUNTIME, OUT_OF_SCOPE, check_servable, chosen_artifact, load_lean
    from distill_gap.edge.lean import read_rows, stream_rows, summary
    from distill_gap.edge.serving import load_edge, stdout_to_stderr  # light: torch loads with a torch artifact
    from distill_gap.errors import DistillError
    from distill_gap.registry.model_uri import parse_model_uri, resolve_edge, trusted_public_keys

    say, out = _say, _real_stdout()
    try:
        if out_of_scope not in OUT_OF_SCOPE:
            raise DistillError(f"--out-of-scope {out_of_scope!r} is not an option", "use abstain or answer")
        rows = read_rows(input, strict=strict)  # strict: a bad file is refused before the model loads
        keys = None
        if model.startswith("models:"):
            parse_model_uri(model)  # a malformed URI is named before any key is looked for
            keys, source = trusted_public_keys(public_key, key_dir, trust_registry_key)
            if not keys:
                say(source)
        # what libraries print goes to stderr; the rows go to `out`, chunk by chunk
        with _bounded_mlflow_retries(registry_timeout), stdout_to_stderr():
            folder = resolve_edge(model, tracking_uri, log=say, public_keys=keys, timeout_s=registry_timeout,
                                  check_alias=_alias_rule(keys, allow_untrusted_alias))
            name, spec, _ = chosen_artifact(folder, artifact)
            note = check_servable(folder, name, allow_failed_artifact)
            if note:
                say(note)
            started = time.monotonic()
            edge = load_lean(folder, name) if spec["runtime"] == LEAN_RUNTIME else load_edge(folder, name)
            say(f"{edge.artifact} ({edge.runtime}) loaded in {time.monotonic() - started:.1f} s; labelling rows")
            counts = stream_rows(edge, rows, out, batch_size=batch_size, out_of_scope=out_of_scope)
        line = summary(counts, edge, out_of_scope, "standard input" if input == "-" else input)
    except DistillError as err:
        say(f"error: {err}")
        raise typer.Exit(code=2)
    except BrokenPipeError:  # `distill predict ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in {out.fileno(), sys.stdout.fileno()}:
            os.dup2(devnull, fd)
        return
    if out is not sys.stdout:
        out.close()
    say(line)


def _alias_rule(keys: list[str] | None, allow: bool):
    """check_alias for resolve_edge: an alias is served only when a signed promote Statement moved it to exactly
    that version and its gates did not fail (distill_gap.governance.verify.alias_check, as `distill verify` reads it);
    otherwise a refusal, or with `allow` a warning."""
    def check(client, mv, alias: str) -> None:
        import tempfile

        from distill_gap.errors import DistillError
        from distill_gap.governance.verify import alias_check

        with tempfile.TemporaryDirectory(prefix="distill-alias-") as tmp:
            trusted, why = alias_check(client, mv, alias, keys or [mv.tags.get("signing.public_key", "")], Path(tmp))
        if trusted:
            return
        if not allow:
            raise DistillError(why, f"serve a version you checked (models:/{mv.name}/<N>), or pass "
                                    "--allow-untrusted-alias to serve this one anyway, knowingly")
        _say(f"WARNING: {why}; serving it because of --allow-untrusted-alias")

    return check


def _say(message: str) -> None:
    """One line on stderr, as plain text: paths, names and row text are never read as Rich markup."""
    err_console.print(message, markup=False, highlight=False)


@contextlib.contextmanager
def _bounded_mlflow_retries(timeout_s: float):
    """MLflow's own retries of a lost server (7, backing off to ~250 s) cut to what a command line can wait, for
    this command only (unless the caller set them)."""
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(timeout_s, 10) * 3))}
    added = {k: v for k, v in limits.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _real_stdout():
    """A text file on this process's stdout that stays there while stdout_to_stderr points fd 1 at stderr (under
    a test runner whose sys.stdout has no file descriptor: sys.stdout itself)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return sys.stdout
    sys.stdout.flush()
    return open(os.dup(fd), "w", encoding="utf-8")
