"""KD loss against the reference formula, with its degenerate cases."""

import math

import pytest
import torch

from tasks.losses import KDLoss


def _reference(s, t, y, alpha, T):
    ce = -torch.log_softmax(s, -1)[torch.arange(len(y)), y].mean()
    p = torch.softmax(t / T, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    return alpha * ce + (1 - alpha) * T * T * kl


@pytest.mark.parametrize("alpha,T", [(0.5, 2.0), (0.0, 4.0), (0.9, 1.0)])
def test_matches_reference_formula(alpha, T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    got = KDLoss(alpha, T)(s, y, t)
    assert math.isclose(got.item(), _reference(s, t, y, alpha, T).item(), rel_tol=1e-5)


def test_alpha_one_or_no_teacher_is_cross_entropy():
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(KDLoss(1.0, 2.0)(s, y, torch.randn(4, 3)), ce)
    assert torch.allclose(KDLoss(0.3, 2.0)(s, y, None), ce)


def test_identical_logits_have_zero_kl():
    s = torch.randn(5, 3)
    assert KDLoss(0.0, 3.0)(s, torch.zeros(5, dtype=torch.long), s.clone()).abs().item() < 1e-6


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        KDLoss(1.5)
    with pytest.raises(ValueError):
        KDLoss(0.5, 0.0)
    with pytest.raises(ValueError, match="teacher logits"):
        KDLoss(0.5)(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4))
