"""What people read in the MLflow UI (issue 23): the experiment's description, the pipeline run's description and
headline metrics, each version's short markdown description, and the registered models' word on promotion.

Plain functions of the gap report and the gates (duck-typed: the registry does not import evaluation); the
description is MLflow's `mlflow.note.content` tag on experiments and runs.
"""

from __future__ import annotations

from distill_gap.evaluation.regions import summary as region_summary
from distill_gap.outcomes import FAIL, INSUFFICIENT, by_outcome

NOTE = "mlflow.note.content"  # the description field of an experiment or a run in the MLflow UI

EXPERIMENT_DESCRIPTION = (
    "Pipeline runs of distill-gap: a pinned teacher distilled into a student and quantized into an edge model, each "
    "evaluated on its own. Open a `<name>-pipeline` run for its verdict, flagged slices and headline metrics "
    "(`headline.*`); its nested runs hold each stage's evidence (the gap report is in the `evaluate` run's "
    "artifacts, the dossier in the `register` run's). Versions are in Models: `<name>-teacher`, `-student`, `-edge`.")


def model_description(role: str, edge_model_name: str) -> str:
    """The registered model's description: what its versions are and how an edge version is promoted."""
    how = (f"**Promotion has gates: use `distill promote --config <config> --version <N>`, not MLflow's \"Promote "
           f"model\" button or a hand-set alias.** `@champion` moves only when every gate of the version passed, or "
           f"a named approver waived the undecided ones with their own key (`distill approve models:/"
           f"{edge_model_name}/<N> --approver <name> --waive <gates> --reason ...`); `distill rollback "
           f"{edge_model_name} --to <N>` moves it back. Each is signed and recorded; an alias set by hand carries no "
           "evidence, and `distill verify` does not trust it.")
    if role == "edge":
        return ("Edge models (INT8, ONNX) distilled and quantized by distill-gap. Each version's description gives "
                "its verdict, flagged slices and scope; its tags the whole lineage.\n\n" + how)
    return (f"Fp32 students distilled by distill-gap; not deployed themselves: each is the parent of an "
            f"`{edge_model_name}` version, which is what ships.\n\n" + how)


def describe_model(client, name: str, role: str, edge_model_name: str) -> None:
    """Give the registered model its description (once; a description someone wrote by hand stays)."""
    current = client.get_registered_model(name).description or ""
    wanted = model_description(role, edge_model_name)
    if current != wanted and (not current or current.startswith(("Edge models (INT8", "Fp32 students"))):
        client.update_registered_model(name, description=wanted)


def headline_metrics(report, gates: dict, edge: str) -> dict[str, float]:
    """The four numbers a reader compares runs and versions by: the edge model's test accuracy, its retention of
    the teacher's accuracy, its accuracy on the worst critical slice (the `noninferior:slice:` gates), and the
    AUROC of its shipped scope guard on the worst OOD set. A number that was not measured is left out."""
    test = report.suites.get("test", {})
    out: dict[str, float] = {}
    if "accuracy" in test.get(edge, {}):
        out["headline.edge_test_accuracy"] = test[edge]["accuracy"]
        if test.get("teacher", {}).get("accuracy"):
            out["headline.retention_vs_teacher"] = test[edge]["accuracy"] / test["teacher"]["accuracy"]
    critical = [report.suites.get(k.removeprefix("noninferior:"), {}).get(edge, {}).get("accuracy")
                for k in gates if k.startswith("noninferior:slice:")]
    if any(a is not None for a in critical):
        out["headline.worst_critical_slice_accuracy"] = min(a for a in critical if a is not None)
    detector = (report.scope.get(edge) or {}).get("detector")
    aurocs = [by_model.get(edge, {}).get(detector, {}).get("auroc") for by_model in report.ood.values()]
    if detector and any(a is not None for a in aurocs):
        out["headline.scope_auroc"] = min(a for a in aurocs if a is not None)
    return out


def verdict_line(gates: dict) -> str:
    failed, thin = by_outcome(gates, FAIL), by_outcome(gates, INSUFFICIENT)
    if failed:
        return f"**Verdict: gates FAILED** ({', '.join(failed)}): not registered for release."
    if thin:
        return (f"**Verdict: insufficient evidence** for {', '.join(thin)}: `@challenger` only, until a named "
                "approver waives them.")
    return "**Verdict: every gate passed.**"


def flagged_lines(report, edge: str) -> list[str]:
    """One markdown bullet per suite where the edge model loses more than the report's threshold to the teacher."""
    flags = [f for f in report.flags if f["model"] == edge]
    if not flags:
        return [f"No slice where `{edge}` loses more than {report.threshold:.0%} accuracy to the teacher."]
    return [f"Flagged (loses more than {report.threshold:.0%} to the teacher):"] + [
        f"- {f['suite'].removeprefix('slice:')}: {f['gap'] * 100:+.1f} pts (n={f['n']})"
        for f in sorted(flags, key=lambda f: f["gap"])]


def scope_line(report, edge: str) -> str:
    g = report.scope.get(edge)
    if not g:
        return "Scope: no scope guard fitted; every input is answered."
    aurocs = {s: d.get(edge, {}).get(g["detector"], {}).get("auroc") for s, d in report.ood.items()}
    shown = ", ".join(f"AUROC {a:.2f} on {s.removeprefix('ood:')}" for s, a in aurocs.items() if a is not None)
    regions = region_summary(g.get("regions"))
    return (f"Scope: in scope when the {g['detector']} score >= {g['threshold']:.3g} (keeps {g['tpr']:.0%} of "
            f"in-distribution rows)" + (f"; {shown}." if shown else ".") + (f" Regions: {regions}." if regions else ""))


def links_line(links: dict[str, str]) -> str:
    return " · ".join(f"[{name}]({url})" for name, url in links.items() if url)


def version_description(report, gates: dict, edge: str, *, kind: str, links: dict[str, str]) -> str:
    """A version's description, short markdown: the verdict first, flagged slices as bullets, scope in one line,
    the model and its accuracy against the teacher, links to the gap report and the dossier."""
    test = report.suites.get("test", {})
    acc = ""
    if "accuracy" in test.get(edge, {}) and "accuracy" in test.get("teacher", {}):
        e, t = test[edge]["accuracy"], test["teacher"]["accuracy"]
        acc = f" Test accuracy {e:.3f} vs the teacher's {t:.3f} (retention {e / max(t, 1e-9):.3f})."
    parts = [verdict_line(gates), "\n".join(flagged_lines(report, edge)), scope_line(report, edge), kind + acc]
    if links_line(links):
        parts.append(links_line(links))
    return "\n\n".join(parts)


def run_description(report, gates: dict, edge: str, *, links: dict[str, str]) -> str:
    """The pipeline run's description: the verdict, the flagged slices, the headline numbers, the links."""
    m = headline_metrics(report, gates, edge)
    names = {"headline.edge_test_accuracy": "edge test accuracy", "headline.retention_vs_teacher": "retention",
             "headline.worst_critical_slice_accuracy": "worst critical slice", "headline.scope_auroc": "scope AUROC"}
    numbers = ", ".join(f"{names[k]} {v:.3f}" for k, v in m.items())
    parts = [verdict_line(gates), "\n".join(flagged_lines(report, edge))]
    if numbers:
        parts.append(f"`{edge}`: {numbers}.")
    if links_line(links):
        parts.append(links_line(links))
    return "\n\n".join(parts)


def describe_run(client, run_id: str, report, gates: dict, edge: str, *, links: dict[str, str]) -> None:
    """Write the pipeline run's description and headline metrics (again with more links once they exist)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in headline_metrics(report, gates, edge).items()]
    client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, NOTE, run_description(report, gates, edge, links=links))


DISTILL_UI_PREFECT = "http://127.0.0.1:4200"  # `distill ui`'s Prefect UI at its default --prefect-port
# MLflow 3.17's sidebar follows a `workflowType` route parameter, else the browser's stored choice (GenAI in a fresh
# browser, whatever the experiment's kind: no model registry in the sidebar, mlflow/mlflow#24498): every link
# into the MLflow UI carries it, so it opens on the training runs with the registry in the sidebar
MODEL_TRAINING = "?workflowType=machine_learning"


def mlflow_ui_url(mlflow_ui: str, route: str) -> str:
    """A page of the MLflow UI in model-training mode: `route` is the UI's hash route ('models/x/versions/1');
    `mlflow_ui` "" gives it relative to the UI (see mlflow_page)."""
    base = f"{mlflow_ui.rstrip('/')}/" if mlflow_ui else ""
    return f"{base}#/{route.strip('/')}{MODEL_TRAINING}"


def mlflow_page(mlflow_ui: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page in the MLflow UI, or one artifact's page in it. `mlflow_ui` "" gives the link relative to the
    MLflow UI (`#/experiments/...`, the UI's own hash route): written into MLflow's own pages, it works on whatever
    port the UI is opened (`distill ui --mlflow-port`). An absolute base (tracking.ui_url) is for pages outside
    MLflow (Prefect artifacts, the terminal)."""
    return mlflow_ui_url(mlflow_ui, f"experiments/{experiment_id}/runs/{run_id}"
                                    + (f"/artifactPath/{artifact}" if artifact else ""))


def prefect_link(prefect_ui: str | None, flow_run_id: str | None) -> tuple[str, str] | None:
    """(text, URL) of the flow run in the Prefect UI. `prefect_ui` is the UI's address when it was known at write
    time (PREFECT_UI_URL, or a server's PREFECT_API_URL); on the embedded Prefect it is not (`distill ui` serves
    that history on the port its reader picks), so the text names the port the URL assumes: `distill ui`'s
    default."""
    if not flow_run_id or flow_run_id == "None":
        return None
    if prefect_ui:
        return "Prefect flow run", f"{prefect_ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
    return ("Prefect flow run (`distill ui` on its default port 4200)",
            f"{DISTILL_UI_PREFECT}/runs/flow-run/{flow_run_id}")


def ui_links(mlflow_ui: str, experiment_id: str, *, evaluate_run: str | None = None, register_run: str | None = None,
             prefect_ui: str | None = None, flow_run_id: str | None = None) -> dict[str, str]:
    """Link text -> URL: the gap report and the dossier in the MLflow UI (relative to it when `mlflow_ui` is "",
    as in MLflow's own descriptions; see mlflow_page), the flow run in the Prefect UI (see prefect_link)."""
    links = {}
    if evaluate_run:
        links["Gap report"] = mlflow_page(mlflow_ui, experiment_id, evaluate_run, "evaluation/gap_report.html")
    if register_run:
        links["Dossier"] = mlflow_page(mlflow_ui, experiment_id, register_run, "dossier/dossier.html")
    flow_run = prefect_link(prefect_ui, flow_run_id)
    if flow_run:
        links[flow_run[0]] = flow_run[1]
    return links


def stage_run_id(client, parent_run_id: str, stage: str) -> str | None:
    """The nested run of `stage` under a pipeline run (the newest, if a stage ran twice)."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                              f"tags.`distill.stage` = '{stage}'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None
