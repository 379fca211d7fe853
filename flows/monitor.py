"""Scheduled watches: teacher-watch and drift-monitor start redistillation on evidence; review-check says when a
champion is past its review date.

Each publishes a markdown artifact every time (what it compared, what it found) and emits its event only
on a finding; the automations of deployments/ turn the event into a distill-pipeline run.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from distill_gap.monitoring.events import DRIFT_DETECTED, REVIEW_DUE, TEACHER_CHANGED, emit
from distill_gap.monitoring.watches import monitor_drift, reviews_due, teacher_change
from distill_gap.ops.run_names import named_after_config
from distill_gap.registry.tracking import client_for
from flows.config import load_config


@flow(name="teacher-watch", flow_run_name=named_after_config("teacher watch"), log_prints=True)
def teacher_watch(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict:
    """Emit distill.teacher.changed when the teacher's alias no longer points to the champion's teacher."""
    cfg = load_config(config_path, overrides or [])
    found = teacher_change(client_for(cfg.tracking), cfg)
    if found["changed"]:
        found["event_id"] = emit(TEACHER_CHANGED, cfg.name, {
            "config_path": config_path, "reason": found["reason"], "from_version": found["champion_teacher_version"],
            "to_version": found["pinned_version"], "champion": found["champion"]})
    create_markdown_artifact(key=f"{cfg.name}-teacher-watch", description=f"teacher-watch for {cfg.name}",
                             markdown=f"**{'Teacher changed: redistillation requested' if found['changed'] else 'No change'}**"
                                      f"\n\n{found['reason']}")
    print(found["reason"])
    return found


@flow(name="drift-monitor", flow_run_name=named_after_config("drift check"), log_prints=True)
def drift_monitor(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
                  production: str = ".distill/production") -> dict:
    """Compare a production sample with the champion's reference; emit distill.drift.detected on drift."""
    from distill_gap.errors import DistillError
    from distill_gap.monitoring.drift import drift_markdown

    cfg = load_config(config_path, overrides or [])
    key = f"{cfg.name}-drift-report"
    try:
        report = monitor_drift(client_for(cfg.tracking), cfg, production)
    except DistillError as err:  # bad input or no champion: said in the run and the report; no event, no retry
        create_markdown_artifact(key=key, description=f"drift-monitor for {cfg.name}: not evaluated",
                                 markdown=f"**Drift not evaluated.** {err.problem}\n\nFix: {err.fix}")
        raise
    create_markdown_artifact(key=key, markdown=drift_markdown(report), description=f"drift-monitor for {cfg.name}")
    if report["drifted"]:  # the evidence travels with the event: the rows (location and digest), what moved, where
        from distill_gap.monitoring.drift import sample_digest

        low = [f"{s['column']}={s['value']}" for s in (report.get("accuracy") or {}).get("slices", [])
               if cfg.drift.min_accuracy is not None and s["accuracy"] < cfg.drift.min_accuracy]
        report["event_id"] = emit(DRIFT_DETECTED, cfg.name, {
            "config_path": config_path, "champion": report["champion"], "production": production,
            "production_digest": sample_digest(production), "statistics": report["reasons"], "slices": low,
            "reason": "; ".join(report["reasons"])[:1000], "rows": report["rows"], "scored": report["scored"]})
    print(("DRIFT: " + "; ".join(report["reasons"])) if report["drifted"] else
          f"no drift in {report['rows']} rows ({report['scored']} scored)")
    return report


@flow(name="review-check", flow_run_name=named_after_config("review check"), log_prints=True)
def review_check(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> list[dict]:
    """Emit distill.review.due for every champion (edge, student) past its review.due date (governance.review_days
    after registration), to its owner; the dossier shows it overdue."""
    cfg = load_config(config_path, overrides or [])
    due = reviews_due(client_for(cfg.tracking), [cfg.edge_model_name, cfg.student_model_name])
    for d in due:
        d["event_id"] = emit(REVIEW_DUE, d["name"], {"config_path": config_path, **d})
    lines = [f"- `{d['name']}` v{d['version']} (owner {d['owner']}): review was due {d['due'] or 'never set'}"
             + (f", {d['days']} days ago" if d["days"] is not None else "") for d in due]
    create_markdown_artifact(key=f"{cfg.name}-review-check", description=f"review-check for {cfg.name}",
                             markdown=("**Reviews overdue**\n\n" + "\n".join(lines)) if due else "**No review due.**")
    print(f"{len(due)} champion(s) past their review date" if due else "no review due")
    return due
