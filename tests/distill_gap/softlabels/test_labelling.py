"""Labelling end to end in this process (ensure_soft_labels): miss then hit, resume, refusals, top-k entries,
and the plan's key from real teacher, tokenizer and data changes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distill_gap.data.splits import split_digest
from distill_gap.digest import model_digest, tokenizer_digest
from distill_gap.errors import DistillError
from distill_gap.softlabels.labelling import ensure_soft_labels, plan_soft_labels
from distill_gap.softlabels.store import SoftLabelStore
from tests.conftest import LABELS

FP16_ATOL = 4e-3   # logits of the sharp teacher are within about +-5; fp16 spacing there is <= 2**-8


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_miss_then_hit_without_the_teacher(store_uri, teacher, tmp_path, reference_logits):
    first = ensure_soft_labels(store_uri, **teacher)
    assert first.hit is False and first.labelled == len(teacher["ids"])
    assert first.uri == f"{SoftLabelStore(store_uri).uri}/{first.key}"
    assert first.manifest["key_inputs"]["labels"] == LABELS and first.manifest["teacher"]["version"] == "1"
    np.testing.assert_allclose(first.logits, reference_logits, atol=FP16_ATOL)

    # The teacher folder is gone: a hit must not need it.
    gone = {**teacher, "teacher_dir": tmp_path / "no-such-teacher"}
    second = ensure_soft_labels(store_uri, **gone)

    assert second.hit is True and second.labelled == 0 and second.key == first.key
    assert np.array_equal(second.logits, first.logits), "a miss and a hit must give identical numbers"
    assert second.manifest == first.manifest

    # Rows follow the ids asked for, in any order or subset.
    subset = teacher["ids"][::-3]
    third = ensure_soft_labels(store_uri, **{**gone, "ids": subset, "texts": ["x"] * len(subset)})
    assert third.hit and np.array_equal(third.logits, first.logits[::-3])


def test_hit_that_does_not_cover_the_ids_is_refused(tmp_path, teacher):
    ensure_soft_labels(tmp_path, **teacher)
    with pytest.raises(DistillError, match="lacks 1 of"):
        ensure_soft_labels(tmp_path, **{**teacher, "ids": teacher["ids"][:5] + ["not-an-id"],
                                        "texts": teacher["texts"][:6]})


def test_interrupted_entry_resumes_from_its_verified_shards(tmp_path, teacher):
    first = ensure_soft_labels(tmp_path, **teacher)
    entry = tmp_path / first.key
    (entry / "manifest.json").unlink()                       # as if the run died before the manifest
    (entry / "shards" / "part-00002.parquet").unlink()       # ... and before shard 2

    again = ensure_soft_labels(tmp_path, **teacher)

    assert again.hit is False and again.labelled == 32       # only the missing shard was labelled
    assert again.manifest["produced_by"]["reused_shards"] == 2
    np.testing.assert_allclose(again.logits, first.logits, atol=FP16_ATOL)


@pytest.mark.parametrize("labels,match", [
    (["negative", "positive"], "predicts 3 labels"),
    (["positive", "neutral", "negative"], "names and order must match"),
])
def test_label_mismatch_raises_and_writes_nothing(tmp_path, teacher, labels, match):
    store = tmp_path / "store"
    with pytest.raises(DistillError, match=match) as err:
        ensure_soft_labels(store, **{**teacher, "labels": labels})
    assert "re-bootstrap or re-import the teacher with data.labels" in str(err.value)
    assert str(labels) in str(err.value) and str(LABELS) in str(err.value)
    assert not store.exists() and SoftLabelStore(store).list_keys() == []


def test_label_names_compare_case_insensitively(tmp_path, teacher):
    result = ensure_soft_labels(tmp_path, **{**teacher, "labels": [l.upper() for l in LABELS],
                                             "ids": teacher["ids"][:8], "texts": teacher["texts"][:8]})
    assert result.logits.shape == (8, 3)


def test_teacher_that_is_not_the_pinned_one_is_refused(tmp_path, teacher):
    with pytest.raises(DistillError, match="pinned teacher"):
        ensure_soft_labels(tmp_path, **{**teacher, "teacher_digest": "0" * 64})
    assert list(tmp_path.iterdir()) == []


def test_bad_example_lists_are_refused(tmp_path, teacher):
    with pytest.raises(DistillError, match="not unique"):
        ensure_soft_labels(tmp_path, **{**teacher, "ids": ["a", "a"], "texts": ["x", "y"]})
    with pytest.raises(DistillError, match="2 ids but 1 texts"):
        ensure_soft_labels(tmp_path, **{**teacher, "ids": ["a", "b"], "texts": ["x"]})


# ------------------------------------------------------------------------------------ top-k


def test_ensure_soft_labels_top_k_miss_hit_and_resume(tmp_path, teacher):
    full = ensure_soft_labels(tmp_path, **teacher)
    first = ensure_soft_labels(tmp_path, **teacher, top_k=2)
    assert first.hit is False and first.key != full.key and first.manifest["top_k"] == 2
    assert first.manifest["key_inputs"]["top_k"] == 2 and "top_k" not in full.manifest["key_inputs"]
    assert first.logits.shape == full.logits.shape
    # Top-2 of 3 classes: the probabilities of the two largest logits and of the third are all exact.
    np.testing.assert_allclose(_softmax(first.logits), _softmax(full.logits), rtol=3e-3, atol=0)

    second = ensure_soft_labels(tmp_path, **{**teacher, "teacher_dir": tmp_path / "gone"}, top_k=2)
    assert second.hit and np.array_equal(second.logits, first.logits) and second.manifest == first.manifest
    # A full request still gets the full entry, not the top-k one.
    again_full = ensure_soft_labels(tmp_path, **{**teacher, "teacher_dir": tmp_path / "gone"})
    assert again_full.hit and again_full.key == full.key and np.array_equal(again_full.logits, full.logits)

    # Resume: the manifest and one shard are gone; the other top-k shards are reused, not relabelled.
    (tmp_path / first.key / "manifest.json").unlink()
    (tmp_path / first.key / "shards" / "part-00001.parquet").unlink()
    resumed = ensure_soft_labels(tmp_path, **teacher, top_k=2)
    assert resumed.labelled == 32 and resumed.manifest["produced_by"]["reused_shards"] == 2
    np.testing.assert_allclose(resumed.logits, first.logits, atol=4e-3)


def test_ensure_soft_labels_refuses_bad_top_k(tmp_path, teacher):
    with pytest.raises(DistillError, match="top_k"):
        ensure_soft_labels(tmp_path, **teacher, top_k=3)              # 3 labels: k must be < 3
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the plan's key, from real files


def _plan_key(**change) -> str:
    base = dict(teacher_digest="t" * 64, tokenizer_digest="k" * 64, data_digest="d" * 64, ids=["a", "b"],
                texts=["x", "y"], labels=list(LABELS), max_length=64)
    return plan_soft_labels("file:///tmp/unused-store", **{**base, **change}).key


def test_key_changes_with_one_teacher_weight(sharp_teacher_dir, tmp_path, teacher):
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "teacher"
    shutil.copytree(sharp_teacher_dir, changed)
    weights = load_file(changed / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert tokenizer_digest(changed) == teacher["tokenizer_digest"]
    assert _plan_key(teacher_digest=model_digest(changed)) != _plan_key(teacher_digest=teacher["teacher_digest"])


def test_key_changes_with_the_tokenizer(sharp_teacher_dir, tmp_path, teacher):
    changed = tmp_path / "teacher"
    shutil.copytree(sharp_teacher_dir, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["do_lower_case"] = not config.get("do_lower_case", True)
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_digest(changed) != teacher["tokenizer_digest"]
    assert _plan_key(tokenizer_digest=tokenizer_digest(changed)) != _plan_key(tokenizer_digest=teacher["tokenizer_digest"])


def test_key_changes_with_max_length():
    assert _plan_key(max_length=64) != _plan_key(max_length=65)


def test_key_changes_with_the_label_order():
    assert _plan_key(labels=list(LABELS)) != _plan_key(labels=list(reversed(LABELS)))


def test_key_changes_with_one_training_row(rows):
    edited = rows.copy()
    edited.iloc[7, edited.columns.get_loc("text")] += " (edited)"
    assert _plan_key(data_digest=split_digest(edited)) != _plan_key(data_digest=split_digest(rows))
    # ... and does not change with the row order alone.
    assert split_digest(rows.iloc[::-1]) == split_digest(rows)


def test_rows_are_stored_in_id_order_whatever_the_callers_order(teacher, tmp_path):
    """The entry depends on the set of rows only: a shuffled request hits and gets its own order back."""
    store = f"file://{tmp_path}/store"
    first = ensure_soft_labels(store, progress=False, **teacher)
    order = np.random.default_rng(0).permutation(len(teacher["ids"]))
    shuffled = {**teacher, "ids": [teacher["ids"][i] for i in order], "texts": [teacher["texts"][i] for i in order]}
    again = ensure_soft_labels(store, progress=False, **shuffled)
    assert again.hit and again.ids == shuffled["ids"]
    assert np.array_equal(again.logits, first.logits[order])
    stored_ids, _ = SoftLabelStore(store).read(first.key)
    assert stored_ids == sorted(teacher["ids"])
