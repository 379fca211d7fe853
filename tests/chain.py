"""The registered chain the lineage, verify, dossier and tamper tests read: x-teacher v1 -> soft labels -> x-student v1
-> x-edge v1, as the pipeline registers them (real MLflow SQLite registry, real signatures, signed Statements with the
gates, a real soft-label entry, the published dossier). A module fixture: each module that imports it into its
conftest.py gets its own chain, so a module may damage it on purpose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distill_gap.digest import model_digest, sha256_json
from distill_gap.governance.attestation import ATTESTATION_DIR, record, statement
from distill_gap.governance.dossier import publish
from distill_gap.registry.tracking import client_for, experiment_id, mlflow_run
from distill_gap.registry.versions import create_version, sign_and_log
from distill_gap.softlabels.store import SoftLabelStore
from flows.config import GovernanceConfig
from tests.helpers import log_model_dir

@pytest.fixture(scope="module")
def mlflow_tracking(tmp_path_factory, mlflow_db_template):
    """A TrackingConfig on a fresh store of this module (a copy of the migrated database, artifacts beside it),
    with MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI unset while the module runs."""
    from flows.config import TrackingConfig

    tmp = tmp_path_factory.mktemp("mlflow")
    shutil.copy(mlflow_db_template, tmp / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        yield TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=str(tmp / "mlartifacts"))


SPLITS = {"train": "1" * 64, "validation": "2" * 64, "test": "3" * 64}  # the split digests of the pipeline run
KEY = "ab" * 32  # the soft-label cache key
GATES = {  # as evaluate_gates writes them into the evaluate Statement (issue 19)
    "noninferior:accuracy": {"value": 0.01, "threshold": 0.02, "passed": True, "outcome": "pass", "low": -0.01,
                             "high": 0.015, "n": 900, "rows_needed": None, "inherited": False,
                             "detail": "accuracy: drop +0.010 vs the teacher on 900 rows"},
    "noninferior:slice:condition=Pain": {"value": 0.04, "threshold": 0.03, "passed": False, "outcome": "insufficient",
                                         "low": -0.05, "high": 0.2, "n": 25, "rows_needed": 1320, "inherited": False,
                                         "detail": "slice:condition=Pain: drop +0.040 on 25 rows"},
    "noninferior:recall:neutral": {"value": 0.0, "threshold": 0.05, "passed": True, "outcome": "pass", "low": -0.02,
                                   "high": 0.02, "n": 80, "rows_needed": None, "inherited": True,
                                   "detail": "recall:neutral: the teacher itself is at 0.00 here"}}
SCOPE = {"format": 2, "model": "int8", "detector": "mahalanobis", "threshold": 1.5, "tpr": 0.95, "temperature": 1.2,
         "rule": "in_scope = mahalanobis score >= threshold", "fitted_on": {"train": 500},
         "ood_sets": {"ood:not_drug_reviews": {"auroc": 0.989, "fpr_at_tpr": 0.005, "fpr_at_threshold": 0.0,
                                               "n_out": 600, "n_in": 325, "tpr": 0.95}},
         "regions": {"column": "condition", "trained": ["Depression", "Pain"], "added": [],
                     "refused": [{"region": "Acne", "outcome": "insufficient", "n": 6, "rows_needed": 140}]}}


def _model_folder(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(bytes([seed]) * 512)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    return path


@pytest.fixture(scope="module")
def chain(mlflow_tracking, tmp_path_factory):
    """x-teacher v1 -> soft labels -> x-student v1 -> x-edge v1, as the pipeline registers them."""
    tmp = tmp_path_factory.mktemp("lineage")
    gov = GovernanceConfig(key_dir=str(tmp / "keys"))
    teacher, student, edge = (_model_folder(tmp / n, i) for i, n in enumerate(("teacher", "student", "edge")))
    (edge / "scope.json").write_text(json.dumps(SCOPE))  # the guard that ships (part of the edge digest)
    store = SoftLabelStore(f"file://{tmp}/soft-labels")
    manifest = store.write(KEY, ["r1", "r2", "r3"], np.arange(9, dtype=np.float32).reshape(3, 3), shard_size=2,
                           meta={})
    client = client_for(mlflow_tracking)
    eid = experiment_id(client, mlflow_tracking)
    digests = {name: model_digest(folder) for name, folder in
               (("x-teacher", teacher), ("x-student", student), ("x-edge", edge))}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DISTILL_KEY_DIR", raising=False)
        with mlflow_run(client, experiment_id=eid, run_name="x-teacher-import") as rid:
            signed = sign_and_log(client, rid, teacher, "teacher", gov)
            create_version(client, "x-teacher", source=log_model_dir(client, rid, teacher, "teacher"), run_id=rid,
                           governance=gov, tags={**signed, "model.digest": digests["x-teacher"], "license": "mit"})
        client.set_registered_model_alias("x-teacher", "pinned", 1)
        with mlflow_run(client, experiment_id=eid, run_name="x-pipeline", tags={"distill.stage": "pipeline"}) as run:
            client.log_dict(run, {"data": SPLITS}, "lineage/inputs.json")
            soft = {f"soft-labels/{KEY}": sha256_json(manifest)}
            evaluated = {"edge_model": "int8", "gates": GATES, "test": {"int8": {"accuracy": 0.7, "n": 900}},
                         "worst_slices": {"int8": [["slice:condition=Pain", -0.04]]}, "flags": []}
            for step, subjects, inputs, results in (
                    ("soft-labels", soft, {"x-teacher/1": digests["x-teacher"]}, {}),
                    ("distill", {"x-student": digests["x-student"]}, {"x-teacher/1": digests["x-teacher"], **soft}, {}),
                    ("quantize", {"edge/int8": digests["x-edge"]}, {"x-student": digests["x-student"]}, {}),
                    ("evaluate", {"x-edge": digests["x-edge"]}, {f"data/{k}": v for k, v in SPLITS.items()},
                     evaluated)):
                record(client, run, gov, statement(step, subjects, technique="test", parameters={}, inputs=inputs,
                                                   results=results))
            with mlflow_run(client, parent_run_id=run, run_name="x-register",
                            tags={"distill.stage": "register"}) as rid:
                lineage_tags = {"teacher.name": "x-teacher", "teacher.version": "1",
                                "teacher.digest": digests["x-teacher"], "data.digest": sha256_json(SPLITS),
                                "soft_labels.uri": store.entry_uri(KEY), "soft_labels.key": KEY,
                                "config.digest": "c" * 64, "code.version": "test", "gates.passed": "false",
                                "gates.outcome": "insufficient", "teacher.license": "mit",
                                "intended_use": "sort reviews", "not_for": "dosage decisions\nother languages",
                                "attestation.uri": f"{client.get_run(run).info.artifact_uri}/{ATTESTATION_DIR}"}
                for name, folder, parent in (("x-student", student, "x-teacher/1"), ("x-edge", edge, "x-student/1")):
                    signed = sign_and_log(client, rid, folder, name, gov)
                    create_version(client, name, source=log_model_dir(client, rid, folder, name), run_id=rid,
                                   governance=gov, tags={**lineage_tags, **signed, "parent": parent,
                                                         "model.digest": digests[name], "edge.primary": "int8"})
        publish(client, client.get_model_version("x-edge", "1"), gov)  # as registration does
        client.set_registered_model_alias("x-edge", "champion", 1)
        yield {"client": client, "run": run, "digests": digests, "keys": tmp / "keys", "tmp": tmp,
               "store": store, "governance": gov, "edge": edge,
               "splits": SPLITS, "key": KEY, "gates": GATES}
