"""The training loop on a tiny real BERT: flat knobs without defaults, the loss object it is handed, seeding by
the caller, early stopping and the errors it raises."""

import inspect

import numpy as np
import pytest
import torch

from distill_gap.errors import DistillError
from distill_gap.kd.losses import HardLabelLoss
from distill_gap.kd.training import train_classifier
from distill_gap.models.loading import load_classifier
from distill_gap.ops.runtime import seed_everything

LABELS = ["negative", "neutral", "positive"]
KNOBS = ["epochs", "learning_rate", "batch_size", "warmup_fraction", "weight_decay", "max_grad_norm", "patience",
         "lr_schedule", "grad_accumulation", "select_metric", "max_length", "seed"]


def _data(review_frame, n=48):
    df = review_frame.head(n)
    return df["text"].tolist(), df["label"].map({l: i for i, l in enumerate(LABELS)}).to_numpy()


def _train(model, tok, texts, label_ids, loss_fn, **changes):
    knobs = dict(epochs=2, learning_rate=1e-3, batch_size=16, warmup_fraction=0.1, weight_decay=0.01,
                 max_grad_norm=1.0, patience=2, lr_schedule="linear", grad_accumulation=1, select_metric="accuracy",
                 max_length=32, seed=3)
    return train_classifier(model, tok, texts, label_ids, loss_fn, val_texts=texts[:16], val_label_ids=label_ids[:16],
                            fix_if_not_finite="the caller's fix", **{**knobs, **changes})


def test_the_knobs_have_no_defaults_in_the_loop():
    """One default per knob, in flows/config.py: the loop takes every knob from its caller."""
    params = inspect.signature(train_classifier).parameters
    assert [k for k in KNOBS if params[k].default is not inspect.Parameter.empty] == []
    assert params["fix_if_not_finite"].default is inspect.Parameter.empty


def test_same_seed_same_model_and_the_loss_reports_each_epoch(tiny_model_dir, review_frame):
    texts, label_ids = _data(review_frame)
    runs = []
    for _ in range(2):
        seed_everything(3)  # the caller seeds: building the model and the loop draw from one stream
        model, tok = load_classifier(tiny_model_dir)
        result = _train(model, tok, texts, label_ids, HardLabelLoss())
        runs.append((model.state_dict(), result))
    (a, ra), (b, rb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra.steps == 2 * 3 and [r["epoch"] for r in ra.history] == [1, 2]
    assert [r["train_loss"] for r in ra.history] == [r["train_loss"] for r in rb.history]
    assert all(r["alpha"] == 1.0 and "val_fidelity" not in r for r in ra.history)   # HardLabelLoss's metrics


def test_non_finite_loss_stops_with_the_callers_fix(tiny_model_dir, review_frame):
    class Exploding(HardLabelLoss):
        def forward(self, outputs, labels, **kw):
            return super().forward(outputs, labels, **kw) * float("nan")

    texts, label_ids = _data(review_frame)
    model, tok = load_classifier(tiny_model_dir)
    with pytest.raises(DistillError, match="optimizer step 1, batch 1") as err:
        _train(model, tok, texts, label_ids, Exploding(), example_ids=[f"row-{i}" for i in range(len(texts))])
    assert err.value.fix == "the caller's fix" and "row-" in str(err.value)


def test_a_loss_reading_the_teacher_needs_the_teacher_model(tiny_model_dir, review_frame):
    class ReadsHiddenStates(HardLabelLoss):
        needs_hidden_states = True

    texts, label_ids = _data(review_frame)
    model, tok = load_classifier(tiny_model_dir)
    with pytest.raises(DistillError, match="no teacher model"):
        _train(model, tok, texts, label_ids, ReadsHiddenStates())


def test_select_metric_fidelity_keeps_the_epoch_closest_to_the_teacher(tiny_model_dir, review_frame):
    texts, label_ids = _data(review_frame)
    model, tok = load_classifier(tiny_model_dir)
    teacher_preds = np.zeros(16, dtype=int)
    result = train_classifier(model, tok, texts, label_ids, HardLabelLoss(), epochs=3, learning_rate=1e-3,
                              batch_size=16, warmup_fraction=0.0, weight_decay=0.0, max_grad_norm=1.0, patience=3,
                              lr_schedule="cosine", grad_accumulation=2, select_metric="fidelity", max_length=32,
                              seed=3, val_texts=texts[:16], val_label_ids=label_ids[:16], fix_if_not_finite="-",
                              val_teacher_preds=teacher_preds)
    fidelity = [r["val_fidelity"] for r in result.history]
    assert result.best_metric == max(fidelity) and result.best_epoch == fidelity.index(max(fidelity)) + 1
    assert result.steps == 3 * 2   # 3 batches per epoch, a step every 2 (and at the epoch's end)


def test_balanced_accuracy_is_the_mean_recall_and_can_pick_the_checkpoint(tiny_model_dir, review_frame):
    """A model that answers the majority class everywhere has validation accuracy = its share, balanced accuracy 1/C
    of the classes validation holds; select_metric=balanced_accuracy keeps the epoch with the best mean recall."""
    from distill_gap.kd.training import _val_metrics

    texts, label_ids = _data(review_frame)
    model, tok = load_classifier(tiny_model_dir)
    with torch.no_grad():  # a head that always answers class 2
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    val = label_ids[:16]
    m = _val_metrics(model, tok, texts[:16], val, None, 32, "cpu")
    assert m["val_accuracy"] == pytest.approx(np.mean(val == 2))
    assert m["val_balanced_accuracy"] == pytest.approx(1 / len(np.unique(val)))
    result = _train(model, tok, texts, label_ids, HardLabelLoss(), epochs=3, patience=3,
                    select_metric="balanced_accuracy")
    balanced = [r["val_balanced_accuracy"] for r in result.history]
    assert result.best_metric == max(balanced) and result.best_epoch == balanced.index(max(balanced)) + 1
