"""The `distill` command: run the pipeline, manage the teacher, open the UIs.

Heavy libraries are imported inside the commands so that `distill --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tasks.runtime import apply_embedded_env  # noqa: E402  (light: os and random only)

apply_embedded_env()

app = typer.Typer(help="distill-gap: accountable distillation and quantization for edge models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
teacher_app = typer.Typer(help="Bootstrap or import the teacher and pin it in the MLflow registry.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(..., "--config", "-c", help="pipeline YAML, e.g. configs/demo.yaml")
SetOpt = typer.Option(None, "--set", "-s", help="override a key: --set distill.temperature=4 (repeatable)")


def _load(config: Path, overrides: Optional[list[str]]):
    from flows.config import load_config

    return load_config(config, overrides or [])


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}", highlight=False)
    raise typer.Exit(code=2)


@app.command()
def run(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
        reason: str = typer.Option("manual", help="why this run started (recorded as trigger.reason)")):
    """Run the whole pipeline: validate, soft labels, distill, quantize, evaluate, register."""
    from tasks.errors import DistillError

    try:
        cfg = _load(config, set)
        console.print(f"[bold]distill-pipeline[/] {cfg.name} (config digest {cfg.digest()[:12]})")
        from flows.pipeline import distill_pipeline

        result = distill_pipeline(cfg, trigger_reason=reason)
    except DistillError as err:
        _fail(err)
    _print_summary(cfg, result)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _print_summary(cfg, result: dict) -> None:
    report = result["report"]
    test = report["suites"]["test"]
    oods = [s for s in report["suites"] if s.startswith("ood:")]
    table = Table(title=f"{cfg.name}: each model evaluated on its own")
    for col in ["model", "test acc", "macro-F1", "fidelity", *[f"{o} acc" for o in oods], "size"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for model in report["models"]:
        m = test[model]
        table.add_row(model, f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                      f"{m['fidelity']:.3f}" if "fidelity" in m else "-",
                      *[f"{report['suites'][o][model]['accuracy']:.3f}" for o in oods], _mb(result["sizes"][model]))
    console.print(table)
    by_suite: dict[str, list[str]] = {}
    for f in report["flags"]:
        by_suite.setdefault(f"{f['suite']} (n={f['n']})", []).append(f"{f['model']} {f['gap']:+.3f}")
    if by_suite:
        console.print(f"[yellow]⚠ losses beyond {report['threshold']:.0%} vs the teacher:[/]")
        for suite, items in by_suite.items():
            console.print(f"[yellow]  {suite}: {', '.join(items)}[/]")
    reg, t, soft = result["registered"], result["teacher"], result["soft_labels"]
    gates = ", ".join(f"{k} {g['value']:.3f} ({'pass' if g['passed'] else 'FAIL'})" for k, g in result["gates"].items())
    console.print(f"teacher      {t['name']} v{t['version']} (digest {t['digest'][:12]})")
    console.print(f"soft labels  {'cache hit' if soft['hit'] else 'computed'}: {soft['uri']}")
    console.print(f"registered   {reg['student']['name']} v{reg['student']['version']}, "
                  f"{reg['edge']['name']} v{reg['edge']['version']}" + (" @champion" if reg['edge']['champion'] else ""))
    edge = result["edge"]
    console.print(f"edge         primary {edge['primary']} ({'INT8' if edge['quantized'] else '[red]NOT quantized[/]'}): "
                  f"{edge['reason']}", highlight=False)
    for e in edge["errors"]:
        console.print(f"[yellow]  not built: {e['problem']}[/]", highlight=False)
    console.print(f"gates        {gates}")
    console.print(f"mlflow run   {result['run_id']} in {result['tracking_uri']}")
    console.print("look         `distill ui` -> Prefect UI (runs, gap report artifact) and MLflow UI (runs, registry)")


@teacher_app.command("bootstrap")
def teacher_bootstrap(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
                      force: bool = typer.Option(False, help="fine-tune again even if the pinned teacher matches")):
    """Fine-tune teacher.base on the training split, register it as <name>-teacher and pin it."""
    from tasks.errors import DistillError

    try:
        from tasks.teacher import bootstrap_teacher

        bootstrap_teacher(_load(config, set), force=force, log=console.print)
    except DistillError as err:
        _fail(err)


@teacher_app.command("import")
def teacher_import(path: Path = typer.Argument(..., help="a Hugging Face classifier folder (safetensors)"),
                   config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
                   license: str = typer.Option(..., help="the model's license, recorded in the registry"),
                   pin: bool = typer.Option(True, help="move the teacher alias to the new version")):
    """Register an existing fine-tuned classifier as <name>-teacher."""
    from tasks.errors import DistillError

    try:
        from tasks.teacher import import_teacher

        import_teacher(_load(config, set), path, license=license, pin=pin, log=console.print)
    except DistillError as err:
        _fail(err)


cache_app = typer.Typer(help="Inspect, verify and clean the soft-label store of a config.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _store(config: Path, overrides: Optional[list[str]]) -> str:
    return _load(config, overrides).soft_labels.store


@cache_app.command("ls")
def cache_ls(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """List the complete cache entries, newest first."""
    from tasks.cache_admin import list_entries
    from tasks.errors import DistillError

    try:
        store = _store(config, set)
        entries = list_entries(store)
    except DistillError as err:
        _fail(err)
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

    from tasks.cache_admin import show_entry
    from tasks.errors import DistillError

    try:
        manifest = show_entry(_store(config, set), key)
    except DistillError as err:
        _fail(err)
    console.print_json(json.dumps(manifest, default=str))


@cache_app.command("verify")
def cache_verify(key: str = typer.Argument(..., help="a cache key or a unique prefix of 8+ characters"),
                 config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Re-hash every shard of an entry against its manifest; exit 1 on any mismatch."""
    from tasks.cache_admin import verify_entry
    from tasks.errors import DistillError

    try:
        result = verify_entry(_store(config, set), key)
    except DistillError as err:
        _fail(err)
    for shard in result["shards"]:
        mark = "[green]ok[/]" if shard["ok"] else f"[red]BAD[/] {shard.get('problem', '')}"
        console.print(f"{shard['name']}  {mark}")
    if not result["ok"]:
        err_console.print(f"[bold red]entry {result['key']} is damaged[/]: the next run recomputes the bad shards")
        raise typer.Exit(1)
    console.print(f"entry {result['key']}: all {len(result['shards'])} shards verified")


@cache_app.command("gc")
def cache_gc(keep: int = typer.Option(..., "--keep", min=0, help="newest complete entries to keep"),
             config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
             dry_run: bool = typer.Option(False, help="say what would be deleted, delete nothing")):
    """Delete old entries; never one that a registered model version references (soft_labels.key)."""
    from tasks.cache_admin import gc_entries, referenced_keys
    from tasks.errors import DistillError
    from tasks.registry import client_for

    try:
        cfg = _load(config, set)
        result = gc_entries(cfg.soft_labels.store, keep=keep, referenced=referenced_keys(client_for(cfg.tracking)),
                            dry_run=dry_run)
    except DistillError as err:
        _fail(err)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(result['deleted'])}, kept {len(result['kept']) + len(result['kept_referenced'])} "
                  f"({len(result['kept_referenced'])} referenced by registered model versions)")
    for key in result["deleted"]:
        console.print(f"  {verb} {key}")


@app.command("config")
def show_config(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Validate a config and print it resolved, with its digest."""
    import yaml

    from tasks.errors import DistillError

    try:
        cfg = _load(config, set)
    except DistillError as err:
        _fail(err)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)
    console.print(f"# config digest {cfg.digest()}")


@app.command()
def ui(prefect_port: int = typer.Option(4200), mlflow_port: int = typer.Option(5000),
       tracking_uri: str = typer.Option("sqlite:///.distill/mlflow.db", help="the MLflow store to browse")):
    """Start the Prefect and MLflow UIs on 127.0.0.1 and print both URLs (Ctrl-C stops both)."""
    import subprocess
    import time

    bindir = Path(sys.executable).parent
    Path(".distill").mkdir(exist_ok=True)
    procs = [
        subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
        subprocess.Popen([str(bindir / "mlflow"), "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                          "--port", str(mlflow_port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
    ]
    console.print(f"Prefect UI  http://127.0.0.1:{prefect_port}   (flow runs, gap-report artifacts)")
    console.print(f"MLflow UI   http://127.0.0.1:{mlflow_port}   (runs, registry: <name>-teacher/-student/-edge)")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        bad = [p.args[0] for p in procs if p.poll() not in (None, 0)]
        if bad:
            err_console.print(f"[red]stopped: {bad}; is the port already in use?[/]")
            raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()


@app.command()
def predict(model: str = typer.Option(..., "--model", "-m", help="models:/<name>-edge@champion, models:/<name>-edge/3, "
                                      "or an edge folder (offline)"),
            input: str = typer.Option(..., "--input", "-i", help='JSONL rows {"id": ..., "text": ...}; - reads stdin'),
            tracking_uri: str = typer.Option("sqlite:///.distill/mlflow.db", envvar="MLFLOW_TRACKING_URI",
                                             help="the MLflow registry holding the model"),
            artifact: Optional[str] = typer.Option(None, help="an artifact other than the primary one, e.g. int8"),
            batch_size: int = typer.Option(32, min=1, help="texts per forward pass"),
            out_of_scope: str = typer.Option("answer", help="rows outside the model's evaluated scope: 'answer' "
                                             "(label them, in_scope=false) or 'abstain' (label null, route "
                                             "'fallback': send them to the teacher or a human)")):
    """Label JSONL rows with an edge model: one JSON object per row on stdout, messages on stderr.

    When the edge model ships a scope (scope.json: the OOD threshold fitted at 95% in-distribution TPR on
    validation), every row gets `in_scope`; out-of-scope rows are counted on stderr.
    """
    import json

    from tasks.edge import load_edge, read_rows, resolve_edge, stdout_to_stderr
    from tasks.errors import DistillError

    try:
        if out_of_scope not in ("answer", "abstain"):
            raise DistillError(f"--out-of-scope {out_of_scope!r} is not an option", "use answer or abstain")
        rows = read_rows(input)  # every row checked before the model loads: a bad file prints nothing
        with stdout_to_stderr():
            edge = load_edge(resolve_edge(model, tracking_uri, log=err_console.print), artifact)
            results = edge.predict_rows(rows, batch_size=batch_size)
    except DistillError as err:
        _fail(err)
    outside = [r for r in results if r.get("in_scope") is False]
    if out_of_scope == "abstain":
        for r in outside:
            r.update(label=None, route="fallback")
    try:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in results))
        sys.stdout.flush()
    except BrokenPipeError:  # `distill predict ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    err_console.print(f"{len(results)} rows labelled with {edge.artifact} ({edge.runtime})"
                      + (f"; {len(outside)} out of scope ({'routed to fallback' if out_of_scope == 'abstain' else 'answered'})"
                         if edge.scope is not None else "; no scope record shipped with this model"), highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
