"""The shipped scope guard: scoring with numpy alone, written and read back exactly, and every damaged file a clear
error (never a silent in_scope)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_gap.edge.guard import SCOPE_FILE, STATS_FILE, ScopeGuard, knn, mahalanobis, read_guard
from distill_gap.errors import DistillError


def _guard(detector: str = "mahalanobis") -> ScopeGuard:
    rng = np.random.default_rng(0)
    stats = {"means": rng.normal(size=(3, 8)), "precision": np.eye(8) * 3e4} if detector == "mahalanobis" \
        else {"bank": rng.normal(size=(50, 8))}
    return ScopeGuard(detector, threshold=-5.0, tpr=0.95, temperature=2.0, stats=stats, k=3,
                      info={"model": "student-onnx-int8"})


def test_scores_match_their_definitions():
    rng = np.random.default_rng(1)
    f, means, p = rng.normal(size=(6, 4)), rng.normal(size=(3, 4)), np.eye(4) * 2
    direct = np.array([min((x - mu) @ p @ (x - mu) for mu in means) for x in f])
    np.testing.assert_allclose(mahalanobis(f, means, p), -direct, rtol=1e-10)
    bank = rng.normal(size=(20, 4))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    sims = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ bank.T
    np.testing.assert_allclose(knn(f, bank, 3), np.sort(sims, axis=1)[:, -3], rtol=1e-6)


@pytest.mark.parametrize("detector", ["mahalanobis", "knn"])
def test_written_guard_reads_back_in_fp16_and_scores_the_same(tmp_path, detector):
    guard = _guard(detector)
    guard.write(tmp_path)
    again = read_guard(tmp_path)
    assert (again.detector, again.threshold, again.temperature, again.info["model"]) == \
        (detector, -5.0, 2.0, "student-onnx-int8")
    assert np.load(tmp_path / STATS_FILE)[next(iter(guard.stats))].dtype == np.float16  # a precision of 3e4 fits
    f = np.random.default_rng(2).normal(size=(5, 8))
    np.testing.assert_allclose(again.score(np.zeros((5, 3)), f), guard.score(np.zeros((5, 3)), f), rtol=2e-2)
    probs = again.probabilities(np.array([[2.0, 0.0, -2.0]]))
    np.testing.assert_allclose(probs.sum(), 1.0) and np.testing.assert_allclose(probs[0, 0], np.exp(1) / (
        np.exp(1) + 1 + np.exp(-1)))


def _damage(folder, what):
    if what == "stats flipped":
        data = bytearray((folder / STATS_FILE).read_bytes())
        data[-20] ^= 0xFF
        (folder / STATS_FILE).write_bytes(bytes(data))
    elif what == "stats missing":
        (folder / STATS_FILE).unlink()
    else:
        record = json.loads((folder / SCOPE_FILE).read_text())
        record.update({"old format": {"format": 1}, "unknown detector": {"detector": "vibes"},
                       "no threshold": {"threshold": None}, "zero temperature": {"temperature": 0}}[what])
        (folder / SCOPE_FILE).write_text(json.dumps(record))


@pytest.mark.parametrize("what, message", [
    ("stats flipped", "does not match the sha256"), ("stats missing", "is missing"),
    ("old format", "scope format 1"), ("unknown detector", "detector 'vibes'"),
    ("no threshold", "no finite threshold"), ("zero temperature", "temperature 0")])
def test_a_damaged_guard_is_a_clear_error_naming_the_file(tmp_path, what, message):
    _guard().write(tmp_path)
    _damage(tmp_path, what)
    with pytest.raises(DistillError, match=message) as err:
        read_guard(tmp_path)
    assert str(tmp_path) in str(err.value) and err.value.fix


def test_a_feature_guard_refuses_to_score_without_features():
    with pytest.raises(DistillError, match="needs the model's pooled features"):
        _guard("knn").score(np.zeros((2, 3)), None)


def test_a_combined_guard_reads_back_exactly_its_lexicon_and_refuses_a_damaged_standardisation(tmp_path):
    from distill_gap.evaluation.scope import fit_guard

    rng = np.random.default_rng(3)
    texts = {s: [" ".join(rng.choice(["dose", "pain", "sleep", "helped", "worse", "mg"], 6)) for _ in range(40)]
             for s in ("train", "validation")}
    f = {s: rng.normal(size=(40, 8)) for s in texts}
    guard = fit_guard("mahalanobis+lexical", train_features=f["train"], train_labels=np.arange(40) % 3, num_classes=3,
                      val_logits=np.zeros((40, 3)), val_features=f["validation"], tpr=0.95, temperature=1.0,
                      train_texts=texts["train"], val_texts=texts["validation"])
    guard.write(tmp_path)
    again = read_guard(tmp_path)
    stored = np.load(tmp_path / STATS_FILE)
    assert stored["lexicon_buckets"].dtype == np.int32 and stored["means"].dtype == np.float16
    np.testing.assert_array_equal(again.stats["lexicon_buckets"], guard.stats["lexicon_buckets"])
    assert again.standardise == guard.standardise and again.threshold == guard.threshold
    rows = ["dose helped sleep", "select * from users", "pain worse mg"]
    x = rng.normal(size=(3, 8))
    np.testing.assert_allclose(again.score(np.zeros((3, 3)), x, rows), guard.score(np.zeros((3, 3)), x, rows))
    record = json.loads((tmp_path / SCOPE_FILE).read_text())
    record["standardise"]["lexical"] = [1.0, 0.0]
    (tmp_path / SCOPE_FILE).write_text(json.dumps(record))
    with pytest.raises(DistillError, match="no usable `standardise` record"):
        read_guard(tmp_path)
