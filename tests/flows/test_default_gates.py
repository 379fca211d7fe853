"""Issue 19: a model that truly passes the default gates, end to end.

The other end-to-end runs either open the gates (their subject is something else) or show a real failure
(tests/reliability/test_gate_rollback.py: the tiny student never predicts "negative") and thin evidence that a named
approver waives. Here the task is one a tiny model can learn completely (each review names its verdict with one of
three words per class among neutral filler), the teacher is trained by `distill teacher bootstrap`'s own code, and
the test split holds enough rows for every non-inferiority check to be decided at the default margins: 70 rows per
class (a check with no disagreeing row passes once its one-sided 95% bound, ~1.9/n, is below the margin: 3 points
of recall need ~40 rows; the aggregate's 3% of the teacher's accuracy ~65), and a declared critical slice of ~100
rows. Every gate keeps its default threshold; the run must register the edge version as @champion with the verdict
"pass", and the dossier must say so. A second run then declares a critical slice the rows do not hold: that gate
has no evidence, so the version is @challenger only until a named approver signs a waiver for exactly that gate
(`distill approve`), which `distill verify` and the dossier then show. Real flow, Prefect API, MLflow SQLite, INC
INT8, the CLI as processes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from flows.config import load_config
from tests.helpers import data_overrides, fresh_mlflow_db

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
LABELS = ["negative", "neutral", "positive"]
VERDICT_WORDS = {"negative": ["terrible", "awful", "useless"], "neutral": ["okay", "average", "mixed"],
                 "positive": ["excellent", "wonderful", "great"]}
FILLER = ("i took this pill for my pain every morning the doctor said to keep a diary of the dose and side "
          "effects for two weeks before we talk again about it since then my sleep and appetite were").split()


def keyword_splits(out: Path, seed: int = 0) -> dict:
    """train / validation / test / OOD CSV files of the keyword task; returns the `data` config section."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)

    def rows(per_class: int, prefix: str) -> pd.DataFrame:
        out_rows = []
        for label in LABELS:
            for i in range(per_class):
                words = list(rng.choice(FILLER, size=int(rng.integers(8, 16))))
                for _ in range(2):  # twice, in the first third: a typo in one or the stress suites' truncation
                    # (keeps the first half) leaves the verdict readable, so the stress gate measures the models
                    words.insert(int(rng.integers(0, len(words) // 3 + 1)), str(rng.choice(VERDICT_WORDS[label])))
                out_rows.append({"id": f"{prefix}-{label}-{i}", "text": " ".join(words), "label": label,
                                 "condition": str(rng.choice(["Pain", "Migraine"]))})
        return pd.DataFrame(out_rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)

    code = ["def main(argv):", "for i in range(10): print(i)", "import numpy as np", "return self._cache[key]",
            "if err is not None: raise err", "x = [a * b for a, b in pairs]", "with open(path) as f: data = f.read()"]
    ood = pd.DataFrame([{"id": f"ood-{i}", "text": " ".join(rng.choice(code, size=2)), "label": str(rng.choice(LABELS)),
                         "condition": "Code"} for i in range(60)])
    files = {}
    for name, frame in {"train": rows(100, "tr"), "validation": rows(40, "va"), "test": rows(70, "te"),
                        "ood-code": ood}.items():
        files[name] = str(out / f"{name}.csv")
        frame.to_csv(files[name], index=False)
    return {"train": files["train"], "validation": files["validation"], "test": files["test"], "holdout": None,
            "ood": {"code": files["ood-code"]}, "text_column": "text", "label_column": "label", "id_column": "id",
            "max_rows": None, "critical_slices": {"condition": ["Pain"]}}


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory, prefect_api, mlflow_db_template):
    """The keyword task's workspace, its teacher trained by `distill teacher bootstrap`'s code, and one pipeline
    run with every gate at its default: (tmp, base overrides, cfg, result)."""
    from flows.pipeline import distill_pipeline
    from distill_gap.kd.teacher import bootstrap_teacher

    tmp = tmp_path_factory.mktemp("default-gates")
    data = keyword_splits(tmp)
    old = os.getcwd()
    os.chdir(tmp)
    try:
        base = [f"tracking.uri={fresh_mlflow_db(mlflow_db_template, tmp)}",
                f"tracking.artifact_location={tmp}/mlartifacts",
                f"soft_labels.store=file://{tmp}/soft-labels", f"governance.key_dir={tmp}/keys",
                *data_overrides(data), "teacher.epochs=10", "distill.epochs=10", "distill.patience=10",
                "quantize.calibration_samples=64",
                "evaluate.bootstrap_samples=200", "evaluate.stress_rows=60", "quantize.candidates=[static]",
                "quantize.max_trials=1", "quantize.onnx=false", "quantize.onnx_int8=false", "runtime.threads=1"]
        cfg = load_config(ROOT / "configs/tiny.yaml", base)
        defaults = load_config(ROOT / "configs/tiny.yaml")
        assert cfg.evaluate.model_dump(exclude={"bootstrap_samples", "stress_rows"}) == \
            defaults.evaluate.model_dump(exclude={"bootstrap_samples", "stress_rows"})  # every gate at its default
        assert cfg.quantize.tolerable_loss == defaults.quantize.tolerable_loss
        bootstrap_teacher(cfg, log=lambda *_: None)
        result = distill_pipeline(cfg, trigger_reason="test: default gates, a model that holds up")
        yield tmp, base, cfg, result
    finally:
        os.chdir(old)


def test_a_model_that_holds_up_passes_every_default_gate_and_becomes_champion(passing_run):
    from distill_gap.governance.dossier import dossier_for
    from distill_gap.registry.tracking import client_for

    _, _, cfg, result = passing_run
    gates = result["gates"]
    assert {k: g["outcome"] for k, g in gates.items() if g["outcome"] != "pass"} == {}, gates
    for check in ("accuracy", "recall:negative", "recall:neutral", "recall:positive", "slice:condition=Pain"):
        g = gates[f"noninferior:{check}"]
        assert g["high"] < g["threshold"] and g["n"] >= 40, (check, g)  # decided on the rows, at the default margin
    assert "calibration_ece" in gates and any(k.startswith("ood_auroc_vs_teacher:") for k in gates)
    assert "stress_flip_rate_vs_teacher" in gates and gates["quantization"]["outcome"] == "pass"
    edge = result["registered"]["edge"]
    assert edge["champion"]
    client = client_for(cfg.tracking)
    assert str(client.get_registered_model(cfg.edge_model_name).aliases["champion"]) == str(edge["version"])
    mv = client.get_model_version(cfg.edge_model_name, str(edge["version"]))
    assert mv.tags["gates.outcome"] == "pass" and not mv.tags.get("gates.insufficient")
    d = dossier_for(client, mv)
    assert d["evidence"]["outcome"] == "pass" and "champion" in d["status"]["aliases"]
    assert d["governance"].get("waiver") is None


def test_a_critical_slice_without_rows_is_insufficient_then_a_named_approver_waives_it(passing_run, prefect_api_url):
    """A critical slice is declared that the test rows do not hold, so its non-inferiority gate has no evidence:
    the run registers the version as @challenger only (insufficient, not failed; @champion stays on the version
    that passed); `distill approve` with the approver's own key makes it @champion; `distill verify` covers the
    waiver. Every other gate keeps its default threshold and passes."""
    import json
    import subprocess
    import sys

    from flows.pipeline import distill_pipeline
    from distill_gap.governance.waiver import create_approver_key
    from distill_gap.registry.tracking import client_for

    tmp, base, first_cfg, first = passing_run
    key = create_approver_key(first_cfg.governance, "rita")
    approvers = json.dumps([{"name": "rita", "public_key": str(key.public_path)}])
    # this candidate also trims its vocabulary (issue 21): the trimmed student goes through quantization,
    # evaluation, registration and the dossier like any other
    overrides = [*base, f"approval.approvers={approvers}", "distill.vocab.trim=true",
                 'data.critical_slices={"condition": ["Pain", "Not In These Rows"]}']
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    old = os.getcwd()
    os.chdir(tmp)
    try:
        result = distill_pipeline(cfg, trigger_reason="test: insufficient evidence")
    finally:
        os.chdir(old)
    edge = result["registered"]["edge"]
    thin = [k for k, g in result["gates"].items() if g["outcome"] == "insufficient"]
    assert thin == ["noninferior:slice:condition=Not In These Rows"], result["gates"]
    assert result["gates"]["noninferior:accuracy"]["outcome"] == "pass"  # the default aggregate margin
    assert not [k for k, g in result["gates"].items() if g["outcome"] == "fail"]
    assert not edge["champion"] and result["promotion"]["challenger"] == edge["version"]
    client = client_for(cfg.tracking)
    assert {a: str(v) for a, v in client.get_registered_model(cfg.edge_model_name).aliases.items()} == {
        "challenger": str(edge["version"]), "champion": str(first["registered"]["edge"]["version"])}
    tags = client.get_model_version(cfg.edge_model_name, str(edge["version"])).tags
    assert tags["gates.outcome"] == "insufficient" and tags["gates.insufficient"] == ",".join(thin)

    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    config = tmp / "waiver.yaml"
    import yaml

    raw = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    raw.update(name=cfg.name, tracking=cfg.tracking.model_dump(), governance=cfg.governance.model_dump(mode="json"),
               approval={"approvers": [{"name": "rita", "public_key": str(key.public_path)}]})
    config.write_text(yaml.safe_dump(raw))
    uri = f"models:/{cfg.edge_model_name}/{edge['version']}"
    done = subprocess.run([str(Path(sys.executable).parent / "distill"), "approve", uri, "--approver", "rita",
                           "--waive", ",".join(thin), "--reason", "pilot clinic has no such rows yet; audit in 30 days",
                           "--config", str(config)], env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert client.get_registered_model(cfg.edge_model_name).aliases["champion"] == edge["version"]
    verified = subprocess.run([str(Path(sys.executable).parent / "distill"), "verify", uri, "--tracking-uri",
                               cfg.tracking.uri, "--key-dir", cfg.governance.key_dir], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "waiver" in verified.stdout and "signed by approver rita" in verified.stdout
    assert "dossier" in verified.stdout  # the published dossier agrees with the signed records

    # the dossier, compiled afresh: signed JSON over the edge digest, and the HTML page
    page = tmp / "dossier.html"
    shown = subprocess.run([str(Path(sys.executable).parent / "distill"), "dossier", uri, "--tracking-uri",
                            cfg.tracking.uri, "--html", str(page), "--json", "--key-dir", cfg.governance.key_dir],
                           env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    from distill_gap.signing import subject_digests, verify_statement

    stmt = verify_statement(json.loads(shown.stdout),
                            [(Path(cfg.governance.key_dir) / "signing-key.pub.pem").read_text()])
    assert subject_digests(stmt) == {uri.removeprefix("models:/"): edge["digest"]}
    d = stmt["predicate"]
    mv = client.get_model_version(cfg.edge_model_name, str(edge["version"]))
    assert d["governance"]["waiver"] == {"gates": thin, "approver": "rita",
                                         "reason": "pilot clinic has no such rows yet; audit in 30 days",
                                         "record": mv.tags["promotion.waiver.uri"]}
    assert d["status"]["aliases"] == ["challenger", "champion"] and d["evidence"]["outcome"] == "insufficient"
    assert [s["step"] for s in d["lineage"]["steps"]][:3] == ["soft-labels", "distill", "quantize"]
    distilled = next(s for s in d["lineage"]["steps"] if s["step"] == "distill")
    assert "vocabulary trimmed" in distilled["technique"] and distilled["parameters"]["vocab"]["trim"] is True
    shrunk = re.fullmatch(r"(\d+) of the teacher's (\d+) tokens", distilled["parameters"]["vocab_kept"])
    kept, total = map(int, shrunk.groups())
    assert 0 < kept <= total
    assert not d["lineage"]["problems"] and d["scope"]["shipped"]
    assert "Waived by <b>rita</b>" in page.read_text()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:  # the Prefect UI links to the page in the MLflow UI
        links = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{cfg.name}-dossier"])))
        validation = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"{cfg.name}-data-validation"])))
    assert links and "/artifactPath/dossier/dossier.html" in links[0].data  # Prefect keeps links as markdown
    assert f"({cfg.tracking.ui_url.rstrip('/')}/#/experiments/" in links[0].data  # absolute: outside MLflow
    assert validation  # one history per config: the key carries the config's name (issue 23)
    # the model card ships inside the signed edge folder
    import mlflow

    from distill_gap.registry.versions import version_folder

    mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp / "edge-dl"),
                                        tracking_uri=cfg.tracking.uri)
    card = (version_folder(tmp / "edge-dl", mv.source) / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == f"{mv.tags['teacher.name']}/{mv.tags['teacher.version']}"
    assert front["base_model_relation"] == ("quantized" if mv.tags["edge.quantized"] == "true" else "finetune")
