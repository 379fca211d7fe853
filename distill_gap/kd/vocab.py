"""Vocabulary trimming (issue 21): a student keeps only the word pieces its domain uses.

A student built from the teacher carries the teacher's whole word-embedding table (all-MiniLM-L6-v2: 30,522 x 384,
11.7M of the student's 15.6M parameters), while a domain's texts use a fraction of it. Trimming keeps

- every special and added token,
- every token the training texts tokenize to (counted without truncation),
- every single-character piece (`a`, `##a`, ...): WordPiece can still spell any word of known characters, so a
  word whose pieces were dropped splits into smaller pieces instead of becoming [UNK],
- and, up to `floor` tokens in all, the teacher's lowest remaining ids (BERT-style vocabularies list frequent pieces
  first after the character block); `[unusedN]` slots never,

in the teacher's order, rebuilds the tokenizer over them and keeps the matching embedding rows. Every training
text tokenizes to exactly the same pieces as before (checked); a text with a dropped piece tokenizes differently,
which is what evaluation then measures (the trimmed model is evaluated like any other). The mapping (teacher id of
each kept token, in the new order) is written beside the model as `vocab_trim.json`.

Only WordPiece tokenizers (BERT, DistilBERT, MiniLM) are trimmed; a BPE or Unigram tokenizer is refused up front
(its merges would need rebuilding, not just its vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from distill_gap.errors import DistillError

TRIM_FILE = "vocab_trim.json"
_FIX = "set distill.vocab.trim: false to keep the teacher's whole vocabulary"


def _backend(tokenizer) -> dict:
    if not getattr(tokenizer, "is_fast", False):
        raise DistillError(f"vocabulary trimming needs a fast tokenizer; this teacher has {type(tokenizer).__name__}",
                           _FIX)
    return json.loads(tokenizer.backend_tokenizer.to_str())


def kept_token_ids(tokenizer, texts, *, floor: int = 0) -> list[int]:
    """The teacher ids a trimmed vocabulary keeps, in the teacher's order (see the module docstring)."""
    spec = _backend(tokenizer)
    kind = spec["model"]["type"]
    if kind != "WordPiece":
        raise DistillError(f"vocabulary trimming supports WordPiece tokenizers (BERT, DistilBERT, MiniLM); this "
                           f"teacher's {type(tokenizer).__name__} is {kind}", _FIX)
    vocab = tokenizer.get_vocab()
    size = len(vocab)
    if floor > size:
        raise DistillError(f"distill.vocab.min_tokens={floor} is larger than the teacher's vocabulary ({size} tokens)",
                           f"set distill.vocab.min_tokens to at most {size} (0: only what the domain uses)")
    keep = set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens") or []}
    texts = list(texts)
    for start in range(0, len(texts), 1024):
        for ids in tokenizer(texts[start:start + 1024], add_special_tokens=False, truncation=False)["input_ids"]:
            keep.update(ids)
    keep |= {i for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    unused = {i for t, i in vocab.items() if t.startswith("[unused") and t.endswith("]")}
    for i in sorted(vocab.values()):
        if len(keep) >= floor:
            break
        if i not in unused:
            keep.add(i)
    return sorted(keep)


def _remap_ids(node, new_id: dict[int, int]) -> None:
    """Rewrite the token ids of the added-token, post-processor and padding sections of a tokenizer.json, in
    place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):  # TemplateProcessing's special_tokens
                node[key] = [new_id[i] for i in value]
            elif key in ("id", "pad_id") and isinstance(value, int):  # added_tokens, padding
                node[key] = new_id[value]
            elif key in ("cls", "sep") and isinstance(value, list) and len(value) == 2:  # BertProcessing
                node[key] = [value[0], new_id[value[1]]]
            else:
                _remap_ids(value, new_id)
    elif isinstance(node, list):
        for item in node:
            _remap_ids(item, new_id)


def trimmed_tokenizer(tokenizer, kept: list[int]):
    """The tokenizer over `kept` teacher ids (new id = position in `kept`), saved and reloaded like any other."""
    from transformers import AutoTokenizer

    new_id = {old: new for new, old in enumerate(kept)}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        spec = json.loads(path.read_text())
        spec["model"]["vocab"] = {by_id[old]: new for new, old in enumerate(kept)}
        for section in ("added_tokens", "post_processor", "padding"):
            if spec.get(section) is not None:
                _remap_ids(spec[section], new_id)
        path.write_text(json.dumps(spec, ensure_ascii=False))
        vocab_txt = Path(tmp) / "vocab.txt"
        if vocab_txt.exists():
            vocab_txt.write_text("".join(by_id[old] + "\n" for old in kept))
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)


def trim_vocabulary(model, tokenizer, texts, *, floor: int = 0) -> tuple[object, object, dict]:
    """(model, tokenizer, record): the model with only the kept embedding rows and its rebuilt tokenizer; every
    text of `texts` must tokenize to the same pieces under both (else a DistillError: nothing is trimmed)."""
    import torch

    texts = list(texts)
    kept = kept_token_ids(tokenizer, texts, floor=floor)
    if model.get_output_embeddings() is not None:
        raise DistillError(f"{type(model).__name__} ties its word embeddings to an output layer: trimming would "
                           "change what it predicts", _FIX)
    new_tok = trimmed_tokenizer(tokenizer, kept)
    new_id = {old: new for new, old in enumerate(kept)}
    for start in range(0, len(texts), 1024):  # the same pieces for every text counted
        chunk = texts[start:start + 1024]
        before = tokenizer(chunk, truncation=False)["input_ids"]
        after = new_tok(chunk, truncation=False)["input_ids"]
        for text, old, new in zip(chunk, before, after):
            if [new_id.get(i, -1) for i in old] != new:
                raise DistillError(f"the trimmed tokenizer splits a training text differently ({text[:60]!r}): "
                                   "its normalizer or pre-tokenizer depends on tokens that were dropped", _FIX)
    old_emb = model.get_input_embeddings()
    pad = new_id.get(old_emb.padding_idx) if old_emb.padding_idx is not None else None
    emb = torch.nn.Embedding(len(kept), old_emb.embedding_dim, padding_idx=pad,
                             dtype=old_emb.weight.dtype, device=old_emb.weight.device)
    with torch.no_grad():
        emb.weight.copy_(old_emb.weight[torch.as_tensor(kept, device=old_emb.weight.device)])
    model.set_input_embeddings(emb)
    model.config.vocab_size = len(kept)
    if getattr(model.config, "pad_token_id", None) is not None and model.config.pad_token_id in new_id:
        model.config.pad_token_id = new_id[model.config.pad_token_id]
    digest = hashlib.sha256("\n".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
    record = {"teacher_vocab_size": len(tokenizer.get_vocab()), "kept": len(kept), "floor": floor,
              "texts": len(texts), "texts_sha256": digest, "embedding_rows_removed": len(tokenizer.get_vocab()) -
              len(kept), "kept_teacher_ids": kept}
    return model, new_tok, record


def write_record(folder: str | Path, record: dict) -> Path:
    path = Path(folder) / TRIM_FILE
    path.write_text(json.dumps(record))
    return path


def read_record(folder: str | Path) -> dict | None:
    path = Path(folder) / TRIM_FILE
    return json.loads(path.read_text()) if path.is_file() else None
