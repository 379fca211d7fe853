"""Student builders on tiny real BERT / DistilBERT classifiers built from configs (no download)."""

import pytest
import torch

from distill_gap.errors import DistillError
from distill_gap.models.loading import load_classifier, save_classifier
from distill_gap.kd.students import (build_student, check_layer_map, default_layer_map, resolve_layers, student_from_config,
                            student_from_layers, student_from_pretrained)

LABELS = ["negative", "neutral", "positive"]
_LABEL_KW = dict(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def bert6():
    """A 6-layer BERT classifier (hidden 16), weights from a fixed seed."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=40, pad_token_id=0, **_LABEL_KW)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def distilbert6():
    """A 6-layer DistilBERT classifier (dim 16), weights from a fixed seed."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=60, dim=16, n_layers=6, n_heads=2, hidden_dim=32, max_position_embeddings=40,
                           pad_token_id=0, **_LABEL_KW)
    return DistilBertForSequenceClassification(cfg).eval()


# ---------------------------------------------------------------------------------------------
# resolve_layers


@pytest.mark.parametrize("spec, n, expected", [
    ([0, 5], 6, [0, 5]),
    ((1, 2, 4), 6, [1, 2, 4]),
    ({"every": 2}, 6, [1, 3, 5]),
    ({"every": 4}, 6, [3, 5]),
    ({"every": 3}, 6, [2, 5]),
    ({"every": 1}, 3, [0, 1, 2]),
    ({"every": 6}, 6, [5]),
])
def test_resolve_layers(spec, n, expected):
    assert resolve_layers(spec, n) == expected


@pytest.mark.parametrize("spec, match", [
    ([0, 6], r"6 is not a teacher layer; valid indices are 0\.\.5"),
    ([-1, 2], r"-1 is not a teacher layer; valid indices are 0\.\.5"),
    ([1, 1], r"layer 1 appears twice.*0\.\.5"),
    ([4, 1], r"not in increasing order"),
    ([], r"non-empty list"),
    ([0, 1.0], r"1\.0 is not a teacher layer"),
    ([True], r"True is not a teacher layer"),
    ({"every": 0}, r"k=0 is not an integer in 1\.\.6"),
    ({"every": 7}, r"k=7 is not an integer in 1\.\.6"),
    ({"every": 2, "from": 1}, r"exactly \{'every': k\}"),
    ({"every": -1}, r"k=-1 is not an integer in 1\.\.6"),
    ("every:2", r"non-empty list"),
    (3, r"non-empty list"),
])
def test_resolve_layers_refuses(spec, match):
    with pytest.raises(DistillError, match=match) as err:
        resolve_layers(spec, 6)
    assert err.value.fix


# ---------------------------------------------------------------------------------------------
# student_from_layers


@pytest.mark.parametrize("teacher_name, layer_key, query", [
    ("bert6", "bert.encoder.layer.", "attention.self.query.weight"),
    ("distilbert6", "distilbert.transformer.layer.", "attention.q_lin.weight"),
])
def test_slicing_keeps_exactly_the_chosen_layers(request, teacher_name, layer_key, query):
    teacher = request.getfixturevalue(teacher_name)
    layers = [0, 2, 5]
    student = student_from_layers(teacher, layers)
    assert student.config.num_hidden_layers == 3 and type(student) is type(teacher)
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        src = key
        if key.startswith(layer_key):
            j, rest = key[len(layer_key):].split(".", 1)
            src = f"{layer_key}{layers[int(j)]}.{rest}"
        assert torch.equal(value, t[src]), key
    # every student layer exists and is the teacher's, not a random fresh one
    assert {k[len(layer_key):].split(".")[0] for k in s if k.startswith(layer_key)} == {"0", "1", "2"}
    assert not torch.equal(s[f"{layer_key}1.{query}"], t[f"{layer_key}1.{query}"])  # student 1 is teacher 2
    assert _n_params(student) < _n_params(teacher)
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        assert student.eval()(input_ids=ids).logits.shape == (1, 3)


def test_slicing_every_k_on_the_tiny_classifier(tiny_model_dir):
    teacher, _ = load_classifier(tiny_model_dir)  # 2 layers
    student = student_from_layers(teacher, {"every": 2})
    assert student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    for key in s:
        assert torch.equal(s[key], t[key.replace("encoder.layer.0.", "encoder.layer.1.")]), key
    assert student.config.id2label == teacher.config.id2label


def test_slicing_refuses_bad_layers_and_other_architectures(bert6):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    with pytest.raises(DistillError, match=r"7 is not a teacher layer; valid indices are 0\.\.5"):
        student_from_layers(bert6, [0, 7])
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=40))
    with pytest.raises(DistillError, match="cannot slice the layers of a gpt2 model"):
        student_from_layers(gpt2, [0])
    with pytest.raises(DistillError, match="cannot build a fresh student config for a gpt2 teacher"):
        student_from_config(gpt2, num_layers=1, hidden_size=8, num_heads=2, intermediate_size=16)


# ---------------------------------------------------------------------------------------------
# student_from_config


def test_fresh_config_has_the_new_dims_and_the_teachers_vocabulary_and_labels(bert6):
    student = student_from_config(bert6, num_layers=2, hidden_size=8, num_heads=2, intermediate_size=16)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 8, 2, 16)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.pad_token_id) == (60, 40, 0)
    assert cfg.id2label == bert6.config.id2label and cfg.label2id == bert6.config.label2id and cfg.num_labels == 3
    assert student.bert.embeddings.word_embeddings.weight.shape == (60, 8)
    assert student.classifier.weight.shape == (3, 8)
    assert _n_params(student) < _n_params(bert6)
    assert bert6.config.hidden_size == 16  # the teacher's config is left alone


def test_fresh_config_copies_embeddings_when_width_is_equal(bert6):
    student = student_from_config(bert6, num_layers=1, hidden_size=16, num_heads=4, intermediate_size=8)
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        assert torch.equal(getattr(student.bert.embeddings, name).weight, getattr(bert6.bert.embeddings, name).weight)
    # the encoder is fresh, not a copy of a teacher layer
    assert student.bert.encoder.layer[0].intermediate.dense.weight.shape == (8, 16)
    narrow = student_from_config(bert6, num_layers=1, hidden_size=8, num_heads=2, intermediate_size=8)
    assert not torch.equal(narrow.bert.embeddings.word_embeddings.weight,
                           bert6.bert.embeddings.word_embeddings.weight[:, :8])


def test_fresh_config_for_distilbert(distilbert6):
    student = student_from_config(distilbert6, num_layers=2, hidden_size=16, num_heads=4, intermediate_size=24)
    cfg = student.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.hidden_dim) == (2, 16, 4, 24)
    assert len(student.distilbert.transformer.layer) == 2
    assert torch.equal(student.distilbert.embeddings.word_embeddings.weight,
                       distilbert6.distilbert.embeddings.word_embeddings.weight)
    assert _n_params(student) < _n_params(distilbert6)


@pytest.mark.parametrize("dims, match", [
    (dict(num_layers=2, hidden_size=10, num_heads=4, intermediate_size=16), r"hidden_size=10 is not divisible by num_heads=4"),
    (dict(num_layers=0, hidden_size=8, num_heads=2, intermediate_size=16), r"num_layers=0 must be a positive integer"),
    (dict(num_layers=2, hidden_size=-8, num_heads=2, intermediate_size=16), r"hidden_size=-8"),
    (dict(num_layers=2, hidden_size=8, num_heads=0, intermediate_size=16), r"num_heads=0"),
    (dict(num_layers=2, hidden_size=8, num_heads=2, intermediate_size=2.5), r"intermediate_size=2\.5"),
])
def test_fresh_config_refuses_bad_dims(bert6, dims, match):
    with pytest.raises(DistillError, match=match):
        student_from_config(bert6, **dims)


# ---------------------------------------------------------------------------------------------
# student_from_pretrained


def _tiny_bert(vocab_size: int, labels: list[str], seed: int = 1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)}))


def test_pretrained_with_the_teachers_tokenizer_gets_the_teachers_labels(tiny_model_dir, tmp_path):
    _, tok = load_classifier(tiny_model_dir)
    other = _tiny_bert(len(tok), ["a", "b"])  # another head size: re-initialised for LABELS
    path = save_classifier(other, tok, tmp_path / "student")
    student = student_from_pretrained(path, tok, LABELS)
    assert student.config.num_labels == 3 and student.config.id2label == dict(enumerate(LABELS))
    assert student.classifier.weight.shape == (3, 16)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, other.bert.embeddings.word_embeddings.weight)
    batch = tok(["the pill helped"], return_tensors="pt")
    with torch.no_grad():
        assert student.eval()(**batch).logits.shape == (1, 3)


def test_pretrained_with_another_tokenizer_is_refused_naming_a_token(tiny_model_dir, review_frame, tmp_path):
    from distill_gap.models.from_scratch import train_wordpiece_tokenizer

    _, tok = load_classifier(tiny_model_dir)
    other_tok = train_wordpiece_tokenizer(review_frame["text"].tolist()[::-1][:60], vocab_size=300)
    path = save_classifier(_tiny_bert(len(tok), LABELS), other_tok, tmp_path / "student")
    with pytest.raises(DistillError, match=r"another tokenizer than the teacher: token '[^']+' is id") as err:
        student_from_pretrained(path, tok, LABELS)
    assert "shares the teacher's tokenizer" in err.value.fix and "'layers'" in err.value.fix


def test_pretrained_with_other_special_tokens_is_refused(tiny_model_dir, tmp_path):
    _, tok = load_classifier(tiny_model_dir)
    other_tok = load_classifier(tiny_model_dir)[1]
    other_tok.pad_token = "[MASK]"  # same vocabulary, another pad id
    path = save_classifier(_tiny_bert(len(tok), LABELS), other_tok, tmp_path / "student")
    with pytest.raises(DistillError, match=r"pad_token '\[MASK\]' is id 4 for the student and '\[PAD\]' \(id 0\)"):
        student_from_pretrained(path, tok, LABELS)


def test_pretrained_with_a_smaller_vocabulary_is_refused(tiny_model_dir, tmp_path):
    _, tok = load_classifier(tiny_model_dir)
    path = save_classifier(_tiny_bert(len(tok) - 10, LABELS), tok, tmp_path / "student")
    with pytest.raises(DistillError, match=rf"embeds {len(tok) - 10} token ids, but the teacher's tokenizer has {len(tok)}"):
        student_from_pretrained(path, tok, LABELS)


def test_pretrained_folder_checks(tiny_model_dir, tmp_path):
    _, tok = load_classifier(tiny_model_dir)
    with pytest.raises(DistillError, match="no config.json"):
        student_from_pretrained(tmp_path, tok, LABELS)
    path = save_classifier(_tiny_bert(len(tok), LABELS), tok, tmp_path / "pickled")
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DistillError, match="pickle-based"):
        student_from_pretrained(path, tok, LABELS)
    bare = tmp_path / "bare"
    _tiny_bert(len(tok), LABELS).save_pretrained(bare, safe_serialization=True)
    with pytest.raises(DistillError, match="no usable tokenizer"):
        student_from_pretrained(bare, tok, LABELS)


# ---------------------------------------------------------------------------------------------
# build_student


def test_build_student_dispatches_on_kind(tiny_model_dir, tmp_path):
    teacher, tok = load_classifier(tiny_model_dir)
    sliced = build_student(teacher, tok, {"kind": "layers", "layers": [1]}, LABELS)
    assert sliced.config.num_hidden_layers == 1
    assert torch.equal(sliced.bert.encoder.layer[0].output.dense.weight, teacher.bert.encoder.layer[1].output.dense.weight)
    every = build_student(teacher, tok, {"kind": "layers", "every": 1}, LABELS)
    assert every.config.num_hidden_layers == 2
    fresh = build_student(teacher, tok, {"kind": "config", "num_layers": 1, "hidden_size": 16, "num_heads": 2,
                                         "intermediate_size": 32}, LABELS)
    assert fresh.config.hidden_size == 16 and fresh.config.vocab_size == teacher.config.vocab_size
    path = save_classifier(_tiny_bert(len(tok), LABELS), tok, tmp_path / "student")
    pre = build_student(teacher, tok, {"kind": "pretrained", "path": str(path)}, LABELS)
    assert pre.config.id2label == dict(enumerate(LABELS))
    assert build_student(teacher, tok, {"kind": "layers", "layers": [0]}).config.num_hidden_layers == 1


@pytest.mark.parametrize("spec, match", [
    ({"kind": "prune"}, r"'prune' is unknown; valid kinds are \['layers', 'config', 'pretrained'\]"),
    ({"layers": [0]}, r"None is unknown; valid kinds"),
    ({"kind": "layers"}, r"needs exactly one of \['every', 'layers'\]"),
    ({"kind": "layers", "layers": [0], "every": 2}, r"needs exactly one of"),
    ({"kind": "layers", "layers": [0], "depth": 2}, r"fields \['depth', 'layers'\]"),
    ({"kind": "config", "num_layers": 1, "hidden_size": 8}, r"needs \['hidden_size', 'intermediate_size'"),
    ({"kind": "pretrained"}, r"needs \['path'\]"),
    ({"kind": "layers", "every": 0}, r"k=0 is not an integer in 1\.\.2"),
])
def test_build_student_refuses_bad_specs(tiny_model_dir, spec, match):
    teacher, tok = load_classifier(tiny_model_dir)
    with pytest.raises(DistillError, match=match):
        build_student(teacher, tok, spec, LABELS)


def test_build_student_refuses_labels_other_than_the_teachers(tiny_model_dir):
    teacher, tok = load_classifier(tiny_model_dir)
    with pytest.raises(DistillError, match="labels"):
        build_student(teacher, tok, {"kind": "layers", "layers": [0]}, ["positive", "neutral", "negative"])


# ---------------------------------------------------------------------------------------------
# layer maps


@pytest.mark.parametrize("n_s, n_t, expected", [
    (2, 6, [(0, 0), (1, 3), (2, 6)]),
    (3, 6, [(0, 0), (1, 2), (2, 4), (3, 6)]),
    (3, 12, [(0, 0), (1, 4), (2, 8), (3, 12)]),
    (1, 2, [(0, 0), (1, 2)]),
    (4, 4, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]),
])
def test_default_layer_map(n_s, n_t, expected):
    layer_map = default_layer_map(n_s, n_t)
    assert layer_map == expected
    assert check_layer_map(layer_map, n_s, n_t) == expected


def test_check_layer_map_accepts_lists_and_the_inclusive_end():
    assert check_layer_map([[0, 0], [2, 6]], 2, 6) == [(0, 0), (2, 6)]
    assert check_layer_map([], 2, 6) == []


@pytest.mark.parametrize("layer_map, match", [
    ([(3, 6)], r"pair \(3, 6\) is out of range.*student 0\.\.2, teacher 0\.\.6"),
    ([(1, 7)], r"pair \(1, 7\) is out of range.*teacher 0\.\.6"),
    ([(-1, 0)], r"pair \(-1, 0\)"),
    ([(1,)], r"pair \(1,\)"),
    ([(1, 2.0)], r"pair \(1, 2\.0\)"),
    ([(1, 2), (1, 2)], r"pair \(1, 2\) appears twice"),
    ("0:0", r"must be a list of \(student, teacher\) pairs"),
])
def test_check_layer_map_refuses(layer_map, match):
    with pytest.raises(DistillError, match=match):
        check_layer_map(layer_map, 2, 6)


@pytest.mark.parametrize("n_s, n_t", [(0, 6), (2, 0), (2.0, 6)])
def test_default_layer_map_refuses_bad_counts(n_s, n_t):
    with pytest.raises(DistillError, match="a layer map needs at least 1"):
        default_layer_map(n_s, n_t)
