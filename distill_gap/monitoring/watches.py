"""Redistillation watches: the teacher moved, or the world drifted. flows/monitor.py emits each finding as one
Prefect event (distill_gap.monitoring.events) with its evidence; automations in deployments/ turn the event into
a run of the distill-pipeline deployment."""

from __future__ import annotations

from distill_gap.edge.folder import REFERENCE_FILE, read_reference
from distill_gap.errors import DistillError
from distill_gap.registry.model_uri import resolve_edge


def champion(client, cfg):
    """The <name>-edge version @champion, or None when nothing has been promoted yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(cfg.edge_model_name, "champion")
    except MlflowException:
        return None


def teacher_change(client, cfg) -> dict:
    """Compare the teacher's alias with the teacher version the champion edge model was distilled from."""
    from mlflow.exceptions import MlflowException

    try:
        pinned = client.get_model_version_by_alias(cfg.teacher_model_name, cfg.teacher.alias)
    except MlflowException:
        raise DistillError(f"{cfg.teacher_model_name} has no @{cfg.teacher.alias} version",
                           "register a teacher first: `distill teacher bootstrap --config <config>`") from None
    current = champion(client, cfg)
    if current is None:
        return {"changed": False, "reason": f"{cfg.edge_model_name} has no @champion yet: nothing to compare",
                "pinned_version": int(pinned.version), "champion": None}
    made_from = int(current.tags.get("teacher.version", 0))
    changed = made_from != int(pinned.version)
    return {"changed": changed, "pinned_version": int(pinned.version), "champion_teacher_version": made_from,
            "champion": f"{cfg.edge_model_name}/{current.version}",
            "reason": (f"teacher changed: {cfg.teacher_model_name} @{cfg.teacher.alias} is v{pinned.version}, "
                       f"champion {cfg.edge_model_name} v{current.version} was distilled from v{made_from}")
            if changed else f"champion {cfg.edge_model_name} v{current.version} was distilled from the pinned "
                            f"teacher v{made_from}"}


# ---------------------------------------------------------------------------------------------
# drift: the reference ships with the edge model (written by the evaluate stage); the monitor compares
# production rows with it


def _scored(model, texts):
    """(logits, the shipped guard's scope scores) of the champion: the monitor counts what predict counts."""
    logits, features = model.predict_outputs(texts)
    return (logits, None) if model.guard is None else (logits, model.guard.score(logits, features, texts))


def _outside_regions(guard, rows) -> list[bool] | None:
    """Per production row, whether it names a region outside the champion's proven scope (None: the guard has no
    regions, or the rows name none: nothing to look up)."""
    column = None if guard is None else guard.region_column
    if column is None or column not in rows:
        return None
    return [r is not None for r in guard.outside_regions([{column: v} for v in rows[column]])]


def monitor_drift(client, cfg, production: str, *, log=print) -> dict:
    """Read the production rows, load the champion and its reference, and compare them (distill_gap.monitoring.drift)."""
    from distill_gap.edge.serving import load_edge
    from distill_gap.monitoring.drift import drift_report, read_production_rows

    rows = read_production_rows(production)  # bad input fails here, before the registry or the model
    current = champion(client, cfg)
    if current is None:
        raise DistillError(f"{cfg.edge_model_name} has no @champion yet: there is nothing to monitor",
                           "run the pipeline until a version passes its gates (`distill run --config <config>`)")
    folder = resolve_edge(f"models:/{cfg.edge_model_name}/{current.version}", client._registry_uri, log=log)
    if not (folder / REFERENCE_FILE).is_file():
        raise DistillError(f"{cfg.edge_model_name} v{current.version} ships no {REFERENCE_FILE} (registered before "
                           "drift monitoring existed)", "run the pipeline once more to register a champion with a reference")
    model = load_edge(folder)
    report = drift_report(read_reference(folder), rows, lambda texts: _scored(model, texts), model.labels,
                          thresholds=cfg.drift.thresholds(),
                          scope_threshold=None if model.guard is None else model.guard.threshold,
                          sample_size=cfg.drift.sample_size, seed=cfg.seed,
                          outside=_outside_regions(model.guard, rows))
    report["champion"] = f"{cfg.edge_model_name}/{current.version}"
    report["production"] = production
    return report


def reviews_due(client, names: list[str], *, today=None) -> list[dict]:
    """Every @champion among the registered models `names` whose review.due date has passed (or is missing or
    unreadable: a champion without a review date is overdue by definition). [{"name", "version", "due", "days"}]"""
    from datetime import date

    from mlflow.exceptions import MlflowException

    today = today or date.today()
    due = []
    for name in names:
        try:
            mv = client.get_model_version_by_alias(name, "champion")
        except MlflowException:  # no such model, or no champion: nothing to review
            continue
        raw = mv.tags.get("review.due", "")
        try:
            when = date.fromisoformat(raw)
        except ValueError:
            when = None
        if when is None or when < today:
            due.append({"name": name, "version": int(mv.version), "due": raw or None,
                        "days": (today - when).days if when else None, "owner": mv.tags.get("owner")})
    return due
