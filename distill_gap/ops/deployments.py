"""`distill deploy`: the work pool, the deployments of prefect.yaml and the automations of deployments/."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import yaml

from distill_gap.errors import DistillError

ROOT = Path(__file__).resolve().parents[2]  # the repository: prefect.yaml, deployments/
AUTOMATIONS = ROOT / "deployments" / "automations.yaml"


def ensure_work_pool(name: str, pool_type: str = "process") -> bool:
    """Create the work pool when missing; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            return True


def deploy_all(cwd: Path = ROOT) -> str:
    """Every deployment of prefect.yaml, through Prefect's own `prefect deploy --all`."""
    prefect = Path(sys.executable).parent / "prefect"
    proc = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DistillError(f"`prefect deploy --all` failed: {(proc.stderr or proc.stdout).strip()[-800:]}",
                           "check prefect.yaml and that PREFECT_API_URL points to a running Prefect server")
    return proc.stdout


def automation_specs(path: Path = AUTOMATIONS) -> list[dict]:
    specs = (yaml.safe_load(path.read_text()) or {}).get("automations", [])
    for spec in specs:
        missing = {"name", "event", "deployment", "cooldown_seconds"} - set(spec)
        if missing:
            raise DistillError(f"automation {spec.get('name', '?')} in {path} lacks {sorted(missing)}",
                               "see the keys of the other automations in that file")
    return specs


def apply_automations(path: Path = AUTOMATIONS) -> list[str]:
    """Create or replace each automation: event on distill.model.* -> run the deployment with the event's reason."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture

    names = []
    with get_client(sync_client=True) as client:
        for spec in automation_specs(path):
            deployment = client.read_deployment_by_name(spec["deployment"])
            for old in client.read_automations_by_name(spec["name"]):
                client.delete_automation(old.id)
            Automation(
                name=spec["name"], description=spec.get("description", ""),
                trigger=EventTrigger(expect={spec["event"]}, match={"prefect.resource.id": "distill.model.*"},
                                     posture=Posture.Reactive, threshold=1,
                                     within=timedelta(seconds=int(spec["cooldown_seconds"]))),
                actions=[RunDeployment(source="selected", deployment_id=deployment.id, parameters={
                    "config_path": {"__prefect_kind": "jinja", "template": "{{ event.payload.config_path }}"},
                    "trigger_reason": {"__prefect_kind": "jinja",
                                       "template": "{{ event.event }}: {{ event.payload.reason }}"},
                    # a drift event's rows and their digest: the run learns from them (empty for other events)
                    "production": {"__prefect_kind": "jinja", "template": "{{ event.payload.production or '' }}"},
                    "production_digest": {"__prefect_kind": "jinja",
                                          "template": "{{ event.payload.production_digest or '' }}"}})],
            ).create()
            names.append(spec["name"])
    return names
