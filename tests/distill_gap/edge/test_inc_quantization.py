"""INC INT8 (PT2E) of a tiny real BERT: accuracy-aware autotune over named candidates, one candidate alone, and
the saved model.pt2 folder: reloadable, self-contained, close to fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_gap.edge.checks import logit_parity
from distill_gap.edge.inc_quantization import autotune_int8
from distill_gap.errors import DistillError
from distill_gap.inference.inc_int8 import load_int8

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def texts(review_frame):
    all_texts = review_frame["text"].tolist()
    return {"calibration": all_texts[:64], "heldout": all_texts[96:192]}


@pytest.fixture(scope="module")
def fp32_logits(spread_model_dir, texts):
    from distill_gap.edge.checks import fp32_logits

    return fp32_logits(spread_model_dir, texts["heldout"], max_length=MAX_LENGTH)


def _one_candidate(model_dir, texts, out, name: str, **kwargs):
    """autotune_int8 with one candidate and a goal any trial meets: that configuration, built and saved."""
    labels = np.arange(len(texts["heldout"])) % 3
    return autotune_int8(model_dir, texts["calibration"], texts["heldout"], labels, texts["heldout"], out,
                         tolerable_loss=0.99, max_trials=1, candidates=[name], max_length=MAX_LENGTH, **kwargs)


@pytest.fixture(scope="module")
def static_int8(spread_model_dir, texts, tmp_path_factory):
    return _one_candidate(spread_model_dir, texts, tmp_path_factory.mktemp("int8") / "static", "static")


def _assert_close_to_fp32(parity: dict, int8_logits: np.ndarray, fp32: np.ndarray):
    spread = float(fp32.std(axis=0).min())  # how much each class logit varies across texts
    assert spread > 0.3, "the test model's logits must vary by text for parity to mean anything"
    assert np.bincount(fp32.argmax(-1), minlength=3).min() > 0, "every class must be predicted somewhere"
    assert parity["argmax_agreement"] >= 0.85  # random weights leave near-ties; the mean gap below is the signal
    assert 0.0 < parity["max_abs_logit_diff"] < spread  # > 0: it did quantize something
    assert float(np.abs(int8_logits - fp32).mean()) < 0.1 * spread


def test_static_int8_is_self_contained_and_close_to_fp32(static_int8, texts, fp32_logits):
    r = static_int8
    assert r.approach == "static" and r.calibration_examples == len(texts["calibration"])
    assert {"model.pt2", "int8_meta.json", "config.json", "tokenizer.json"} <= {p.name for p in r.path.iterdir()}
    assert not r.path.with_name(r.path.name + ".partial").exists()
    assert r.parity["n"] == len(texts["heldout"])
    json.dumps({k: v for k, v in vars(r).items() if k not in ("path", "tuning")})  # JSON-able record
    assert r.tuning.best == "static" and len(r.tuning.trials) == 1

    predictor = load_int8(r.path)
    assert predictor.labels == ["negative", "neutral", "positive"]
    logits = predictor.predict_logits(texts["heldout"], batch_size=5)  # ragged last batch, other batch size
    assert logits.shape == (len(texts["heldout"]), 3) and logits.dtype == np.float32
    assert logit_parity(fp32_logits, logits) == pytest.approx(r.parity, abs=1e-5)
    _assert_close_to_fp32(r.parity, logits, fp32_logits)


def test_dynamic_int8_close_to_fp32(spread_model_dir, texts, fp32_logits, tmp_path):
    r = _one_candidate(spread_model_dir, {**texts, "calibration": []}, tmp_path / "dynamic", "dynamic",
                       int8_embeddings=False)
    assert r.approach == "dynamic" and r.calibration_examples == 0
    assert json.loads((r.path / "int8_meta.json").read_text())["int8_embeddings"] is False
    _assert_close_to_fp32(r.parity, load_int8(r.path).predict_logits(texts["heldout"]), fp32_logits)


def test_user_errors_name_the_fix(tmp_path, spread_model_dir, texts):
    labels = np.zeros(len(texts["heldout"]), dtype=int)
    with pytest.raises(DistillError, match="does not exist") as err:
        autotune_int8(tmp_path / "missing", ["a"], ["b"], [0], ["b"], tmp_path / "out")
    assert err.value.fix
    with pytest.raises(DistillError, match=r"unknown or no entries \['qat'\]"):
        autotune_int8(spread_model_dir, ["a"], ["b"], [0], ["b"], tmp_path / "out", candidates=["qat"])
    with pytest.raises(DistillError, match="calibration"):
        autotune_int8(spread_model_dir, [], texts["heldout"], labels, texts["heldout"], tmp_path / "out",
                      candidates=["static"])
    with pytest.raises(DistillError, match="held-out"):
        autotune_int8(spread_model_dir, texts["calibration"], texts["heldout"], labels, [], tmp_path / "out")
    with pytest.raises(DistillError, match="labelled validation texts"):
        autotune_int8(spread_model_dir, texts["calibration"], texts["heldout"], labels[:3], texts["heldout"],
                      tmp_path / "out")
    with pytest.raises(DistillError, match="tolerable_loss=1.5"):
        autotune_int8(spread_model_dir, ["a"], ["b"], [0], ["b"], tmp_path / "out", tolerable_loss=1.5)
    with pytest.raises(DistillError, match="INT8 model folder"):
        load_int8(spread_model_dir)
    assert not (tmp_path / "out").exists()


def test_autotune_stops_at_the_first_candidate_meeting_the_goal(spread_model_dir, texts, tmp_path):
    labels = np.arange(len(texts["heldout"])) % 3
    r = autotune_int8(spread_model_dir, texts["calibration"], texts["heldout"], labels, texts["heldout"],
                      tmp_path / "int8", tolerable_loss=0.99, max_trials=3, candidates=["static", "dynamic"],
                      max_length=MAX_LENGTH)
    t = r.tuning
    assert t.met and t.best == "static" and len(t.trials) == 1  # INC stops at the first trial meeting the goal
    assert t.trials[0]["met_goal"] and t.trials[0]["name"] == "static" and "inc" in t.trials[0]
    assert t.goal == pytest.approx(t.baseline * 0.01)
    meta = json.loads((r.path / "int8_meta.json").read_text())
    assert meta["tuning"]["best"] == "static" and meta["approach"] == "static"


def test_autotune_keeps_the_best_trial_when_no_candidate_meets_the_goal(spread_model_dir, texts, fp32_logits,
                                                                         tmp_path):
    # labels = the fp32 student's own predictions: baseline 1.0, and with tolerable_loss 0 any flipped row misses
    labels = fp32_logits.argmax(-1)
    r = autotune_int8(spread_model_dir, texts["calibration"], texts["heldout"], labels, texts["heldout"],
                      tmp_path / "int8", tolerable_loss=0.0, max_trials=2, candidates=["dynamic", "static"],
                      max_length=MAX_LENGTH)
    t = r.tuning
    assert t.baseline == 1.0 and not t.met
    assert [x["name"] for x in t.trials] == ["dynamic", "static"]  # every trial recorded, in order
    assert all(not x["met_goal"] and x["metric"] < 1.0 and "inc" in x for x in t.trials)
    assert t.best == max(t.trials, key=lambda x: x["metric"])["name"]
    assert "no candidate" in t.reason and "fails the quantization gate" in t.reason
    # the best trial is still built, saved and reloadable: nothing is lost
    assert r.approach == t.best and load_int8(r.path).predict_logits(texts["heldout"][:3]).shape == (3, 3)
