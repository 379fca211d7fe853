"""The from-scratch tokenizer (distill_gap/models/from_scratch.py): a WordPiece vocabulary that is the same on every
run. `tokenizers`' own trainer broke count ties in hash-map order, so each process built a different tiny model from
the same texts and seed (a drift test and the scratch teacher changed from run to run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

from distill_gap.models.from_scratch import train_wordpiece_tokenizer, wordpiece_vocabulary

from tests.conftest import ROOT

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_merges_go_by_count_then_string_order_whatever_order_the_words_come_in():
    words = {"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5}
    # pairs: (##u, ##g) 20, (##u, ##n) 16, (h, ##u) 15, (p, ##u) 17 ... the first merge is ##ug, then ##un
    forward = wordpiece_vocabulary(Counter(words), 14, SPECIAL)
    backward = wordpiece_vocabulary(Counter(dict(reversed(list(words.items())))), 14, SPECIAL)
    assert forward == backward
    alphabet = ["##g", "##n", "##s", "##u", "b", "h", "p"]
    assert forward == SPECIAL + alphabet + ["##ug", "##un"]
    # a tie: (b, ##u) and (c, ##u) both occur 3 times; "b" sorts first
    tie = wordpiece_vocabulary(Counter({"cu": 3, "bu": 3}), len(SPECIAL) + 4, SPECIAL)
    assert tie[-1] == "bu" and "cu" not in tie


def test_the_same_texts_give_the_same_tokenizer_in_another_process(review_frame, tmp_path):
    texts = review_frame["text"].tolist()
    here = train_wordpiece_tokenizer(texts, 600)
    assert len(here) == 600
    pieces = here.tokenize("The side effects were terrible")
    assert pieces[:4] == ["the", "side", "effects", "were"] and "[UNK]" not in pieces
    assert here.convert_tokens_to_string(pieces) == "the side effects were terrible"
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = ("import json, sys; from distill_gap.models.from_scratch import train_wordpiece_tokenizer as t; "
            "print(json.dumps(t(json.load(open(sys.argv[1])), 600).get_vocab()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another hash order in Python; Rust's is random per process
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "texts.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here.get_vocab()
