"""Crash recovery: a pipeline run whose process died is marked as such, never left RUNNING.

An exception or SIGTERM is handled in the process: Prefect's engine reports the flow run Crashed (SIGTERM) or
Failed, the pipeline marks its MLflow runs FAILED, and the register step removes what it had staged. SIGKILL
(or the OOM killer, or a power cut) leaves the process no chance, so the next pipeline run, or `distill
recover`, looks for pipeline runs still RUNNING in MLflow whose process is gone from this host, and:

- marks the MLflow pipeline run and its stage runs KILLED, with a `distill.crash` tag saying what happened;
- sets the Prefect flow run (and its running task runs) Crashed with the same message;
- deletes the registry versions the dead run had created without an alias (a half-done registration).

A run is judged dead only on the host that started it (pid and process start time are tags of the run); runs
from other hosts are left alone, as their own host (or its worker) reports them.
"""

from __future__ import annotations

from typing import Callable

from distill_gap.ops.liveness import HOST, PID, process_alive
from distill_gap.registry.versions import Staged, unstage


def crash_flow_run(flow_run_id: str, message: str) -> str | None:
    """Set a non-final Prefect flow run, and its running task runs, Crashed. Returns the state set (or None)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState
    from prefect.client.schemas.filters import TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    if not flow_run_id:
        return None
    with get_client(sync_client=True) as c:
        try:
            run = c.read_flow_run(flow_run_id)
        except Exception:  # the run lives on another Prefect API: nothing to mark here
            return None
        if run.state is not None and run.state.is_final():
            return None
        tasks = c.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]))))
        for t in tasks:
            c.set_task_run_state(t.id, Crashed(message=message), force=True)
        c.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return "Crashed"


def reap(client, tracking, log: Callable = print) -> list[dict]:
    """Mark every dead pipeline run of this host's experiment; returns one record per run marked."""
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return []
    eid = exp.experiment_id
    found = []
    for run in client.search_runs([eid], filter_string="tags.distill.stage = 'pipeline' and attributes.status = 'RUNNING'"):
        if process_alive(run.data.tags) is not False:
            continue
        rid = run.info.run_id
        stages = client.search_runs([eid], filter_string=f"tags.mlflow.parentRunId = '{rid}'",
                                    order_by=["attributes.start_time DESC"])
        last = stages[0].data.tags.get("distill.stage", "?") if stages else "start"
        message = (f"process {run.data.tags.get(PID)} on {run.data.tags.get(HOST)} died during the {last} stage "
                   "(killed: SIGKILL, OOM or power loss); marked by the next run")
        # a version with an alias was promoted: kept. Search results carry no aliases (MLflow 3), so each is read.
        staged = Staged(versions=[(mv.name, str(mv.version)) for r in [run, *stages]
                                  for mv in client.search_model_versions(f"run_id = '{r.info.run_id}'")
                                  if not client.get_model_version(mv.name, str(mv.version)).aliases])
        removed = unstage(client, staged, log)
        for s in stages:
            if s.info.status == "RUNNING":
                client.set_terminated(s.info.run_id, "KILLED")
        client.set_tag(rid, "distill.crash", message)
        client.set_terminated(rid, "KILLED")
        flow_run_id = run.data.tags.get("prefect.flow_run_id", "")
        state = crash_flow_run(flow_run_id, message)
        log(f"recovered crashed run {rid} (flow run {flow_run_id or '?'}): {message}"
            + (f"; removed {', '.join(removed)}" if removed else ""))
        found.append({"mlflow_run_id": rid, "flow_run_id": flow_run_id, "stage": last, "removed": removed,
                      "prefect_state": state})
    return found
