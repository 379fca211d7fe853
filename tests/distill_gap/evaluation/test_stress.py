"""Stress suites: seeded, batch-independent perturbations with known content, and the flip rate they measure."""

import re

import numpy as np
import pytest

from distill_gap.errors import DistillError
from distill_gap.evaluation.stress import stress_result, stress_variants


TEXTS = ['"I have been taking this medicine for 2 years and my doctor is happy with the results."',
         "This pill gave me terrible headaches, I stopped after a week.",
         "Works great for my anxiety. No side effects so far, would recommend to anyone.",
         "My Doctor switched my MEDICATION and the new drug is much better than the old one"]


def test_stress_variants_are_seeded_same_length_and_differ_from_the_input():
    a, b, other = stress_variants(TEXTS, seed=0), stress_variants(TEXTS, seed=0), stress_variants(TEXTS, seed=1)
    assert a == b and a != other
    assert set(a) == {"typos", "casing", "whitespace", "punctuation", "truncation", "negation", "domain_swap"}
    for name, texts in a.items():
        assert len(texts) == len(TEXTS) and all(isinstance(t, str) for t in texts)
        changed = [t != s for t, s in zip(texts, TEXTS)]
        assert all(changed) if name != "domain_swap" else changed == [True, True, False, True], name
    # a text's variant does not depend on the rest of the batch
    assert stress_variants(TEXTS[1:2], seed=0)["typos"] == a["typos"][1:2]


def test_stress_variants_content():
    v = stress_variants(TEXTS, seed=3)
    assert v["truncation"][1] == "This pill gave me terrible"  # first half of 11 words
    assert v["negation"][0] == '"I have not been taking this medicine for 2 years and my doctor is happy with the results."'
    assert v["negation"][1] == "I do not think this pill gave me terrible headaches, I stopped after a week."
    assert v["negation"][2].endswith("so far, would not recommend to anyone.")
    assert v["whitespace"][1].split() == TEXTS[1].split()
    assert v["casing"][2].lower() == TEXTS[2].lower()
    for orig, typo in zip(TEXTS, v["typos"]):
        words, typo_words = orig.split(), typo.split()
        assert len(words) == len(typo_words) and 1 <= sum(w != t for w, t in zip(words, typo_words)) <= 3
    swapped = v["domain_swap"][3].split()
    assert swapped[1] in ("Physician", "Doc") and swapped[4] in ("MEDICINE", "DRUG") and "drug" not in swapped
    assert v["domain_swap"][2] == TEXTS[2]


def test_stress_result_flip_rate_and_accuracy_drop():
    truth = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    assert stress_result(truth, truth, truth) == {"n": 8, "clean_accuracy": 1.0, "stressed_accuracy": 1.0,
                                                  "accuracy_drop": 0.0, "flip_rate": 0.0}
    stressed = truth.copy()
    stressed[:2] = [1, 0]
    out = stress_result(truth, stressed, truth)
    assert out["flip_rate"] == 0.25 and out["accuracy_drop"] == pytest.approx(0.25)


@pytest.mark.parametrize("call, message", [
    (lambda: stress_variants([]), "no texts"),
    (lambda: stress_variants(["ok", float("nan")]), "not strings (first at row 1"),
    (lambda: stress_result(np.array([0, 1]), np.array([0]), np.array([0, 1])), "row counts differ"),
])
def test_bad_inputs_raise_distill_error_with_a_fix(call, message):
    with pytest.raises(DistillError, match=re.escape(message)) as err:
        call()
    assert err.value.fix
