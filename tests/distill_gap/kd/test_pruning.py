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


def test_a_narrower_copy_keeps_the_most_important_dimensions_and_heads_and_loads_back(tiny_model_dir, review_frame,
                                                                                     tmp_path):
    from distill_gap.kd.pruning import hidden_importance, narrow

    model, tok = load_classifier(tiny_model_dir)
    texts = review_frame["text"].tolist()[:40]
    emb = model.base_model.embeddings
    with torch.no_grad():  # residual dimensions 0..7 made the loudest in the embeddings: they must stay
        emb.word_embeddings.weight[:, :8] *= 50
    width, d = model.config.hidden_size, model.base_model.encoder.layer[0].attention.self.attention_head_size
    scores = hidden_importance(model, tok, texts, max_length=32)
    assert scores.shape == (width,) and scores[:8].min() > np.median(scores)
    model.eval()
    small, record = narrow(model, tok, texts, hidden=0.5, max_length=32)
    assert record["hidden_width"] == [width, width // 2] and record["heads_kept"] == [1, 1]
    assert record["parameters"][1] < record["parameters"][0] and not small.training
    assert small.config.hidden_size == width // 2 and small.config.num_attention_heads == 1
    kept = np.sort(np.argsort(-scores, kind="stable")[:width // 2])
    assert set(range(8)) <= set(kept.tolist())
    torch.testing.assert_close(small.base_model.embeddings.word_embeddings.weight, emb.word_embeddings.weight[:, kept])
    layer, small_layer = model.base_model.encoder.layer[1], small.base_model.encoder.layer[1]
    assert small_layer.attention.self.query.weight.shape == (d, width // 2)  # one head of d dims, from the teacher's
    assert any(torch.equal(small_layer.attention.self.query.weight, layer.attention.self.query.weight[h * d:(h + 1) * d]
                           [:, kept]) for h in range(2))
    assert small_layer.intermediate.dense.weight.shape == (64, width // 2)  # the FFN keeps its width
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = small(**enc).logits.numpy()
    assert np.isfinite(logits).all()
    again, _ = load_classifier(save_classifier(small, tok, tmp_path / "narrow"))  # a plain, smaller BERT
    again.eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(**enc).logits.numpy(), logits, atol=1e-5)

    with pytest.raises(DistillError, match=r"distill.prune.hidden=0.9 leaves less than one head \(16 wide\) of the "
                                           r"32-wide residual stream"):
        narrow(model, tok, texts, hidden=0.9, max_length=32)
    prune(model, tok, texts, heads=0.5, ffn=0.0, max_length=32)
    with pytest.raises(DistillError, match="distill.prune.hidden needs every layer's heads"):
        narrow(model, tok, texts, hidden=0.5, max_length=32)


def test_width_with_head_pruning_or_attention_maps_is_refused_in_the_config():
    from pydantic import ValidationError

    from flows.config import DistillConfig

    with pytest.raises(ValidationError, match="distill.prune.hidden and distill.prune.heads are both set"):
        DistillConfig(prune={"hidden": 0.3, "heads": 0.5})
    with pytest.raises(ValidationError, match="which distill.prune.hidden removes"):
        DistillConfig(prune={"hidden": 0.3}, attention_loss=True)
