"""Device, threads and seeds: one place decides where torch runs."""

from __future__ import annotations

import os
import random

# Embedded defaults for every entry point (the distill command, benchmark scripts): no telemetry, no hub
# downloads, quiet libraries, a patient ephemeral Prefect API. setdefault: the user's environment wins.
EMBEDDED_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def apply_embedded_env(extra: dict[str, str] | None = None) -> None:
    """Set EMBEDDED_ENV (and `extra`) where the environment does not already say otherwise."""
    for key, value in {**EMBEDDED_ENV, **(extra or {})}.items():
        os.environ.setdefault(key, value)


STATE_DIR = ".distill"  # the project's state folder: MLflow store, keys, caches, logs, the embedded Prefect's history


def project_prefect_home(environ=os.environ, cwd: str | None = None) -> str | None:
    """Where the embedded Prefect keeps its history for this project: <cwd>/.distill/prefect, so that `make clean`
    clears it and two clones do not share one. None (leave Prefect's own default) when the user chose: PREFECT_HOME
    or PREFECT_API_URL set, in the environment or in the active Prefect profile."""
    if environ.get("PREFECT_HOME") or environ.get("PREFECT_API_URL"):
        return None
    profiles = environ.get("PREFECT_PROFILES_PATH") or os.path.expanduser("~/.prefect/profiles.toml")
    try:
        import tomllib

        with open(profiles, "rb") as f:
            data = tomllib.load(f)
        active = environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
        chosen = data.get("profiles", {}).get(active, {})
        if chosen.get("PREFECT_HOME") or chosen.get("PREFECT_API_URL"):
            return None
    except (OSError, ValueError, AttributeError):  # no profile file, or one Prefect itself would reject
        pass
    return os.path.join(cwd or os.getcwd(), STATE_DIR, "prefect")


def apply_project_prefect_home() -> None:
    """Set PREFECT_HOME to the project's state folder unless the user chose otherwise (see project_prefect_home).
    Before Prefect is imported: its settings are read once."""
    home = project_prefect_home()
    if home:
        os.environ["PREFECT_HOME"] = home


def select_device(preference: str = "auto") -> str:
    """'cuda' when available (or asked for), else 'cpu'."""
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        from distill_gap.errors import DistillError

        raise DistillError("runtime.device is 'cuda' but no CUDA device is available", "set runtime.device=auto or cpu")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def configure_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def progress_disabled() -> bool:
    """Progress bars off in CI logs (CI=true) unless forced with DISTILL_PROGRESS=1."""
    if os.environ.get("DISTILL_PROGRESS") == "1":
        return False
    return os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("DISTILL_PROGRESS") == "0"
