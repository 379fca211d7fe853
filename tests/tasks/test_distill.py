"""Students from teacher layers and KD training on a tiny real BERT."""

import numpy as np
import pytest
import torch

from flows.config import DistillConfig
from tasks.distill import distill_student, student_from_teacher
from tasks.errors import DistillError
from tasks.modeling import load_classifier

LABELS = ["negative", "neutral", "positive"]


def test_student_copies_the_chosen_layers(tiny_model_dir):
    teacher, _ = load_classifier(tiny_model_dir)
    student = student_from_teacher(teacher, [1])
    assert student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    for key in s:
        src = key.replace("encoder.layer.0.", "encoder.layer.1.")
        assert torch.equal(s[key], t[src]), key
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_bad_layer_list_is_refused(tiny_model_dir):
    teacher, _ = load_classifier(tiny_model_dir)
    with pytest.raises(DistillError, match="student_layers"):
        student_from_teacher(teacher, [0, 7])
    with pytest.raises(DistillError, match="distinct"):
        student_from_teacher(teacher, [1, 1])


def _run(tiny_model_dir, review_frame, out, seed=3):
    df = review_frame.head(96)
    label_ids = df["label"].map({l: i for i, l in enumerate(LABELS)}).to_numpy()
    rng = np.random.default_rng(0)
    teacher_logits = rng.normal(size=(len(df), 3)).astype(np.float32)
    cfg = DistillConfig(student_layers=[1], epochs=2, learning_rate=1e-3, batch_size=16, patience=2)
    return distill_student(tiny_model_dir, out, train_texts=df["text"].tolist(), train_label_ids=label_ids,
                           teacher_logits=teacher_logits, val_texts=df["text"].tolist()[:32],
                           val_label_ids=label_ids[:32], cfg=cfg, max_length=32, seed=seed, device="cpu")


def test_distillation_trains_saves_and_is_reproducible(tiny_model_dir, review_frame, tmp_path):
    a = _run(tiny_model_dir, review_frame, tmp_path / "a")
    b = _run(tiny_model_dir, review_frame, tmp_path / "b")
    assert (a.path / "model.safetensors").is_file()
    assert len(a.history) >= 1 and {"train_loss", "val_accuracy", "val_fidelity"} <= set(a.history[0])
    assert a.digest == b.digest  # same config, data and seed -> the same student
    student, _ = load_classifier(a.path)
    assert student.config.num_hidden_layers == 1
