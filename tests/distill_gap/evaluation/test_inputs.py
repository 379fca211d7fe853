"""Input checks of the evaluation statistics: what passes (converted) and the DistillError each bad input gets."""

import re

import numpy as np
import pytest

from distill_gap.errors import DistillError
from distill_gap.evaluation.inputs import check_labels, check_logits, check_probs, check_scores, same_length


def test_good_inputs_come_back_converted():
    logits = check_logits(np.zeros((2, 3), dtype=np.float32), "logits", 3)
    assert logits.dtype == np.float64 and logits.shape == (2, 3)
    labels = check_labels(np.array([0.0, 2.0]), "truth", 3)  # whole floats are class ids
    assert labels.dtype == np.int64 and labels.tolist() == [0, 2]
    assert check_labels(np.array([True, False]), "pred").tolist() == [1, 0]
    assert check_scores([0.5, 1.0], "in_scores").tolist() == [0.5, 1.0]
    assert check_probs(np.array([[0.25, 0.75]])).shape == (1, 2)
    assert same_length(a=[1, 2], b=np.zeros(2)) == 2


@pytest.mark.parametrize("call, message", [
    (lambda: check_logits(np.zeros(3), "logits"), "logits must be a 2-D (rows, classes) array, got shape (3,)"),
    (lambda: check_logits(np.zeros((0, 3)), "logits"), "logits is empty (0 rows)"),
    (lambda: check_logits(np.array([["a", "b"]]), "logits"), "not a number type"),
    (lambda: check_logits(np.zeros((2, 3)), "model_logits", 2), "model_logits has 3 classes, expected 2"),
    (lambda: check_logits(np.array([[0.0, 1.0], [np.inf, 0.0]]), "logits"), "NaN or inf in 1 of 2 rows (first row 1)"),
    (lambda: check_labels(np.zeros((2, 2)), "truth"), "1-D class ids"),
    (lambda: check_labels(np.array([], int), "truth"), "truth is empty"),
    (lambda: check_labels(np.array([0.5]), "truth"), "NaN or non-integer"),
    (lambda: check_labels(np.array(["a"]), "truth"), "expected integer class ids"),
    (lambda: check_labels(np.array([0, 3]), "pred", 3), "class ids outside [0, 3): min 0, max 3"),
    (lambda: check_scores(np.zeros((2, 2)), "in_scores"), "non-empty 1-D array of scores"),
    (lambda: check_scores([1.0, np.nan], "out_scores"), "out_scores has NaN or inf scores"),
    (lambda: check_probs(np.array([[2.0, -1.0]])), "not probabilities"),
    (lambda: same_length(truth=[1, 2], pred=[1]), "row counts differ: {'truth': 2, 'pred': 1}"),
])
def test_bad_inputs_raise_distill_error_with_a_fix(call, message):
    with pytest.raises(DistillError, match=re.escape(message)) as err:
        call()
    assert err.value.fix
