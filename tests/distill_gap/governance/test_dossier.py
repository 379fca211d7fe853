"""distill_gap.governance.dossier on the registered chain of conftest.py (real MLflow SQLite registry, real signed
Statements, the dossier published as registration publishes it): compiled from the records alone, signed, checked
by `distill verify` against the signed records, rendered in a real browser, and its model card readable by the
Hugging Face conventions."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from datetime import date, timedelta
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import pytest
import yaml

from distill_gap.errors import DistillError
from distill_gap.governance.dossier import (PREDICATE_TYPE, dossier_for, dossier_statement, require_current_review,
                                            write_model_card)
from distill_gap.governance.dossier_render import render_dossier
from distill_gap.governance.verify import verify
from distill_gap.signing import ensure_key_pair, sign_statement, subject_digests, verify_statement


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


@pytest.fixture()
def version(chain):
    return chain["client"].get_model_version("x-edge", "1")


def test_the_dossier_is_compiled_from_the_signed_records(chain, version):
    d = dossier_for(chain["client"], version)
    assert d["model"]["digest"] == chain["digests"]["x-edge"] and d["model"]["version"] == 1
    assert d["intended_use"] == {"use": "sort reviews", "not_for": ["dosage decisions", "other languages"]}
    ev = d["evidence"]
    assert ev["gates"] == chain["gates"] and ev["outcome"] == "insufficient"
    assert ev["insufficient"] == ["noninferior:slice:condition=Pain"] and ev["rows_needed_max"] == 1320
    assert any(x.startswith("inherited from the teacher: recall:neutral") for x in ev["limitations"])
    assert ev["worst_slices"] == [["slice:condition=Pain", -0.04]]
    assert d["scope"]["shipped"] and d["scope"]["detector"] == "mahalanobis"
    assert d["scope"]["detection"] == {"not_drug_reviews": {"auroc": 0.989, "fpr_at_tpr": 0.005,
                                                            "fpr_at_threshold": 0.0, "n_out": 600}}
    assert d["scope"]["regions_summary"] == ("2 condition regions from training; Acne not added (insufficient on 6 "
                                             "rows, about 140 labelled rows would decide it)")
    lin = d["lineage"]
    assert lin["teacher"] == {"name": "x-teacher", "version": "1", "digest": chain["digests"]["x-teacher"],
                              "license": "mit", "license_override": None}
    assert lin["data"]["splits"]["test"] == chain["splits"]["test"] and not lin["problems"]
    assert [s["step"] for s in lin["steps"]] == ["soft-labels", "distill", "quantize", "evaluate"]
    assert all(len(s["statement_sha256"]) == 64 for s in lin["steps"])
    assert d["status"]["aliases"] == ["champion"] and not d["governance"]["review"]["overdue"]
    assert d["verify"].startswith("distill verify models:/x-edge/1")


def test_the_published_dossier_is_signed_over_the_edge_digest_and_verify_refuses_a_forged_one(chain, version):
    client = chain["client"]
    path = _local(version.tags["dossier.uri"]) / "dossier.dsse.json"
    assert (path.parent / "dossier.html").is_file()
    pub = (chain["keys"] / "signing-key.pub.pem").read_text()
    stmt = verify_statement(json.loads(path.read_text()), [pub])
    assert stmt["predicateType"] == PREDICATE_TYPE
    assert subject_digests(stmt) == {"x-edge/1": chain["digests"]["x-edge"]}
    checks = {c.link: c for c in verify(client, "models:/x-edge/1", key_dir=chain["keys"]).checks}
    assert checks["dossier"].ok, checks["dossier"].detail

    original = path.read_bytes()
    forged = json.loads(base64.b64decode(json.loads(original)["payload"]))["predicate"]
    forged["evidence"]["outcome"] = "pass"  # someone holding the pipeline key rewrites the verdict
    forged["evidence"]["gates"]["noninferior:slice:condition=Pain"]["outcome"] = "pass"
    try:
        path.write_text(json.dumps(sign_statement(dossier_statement(forged), ensure_key_pair(chain["keys"]))))
        broken = {c.link: c.detail for c in verify(client, "models:/x-edge/1", key_dir=chain["keys"]).checks
                  if not c.ok}
        assert broken["dossier"] == "the published dossier differs from the signed records in: gates, outcome"
        other = ensure_key_pair(chain["tmp"] / "other-key")  # signed by a key nobody trusts
        path.write_text(json.dumps(sign_statement(dossier_statement(forged), other)))
        broken = {c.link: c.detail for c in verify(client, "models:/x-edge/1", key_dir=chain["keys"]).checks
                  if not c.ok}
        assert broken["dossier"].startswith("not verifiable at")
    finally:
        path.write_bytes(original)


def test_a_statement_copied_under_another_step_name_is_not_used(chain, version):
    folder = _local(version.tags["attestation.uri"])
    evaluate = folder / "evaluate.dsse.json"
    original = evaluate.read_bytes()
    try:
        shutil.copy(folder / "quantize.dsse.json", evaluate)  # a signed Statement, of the wrong step
        d = dossier_for(chain["client"], version)
    finally:
        evaluate.write_bytes(original)
    assert "evaluate.dsse.json holds the signed Statement of step 'quantize': not used" in d["lineage"]["problems"]
    assert d["evidence"]["gates"] == {} and d["evidence"]["outcome"] == "fail"  # missing evidence is never a pass


def test_an_overdue_review_shows_and_refuses_promotion(chain, version):
    due = date.fromisoformat(version.tags["review.due"])
    d = dossier_for(chain["client"], version, today=due + timedelta(days=1))
    assert d["governance"]["review"] == {"due": due.isoformat(), "overdue": True, "days_left": -1}
    assert "Review overdue" in render_dossier(d)
    with pytest.raises(DistillError, match=r"x-edge v1's review was due .*: an expired review cannot be promoted"):
        require_current_review(version.tags, "x-edge", 1, today=due + timedelta(days=1))
    require_current_review(version.tags, "x-edge", 1, today=due)  # due today: still current


def test_the_model_card_follows_the_hugging_face_conventions(chain, tmp_path):
    edge = SimpleNamespace(path=tmp_path, primary="int8", artifacts={"int8": {"runtime": "inc"}})
    version = chain["client"].get_model_version("x-edge", "1")
    write_model_card(chain["client"], edge, name="x-edge", tags=dict(version.tags), governance=chain["governance"])
    text = (tmp_path / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "x-teacher/1" and meta["license"] == "mit"
    assert meta["base_model_relation"] == "finetune" and meta["pipeline_tag"] == "text-classification"
    assert meta["model-index"][0]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.7,
                                                                "name": "test accuracy"}]
    assert "## Uses" in body and "dosage decisions" in body and "Gates: **insufficient**" in body


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_dossier_page_renders_in_a_real_browser(chain, version, tmp_path):
    html = render_dossier(dossier_for(chain["client"], version))
    assert "<script" not in html and "src=" not in html and "http" not in html.split("<body>")[0]
    page = tmp_path / "dossier.html"
    page.write_text(html)
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "<h1>Dossier: x-edge v1</h1>" in dom
    for text in ("Insufficient evidence", "noninferior:slice:condition=Pain", "1,320", "mahalanobis", "0.0%",
                 "distill verify models:/x-edge/1", "x-teacher v1, licence mit", "dosage decisions",
                 "Acne not added (insufficient on 6 rows"):
        assert text in dom, text
