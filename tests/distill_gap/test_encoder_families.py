"""Issue 21, encoder families: a tiny sequence classifier of each family, built from its config with a tokenizer
trained in-process (nothing downloaded), runs every stage the pipeline runs on a teacher: a student from its layers,
INC INT8, ONNX export and ONNX INT8, prediction through load_predictor, the scope guard's fit. A stage a family
cannot take is refused up front, naming the family and the stage."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "deberta-v2", "modernbert")
TEXTS = ["the tablets helped my headache within a day", "no change at all after two weeks of this",
         "terrible nausea and dizziness, stopped taking it", "works well, mild dry mouth in the morning",
         "my doctor switched me because it did nothing", "sleeping better than in years, highly recommend",
         "rash on both arms after the third dose", "it is fine, nothing special, some fatigue",
         "best medication i have tried for anxiety", "gained weight and felt foggy all the time",
         "helped at first then stopped working", "no side effects and the pain is gone"]
LABEL_IDS = [i % 3 for i in range(len(TEXTS))]
LABELS = ["negative", "neutral", "positive"]
MAX_LENGTH = 32
_BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ROBERTA_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4 as in RoBERTa and XLM-R: pad_token_id=1


def _tokenizer(family: str):
    """A fast tokenizer of the family's class and special tokens over a WordPiece vocabulary learnt from TEXTS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import (DebertaV2TokenizerFast, PreTrainedTokenizerFast, RobertaTokenizerFast,
                              XLMRobertaTokenizerFast)

    from distill_gap.models.from_scratch import train_wordpiece_tokenizer, wordpiece_vocabulary

    if family in ("bert", "distilbert"):
        return train_wordpiece_tokenizer(TEXTS, vocab_size=200)
    roberta_like = family in ("roberta", "xlm-roberta")
    pad, unk, cls, sep, mask = (("<pad>", "<unk>", "<s>", "</s>", "<mask>") if roberta_like else _BERT_SPECIAL)
    special = _ROBERTA_SPECIAL if roberta_like else _BERT_SPECIAL
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in TEXTS for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    vocab = wordpiece_vocabulary(words, 200, special)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=unk))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab.index(cls)), (sep, vocab.index(sep))])
    cls_ = {"roberta": RobertaTokenizerFast, "xlm-roberta": XLMRobertaTokenizerFast,
            "deberta-v2": DebertaV2TokenizerFast}.get(family, PreTrainedTokenizerFast)
    extra = {"bos_token": cls, "eos_token": sep} if roberta_like else {}
    return cls_(tokenizer_object=tok, unk_token=unk, sep_token=sep, pad_token=pad, cls_token=cls, mask_token=mask,
                model_max_length=512, **extra)


def _config(family: str, tokenizer):
    """The family's config at hidden 32, 2 layers, 2 heads, 3 labels, the tokenizer's vocabulary and special ids."""
    from transformers import AutoConfig

    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "num_labels": len(LABELS),
           "id2label": dict(enumerate(LABELS)), "label2id": {l: i for i, l in enumerate(LABELS)}}
    if family == "distilbert":
        return AutoConfig.for_model(family, dim=32, n_layers=2, n_heads=2, hidden_dim=64, **ids)
    dims = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    if family in ("roberta", "xlm-roberta"):
        extra = {"max_position_embeddings": 514, "type_vocab_size": 1, "bos_token_id": tokenizer.cls_token_id,
                 "eos_token_id": tokenizer.sep_token_id}
    elif family == "deberta-v2":
        extra = {"max_position_embeddings": 512, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                 "position_buckets": 16, "max_relative_positions": 64, "type_vocab_size": 0}
    elif family == "modernbert":
        extra = {"max_position_embeddings": 512, "cls_token_id": tokenizer.cls_token_id,
                 "sep_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id,
                 "eos_token_id": tokenizer.sep_token_id, "local_attention": 16, "global_attn_every_n_layers": 2,
                 "reference_compile": False}
    else:
        extra = {"max_position_embeddings": 512}
    return AutoConfig.for_model(family, **dims, **ids, **extra)


def build_family(family: str, out: Path, seed: int = 0) -> Path:
    """An untrained sequence classifier of `family` + its tokenizer, saved to `out` (safetensors)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = _tokenizer(family)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(_config(family, tokenizer))
    with torch.no_grad():  # larger random weights than the default init, so logits vary by text
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    """(family, its tiny classifier's folder), built once per family."""
    return request.param, build_family(request.param, tmp_path_factory.mktemp(request.param) / "teacher")


def _fp32_linears(program) -> list[str]:
    """Modules of the saved INC program whose linear reads a float weight (not a dequantized int8 one)."""
    import torch

    return sorted(list(n.meta["nn_module_stack"].values())[-1][0] for n in program.graph.nodes
                  if n.target is torch.ops.aten.linear.default and "dequantize" not in str(n.args[1].target))


def test_student_from_the_teachers_layers_and_from_a_config(family_dir):
    import torch

    from distill_gap.kd.students import build_student
    from distill_gap.models.loading import load_classifier

    family, folder = family_dir
    teacher, tokenizer = load_classifier(folder)
    batch = {k: v for k, v in tokenizer(TEXTS[:2], padding=True, return_tensors="pt").items()
             if k != "token_type_ids" or family not in ("distilbert", "modernbert")}
    for spec in ({"kind": "layers", "layers": [0]}, {"kind": "config", "num_layers": 1, "hidden_size": 32,
                                                     "num_heads": 2, "intermediate_size": 32}):
        student = build_student(teacher, tokenizer, spec)
        assert type(student) is type(teacher) and student.config.num_hidden_layers == 1, (family, spec)
        with torch.no_grad():
            assert student.eval()(**batch).logits.shape == (2, len(LABELS)), (family, spec)


@pytest.mark.slow  # ~8-15 s a family: INC's prepare, calibrate and convert dominate
def test_every_edge_stage_runs_on_the_family(family_dir, tmp_path):
    from distill_gap.edge.inc_quantization import autotune_int8, fp32_fallbacks
    from distill_gap.edge.onnx_export import export_onnx, quantize_onnx_int8
    from distill_gap.evaluation.scope import fit_guard
    from distill_gap.inference.inc_int8 import INT8_FILE, _load_program
    from distill_gap.inference.predictor import load_predictor

    family, folder = family_dir
    # 1. prediction through the project's predictor: logits and the head's pooled features
    fp32 = load_predictor(folder, max_length=MAX_LENGTH)
    logits, features = fp32.predict_outputs(TEXTS)
    assert logits.shape == (len(TEXTS), len(LABELS)) and features.shape[0] == len(TEXTS)
    assert np.isfinite(features).all() and np.ptp(logits, axis=0).max() > 0, family  # logits vary by text
    # 2. INC INT8, one static candidate keeping the head in fp32: the fallback found in the graph takes effect
    int8 = autotune_int8(folder, TEXTS, TEXTS, LABEL_IDS, TEXTS, tmp_path / "int8", candidates=["static-fp32-head"],
                         tolerable_loss=0.99, max_length=MAX_LENGTH, reference=logits)
    assert int8.parity["finite"] and int8.parity["n"] == len(TEXTS), (family, int8.parity)
    int8_logits, int8_features = load_predictor(int8.path).predict_outputs(TEXTS)
    program, module = _load_program(int8.path / INT8_FILE)  # the archive the predictor loaded (checked, cached)
    fp32_modules = _fp32_linears(program)
    assert len(fp32_modules) == 2 and any(m.endswith(("classifier", "out_proj")) for m in fp32_modules), fp32_modules
    fallbacks = fp32_fallbacks(module, fp32.model.config)
    assert sorted(fallbacks["static-fp32-head"]) == fp32_modules, (family, fallbacks)
    assert len(fallbacks["static-fp32-ffn-out"]) == 2, (family, fallbacks)  # one FFN output per layer
    # 3. ONNX export (fp32, within float error of torch) and ONNX Runtime INT8
    onnx = export_onnx(folder, tmp_path / "onnx", heldout_texts=TEXTS, max_length=MAX_LENGTH)
    assert onnx.parity["max_abs_logit_diff"] < 1e-3 and onnx.parity["max_abs_feature_diff"] < 1e-3, onnx.parity
    onnx_int8 = quantize_onnx_int8(tmp_path / "onnx", tmp_path / "onnx-int8", heldout_texts=TEXTS,
                                   max_length=MAX_LENGTH)
    assert onnx_int8.parity["finite"], (family, onnx_int8.parity)
    # 4. the scope guard, fitted on the INT8 artifact's own features as evaluate fits it
    guard = fit_guard("knn", train_features=int8_features, train_labels=np.asarray(LABEL_IDS),
                      num_classes=len(LABELS), val_logits=int8_logits, val_features=int8_features, tpr=0.95,
                      temperature=1.0, k=3)
    assert np.isfinite(guard.threshold), family


def test_modernbert_slices_that_change_a_layers_attention_are_refused(tmp_path):
    from distill_gap.errors import DistillError
    from distill_gap.kd.students import student_from_layers
    from distill_gap.models.loading import load_classifier

    teacher, _ = load_classifier(build_family("modernbert", tmp_path / "m"))  # layer 0 global, layer 1 local
    with pytest.raises(DistillError, match=r"distill: a student of kind 'layers' cannot slice this modernbert "
                                           r"teacher as \[1\]: teacher layer 1 \(local attention\) would become "
                                           r"student layer 0 \(global attention\)") as err:
        student_from_layers(teacher, {"every": 2})
    assert "use a student of kind 'config'" in err.value.fix
    assert student_from_layers(teacher, [0, 1]).config.num_hidden_layers == 2


def test_a_fallback_candidate_with_nothing_to_keep_is_refused_naming_the_family():
    from distill_gap.edge.inc_quantization import inc_config
    from distill_gap.errors import DistillError

    with pytest.raises(DistillError, match=r"quantize-int8: candidate static-fp32-ffn-out keeps the FFN output "
                                           r"projections .* and the gpt2 student's exported graph has none") as err:
        inc_config("static-fp32-ffn-out", {"static-fp32-head": ["model.score"]}, family="gpt2")
    assert "remove static-fp32-ffn-out from quantize.candidates" in err.value.fix
