"""Scheduled watches that start redistillation on evidence: teacher-watch and drift-monitor.

Each publishes a markdown artifact every time (what it compared, what it found) and emits its event only
on a finding; the automations of deployments/ turn the event into a distill-pipeline run.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from distill_gap.monitoring.events import DRIFT_DETECTED, TEACHER_CHANGED, emit
from distill_gap.monitoring.watches import monitor_drift, teacher_change
from distill_gap.registry.tracking import client_for
from flows.config import load_config


@flow(name="teacher-watch", log_prints=True)
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


@flow(name="drift-monitor", log_prints=True)
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
    if report["drifted"]:
        report["event_id"] = emit(DRIFT_DETECTED, cfg.name, {
            "config_path": config_path, "champion": report["champion"], "production": production,
            "reason": "; ".join(report["reasons"])[:1000], "rows": report["rows"], "scored": report["scored"]})
    print(("DRIFT: " + "; ".join(report["reasons"])) if report["drifted"] else
          f"no drift in {report['rows']} rows ({report['scored']} scored)")
    return report
