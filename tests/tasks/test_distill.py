"""The distill stage on a tiny real BERT: the student and its loss built from the distill section, KD training,
the hard-label baseline, rare-case weights, and the stage step with the sections it is given."""

import numpy as np
import pytest
import torch

from flows.config import DistillConfig
from tasks.distill import distill, distill_student, example_weights, kd_loss, student_seed
from distill_gap.errors import DistillError
from distill_gap.models.loading import load_classifier

LABELS = ["negative", "neutral", "positive"]


def _run(tiny_model_dir, review_frame, out, seed=3, teacher_logits=None, weights=None, hard_labels_only=False,
         **cfg_changes):
    df = review_frame.head(96)
    label_ids = df["label"].map({l: i for i, l in enumerate(LABELS)}).to_numpy()
    rng = np.random.default_rng(0)
    if teacher_logits is None:
        teacher_logits = rng.normal(size=(len(df), 3)).astype(np.float32)
    cfg = DistillConfig(**{"student_layers": [1], "epochs": 2, "learning_rate": 1e-3, "batch_size": 16,
                           "patience": 2, **cfg_changes})
    return distill_student(tiny_model_dir, out, train_texts=df["text"].tolist(), train_label_ids=label_ids,
                           teacher_logits=teacher_logits, val_texts=df["text"].tolist()[:32],
                           val_label_ids=label_ids[:32], distill_cfg=cfg, max_length=32, seed=seed, device="cpu",
                           train_ids=df["id"].tolist(), weights=weights, hard_labels_only=hard_labels_only)


def test_distillation_trains_saves_and_is_reproducible(tiny_model_dir, review_frame, tmp_path):
    a = _run(tiny_model_dir, review_frame, tmp_path / "a")
    b = _run(tiny_model_dir, review_frame, tmp_path / "b")
    assert (a.path / "model.safetensors").is_file()
    assert len(a.history) >= 1 and {"train_loss", "val_accuracy", "val_fidelity"} <= set(a.history[0])
    assert a.digest == b.digest  # same config, data and seed -> the same student
    student, _ = load_classifier(a.path)
    assert student.config.num_hidden_layers == 1


# ------------------------------------------------------------------------------ issue 4: engine options


def test_fresh_config_student_with_hidden_and_attention_matching(tiny_model_dir, review_frame, tmp_path):
    """A fresh, narrower student (16 wide vs the teacher's 32) learns through a projection; the
    attention maps are matched on the default layer map; the student saved has no projection."""
    res = _run(tiny_model_dir, review_frame, tmp_path / "s", epochs=1,
               student={"kind": "config", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32},
               hidden_loss="mse", attention_loss=True, divergence="js")
    student, _ = load_classifier(res.path)
    assert student.config.hidden_size == 16 and student.config.num_hidden_layers == 1
    assert res.spec["kind"] == "config" and np.isfinite(res.history[0]["train_loss"])
    assert not any("projection" in k for k in student.state_dict())


def test_every_kth_layer_cosine_schedule_and_accumulation(tiny_model_dir, review_frame, tmp_path):
    res = _run(tiny_model_dir, review_frame, tmp_path / "s", epochs=1, student={"kind": "layers", "every": 2},
               lr_schedule="cosine", grad_accumulation=2, alpha=0.8, alpha_end=0.2, alpha_schedule="linear",
               hidden_loss="cosine", layer_map=[(0, 0), (1, 2)])
    student, _ = load_classifier(res.path)
    assert student.config.num_hidden_layers == 1 and res.layers == [] and res.spec == {"kind": "layers", "every": 2}
    assert res.history[0]["alpha"] == pytest.approx(0.2, abs=0.05)   # the schedule reached alpha_end


def test_hard_label_baseline_ignores_the_teacher(tiny_model_dir, review_frame, tmp_path):
    """The baseline trains on labels only: teacher logits that are pure noise cannot change it."""
    a = _run(tiny_model_dir, review_frame, tmp_path / "a", hard_labels_only=True)
    b = _run(tiny_model_dir, review_frame, tmp_path / "b", hard_labels_only=True,
             teacher_logits=np.full((96, 3), 50.0, np.float32))
    kd = _run(tiny_model_dir, review_frame, tmp_path / "kd")
    assert a.hard_labels_only and a.digest == b.digest and kd.digest != a.digest


def test_non_finite_loss_stops_with_step_and_ids(tiny_model_dir, review_frame, tmp_path):
    logits = np.random.default_rng(0).normal(size=(96, 3)).astype(np.float32)
    logits[5] = np.nan
    bad_id = review_frame.head(96)["id"].iloc[5]
    with pytest.raises(DistillError, match="optimizer step") as err:
        _run(tiny_model_dir, review_frame, tmp_path / "s", teacher_logits=logits)
    assert str(bad_id) in str(err.value) and "no checkpoint" in str(err.value)
    assert not (tmp_path / "s").exists(), "nothing saved from a failed run"


@pytest.mark.parametrize("change, match", [
    ({"student_layers": [0, 7]}, "0..1"),
    ({"hidden_loss": "mse", "layer_map": [(0, 0), (3, 2)]}, "layer map|0..1"),
    ({"attention_loss": True, "student": {"kind": "config", "num_layers": 1, "hidden_size": 32, "num_heads": 4,
                                          "intermediate_size": 32}}, "head"),
])
def test_bad_student_or_layer_map_fails_before_training(tiny_model_dir, review_frame, tmp_path, change, match):
    with pytest.raises(DistillError, match=match):
        _run(tiny_model_dir, review_frame, tmp_path / "s", **change)
    assert not (tmp_path / "s").exists()


def test_student_with_another_tokenizer_is_refused(tiny_model_dir, review_frame, tmp_path):
    from distill_gap.models.from_scratch import build_scratch_classifier

    other = build_scratch_classifier(["completely different words here"] * 50 + review_frame["text"].tolist()[-40:],
                                     LABELS, tmp_path / "other", seed=1)
    with pytest.raises(DistillError, match="tokenizer"):
        _run(tiny_model_dir, review_frame, tmp_path / "s", student={"kind": "pretrained", "path": str(other)})


@pytest.mark.parametrize("overrides, match", [
    (["distill.alpha=1.5"], "distill.alpha"), (["distill.temperature=0"], "distill.temperature"),
    (["distill.alpha_schedule=linear"], "alpha_end"),
])
def test_bad_loss_settings_are_config_errors(overrides, match):
    from flows.config import load_config

    with pytest.raises(DistillError, match=match):
        load_config("configs/tiny.yaml", overrides)


def test_example_weights_emphasise_critical_and_uncertain_rows():
    logits = np.array([[10.0, 0, 0], [0.0, 0, 0], [10.0, 0, 0]], np.float32)   # confident, uniform, confident
    assert example_weights(logits, None, critical_weight=1.0, uncertainty_weight=0.0) is None
    w = example_weights(logits, np.array([False, False, True]), critical_weight=3.0, uncertainty_weight=1.0)
    assert w[2] == pytest.approx(3.0, abs=1e-3) and w[1] == pytest.approx(1 + 2 / 3, abs=1e-4)
    assert w[0] == pytest.approx(1.0, abs=1e-3)


def test_weights_change_the_student(tiny_model_dir, review_frame, tmp_path):
    w = np.ones(96, np.float32)
    w[:10] = 20.0
    plain = _run(tiny_model_dir, review_frame, tmp_path / "a")
    weighted = _run(tiny_model_dir, review_frame, tmp_path / "b", weights=w)
    assert plain.digest != weighted.digest


def test_frozen_embeddings_stay_the_teachers(tiny_model_dir, review_frame, tmp_path):
    teacher, _ = load_classifier(tiny_model_dir)
    frozen = _run(tiny_model_dir, review_frame, tmp_path / "f", freeze_embeddings=True)
    trained = _run(tiny_model_dir, review_frame, tmp_path / "t")
    word = lambda m: m.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(word(load_classifier(frozen.path)[0]), word(teacher))
    assert not torch.equal(word(load_classifier(trained.path)[0]), word(teacher))


# ------------------------------------------------------------------------------ issue 17: the loss from the section


def test_kd_loss_carries_every_loss_knob_of_the_section(tiny_model_dir):
    from distill_gap.kd.losses import AttentionKLLoss, HiddenStateLoss
    from distill_gap.kd.students import build_student

    teacher, tok = load_classifier(tiny_model_dir)
    student = build_student(teacher, tok, {"kind": "config", "num_layers": 1, "hidden_size": 16, "num_heads": 2,
                                           "intermediate_size": 32})
    cfg = DistillConfig(temperature=3.5, divergence="reverse_kl", alpha=0.7, alpha_end=0.1, alpha_schedule="cosine",
                        hidden_loss="cosine", hidden_weight=0.25, attention_loss=True, attention_weight=2.0)
    loss = kd_loss(cfg, student, teacher)
    assert (loss.kd.alpha, loss.kd.temperature, loss.kd.divergence) == (0.7, 3.5, "reverse_kl")
    assert (loss.alpha_end, loss.schedule, loss.hidden_weight, loss.attention_weight) == (0.1, "cosine", 0.25, 2.0)
    assert isinstance(loss.hidden, HiddenStateLoss) and loss.hidden.kind == "cosine"
    assert loss.hidden.layer_map == [(0, 0), (1, 2)]                  # the default map: embeddings and last layer
    assert any(p.shape == (32, 16) for p in loss.parameters())        # a learned 16 -> 32 projection
    assert isinstance(loss.attention, AttentionKLLoss) and loss.attention.layer_map == [(0, 1)]
    loss.set_step(9, 10)
    assert loss.epoch_metrics()["alpha"] == pytest.approx(0.1)

    plain = kd_loss(DistillConfig(), student, None)                   # the schema's defaults, no teacher needed
    defaults = DistillConfig()
    assert (plain.kd.alpha, plain.kd.temperature, plain.kd.divergence) == (defaults.alpha, defaults.temperature,
                                                                          defaults.divergence)
    assert plain.hidden is None and plain.attention is None and not list(plain.parameters())


def test_the_stage_step_takes_its_sections(tiny_model_dir, review_frame, tmp_path):
    """distill() with the distill section, critical slices, seed and max length: rare-case weights change the
    KD student, the baseline trains beside it, each epoch reaches the log."""
    import logging
    from types import SimpleNamespace

    from distill_gap.data.splits import Splits

    frames = {"train": review_frame.head(64), "validation": review_frame.iloc[64:96]}
    splits = Splits(frames=frames, labels=LABELS, slice_columns=["condition"])
    rng = np.random.default_rng(1)
    ids = frames["train"]["id"].tolist()[::-1]                      # the store's order is not the split's
    soft = SimpleNamespace(ids=ids, logits=rng.normal(size=(64, 3)).astype(np.float32))
    cfg = DistillConfig(student_layers=[1], epochs=1, learning_rate=1e-3, batch_size=16, baseline=True,
                        critical_weight=5.0)
    critical = {"condition": [frames["train"]["condition"].iloc[0]]}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("test.distill")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    kw = dict(max_length=32, seed=3, device="cpu", log=log)
    weighted = distill(tiny_model_dir, splits, soft, cfg, tmp_path / "w", critical_slices=critical, **kw)
    plain = distill(tiny_model_dir, splits, soft, cfg, tmp_path / "p", critical_slices={}, **kw)
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("rare-case emphasis:") for m in messages)
    assert any(m.startswith("student epoch 1") for m in messages) and any("hard-label baseline" in m for m in messages)
    assert weighted.digest != plain.digest                             # the critical rows weigh more
    assert weighted.baseline.hard_labels_only and weighted.baseline.digest == plain.baseline.digest  # no weights
    assert (weighted.path.parent, weighted.baseline.path.name) == (tmp_path / "w", "student-hard")


def test_distill_seed_seeds_the_student_and_leaves_the_run_seed_to_the_data(tiny_model_dir, review_frame, tmp_path):
    """distill.seed (medians over seeds on the same splits and soft labels): the student trains with it instead of
    the run's seed, and the step records the seed it trained with."""
    from types import SimpleNamespace

    from distill_gap.data.splits import Splits
    from distill_gap.governance.attestation import distill_statement

    frames = {"train": review_frame.head(64), "validation": review_frame.iloc[64:96]}
    splits = Splits(frames=frames, labels=LABELS, slice_columns=["condition"])
    soft = SimpleNamespace(ids=frames["train"]["id"].tolist(),
                           logits=np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32))
    cfg = DistillConfig(student_layers=[1], epochs=1, learning_rate=1e-3, batch_size=16)
    kw = dict(critical_slices={}, max_length=32, device="cpu")
    run_seed_4 = distill(tiny_model_dir, splits, soft, cfg, tmp_path / "a", seed=4, **kw)
    own_seed_4 = distill(tiny_model_dir, splits, soft, cfg.model_copy(update={"seed": 4}), tmp_path / "b", seed=3, **kw)
    run_seed_3 = distill(tiny_model_dir, splits, soft, cfg, tmp_path / "c", seed=3, **kw)
    assert own_seed_4.digest == run_seed_4.digest != run_seed_3.digest
    teacher = SimpleNamespace(name="t", version="1", digest="0" * 64)
    soft.key, soft.manifest = "k", {"shards": []}
    own = cfg.model_copy(update={"seed": 4})
    stmt = distill_statement(own, seed=student_seed(own, 3), student_model_name="s", student=own_seed_4,
                             soft=soft, teacher=teacher, splits=splits, context={})
    assert stmt["predicate"]["parameters"]["seed"] == 4
    with pytest.raises(ValueError):
        DistillConfig(seed=-1)


def test_a_trimmed_student_answers_its_training_texts_as_the_untrimmed_one(tiny_model_dir, review_frame, tmp_path):
    """distill.vocab.trim (issue 21): the same training, then only the pieces the training texts use are kept; the
    mapping and the count go with the student (folder, StudentResult), the logits on the training texts do not
    move, and the folder is smaller."""
    from distill_gap.kd.vocab import read_record

    full = _run(tiny_model_dir, review_frame, tmp_path / "full")
    trimmed = _run(tiny_model_dir, review_frame, tmp_path / "trimmed", vocab={"trim": True})
    assert full.vocab is None and trimmed.vocab["kept"] < trimmed.vocab["teacher_vocab_size"]
    assert trimmed.vocab["texts"] == 96 and "kept_teacher_ids" not in trimmed.vocab
    assert read_record(trimmed.path)["kept"] == trimmed.vocab["kept"] and trimmed.parameters < full.parameters
    texts = review_frame["text"].tolist()[:96]
    logits = []
    for path in (full.path, trimmed.path):
        model, tok = load_classifier(path)
        model.eval()
        with torch.no_grad():
            logits.append(model(**tok(texts, padding=True, truncation=True, max_length=32,
                                      return_tensors="pt")).logits.numpy())
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5)
    assert (trimmed.path / "model.safetensors").stat().st_size < (full.path / "model.safetensors").stat().st_size


def test_a_pruned_student_is_smaller_trains_and_records_what_went(tiny_model_dir, review_frame, tmp_path):
    """distill.prune (issue 21): heads and FFN neurons are removed before training, the saved student has the
    smaller shapes, and the record goes with it."""
    pruned = _run(tiny_model_dir, review_frame, tmp_path / "pruned", prune={"heads": 0.5, "ffn": 0.5})
    assert pruned.pruning["heads_kept"] == [1] and pruned.pruning["ffn_width"] == [64, 32]  # one layer kept
    student, _ = load_classifier(pruned.path)
    assert student.config.intermediate_size == 32 and pruned.parameters == pruned.pruning["parameters"][1]
    assert student.base_model.encoder.layer[0].attention.self.num_attention_heads == 1
    assert len(pruned.history) >= 1


def test_a_narrower_student_from_the_teachers_layers_trains_with_a_hidden_state_loss(tiny_model_dir, review_frame,
                                                                                   tmp_path):
    """distill.prune.hidden (issue 21): the student of teacher layer 1 made half as wide, its FFN pruned too, then
    trained with the hidden-state loss through a learned projection to the teacher's width."""
    narrow = _run(tiny_model_dir, review_frame, tmp_path / "narrow", prune={"hidden": 0.5, "ffn": 0.5},
                  hidden_loss="mse")
    p = narrow.pruning
    assert p["hidden_width"] == [32, 16] and p["heads_kept"] == [1] and p["ffn_width"] == [64, 32]
    student, _ = load_classifier(narrow.path)
    assert student.config.hidden_size == 16 and student.config.num_attention_heads == 1
    assert student.config.intermediate_size == 32 and narrow.parameters == p["parameters"][1] < p["parameters"][0]
    assert len(narrow.history) >= 1 and np.isfinite(narrow.history[-1]["train_loss"])
