"""The `distill` command: run the pipeline, manage the teacher, open the UIs.

Heavy libraries are imported inside the commands so that `distill --help` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402  (light: os and random only)

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


def _stopped(signum, _frame) -> None:
    """SIGTERM (a worker cancelling, `kill`, a node draining): one clear message, then exit 128+signal."""
    err_console.print(f"[bold red]stopped:[/] signal {signum}. A flow run in progress is marked Crashed in Prefect "
                      "and FAILED in MLflow; a half-done registration is removed.\n  fix: run the same command again; "
                      "the soft labels already stored are reused", highlight=False)
    try:  # what Prefect has logged reaches its API before the process goes
        from prefect.logging.handlers import APILogHandler

        APILogHandler.flush()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)  # no traceback; the ephemeral API server dies with this process (distill_gap/ops/prefect_server.py)


@app.command()
def run(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
        reason: str = typer.Option("manual", help="why this run started (recorded as trigger.reason)")):
    """Run the whole pipeline: validate, soft labels, distill, quantize, evaluate, register."""
    from distill_gap.errors import DistillError

    try:
        cfg = _load(config, set)
        console.print(f"[bold]distill-pipeline[/] {cfg.name} (config digest {cfg.digest()[:12]})")
        from flows.pipeline import distill_pipeline
        from distill_gap.ops.prefect_server import tie_ephemeral_server

        tie_ephemeral_server()  # a SIGKILLed run leaves no orphaned API server behind
        signal.signal(signal.SIGTERM, _stopped)  # Prefect marks the run Crashed first, then calls this

        result = distill_pipeline(cfg, trigger_reason=reason)
    except DistillError as err:
        _fail(err)
    _print_summary(cfg, result)


@app.command()
def recover(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Mark pipeline runs whose process died (SIGKILL, OOM) as KILLED in MLflow and Crashed in Prefect."""
    from distill_gap.errors import DistillError
    from distill_gap.ops.prefect_server import tie_ephemeral_server
    from distill_gap.registry.crash_recovery import reap
    from distill_gap.registry.tracking import client_for

    try:
        cfg = _load(config, set)
        tie_ephemeral_server()
        found = reap(client_for(cfg.tracking), cfg.tracking, log=console.print)
    except DistillError as err:
        _fail(err)
    if not found:
        console.print("no crashed runs: every pipeline run still RUNNING has a live process")


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
    from distill_gap.errors import DistillError

    try:
        from distill_gap.kd.teacher import bootstrap_teacher

        bootstrap_teacher(_load(config, set), force=force, log=console.print)
    except DistillError as err:
        _fail(err)


@teacher_app.command("import")
def teacher_import(path: Path = typer.Argument(..., help="a Hugging Face classifier folder (safetensors)"),
                   config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
                   license: str = typer.Option(..., help="the model's license, recorded in the registry"),
                   pin: bool = typer.Option(True, help="move the teacher alias to the new version")):
    """Register an existing fine-tuned classifier as <name>-teacher."""
    from distill_gap.errors import DistillError

    try:
        from distill_gap.kd.teacher import import_teacher

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
    from distill_gap.softlabels.maintenance import list_entries
    from distill_gap.errors import DistillError

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

    from distill_gap.softlabels.maintenance import show_entry
    from distill_gap.errors import DistillError

    try:
        manifest = show_entry(_store(config, set), key)
    except DistillError as err:
        _fail(err)
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
    from distill_gap.softlabels.maintenance import gc_entries, referenced_keys
    from distill_gap.errors import DistillError
    from distill_gap.registry.tracking import client_for

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

    from distill_gap.errors import DistillError

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

    from distill_gap.edge.serving import load_edge, read_rows, stdout_to_stderr
    from distill_gap.registry.model_uri import resolve_edge
    from distill_gap.errors import DistillError

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


TrackingOpt = typer.Option("sqlite:///.distill/mlflow.db", "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                           help="the MLflow registry holding the model")


class _Branch:
    """A tree printed line by line (rich's Tree crops long lines; digests must stay whole)."""

    def __init__(self, text: str):
        self.text, self.children = text, []

    def add(self, text: str, **_) -> "_Branch":
        self.children.append(_Branch(text))
        return self.children[-1]

    def lines(self, prefix: str = "") -> list[str]:
        out = [self.text] if not prefix else []
        for i, child in enumerate(self.children):
            last = i == len(self.children) - 1
            out.append(f"{prefix}{'└── ' if last else '├── '}{child.text}")
            out += child.lines(prefix + ("    " if last else "│   "))
        return out


@app.command()
def lineage(model: str = typer.Argument(..., help="models:/<name>-edge@champion or models:/<name>-edge/3"),
            tracking_uri: str = TrackingOpt,
            mlflow_ui: str = typer.Option("http://127.0.0.1:5000", help="MLflow UI base URL for the links"),
            as_json: bool = typer.Option(False, "--json", help="print the chain as JSON")):
    """Print the chain edge -> student -> soft labels -> teacher version -> data digests, with runs and links."""
    import json

    from distill_gap.errors import DistillError
    from distill_gap.governance.lineage import lineage as build
    from distill_gap.registry.model_uri import registry_client

    try:
        info = build(registry_client(tracking_uri), model, mlflow_ui=mlflow_ui)
    except DistillError as err:
        _fail(err)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    run = info["pipeline_run"]
    root = _Branch(f"[bold]{info['name']} v{info['version']}[/]  ({model})  pipeline run {run['run_id']} "
                   f"(trigger: {run['trigger_reason']})")
    node = root
    for link in info["chain"]:
        role = link["role"]
        if role in ("edge", "student", "teacher"):
            text = (f"[bold]{role}[/] {link['name']} v{link['version']}  sha256 {str(link['digest'])[:16]}  "
                    f"run {link['run_id']}" + (f"  @{', @'.join(link['aliases'])}" if link["aliases"] else ""))
            node = node.add(text, highlight=False)
            if role == "edge":
                node.add(f"{link['primary']} (INT8: {link['quantized']}, candidate {link['candidate']}), gates passed: "
                         f"{link['gates_passed']}, owner {link['owner']}", highlight=False)
                if link["promotion"]:
                    node.add(f"promoted by {link['promotion'].get('approver')} at {link['promotion'].get('at')}",
                             highlight=False)
            if role == "teacher":
                moved = {a: v for a, v in link["aliases_now"].items() if v != link["version"]}
                node.add(f"licence {link['license']}" + (f" (override: {link['license_override']})"
                                                         if link.get("license_override") else ""), highlight=False)
                if moved:
                    node.add(f"[yellow]aliases now elsewhere: {', '.join(f'@{a} -> v{v}' for a, v in moved.items())}; "
                             f"this model was made from v{link['version']}[/]", highlight=False)
            node.add(f"[dim]{link['link']}[/]", highlight=False)
        elif role == "soft labels":
            node = node.add(f"[bold]soft labels[/] key {str(link['key'])[:16]}  {link['uri']}", highlight=False)
        elif role == "data":
            data = node.add(f"[bold]data[/] sha256 {link['digest'][:16]}", highlight=False)
            for split, digest in link.get("splits", {}).items():
                data.add(f"{split}: sha256 {digest}", highlight=False)
            if link.get("problem"):
                data.add(f"[red]{link['problem']}[/]", highlight=False)
    for line in root.lines():
        console.print(line, highlight=False)  # never cropped: digests and run ids stay whole
    console.print(f"pipeline run  {run['link']}" + (f"\nprefect run   {run['prefect_flow_run']}" if run["prefect_flow_run"] else ""),
                  highlight=False)
    console.print(f"attestations  {info['attestation_uri']}  (check them: distill verify {model})", highlight=False)


@app.command()
def verify(model: str = typer.Argument(..., help="models:/<name>-edge@champion or models:/<name>-edge/3"),
           tracking_uri: str = TrackingOpt,
           public_key: Optional[list[str]] = typer.Option(None, "--public-key", help="trusted signing public key (PEM); "
                                                          "default: the local key pair's (governance.key_dir)"),
           key_dir: Optional[Path] = typer.Option(None, help="folder of the local key pair (default .distill/keys)")):
    """Recompute every digest and check every signature behind a model; exit 1 naming any broken link."""
    from distill_gap.edge.serving import stdout_to_stderr
    from distill_gap.errors import DistillError
    from distill_gap.governance.lineage import verify as run_verify
    from distill_gap.registry.model_uri import registry_client

    try:
        with stdout_to_stderr():
            result = run_verify(registry_client(tracking_uri), model, public_keys=public_key, key_dir=key_dir,
                                log=lambda m: err_console.print(f"[dim]{m}[/]"))
    except DistillError as err:
        _fail(err)
    table = Table(title=f"verify {result.uri} (keys: {result.key_source})")
    for col in ("link", "result", "detail"):
        table.add_column(col)
    for c in result.checks:
        table.add_row(c.link, "[green]ok[/]" if c.ok else "[bold red]BROKEN[/]", c.detail)
    console.print(table)
    if not result.ok:
        broken = [c.link for c in result.checks if not c.ok]
        err_console.print(f"[bold red]verification failed[/]: {', '.join(broken)}")
        raise typer.Exit(1)
    console.print(f"[green]all {len(result.checks)} checks passed[/]")


@app.command()
def promote(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
            version: int = typer.Option(..., help="the <name>-edge version to promote"),
            reason: str = typer.Option("manual", help="recorded on the promotion")):
    """Promote an edge version that passed its gates (asks for approval when approval.required); idempotent."""
    from distill_gap.errors import DistillError

    try:
        cfg = _load(config, set)
        from flows.promote import promote_edge
        from distill_gap.ops.prefect_server import tie_ephemeral_server

        tie_ephemeral_server()

        result = promote_edge(cfg, version=version, reason=reason)
    except DistillError as err:
        _fail(err)
    console.print(f"{cfg.edge_model_name}: @champion -> v{result['champion']}"
                  + ("" if result["changed"] else f" (unchanged: {result['reason']})"), highlight=False)


@app.command()
def approve(flow_run_id: str = typer.Argument(..., help="the paused flow run (printed by the run, shown in the UI)"),
            approver: str = typer.Option(..., help="your name (recorded)"),
            decision: str = typer.Option(..., help="approve or reject"),
            comment: str = typer.Option("", help="why (recorded)")):
    """Answer a paused promotion without the UI (same form, same validation as the Prefect UI)."""
    from distill_gap.ops.prefect_server import tie_ephemeral_server
    from distill_gap.errors import DistillError
    from distill_gap.governance.promotion import answer_run

    tie_ephemeral_server()
    try:
        answer_run(flow_run_id, {"approver": approver, "decision": decision, "comment": comment})
    except DistillError as err:
        _fail(err)
    console.print(f"flow run {flow_run_id} resumed with decision {decision} by {approver}")


@app.command()
def rollback(model: str = typer.Argument(..., help="the registered edge model, e.g. demo-edge"),
             to: int = typer.Option(..., "--to", help="the version to make @champion again"),
             reason: str = typer.Option(..., help="why (recorded on the version and in a signed attestation)"),
             by: Optional[str] = typer.Option(None, help="who rolls back (default: the login name)"),
             tracking_uri: str = TrackingOpt,
             key_dir: Path = typer.Option(Path(".distill/keys"), envvar="DISTILL_KEY_DIR", help="signing key pair")):
    """Move @champion back to an earlier version that passed its gates; record who and why."""
    from flows.config import GovernanceConfig, TrackingConfig
    from distill_gap.errors import DistillError
    from distill_gap.governance.promotion import rollback as do_rollback
    from distill_gap.registry.model_uri import registry_client

    try:
        result = do_rollback(registry_client(tracking_uri), model, to, reason=reason, by=by,
                             governance=GovernanceConfig(key_dir=str(key_dir)),
                             tracking=TrackingConfig(uri=tracking_uri))
    except DistillError as err:
        _fail(err)
    if not result["changed"]:
        console.print(f"{model} v{to} is already @champion: nothing changed")
        return
    console.print(f"{model}: @champion v{result['previous']} -> v{to} (by {result['by']}: {reason})", highlight=False)


@app.command()
def deploy(pool: str = typer.Option("distill-process", help="the work pool named in prefect.yaml")):
    """Create the work pool if missing, deploy everything in prefect.yaml, apply deployments/automations.yaml."""
    from distill_gap.ops.deployments import apply_automations, deploy_all, ensure_work_pool
    from distill_gap.errors import DistillError

    try:
        created = ensure_work_pool(pool)
        console.print(f"work pool {pool}: {'created' if created else 'exists'}")
        deploy_all()
        console.print("deployments: distill-pipeline, drift-monitor, teacher-watch (prefect.yaml)")
        for name in apply_automations():
            console.print(f"automation {name}: applied")
    except DistillError as err:
        _fail(err)
    console.print(f"next: `distill worker --pool {pool}` runs them; the Prefect UI shows schedules and runs")


@app.command()
def worker(pool: str = typer.Option("distill-process", help="the work pool to take runs from")):
    """Start a Prefect worker on the pool, in this directory (the deployments run flows from here)."""
    bindir = Path(sys.executable).parent
    os.execv(str(bindir / "prefect"), [str(bindir / "prefect"), "worker", "start", "--pool", pool, "--type", "process"])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
