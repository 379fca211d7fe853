"""A small BERT classifier built from a config, with a WordPiece tokenizer trained in-process.

Used by configs/tiny.yaml and the tests: a real transformer, no download.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence


def wordpiece_vocabulary(words: Counter, vocab_size: int, special: Sequence[str]) -> list[str]:
    """A WordPiece vocabulary learned by byte-pair merges over word counts, as `tokenizers`' WordPieceTrainer does,
    but the same on every run: among pairs of equal count the first in string order merges.

    `tokenizers` breaks those ties by ids it hands out in hash-map order (huggingface/tokenizers#1794, fix open
    in #2066), so the same texts and seed gave a different vocabulary, hence a different model, in each process.
    """
    prefix = "##"
    splits = {w: [w[0]] + [prefix + c for c in w[1:]] for w in words}
    vocab = list(special) + sorted({s for parts in splits.values() for s in parts} - set(special))
    known = set(vocab)
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[str]] = defaultdict(set)
    for w, parts in splits.items():
        for pair in zip(parts, parts[1:]):
            pairs[pair] += words[w]
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in pairs.items()]  # stale entries are skipped when popped
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        count, (a, b) = heapq.heappop(heap)
        if -count != pairs.get((a, b)) or count >= 0:
            continue
        merged = a + b.removeprefix(prefix)
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed = set()
        for w in sorted(where.pop((a, b))):
            parts, n = splits[w], words[w]
            for pair in zip(parts, parts[1:]):
                pairs[pair] -= n
                changed.add(pair)
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
            for pair in zip(out, out[1:]):
                pairs[pair] += n
                where[pair].add(w)
                changed.add(pair)
        for pair in changed:
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
            else:
                del pairs[pair]
    return vocab


def train_wordpiece_tokenizer(texts: Sequence[str], vocab_size: int = 600):
    """A BertTokenizerFast whose WordPiece vocabulary is learned from `texts` (the same on every run)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    vocab = wordpiece_vocabulary(words, vocab_size, special)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", model_max_length=512)


def build_scratch_classifier(texts: Sequence[str], labels: Sequence[str], out_dir: str | Path, *,
                             hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                             intermediate_size: int = 64, vocab_size: int = 600, seed: int = 0) -> Path:
    """Save an untrained BertForSequenceClassification + tokenizer to `out_dir` and return it."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = train_wordpiece_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        max_position_embeddings=512, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
