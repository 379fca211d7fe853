"""The Prefect events this project emits, one resource per model (DESIGN.md, events): the watches' findings
(teacher changed, drift) and the promotion outcomes (gates failed, model promoted). Automations in deployments/
turn them into runs."""

from __future__ import annotations

TEACHER_CHANGED = "distill.teacher.changed"
DRIFT_DETECTED = "distill.drift.detected"
GATES_FAILED = "distill.gates.failed"
MODEL_PROMOTED = "distill.model.promoted"
REVIEW_DUE = "distill.review.due"  # a champion past its review.due date (review-check)


def resource(name: str) -> dict:
    """The Prefect resource of model `name`: what automations match on."""
    return {"prefect.resource.id": f"distill.model.{name}", "prefect.resource.name": name}


def emit(event: str, name: str, payload: dict) -> str | None:
    """Emit one event on resource distill.model.<name>; returns its id (None when events are disabled)."""
    from prefect.events import emit_event

    sent = emit_event(event=event, resource=resource(name), payload=payload)
    return str(sent.id) if sent is not None else None
