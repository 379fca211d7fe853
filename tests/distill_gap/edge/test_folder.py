"""The edge folder format: edge.json, scope.json and reference.json written and read back by the one module that
names them; EdgeBuild's digest is taken when edge.json is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distill_gap.digest import model_digest
from distill_gap.edge.folder import (EDGE_FILE, REFERENCE_FILE, EdgeBuild, copy_model_files, read_manifest,
                                     read_reference, replace_dir, write_manifest, write_reference)
from distill_gap.edge.guard import SCOPE_FILE, STATS_FILE, ScopeGuard, read_guard
from distill_gap.errors import DistillError
from tests.conftest import LABELS


def _build(folder) -> EdgeBuild:
    (folder / "onnx").mkdir(parents=True)
    (folder / "onnx" / "model.onnx").write_bytes(b"not really a model")
    return EdgeBuild(path=folder, primary="onnx", quantized=False, reason="fp32 ONNX only", errors=[], tuning=None,
                     artifacts={"onnx": {"path": "onnx", "runtime": "onnxruntime", "report_name": "student-onnx",
                                         "ok": True}}, labels=LABELS, max_length=64)


def test_the_build_writes_a_manifest_that_reads_back_and_carries_the_folder_digest(tmp_path):
    build = _build(tmp_path / "edge")
    digest = build.write()
    assert digest == build.digest == model_digest(build.path)
    manifest = read_manifest(build.path)
    assert manifest == json.loads((build.path / EDGE_FILE).read_text()) == build.manifest()
    assert (manifest["primary"], manifest["labels"], manifest["max_length"]) == ("onnx", LABELS, 64)
    assert build.report_name == "student-onnx" and build.primary_ok

    assert read_guard(build.path) is None  # no scope guard yet (predict refuses to abstain without one)
    with pytest.raises(DistillError, match=f"ships no {REFERENCE_FILE}"):
        read_reference(build.path)
    guard = ScopeGuard("knn", threshold=0.5, tpr=0.95, temperature=1.3, stats={"bank": np.eye(3, 4)}, k=1)
    profile = {"rows": 3, "classes": LABELS}
    guard.write(build.path)
    write_reference(build.path, profile)
    assert model_digest(build.path) != digest  # they ship with the model: part of its digest
    assert read_guard(build.path).threshold == 0.5 and read_reference(build.path) == profile
    assert {p.name for p in build.path.iterdir()} == {EDGE_FILE, SCOPE_FILE, STATS_FILE, REFERENCE_FILE, "onnx"}


def test_plain_writers_and_readers_round_trip(tmp_path):
    write_reference(tmp_path, {"a": [1, 2]})
    assert read_reference(tmp_path) == {"a": [1, 2]}
    manifest = {"format": 1, "primary": "fp32", "labels": LABELS, "artifacts": {
        "fp32": {"path": "fp32", "runtime": "transformers"}}}
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest


def test_malformed_manifests_name_every_problem(tmp_path):
    write_manifest(tmp_path, {"format": 2, "primary": "x", "labels": ["one"], "max_length": 1,
                              "artifacts": {"a": {"path": "a", "runtime": "tflite"}}})
    with pytest.raises(DistillError) as err:
        read_manifest(tmp_path)
    problem = err.value.problem
    for part in ("format is 2", "at least two label names", "max_length must be an integer >= 2",
                 "artifacts.a needs a path and a runtime", "primary 'x' is not one of the artifacts"):
        assert part in problem, (part, problem)
    (tmp_path / EDGE_FILE).write_text("[1, 2]")
    with pytest.raises(DistillError, match="must hold a JSON object, got list"):
        read_manifest(tmp_path)


def test_artifact_folders_are_assembled_then_moved_into_place(tiny_model_dir, tmp_path):
    tmp, out = tmp_path / "onnx.partial", tmp_path / "onnx"
    tmp.mkdir()
    copy_model_files(tiny_model_dir, tmp)
    assert {"config.json", "tokenizer.json"} <= {p.name for p in tmp.iterdir()}
    assert not list(tmp.glob("*.safetensors"))  # weights are the exporter's job, not copied
    out.mkdir()
    (out / "stale").write_text("from an earlier run")
    replace_dir(tmp, out)
    assert not tmp.exists() and not (out / "stale").exists() and (out / "config.json").is_file()
    shutil.rmtree(out)
