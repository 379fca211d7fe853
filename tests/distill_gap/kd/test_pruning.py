"""Structured pruning on a tiny real BERT (2 layers, 2 heads, FFN 64): shapes shrink, the least important parts
go, the folder loads back pruned, and settings that leave nothing are refused (issue 21)."""

import numpy as np
import pytest
import torch

from distill_gap.errors import DistillError
from distill_gap.kd.pruning import importance, prune
from distill_gap.models.loading import load_classifier, save_classifier


def test_heads_and_ffn_neurons_go_by_importance_and_the_folder_loads_back_pruned(tiny_model_dir, review_frame,
                                                                                 tmp_path):
    model, tok = load_classifier(tiny_model_dir)
    texts = review_frame["text"].tolist()[:40]
    layer0 = model.base_model.encoder.layer[0]
    d = layer0.attention.self.attention_head_size
    with torch.no_grad():  # head 1 of layer 0 adds nothing to the residual stream, neurons 0..9 of layer 1 neither
        layer0.attention.output.dense.weight[:, d:2 * d] = 0
        model.base_model.encoder.layer[1].output.dense.weight[:, :10] = 0
    heads, ffn = importance(model, tok, texts, max_length=32)
    assert heads.shape == (2, 2) and ffn.shape == (2, 64)
    assert heads[0, 1] == 0 < heads[0, 0] and (ffn[1, :10] == 0).all() and (ffn[1, 10:] > 0).all()

    record = prune(model, tok, texts, heads=0.5, ffn=0.25, max_length=32)
    assert record["heads_kept"] == [1, 1] and record["heads_pruned"]["0"] == [1] and record["ffn_width"] == [64, 48]
    assert layer0.attention.self.query.weight.shape == (d, 32)  # one head of d dims left, hidden 32
    layer1 = model.base_model.encoder.layer[1]
    assert layer1.intermediate.dense.weight.shape == (48, 32) and layer1.output.dense.weight.shape == (32, 48)
    assert record["parameters"][1] < record["parameters"][0] == sum(
        p.numel() for p in load_classifier(tiny_model_dir)[0].parameters())
    model.eval()
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.numpy()
    out = save_classifier(model, tok, tmp_path / "pruned")
    again, _ = load_classifier(out)  # config.pruned_heads and intermediate_size rebuild the same shapes
    again.eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(**enc).logits.numpy(), logits, atol=1e-5)
    assert again.config.intermediate_size == 48 and {int(k): v for k, v in again.config.pruned_heads.items()}[0] == [1]


def test_a_ratio_that_leaves_nothing_or_an_unsupported_student_is_refused(tiny_model_dir, review_frame):
    from pydantic import ValidationError
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from flows.config import DistillConfig

    model, tok = load_classifier(tiny_model_dir)
    texts = review_frame["text"].tolist()[:8]
    with pytest.raises(DistillError, match=r"distill.prune.heads=1.0 leaves no attention head in a layer of 2 heads"):
        prune(model, tok, texts, heads=1.0, ffn=0.0, max_length=32)
    with pytest.raises(DistillError, match=r"distill.prune.ffn=1.0 leaves no FFN neuron of 64"):
        prune(model, tok, texts, heads=0.0, ffn=1.0, max_length=32)
    assert model.base_model.encoder.layer[0].attention.self.num_attention_heads == 2  # nothing was pruned
    with pytest.raises(ValidationError, match="less than 1"):
        DistillConfig(prune={"heads": 1.0})
    with pytest.raises(ValidationError, match="distill.attention_loss matches attention maps head by head"):
        DistillConfig(prune={"heads": 0.5}, attention_loss=True)
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=16, n_layers=1, n_heads=2,
                                                                  hidden_dim=32, num_labels=3))
    with pytest.raises(DistillError, match="supports BERT-style encoders .* this student is distilbert") as err:
        prune(distil, tok, texts, heads=0.5, ffn=0.0, max_length=32)
    assert "distill.prune.heads and distill.prune.ffn to 0" in err.value.fix
