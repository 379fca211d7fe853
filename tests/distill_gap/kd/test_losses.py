"""Distillation losses against independent reference formulas, with their degenerate cases and errors."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

from distill_gap.kd.losses import (AttentionKLLoss, DistillationLoss, HardLabelLoss, HiddenStateLoss, KDLoss,
                                   alpha_schedule)

DIVERGENCES = ["forward_kl", "reverse_kl", "js"]


def _logits(b=8, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 2, torch.randn(b, c, generator=g) * 2, torch.randint(0, c, (b,), generator=g)


# Reference formulas in numpy/scipy (float64), independent of the module's log-space code.

def _np_probs(logits, T):
    return softmax(logits.double().numpy() / T, axis=-1)


def _ref_kl(s, t, T, weight=None, reverse=False):
    p, q = _np_probs(t, T), _np_probs(s, T)
    per = rel_entr(q, p).sum(-1) if reverse else rel_entr(p, q).sum(-1)
    return T * T * np.average(per, weights=None if weight is None else weight.numpy())


def _ref_js(s, t, T, weight=None):
    per = jensenshannon(_np_probs(t, T), _np_probs(s, T), axis=-1) ** 2  # scipy returns the sqrt, natural log
    return T * T * np.average(per, weights=None if weight is None else weight.numpy())


def _ref_ce(s, y, weight=None):
    logp = np.log(softmax(s.double().numpy(), axis=-1))
    per = -logp[np.arange(len(y)), y.numpy()]
    return np.average(per, weights=None if weight is None else weight.numpy())


# ---- KDLoss's divergence term on its own (alpha = 0: T^2 * divergence, no hard-label term)

def _divergence(kind, T):
    """KDLoss with alpha 0 as a function of (student, teacher) logits: its soft-label term alone."""
    loss = KDLoss(0.0, T, kind)
    return lambda s, t: loss(s, torch.zeros(len(s), dtype=torch.long), t)


_REFERENCES = {"forward_kl": _ref_kl, "reverse_kl": lambda s, t, T, w=None: _ref_kl(s, t, T, w, reverse=True),
               "js": _ref_js}


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences_match_scipy(kind, T):
    s, t, _ = _logits()
    assert math.isclose(_divergence(kind, T)(s, t).item(), _REFERENCES[kind](s, t, T), rel_tol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_logits_give_zero(kind):
    s, _, _ = _logits()
    assert _divergence(kind, 3.0)(s, s.clone()).abs().item() < 1e-6


def test_forward_and_reverse_kl_differ():
    s, t, _ = _logits()
    assert abs(_divergence("forward_kl", 1.0)(s, t).item() - _divergence("reverse_kl", 1.0)(s, t).item()) > 1e-3
    assert torch.allclose(_divergence("reverse_kl", 2.0)(s, t), _divergence("forward_kl", 2.0)(t, s))


def test_js_is_symmetric_and_bounded_by_ln2_t_squared():
    s, t, _ = _logits()
    assert torch.allclose(_divergence("js", 2.0)(s, t), _divergence("js", 2.0)(t, s))
    # disjoint one-hot distributions reach the bound
    a, b = torch.tensor([[1e4, -1e4]]), torch.tensor([[-1e4, 1e4]])
    for T in (1.0, 3.0):
        got = _divergence("js", T)(a, b).item()
        assert got <= math.log(2) * T * T + 1e-5
    assert math.isclose(_divergence("js", 1.0)(a, b).item(), math.log(2), rel_tol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_extreme_logits_are_finite_with_finite_gradients(kind):
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, -1e4]])
    loss = _divergence(kind, 1.0)(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # a -inf (masked) class on both sides contributes 0, not NaN
    m = torch.tensor([[0.5, -float("inf"), 1.0]])
    assert torch.isfinite(_divergence(kind, 2.0)(m, m.clone())) and _divergence(kind, 2.0)(m, m.clone()).abs() < 1e-6


def test_fp16_teacher_is_upcast():
    s, t, _ = _logits()
    got = _divergence("forward_kl", 2.0)(s, t.half())
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), _ref_kl(s, t.half().float(), 2.0), rel_tol=1e-5)
    # a teacher logit beyond fp32 exp range in fp16 is still fine
    assert torch.isfinite(_divergence("js", 1.0)(s[:1], torch.tensor([[6e4, -6e4, 0.0]], dtype=torch.float16)))


# ---- KDLoss

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
    got = KDLoss(alpha, T, "forward_kl")(s, y, t)
    assert math.isclose(got.item(), _reference(s, t, y, alpha, T).item(), rel_tol=1e-5)


@pytest.mark.parametrize("divergence,ref", [("forward_kl", _ref_kl), ("reverse_kl", lambda s, t, T, w: _ref_kl(s, t, T, w, True)),
                                            ("js", _ref_js)])
def test_kd_divergences_and_weights_match_reference(divergence, ref):
    s, t, y = _logits()
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.0, 4.0, 1.0])
    alpha, T = 0.3, 2.0
    got = KDLoss(alpha, T, divergence)(s, y, t, weight=w).item()
    want = alpha * _ref_ce(s, y, w) + (1 - alpha) * ref(s, t, T, w)
    assert math.isclose(got, want, rel_tol=1e-5)


def test_alpha_one_or_no_teacher_is_cross_entropy():
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(KDLoss(1.0, 2.0, "forward_kl")(s, y, torch.randn(4, 3)), ce)
    assert torch.allclose(KDLoss(0.3, 2.0, "forward_kl")(s, y, None), ce)
    w = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(KDLoss(0.3, 2.0, "forward_kl")(s, y, None, weight=w), torch.nn.functional.cross_entropy(s[[0, 3]], y[[0, 3]]))


def test_identical_logits_have_zero_kl():
    s = torch.randn(5, 3)
    assert KDLoss(0.0, 3.0, "forward_kl")(s, torch.zeros(5, dtype=torch.long), s.clone()).abs().item() < 1e-6


def test_uniform_weights_equal_unweighted_and_zero_weight_removes_example():
    s, t, y = _logits()
    loss = KDLoss(0.4, 2.0, "js")
    assert torch.allclose(loss(s, y, t, weight=torch.full((8,), 3.0)), loss(s, y, t))
    w = torch.ones(8)
    w[2] = 0.0
    keep = [i for i in range(8) if i != 2]
    assert torch.allclose(loss(s, y, t, weight=w), loss(s[keep], y[keep], t[keep]))
    # the removed example gets no gradient
    s_req = s.clone().requires_grad_(True)
    loss(s_req, y, t, weight=w).backward()
    assert s_req.grad[2].abs().max().item() == 0.0 and s_req.grad[0].abs().max().item() > 0


def test_alpha_can_change_between_steps():
    s, t, y = _logits()
    loss = KDLoss(0.5, 2.0, "forward_kl")
    loss.alpha = 1.0
    assert torch.allclose(loss(s, y, t), torch.nn.functional.cross_entropy(s, y))
    loss.alpha = 1.5
    with pytest.raises(ValueError, match="alpha"):
        loss(s, y, t)


def test_alpha_schedule():
    assert alpha_schedule("constant", 0.9, 0.1, 50, 100) == 0.9
    assert alpha_schedule("linear", 0.9, 0.1, 0, 100) == pytest.approx(0.9)
    assert alpha_schedule("linear", 0.9, 0.1, 25, 100) == pytest.approx(0.7)
    assert alpha_schedule("linear", 0.9, 0.1, 100, 100) == pytest.approx(0.1)
    assert alpha_schedule("linear", 0.9, 0.1, 150, 100) == pytest.approx(0.1)  # clamped past the end
    assert alpha_schedule("cosine", 0.9, 0.1, 0, 100) == pytest.approx(0.9)
    assert alpha_schedule("cosine", 0.9, 0.1, 50, 100) == pytest.approx(0.5)
    assert alpha_schedule("cosine", 0.9, 0.1, 25, 100) == pytest.approx(0.1 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert alpha_schedule("cosine", 0.9, 0.1, 100, 100) == pytest.approx(0.1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="alpha"):
        KDLoss(1.5, 2.0, "forward_kl")
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.5, 0.0, "forward_kl")
    with pytest.raises(ValueError, match="divergence"):
        KDLoss(0.5, 2.0, "kl")
    with pytest.raises(ValueError, match="teacher logits"):
        KDLoss(0.5, 2.0, "forward_kl")(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4))
    for kind in DIVERGENCES:
        with pytest.raises(ValueError, match="temperature"):
            KDLoss(0.0, -1.0, kind)
        with pytest.raises(ValueError, match="teacher logits"):
            _divergence(kind, 1.0)(torch.randn(2, 3), torch.randn(3, 3))
    s, y, t = torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3)
    for w in (torch.ones(3), torch.tensor([1.0, -1.0]), torch.zeros(2), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="weight"):
            KDLoss(0.5, 2.0, "forward_kl")(s, y, t, weight=w)
    for args in (("step", 0.9, 0.1, 1, 10), ("linear", 1.2, 0.1, 1, 10), ("linear", 0.9, 0.1, 1, 0),
                 ("linear", 0.9, 0.1, -1, 10)):
        with pytest.raises(ValueError):
            alpha_schedule(*args)


# ---- HiddenStateLoss

def _hidden(b, length, dims, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, length, d, generator=g) for d in dims)


def _ref_hidden(s_h, t_h, mask, pairs, projs, kind):
    """Explicit per-token loops over real tokens."""
    out = []
    for (si, ti), proj in zip(pairs, projs):
        vals = []
        for bi in range(mask.shape[0]):
            for li in range(mask.shape[1]):
                if mask[bi, li]:
                    a, b = proj(s_h[si][bi, li]).double(), t_h[ti][bi, li].double()
                    if kind == "mse":
                        vals.append(((a - b) ** 2).mean().item())
                    else:
                        vals.append(1 - (a @ b / (a.norm() * b.norm())).item())
        out.append(np.mean(vals))
    return float(np.mean(out))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_reference(kind):
    s_dims, t_dims, pairs = [4, 4, 4], [6, 6, 6, 6, 4], [(0, 0), (1, 2), (2, 4)]
    s_h, t_h = _hidden(2, 5, s_dims, 0), _hidden(2, 5, t_dims, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = HiddenStateLoss(s_dims, t_dims, pairs, kind=kind)
    assert isinstance(loss.projections[0], torch.nn.Linear) and isinstance(loss.projections[2], torch.nn.Identity)
    with torch.no_grad():
        want = _ref_hidden(s_h, t_h, mask, pairs, loss.projections, kind)
        got = loss(s_h, t_h, mask).item()
    assert math.isclose(got, want, rel_tol=1e-5)
    # changing a padding position changes nothing
    t_h2 = tuple(h.clone() for h in t_h)
    t_h2[2][0, 4] += 100.0
    assert torch.allclose(loss(s_h, t_h2, mask), loss(s_h, t_h, mask))


def test_hidden_state_loss_zero_when_equal_and_gradients_reach_projection():
    h = _hidden(2, 3, [4, 4], 0)
    for kind in ("mse", "cosine"):
        assert HiddenStateLoss([4, 4], [4, 4], [(1, 1)], kind)(h, tuple(x.clone() for x in h), None).abs().item() < 1e-6
    loss = HiddenStateLoss([4, 4], [8, 8], [(0, 0), (1, 1)], kind="mse")
    s_h = tuple(x.requires_grad_(True) for x in _hidden(2, 3, [4, 4], 0))
    loss(s_h, _hidden(2, 3, [8, 8], 1), torch.ones(2, 3, dtype=torch.long)).backward()
    for proj in loss.projections:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert s_h[1].grad.abs().sum() > 0
    # an all-padding batch gives 0, not NaN
    assert loss(s_h, _hidden(2, 3, [8, 8], 1), torch.zeros(2, 3)).item() == 0.0


def test_hidden_state_loss_bad_arguments():
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateLoss([4, 4], [4, 4, 4], [(2, 0)], kind="mse")
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateLoss([4, 4], [4, 4, 4], [(1, 3)], kind="mse")
    with pytest.raises(ValueError, match="negative"):
        HiddenStateLoss([4, 4], [4, 4, 4], [(-1, 0)], kind="mse")
    with pytest.raises(ValueError, match="at least one"):
        HiddenStateLoss([4, 4], [4, 4], [], kind="mse")
    with pytest.raises(ValueError, match="kind"):
        HiddenStateLoss([4, 4], [4, 4], [(0, 0)], kind="l1")
    loss = HiddenStateLoss([4, 4], [4, 4, 4], [(1, 2)], kind="mse")
    with pytest.raises(ValueError, match="3 student hidden states"):
        loss(_hidden(1, 2, [4, 4, 4], 0), _hidden(1, 2, [4, 4, 4], 1), None)
    with pytest.raises(ValueError, match="2 teacher hidden states"):
        loss(_hidden(1, 2, [4, 4], 0), _hidden(1, 2, [4, 4], 1), None)
    with pytest.raises(ValueError, match="attention_mask"):
        loss(_hidden(1, 2, [4, 4], 0), _hidden(1, 2, [4, 4, 4], 1), torch.ones(1, 3))


# ---- AttentionKLLoss

def _attn(b, heads, length, n_layers, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.softmax(torch.randn(b, heads, length, length, generator=g), -1) for _ in range(n_layers))


def test_attention_kl_matches_reference():
    s_a, t_a = _attn(2, 2, 4, 2, 0), _attn(2, 2, 4, 3, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    pairs = [(0, 1), (1, 2)]
    got = AttentionKLLoss(pairs)(s_a, t_a, mask).item()
    want = []
    for si, ti in pairs:
        p, q = t_a[ti].double().numpy(), s_a[si].double().numpy()
        rows = [rel_entr(p[b, h, i], q[b, h, i]).sum() for b in range(2) for h in range(2) for i in range(4) if mask[b, i]]
        want.append(np.mean(rows))
    assert math.isclose(got, float(np.mean(want)), rel_tol=1e-5)
    assert AttentionKLLoss([(1, 1)])(s_a, s_a, mask).abs().item() < 1e-6


def test_attention_kl_with_zero_probabilities_is_finite():
    # HF zeroes padded keys exactly; student and teacher both have zeros there
    scores = torch.randn(1, 2, 3, 3)
    scores[..., 2] = -float("inf")
    s_a = (torch.softmax(scores, -1).requires_grad_(True),)
    t_a = (torch.softmax(torch.randn(1, 2, 3, 3).masked_fill(torch.tensor([False, False, True]), -float("inf")), -1),)
    loss = AttentionKLLoss([(0, 0)])(s_a, t_a, torch.tensor([[1, 1, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_a[0].grad).all()


def test_attention_kl_bad_arguments():
    with pytest.raises(ValueError, match="negative"):
        AttentionKLLoss([(0, -1)])
    with pytest.raises(ValueError, match="out of range"):
        AttentionKLLoss([(2, 0)], num_student_layers=2, num_teacher_layers=4)
    with pytest.raises(ValueError, match="out of range"):
        AttentionKLLoss([(0, 3)])(_attn(1, 2, 3, 1, 0), _attn(1, 2, 3, 3, 1), None)
    with pytest.raises(ValueError, match="2 heads but teacher layer 0 has 4"):
        AttentionKLLoss([(0, 0)])(_attn(1, 2, 3, 1, 0), _attn(1, 4, 3, 1, 1), None)


# ---- the training loop's objectives: HardLabelLoss and DistillationLoss

def _outputs(logits, hidden=None, attentions=None):
    """An HF-style model output: .logits (B, C), .hidden_states and .attentions tuples."""
    from types import SimpleNamespace

    return SimpleNamespace(logits=logits, hidden_states=hidden, attentions=attentions)


def test_hard_label_loss_is_weighted_cross_entropy():
    s, _, y = _logits()
    loss = HardLabelLoss()
    assert math.isclose(loss(_outputs(s), y).item(), _ref_ce(s, y), rel_tol=1e-6)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.0, 4.0, 1.0])
    assert math.isclose(loss(_outputs(s), y, weight=w).item(), _ref_ce(s, y, w), rel_tol=1e-6)
    assert not loss.needs_hidden_states and not loss.needs_attentions and loss.epoch_metrics() == {"alpha": 1.0}
    with pytest.raises(ValueError, match="weight"):
        loss(_outputs(s), y, weight=-w)


def _distillation(kd, *, alpha_end=None, schedule="constant", hidden=None, hidden_weight=1.0, attention=None,
                  attention_weight=1.0):
    return DistillationLoss(kd, alpha_end=alpha_end, alpha_schedule=schedule, hidden=hidden,
                            hidden_weight=hidden_weight, attention=attention, attention_weight=attention_weight)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_distillation_loss_without_layer_terms_is_the_kd_loss(kind):
    s, t, y = _logits()
    w = torch.linspace(0.5, 2.0, 8)
    loss = _distillation(KDLoss(0.3, 2.0, kind))
    want = 0.3 * _ref_ce(s, y, w) + 0.7 * _REFERENCES[kind](s, t, 2.0, w)
    assert math.isclose(loss(_outputs(s), y, teacher_logits=t, weight=w).item(), want, rel_tol=1e-5)
    assert not loss.needs_hidden_states and not loss.needs_attentions and not list(loss.parameters())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_distillation_loss_alpha_follows_its_schedule_to_the_last_step(schedule):
    s, t, y = _logits()
    loss = _distillation(KDLoss(0.8, 2.0, "forward_kl"), alpha_end=0.2, schedule=schedule)
    seen = []
    for step in range(10):  # 10 optimizer steps: the last one reaches alpha_end
        loss.set_step(step, 10)
        seen.append(loss.epoch_metrics()["alpha"])
    assert seen[0] == pytest.approx(0.8) and seen[-1] == pytest.approx(0.2)
    assert seen[5] == pytest.approx(alpha_schedule(schedule, 0.8, 0.2, 5, 9))
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    # the loss uses the alpha of the step: at the last step 0.2 CE + 0.8 T^2 KL
    assert math.isclose(loss(_outputs(s), y, teacher_logits=t).item(),
                        0.2 * _ref_ce(s, y) + 0.8 * _ref_kl(s, t, 2.0), rel_tol=1e-5)
    constant = _distillation(KDLoss(0.8, 2.0, "forward_kl"), alpha_end=0.2, schedule="constant")
    constant.set_step(9, 10)
    assert constant.epoch_metrics() == {"alpha": 0.8}


def test_distillation_loss_adds_the_weighted_layer_terms():
    s, t, y = _logits(b=2)
    s_h, t_h = _hidden(2, 4, [4, 4], 0), _hidden(2, 4, [8, 8], 1)   # student 4 wide, teacher 8: a projection
    s_a, t_a = _attn(2, 2, 4, 1, 2), _attn(2, 2, 4, 1, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    kd = KDLoss(0.5, 2.0, "js")
    hidden = HiddenStateLoss([4, 4], [8, 8], [(0, 0), (1, 1)], kind="mse")
    attention = AttentionKLLoss([(0, 0)])
    loss = _distillation(kd, hidden=hidden, hidden_weight=0.5, attention=attention, attention_weight=3.0)
    assert loss.needs_hidden_states and loss.needs_attentions
    assert {id(p) for p in loss.parameters()} == {id(p) for p in hidden.parameters()}   # the projections train
    got = loss(_outputs(s, s_h, s_a), y, teacher_logits=t, teacher_outputs=_outputs(t, t_h, t_a), attention_mask=mask)
    want = kd(s, y, t) + 0.5 * hidden(s_h, t_h, mask) + 3.0 * attention(s_a, t_a, mask)
    assert torch.allclose(got, want)
    with pytest.raises(ValueError, match="teacher's outputs"):
        loss(_outputs(s, s_h, s_a), y, teacher_logits=t, attention_mask=mask)


def test_distillation_loss_bad_arguments():
    with pytest.raises(ValueError, match="alpha_schedule"):
        _distillation(KDLoss(0.5, 2.0, "forward_kl"), schedule="step")
    with pytest.raises(ValueError, match="alpha_end"):
        _distillation(KDLoss(0.5, 2.0, "forward_kl"), alpha_end=1.5, schedule="linear")
