"""Config: YAML + --set overrides, unknown keys named with the nearest valid one, digest."""

import pytest

from flows.config import apply_overrides, config_from_dict, load_config
from distill_gap.errors import DistillError
from tests.conftest import ROOT


def _raw():
    return {"name": "t", "data": {"train": "x.csv", "labels": ["a", "b"]}}


def test_demo_and_tiny_configs_load():
    demo = load_config("configs/demo.yaml")
    assert demo.name == "demo" and demo.edge_model_name == "demo-edge"
    assert demo.teacher_model_name == "demo-teacher" and demo.student_model_name == "demo-student"
    assert load_config("configs/tiny.yaml").teacher.base == "scratch"


def test_override_sets_nested_value_with_yaml_types():
    cfg = load_config("configs/demo.yaml", ["distill.temperature=4", "distill.student_layers=[0, 2, 5]"])
    assert cfg.distill.temperature == 4.0
    assert cfg.distill.student_layers == [0, 2, 5]


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(DistillError) as err:
        load_config("configs/demo.yaml", ["distill.temprature=4"])
    assert "unknown key 'distill.temprature'" in str(err.value)
    assert "did you mean 'distill.temperature'" in str(err.value)


def test_unknown_section_is_named():
    raw = _raw() | {"distil": {"alpha": 0.3}}
    with pytest.raises(DistillError, match=r"unknown key 'distil'.*did you mean 'distill'"):
        config_from_dict(raw)


def test_wrong_type_and_range_are_explained():
    with pytest.raises(DistillError, match=r"'distill.alpha'"):
        load_config("configs/demo.yaml", ["distill.alpha=1.5"])
    with pytest.raises(DistillError, match=r"'distill.epochs'"):
        load_config("configs/demo.yaml", ["distill.epochs=many"])


def test_missing_required_key_and_file():
    with pytest.raises(DistillError, match=r"missing required key 'data.labels'"):
        config_from_dict({"name": "t", "data": {"train": "x.csv"}})
    with pytest.raises(DistillError, match="config file not found"):
        load_config("configs/nope.yaml")


def test_override_without_equals_is_an_error():
    with pytest.raises(DistillError, match="has no '='"):
        apply_overrides({}, ["distill.alpha"])


def test_digest_is_stable_and_changes_with_any_value():
    a = config_from_dict(_raw())
    b = config_from_dict(_raw())
    c = config_from_dict(apply_overrides(_raw(), ["distill.alpha=0.7"]))
    assert a.digest() == b.digest() != c.digest()


def test_a_drift_events_rows_become_redistill_overrides_that_stay_text():
    from flows.pipeline import production_overrides

    assert production_overrides("") == []
    cfg = load_config(ROOT / "configs/tiny.yaml", production_overrides("2026-12-02", "0e12345"))
    assert (cfg.redistill.production, cfg.redistill.production_digest) == ("2026-12-02", "0e12345")
    assert cfg.redistill.active and not load_config(ROOT / "configs/tiny.yaml", []).redistill.active
    assert load_config(ROOT / "configs/tiny.yaml", production_overrides("s3://b/p")).redistill.production_digest is None


def test_a_scope_region_column_must_be_a_slice_column():
    raw = _raw()
    raw["data"]["slice_columns"] = ["condition"]
    assert config_from_dict(raw | {"scope": {"region_column": "condition"}}).scope.region_column == "condition"
    with pytest.raises(DistillError, match=r"scope.region_column 'drug' is not one of data.slice_columns"):
        config_from_dict(raw | {"scope": {"region_column": "drug"}})
    assert load_config("configs/demo.yaml").scope.region_column == "condition"


def test_validation_from_test_needs_a_test_file_and_no_validation_file():
    raw = _raw()
    raw["data"]["test"] = "test.csv"
    assert config_from_dict(raw | {"data": {**raw["data"], "validation_from_test": 0.2}}).data.validation_from_test == 0.2
    with pytest.raises(DistillError, match=r"data.validation names a file \(v.csv\) and data.validation_from_test"):
        config_from_dict(raw | {"data": {**raw["data"], "validation": "v.csv", "validation_from_test": 0.2}})
    raw["data"].pop("test")
    with pytest.raises(DistillError, match=r"data.test names no file"):
        config_from_dict(raw | {"data": {**raw["data"], "validation_from_test": 0.2}})
    with pytest.raises(DistillError, match="validation_from_test"):
        config_from_dict(raw | {"data": {**raw["data"], "validation_from_test": 0.7}})


def test_a_quantize_section_that_builds_no_int8_artifact_is_refused_unless_fp32_is_allowed():
    with pytest.raises(DistillError, match=r"quantize.inc and quantize.onnx_int8 are both false.*require_int8"):
        load_config("configs/demo.yaml", ["quantize.inc=false", "quantize.onnx_int8=false"])
    fp32 = load_config("configs/demo.yaml", ["quantize.inc=false", "quantize.onnx_int8=false",
                                             "quantize.require_int8=false"])
    assert not fp32.quantize.inc and not fp32.quantize.onnx_int8
