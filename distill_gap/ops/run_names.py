"""Names and tags that say what ran, in the Prefect UI (issue 23): `demo · manual`, `demo · drift`; tags
`config:demo` and `trigger:drift`, so that runs of several configs and triggers can be told apart and filtered."""

from __future__ import annotations

# the events that start a redistillation (deployments/automations.yaml) -> the word people see
_EVENT_TRIGGERS = {"distill.drift.detected": "drift", "distill.teacher.changed": "teacher-change"}


def trigger_kind(reason: str) -> str:
    """The trigger in one word: `drift` for "distill.drift.detected: psi 0.31 ...", `manual` for "manual", the
    part before the first colon of any other reason ("test: first run" -> "test"), at most 32 characters."""
    head = (reason or "manual").split(":", 1)[0].strip() or "manual"
    return _EVENT_TRIGGERS.get(head, head)[:32]


def flow_run_name(config_name: str, reason: str) -> str:
    return f"{config_name} · {trigger_kind(reason)}"


def named_after_config(what: str):
    """A Prefect `flow_run_name` for the scheduled watches: `<config> · <what>` (`demo · drift check`), the config
    named by the flow run's `config_path` parameter (its file name, as the deployments pass it)."""
    def name() -> str:
        from pathlib import Path

        from prefect.runtime import flow_run

        return f"{Path(str(flow_run.parameters.get('config_path', '?'))).stem} · {what}"
    return name


def run_tags(config_name: str, reason: str) -> list[str]:
    return [f"config:{config_name}", f"trigger:{trigger_kind(reason)}"]


def config_name_of(config) -> str:
    """The name of a flow's config parameter: a PipelineConfig, or its dict (as a deployment passes it)."""
    if isinstance(config, dict):
        return str(config.get("name", "?"))
    return str(getattr(config, "name", "?"))


def tag_flow_run(tags: list[str], log=None) -> None:
    """Add `tags` to the current flow run (its own tags, which the Prefect UI filters by); outside a flow run,
    nothing. A failure costs the tags only, with a warning: they label the run, they decide nothing."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(run_id).tags
            client.update_flow_run(run_id, tags=sorted(set(current) | set(tags)))
    except Exception as exc:  # noqa: BLE001 - see above
        if log is not None:
            log(f"flow run not tagged {tags}: {exc}")
