"""The deployment files, without Docker or a cluster: infra/docker-compose.yml (validated by `docker compose config`
where a compose plugin exists, and always read with PyYAML: services, health checks, no secret written in it) and
the Kubernetes work-pool templates of infra/k8s (checked and rendered the way the Prefect server and worker do)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:]?[-?+][^}]*)?\}")  # ${VAR}, ${VAR:-default}, ${VAR:?error}
ONLY_VAR = re.compile(rf"^{VAR.pattern}$")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_docker_compose_config_validates():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on PATH")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if version.returncode != 0:
        why = (version.stderr or version.stdout).strip().splitlines()
        pytest.skip(f"docker has no compose plugin (`docker compose version`: {why[0] if why else version.returncode})")
    out = subprocess.run([docker, "compose", "-f", COMPOSE, "--env-file", INFRA / ".env.example", "config", "--quiet"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_services_are_there_and_each_checks_its_health(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "worker", "dask-scheduler",
            "dask-worker"} <= set(services)
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"minio-init"}
    for name, service in services.items():
        if name in one_shot:  # a job's health is its exit status: everything that needs it waits for that
            waiting = [s["depends_on"][name]["condition"] for s in services.values() if name in s.get("depends_on", {})]
            assert waiting and set(waiting) == {"service_completed_successfully"}, (name, waiting)
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name} has no health check"
        for dep, how in service.get("depends_on", {}).items():  # start only on healthy (or finished) dependencies
            assert how["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)


def test_services_use_postgresql_and_s3(compose):
    s = compose["services"]
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/10-distill.sh:ro" in s["postgres"]["volumes"]
    assert s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    mlflow = s["mlflow"]["environment"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["MLFLOW_DEFAULT_ARTIFACT_ROOT"].startswith("s3://")
    assert "--no-serve-artifacts" in s["mlflow"]["command"]  # as tests/infra/test_production_stack.py runs it
    # the worker is configured through the standard variables alone
    worker = s["worker"]["environment"]
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        assert worker.get(key), key
    assert "--pool distill-process" in s["worker"]["command"]  # the pool of prefect.yaml


def test_dask_workers_see_the_teacher_folder_the_store_and_the_api(compose):
    s = compose["services"]
    assert s["dask-scheduler"]["profiles"] == s["dask-worker"]["profiles"] == ["dask"]
    for name in ("worker", "dask-worker"):  # the teacher folder at the same path on both
        assert "distill-work:/app/.distill" in s[name]["volumes"], name
    env = s["dask-worker"]["environment"]
    assert env["PREFECT_API_URL"] == s["worker"]["environment"]["PREFECT_API_URL"]
    assert {k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")} == \
        {k: s["worker"]["environment"][k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}
    assert "tcp://dask-scheduler:8786" in s["dask-worker"]["command"]


def test_no_secret_is_written_in_the_compose_file(compose):
    example = _env_example()
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_KEY.search(key):
                assert ONLY_VAR.match(str(value)), f"{name}: {key} must come from infra/.env as ${{VAR}}, not {value!r}"
    for text in _strings(compose):
        for userinfo in re.findall(r"://[^/\s:@]+:([^@\s]+)@", text):  # credentials inside a URL
            assert ONLY_VAR.match(userinfo), f"password written into {text!r}"
    # every variable the file uses is in .env.example, and every secret there is a placeholder to replace
    used = {m.group(1) for text in _strings(compose) for m in VAR.finditer(text.replace("$$", ""))}
    assert used <= set(example), f"missing from infra/.env.example: {sorted(used - set(example))}"
    for key, value in example.items():
        if SECRET_KEY.search(key) and key != "AWS_ACCESS_KEY_ID":
            assert value.startswith("CHANGE-ME"), f".env.example ships a real-looking {key}"


# ------------------------------------------------------------------------------------------------------------
# Kubernetes work-pool templates


def _template(kind: str) -> dict:
    return json.loads((INFRA / "k8s" / f"base-job-template-{kind}.json").read_text())


def _render(template: dict, job_variables: dict) -> dict:
    """The job manifest a Kubernetes worker would submit: variable defaults, then the deployment's job variables
    (prefect.workers.base.BaseJobConfiguration.from_template_and_values), applied to the job configuration."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    values = {k: p["default"] for k, p in props.items() if "default" in p} | job_variables
    return apply_values(template["job_configuration"], values)["job_manifest"]


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_base_job_templates_are_valid_for_a_kubernetes_pool(kind):
    from prefect.server.schemas.actions import WorkPoolCreate

    template = _template(kind)
    # what the Prefect server checks on `prefect work-pool create --base-job-template` (every placeholder declared)
    WorkPoolCreate(name=f"distill-k8s-{kind}", type="kubernetes", base_job_template=template)
    manifest = _render(template, {"name": "run-1", "command": "prefect flow-run execute"})
    pod = manifest["spec"]["template"]["spec"]
    # the parts prefect-kubernetes requires unchanged (its _get_base_job_manifest)
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    [container] = pod["containers"]
    assert container["name"] == "prefect-job" and container["envFrom"] == [{"secretRef": {"name": "distill-env"}}]
    assert {"name": "signing-key", "secret": {"secretName": "distill-signing-key"}} in pod["volumes"]
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    if kind == "gpu":
        assert gpu == 1 and container["image"].endswith(":gpu")
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["nodeSelector"]
    else:
        assert gpu is None and "tolerations" not in pod and "nodeSelector" not in pod


def test_gpu_deployment_asks_for_a_gpu_and_runs_on_cuda():
    from flows.config import load_config
    from prefect.utilities.schema_tools import validate

    [deployment] = yaml.safe_load((INFRA / "k8s" / "gpu-job-variables.yaml").read_text())["deployments"]
    template = _template("gpu")
    job_variables = deployment["work_pool"]["job_variables"]
    # what the server checks when the deployment is created: the job variables fit the pool's schema
    validate(job_variables, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
    container = _render(template, job_variables)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the config the flow run will load (distill_pipeline_from_file's parameters)
    params = deployment["parameters"]
    cfg = load_config(ROOT / params["config_path"], params["overrides"])
    assert cfg.runtime.device == "cuda" and cfg.soft_labels.engine == "torch"
    assert deployment["entrypoint"] == "flows/pipeline.py:distill_pipeline_from_file"


def test_workers_start_each_pool_from_its_template():
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "worker-deployment.yaml").read_text()) if d]
    workers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(workers) == {"distill-worker-cpu", "distill-worker-gpu"}
    for name, d in workers.items():
        [container] = d["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        kind = name.rsplit("-", 1)[1]
        assert args[args.index("--pool") + 1] == f"distill-k8s-{kind}"
        assert args[args.index("--type") + 1] == "kubernetes"
        assert Path(args[args.index("--base-job-template") + 1]).name == f"base-job-template-{kind}.json"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health" and "--with-healthcheck" in args
    role = next(d for d in docs if d["kind"] == "Role")
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
