"""Vocabulary trimming on a tiny real BERT (WordPiece tokenizer trained on real reviews): what is kept, the same
pieces and logits for every counted text, the mapping on disk, and the refusals (issue 21)."""

import json

import numpy as np
import pytest
import torch

from distill_gap.errors import DistillError
from distill_gap.kd.vocab import TRIM_FILE, kept_token_ids, read_record, trim_vocabulary, write_record
from distill_gap.models.loading import load_classifier, save_classifier


def _logits(model, tokenizer, texts):
    model.eval()
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return model(**enc).logits.numpy()


def test_a_trimmed_model_keeps_the_pieces_and_logits_of_the_texts_it_was_trimmed_on(tiny_model_dir, review_frame,
                                                                                     tmp_path):
    model, tok = load_classifier(tiny_model_dir)
    texts = review_frame["text"].tolist()[:12]
    before = _logits(model, tok, texts)
    vocab = tok.get_vocab()
    trimmed, new_tok, record = trim_vocabulary(model, tok, texts)
    assert record["kept"] == len(new_tok) == trimmed.config.vocab_size < record["teacher_vocab_size"] == len(vocab)
    assert trimmed.get_input_embeddings().weight.shape[0] == record["kept"]
    kept = record["kept_teacher_ids"]
    assert set(tok.all_special_ids) <= set(kept) and kept == sorted(kept)
    assert {vocab[t] for t in vocab if len(t) == 1 or (t.startswith("##") and len(t) == 3)} <= set(kept)
    np.testing.assert_allclose(_logits(trimmed, new_tok, texts), before, atol=1e-5)  # same pieces, same rows
    # a text the trimming did not count: its dropped pieces become smaller ones, never [UNK] for known characters
    other = next(t for t in review_frame["text"].tolist()[12:]
                 if any(i not in set(kept) for i in tok(t, add_special_tokens=False)["input_ids"]))
    pieces = new_tok.convert_ids_to_tokens(new_tok(other)["input_ids"])
    assert len(pieces) > len(tok(other)["input_ids"]) and pieces.count("[UNK]") == tok.convert_ids_to_tokens(
        tok(other)["input_ids"]).count("[UNK]")
    # saved and loaded back like any model folder, with the mapping beside it
    out = save_classifier(trimmed, new_tok, tmp_path / "trimmed")
    write_record(out, record)
    again, again_tok = load_classifier(out)
    np.testing.assert_allclose(_logits(again, again_tok, texts), before, atol=1e-5)
    assert read_record(out)["kept_teacher_ids"] == kept and json.loads((out / TRIM_FILE).read_text())["floor"] == 0
    assert read_record(tiny_model_dir) is None


def test_the_floor_tops_up_with_the_lowest_ids_and_a_floor_beyond_the_vocabulary_is_refused(tiny_model_dir,
                                                                                          review_frame):
    _, tok = load_classifier(tiny_model_dir)
    texts = review_frame["text"].tolist()[:5]
    needed = kept_token_ids(tok, texts)
    floored = kept_token_ids(tok, texts, floor=len(needed) + 50)
    assert len(floored) == len(needed) + 50 and set(needed) < set(floored)
    assert set(floored) - set(needed) == set(sorted(set(range(len(tok))) - set(needed))[:50])
    with pytest.raises(DistillError, match=r"distill.vocab.min_tokens=100000 is larger than the teacher's "
                                           rf"vocabulary \({len(tok)} tokens\)") as err:
        kept_token_ids(tok, texts, floor=100_000)
    assert f"at most {len(tok)}" in err.value.fix


def test_a_bpe_tokenizer_is_refused_up_front(review_frame):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(review_frame["text"].tolist()[:50], trainers.BpeTrainer(vocab_size=300,
                                                                                   special_tokens=["<unk>", "<pad>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(DistillError, match="supports WordPiece tokenizers .* is BPE") as err:
        kept_token_ids(tok, ["a text"])
    assert "distill.vocab.trim: false" in err.value.fix
