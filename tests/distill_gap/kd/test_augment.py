"""Teacher-labelled augmentation (distill_gap/kd/augment.py) and the KD loss on rows without a hard label."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from distill_gap.errors import DistillError
from distill_gap.kd.augment import augment_rows, edit_text, extra_texts, unlabelled_rows
from distill_gap.kd.losses import NO_LABEL, KDLoss

TEXT = "the tablets stopped my migraines within a week but left me dizzy every single morning"


def _rng(k=0):
    return np.random.default_rng([7, k])


def test_each_edit_changes_the_words_as_named_and_is_seeded():
    words = TEXT.split()
    deleted = edit_text(TEXT, "delete", _rng(), 0.3).split()
    assert 0 < len(deleted) < len(words) and all(w in words for w in deleted)
    it = iter(words)  # order kept: a subsequence
    assert all(any(w == x for x in it) for w in deleted)
    swapped = edit_text(TEXT, "swap", _rng(), 0.15)
    assert sorted(swapped.split()) == sorted(words) and swapped != TEXT
    cropped = edit_text(TEXT, "crop", _rng(), 0.15).split()
    assert len(cropped) == len(words) - 3 and " ".join(cropped) in TEXT  # ceil(0.15 * 15) words off the ends
    assert edit_text(TEXT, "delete", _rng(), 0.3) == " ".join(deleted)  # same generator, same edit
    assert edit_text("too short", "delete", _rng(), 0.3) == "too short"
    with pytest.raises(DistillError, match="unknown augmentation method 'shuffle'"):
        edit_text(TEXT, "shuffle", _rng(), 0.1)


def test_rows_do_not_depend_on_order_and_never_repeat_a_split_text(review_frame):
    ids, texts = review_frame["id"].tolist()[:40], review_frame["text"].tolist()[:40]
    kw = dict(copies=3, methods=["delete", "swap", "crop"], rate=0.15, seed=13)
    a = augment_rows(ids, texts, exclude=set(texts), **kw)
    b = augment_rows(ids[::-1], texts[::-1], exclude=set(texts), **kw)
    assert a.sort_values("id").reset_index(drop=True).equals(b.sort_values("id").reset_index(drop=True))
    assert len(a) > 100 and not set(a["text"]) & set(texts) and a["text"].is_unique
    assert set(a["source"]) == {"delete", "swap", "crop"}
    assert a["id"].iloc[0] == f"{ids[0]}~delete0" and f"{ids[0]}~crop2" in set(a["id"])
    other_seed = augment_rows(ids, texts, exclude=set(texts), **{**kw, "seed": 14})
    assert set(other_seed["text"]) != set(a["text"])


def test_unlabelled_texts_are_cleaned_deduplicated_and_capped(tmp_path, review_frame):
    split_text = review_frame["text"].iloc[0]
    rows = [{"body": "new drug, no side effects so far"}, {"body": "  "}, {"body": split_text},
            {"body": "new drug, no side effects so far"}] + [{"body": f"in-domain text number {i}"} for i in range(30)]
    path = tmp_path / "extra.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = unlabelled_rows(str(path), text_column="body", max_rows=100, seed=0, exclude={split_text})
    assert len(got) == 31 and got["text"].iloc[0] == "new drug, no side effects so far"
    assert got["id"].str.match(r"^unlabelled:[0-9a-f]{16}$").all() and (got["source"] == "unlabelled").all()
    capped = unlabelled_rows(str(path), text_column="body", max_rows=10, seed=0, exclude=set())
    assert len(capped) == 10 and capped["text"].equals(
        unlabelled_rows(str(path), text_column="body", max_rows=10, seed=0, exclude=set())["text"])
    with pytest.raises(DistillError, match="has no column 'text'.*columns: body") as err:
        unlabelled_rows(str(path), text_column="text", max_rows=10, seed=0, exclude=set())
    assert "distill.augment.text_column" in err.value.fix
    (tmp_path / "numbers.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DistillError, match="1 rows whose 'text' is not a string \\(first at row 2\\)"):
        unlabelled_rows(str(tmp_path / "numbers.jsonl"), text_column="text", max_rows=10, seed=0, exclude=set())


def _augment(**kw):
    base = dict(copies=0, methods=["delete", "swap", "crop"], rate=0.15, unlabelled=None, text_column="text",
                max_unlabelled=100)
    return SimpleNamespace(**{**base, **kw})


def test_extra_texts_off_on_and_refused(review_frame):
    train, test = review_frame.iloc[:30], review_frame.iloc[30:60]
    frames = {"train": train, "test": test}
    assert extra_texts(_augment(), frames, seed=1) is None
    extra = extra_texts(_augment(copies=2), frames, seed=1)
    assert list(extra.columns) == ["id", "text", "label", "source", "weight"] and (extra["label"] == "").all()
    assert not set(extra["text"]) & set(review_frame["text"]) and len(extra) > 40
    clash = {"train": train, "test": test.assign(id=[f"{train['id'].iloc[0]}~delete0"] + test["id"].tolist()[1:])}
    with pytest.raises(DistillError, match="augmentation ids collide with data ids"):
        extra_texts(_augment(copies=1), clash, seed=1)
    short = {"train": pd.DataFrame({"id": ["a", "b"], "text": ["ok", "fine drug"]})}
    with pytest.raises(DistillError, match="produced no text") as err:
        extra_texts(_augment(copies=2), short, seed=1)
    assert "distill.augment" in err.value.fix


def test_rows_without_a_hard_label_learn_from_the_kd_term_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3)
    labels = torch.tensor([0, 2, 1, NO_LABEL, NO_LABEL, NO_LABEL])
    loss = KDLoss(1.0, 2.0, "forward_kl")  # alpha 1: hard-label CE only
    ce_labelled = torch.nn.functional.cross_entropy(student[:3], labels[:3])
    assert torch.allclose(loss(student, labels, teacher), ce_labelled)  # the mean over the labelled rows
    loss(student, labels, teacher).backward()
    assert student.grad[3:].abs().sum() == 0 and student.grad[:3].abs().sum() > 0
    student.grad = None
    kd_only = KDLoss(0.5, 2.0, "forward_kl")
    unlabelled = torch.full((6,), NO_LABEL)
    value = kd_only(student, unlabelled, teacher)  # no labelled row: the CE part is 0, the KD part remains
    assert value > 0 and torch.allclose(value, KDLoss(0.0, 2.0, "forward_kl")(student, unlabelled, teacher) * 0.5)


def test_a_config_that_would_ignore_the_augmentation_rows_is_refused():
    from flows.config import load_config
    from tests.conftest import ROOT

    with pytest.raises(DistillError, match="learn from the KD term only, which distill.alpha 1 switches off"):
        load_config(ROOT / "configs/tiny.yaml", ["distill.augment.copies=1", "distill.alpha=1"])
    with pytest.raises(DistillError, match="distill.augment.methods"):
        load_config(ROOT / "configs/tiny.yaml", ["distill.augment.methods=[shuffle]"])
    cfg = load_config(ROOT / "configs/tiny.yaml", ["distill.augment.copies=1", "distill.alpha=1",
                                                   "distill.alpha_end=0.5", "distill.alpha_schedule=linear"])
    assert cfg.distill.augment.copies == 1  # alpha falls to 0.5: the KD term learns them
