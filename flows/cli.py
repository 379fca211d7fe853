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
from rich.table import Table

from distill_gap.ops.runtime import apply_embedded_env, apply_project_prefect_home  # noqa: E402  (light)

apply_embedded_env()
apply_project_prefect_home()  # every command (run, ui, worker, deploy) on one Prefect history: .distill/prefect

from flows.cli_common import (ConfigOpt, SetOpt, app, console, fail, load_cfg,  # noqa: E402
                               on_sigterm, teacher_app)


@app.command()
def run(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
        reason: str = typer.Option("manual", help="why this run started (recorded as trigger.reason)")):
    """Run the whole pipeline: validate, soft labels, distill, quantize, evaluate, register."""
    from distill_gap.errors import DistillError

    try:
        cfg = load_cfg(config, set)
        console.print(f"distill-pipeline {cfg.name} (config digest {cfg.digest()[:12]})", style="bold")
        from flows.pipeline import distill_pipeline
        from distill_gap.ops.prefect_server import tie_ephemeral_server

        tie_ephemeral_server()  # a SIGKILLed run leaves no orphaned API server behind
        signal.signal(signal.SIGTERM, on_sigterm)  # Prefect marks the run Crashed first, then calls this

        result = distill_pipeline(cfg, trigger_reason=reason)
    except DistillError as err:
        fail(err)
    _print_summary(cfg, result)


@app.command()
def recover(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Mark pipeline runs whose process died (SIGKILL, OOM) as KILLED in MLflow and Crashed in Prefect."""
    from distill_gap.errors import DistillError
    from distill_gap.ops.prefect_server import tie_ephemeral_server
    from distill_gap.registry.crash_recovery import reap
    from distill_gap.registry.tracking import client_for

    try:
        cfg = load_cfg(config, set)
        tie_ephemeral_server()
        found = reap(client_for(cfg.tracking), cfg.tracking, log=console.print)
    except DistillError as err:
        fail(err)
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
        console.print(f"⚠ losses beyond {report['threshold']:.0%} vs the teacher:", style="yellow")
        for suite, items in by_suite.items():
            console.print(f"  {suite}: {', '.join(items)}", style="yellow")
    reg, t, soft = result["registered"], result["teacher"], result["soft_labels"]
    from distill_gap.outcomes import gate_outcome

    shown = {"pass": "pass", "fail": "FAIL", "insufficient": "insufficient"}
    gates = ", ".join(f"{k} {g['value']:.3f} ({shown[gate_outcome(g)]})" for k, g in result["gates"].items())
    console.print(f"teacher      {t['name']} v{t['version']} (digest {t['digest'][:12]})")
    console.print(f"soft labels  {'cache hit' if soft['hit'] else 'computed'}: {soft['uri']}")
    promotion = result.get("promotion") or {}
    console.print(f"registered   {reg['student']['name']} v{reg['student']['version']}, "
                  f"{reg['edge']['name']} v{reg['edge']['version']}" + (" @champion" if reg['edge']['champion'] else
                  " @challenger" if promotion.get("challenger") == reg["edge"]["version"] else ""))
    if promotion.get("challenger") == reg["edge"]["version"] and not reg["edge"]["champion"]:
        from distill_gap.governance.promotion import waiver_command
        from distill_gap.outcomes import INSUFFICIENT, by_outcome

        thin = list(by_outcome(result["gates"], INSUFFICIENT))
        console.print(f"insufficient evidence for {', '.join(thin)}: @champion did not move. A named approver "
                      "may waive these gates with their own key:", style="yellow")
        console.print(f"  {waiver_command(reg['edge']['name'], reg['edge']['version'], thin)}")
    edge = result["edge"]
    console.print(f"edge         primary {edge['primary']} ({'INT8' if edge['quantized'] else 'NOT quantized'}): "
                  f"{edge['reason']}", style=None if edge["quantized"] else "red")
    for e in edge["errors"]:
        console.print(f"  not built: {e['problem']}", style="yellow")
    console.print(f"gates        {gates}")
    checks = report.get("noninferiority", {}).get(edge["report_name"], [])
    if checks:  # the paired evidence against the teacher (issue 19): what is shown, what is not yet
        counts = {o: sum(c["outcome"] == o for c in checks) for o in ("pass", "fail", "insufficient")}
        undecided = [f"{c['check']} (~{c['rows_needed']:,} rows)" if c["rows_needed"] else c["check"]
                     for c in checks if c["outcome"] != "pass"]
        console.print(f"proof        not worse than the teacher by more than the margin, same test rows: "
                      f"{counts['pass']} shown, {counts['fail']} shown worse, {counts['insufficient']} undecided"
                      + (f" ({', '.join(undecided)})" if undecided else ""), highlight=False)
    console.print(f"mlflow run   {result['run_id']} in {result['tracking_uri']}")
    console.print("look         `distill ui` -> Prefect UI (runs, gap report artifact) and MLflow UI (runs, registry)")


@teacher_app.command("bootstrap")
def teacher_bootstrap(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
                      force: bool = typer.Option(False, help="fine-tune again even if the pinned teacher matches")):
    """Fine-tune teacher.base on the training split, register it as <name>-teacher and pin it."""
    from distill_gap.errors import DistillError

    try:
        from distill_gap.kd.teacher import bootstrap_teacher

        bootstrap_teacher(load_cfg(config, set), force=force, log=console.print)
    except DistillError as err:
        fail(err)


@teacher_app.command("import")
def teacher_import(path: Path = typer.Argument(..., help="a Hugging Face classifier folder (safetensors)"),
                   config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
                   license: str = typer.Option(..., help="the model's license, recorded in the registry"),
                   pin: bool = typer.Option(True, help="move the teacher alias to the new version")):
    """Register an existing fine-tuned classifier as <name>-teacher."""
    from distill_gap.errors import DistillError

    try:
        from distill_gap.kd.teacher import import_teacher

        import_teacher(load_cfg(config, set), path, license=license, pin=pin, log=console.print)
    except DistillError as err:
        fail(err)


@app.command("config")
def show_config(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Validate a config and print it resolved, with its digest."""
    import yaml

    from distill_gap.errors import DistillError

    try:
        cfg = load_cfg(config, set)
    except DistillError as err:
        fail(err)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)
    console.print(f"# config digest {cfg.digest()}")


@app.command()
def deploy(pool: str = typer.Option("distill-process", help="the work pool named in prefect.yaml")):
    """Create the work pool if missing, deploy everything in prefect.yaml, apply deployments/automations.yaml."""
    from distill_gap.ops.deployments import apply_automations, deploy_all, ensure_work_pool
    from distill_gap.errors import DistillError

    try:
        created = ensure_work_pool(pool)
        console.print(f"work pool {pool}: {'created' if created else 'exists'}")
        deploy_all()
        console.print("deployments: distill-pipeline, drift-monitor, teacher-watch, review-check (prefect.yaml)")
        for name in apply_automations():
            console.print(f"automation {name}: applied")
    except DistillError as err:
        fail(err)
    console.print(f"next: `distill worker --pool {pool}` runs them; the Prefect UI shows schedules and runs")


@app.command()
def worker(pool: str = typer.Option("distill-process", help="the work pool to take runs from")):
    """Start a Prefect worker on the pool, in this directory (the deployments run flows from here)."""
    bindir = Path(sys.executable).parent
    os.execv(str(bindir / "prefect"), [str(bindir / "prefect"), "worker", "start", "--pool", pool, "--type", "process"])


# the cache and model commands register on `app` too; imported last so that `distill --help` lists run first
from flows import cli_cache, cli_feedback, cli_models, cli_predict, cli_ui  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
