"""run_batched, the one prediction loop, on a real tokenizer: rows come back in input order, batches are
length-sorted and padded to their longest row; predict_logits on it matches one text at a time."""

from __future__ import annotations

import numpy as np
import pytest

from distill_gap.inference.batching import length_sorted_batches, pad_batch, predict_logits, run_batched


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_rows_come_back_in_input_order_from_length_sorted_padded_batches(tokenizer, review_frame):
    # review openings of 2 to 31 words, in an order that is not sorted by length
    texts = [" ".join(t.split()[:2 + (7 * i) % 30]) for i, t in enumerate(review_frame["text"].tolist()[:23])]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=48)["input_ids"]]
    assert len(set(lengths)) > 5, "texts of many lengths, so sorting changes the order"
    seen = []

    def run_batch(arrays):  # (B, T) arrays -> (B, 2): each row's real length and its first token id
        seen.append({k: v.shape for k, v in arrays.items()})
        mask = arrays["attention_mask"]
        assert (mask.sum(1) == (arrays["input_ids"] != tokenizer.pad_token_id).sum(1)).all()
        assert mask[:, -1].any(), "T is the longest row of the batch, not max_length"
        return np.stack([mask.sum(1), arrays["input_ids"][:, 0]], axis=1).astype(np.float32)

    out = run_batched(tokenizer, texts, run_batch, num_labels=2, batch_size=5, max_length=48)
    assert out.shape == (23, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], lengths)  # row i is text i, whatever batch it ran in
    assert len(seen) == 5 and [s["input_ids"][0] for s in seen] == [5, 5, 5, 5, 3]
    widths = [s["input_ids"][1] for s in seen]
    assert widths == sorted(widths)  # batches of similar length, shortest first
    assert run_batched(tokenizer, [], run_batch, num_labels=2).shape == (0, 2)


def test_keys_select_and_zero_fill_the_model_inputs(tokenizer):
    enc = {"input_ids": [[1, 2, 3], [4]], "attention_mask": [[1, 1, 1], [1]]}
    arrays = pad_batch(enc, [1, 0], pad_token_id=9, keys=["input_ids", "attention_mask", "token_type_ids"])
    np.testing.assert_array_equal(arrays["input_ids"], [[4, 9, 9], [1, 2, 3]])
    np.testing.assert_array_equal(arrays["attention_mask"], [[1, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(arrays["token_type_ids"], np.zeros((2, 3)))
    assert length_sorted_batches([5, 1, 3, 1], 2) == [[1, 3], [2, 0]]  # stable: ties keep their order


def test_predict_logits_matches_one_text_at_a_time(tiny_model_dir, review_frame):
    from distill_gap.models.loading import load_classifier

    model, tokenizer = load_classifier(tiny_model_dir)
    texts = review_frame["text"].tolist()[:12]
    batched = predict_logits(model, tokenizer, texts, batch_size=4, max_length=64)
    alone = np.concatenate([predict_logits(model, tokenizer, [t], max_length=64) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert predict_logits(model, tokenizer, [], max_length=64).shape == (0, 3)
