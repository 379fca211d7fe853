"""The CUDA path of training, inference and the KD losses, checked against the CPU path.

Skipped where torch sees no CUDA device (CI). On a GPU machine with this project installed:
    python -m pytest tests/distill_gap/test_cuda.py -q -rs
and on a GPU image with torch and transformers only: tests/cuda_plugin.py.
"""

import copy
import math

import numpy as np
import pytest
import torch

from distill_gap.inference.batching import predict_logits
from distill_gap.kd.losses import AttentionKLLoss, DistillationLoss, HiddenStateLoss, KDLoss
from distill_gap.models.loading import load_classifier
from distill_gap.ops.runtime import select_device
from distill_gap.kd.students import build_student
from distill_gap.kd.training import train_classifier

LABELS = ["negative", "neutral", "positive"]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")


def _on_cuda(module) -> bool:
    return all(p.device.type == "cuda" for p in module.parameters())


def _split(review_frame, n=96):
    """Texts, label ids and random teacher logits (N, C) of the first `n` review rows."""
    df = review_frame.head(n)
    label_ids = df["label"].map({l: i for i, l in enumerate(LABELS)}).to_numpy()
    teacher_logits = (np.random.default_rng(0).normal(size=(n, len(LABELS))) * 2).astype(np.float32)
    return df["text"].tolist(), label_ids, teacher_logits


def _knobs(**changes) -> dict:
    """The loop's flat knobs (the tiny tests' budget); `changes` override them."""
    return {"epochs": 1, "learning_rate": 1e-3, "batch_size": 16, "warmup_fraction": 0.1, "weight_decay": 0.01,
            "max_grad_norm": 1.0, "patience": 2, "lr_schedule": "linear", "grad_accumulation": 1,
            "select_metric": "accuracy", "max_length": 32, "seed": 3, "fix_if_not_finite": "-", **changes}


def _logits_on_both(model, tokenizer, texts, **kwargs):
    """predict_logits on cuda, then on cpu (it moves the model, so the cpu run goes last)."""
    gpu = predict_logits(model, tokenizer, texts, device="cuda", **kwargs)
    cpu = predict_logits(model, tokenizer, texts, device="cpu", **kwargs)
    return gpu, cpu


# ---- runtime


def test_select_device_picks_cuda():
    assert select_device("auto") == "cuda"
    assert select_device("cuda") == "cuda"
    assert select_device("cpu") == "cpu"


# ---- training


@pytest.mark.parametrize("divergence, weighted", [("forward_kl", False), ("js", True)])
def test_kd_training_runs_on_cuda(tiny_model_dir, review_frame, divergence, weighted):
    """Soft-label KD on the tiny BERT: weights stay on cuda, every loss is finite, the weights move."""
    model, tok = load_classifier(tiny_model_dir)
    texts, label_ids, teacher_logits = _split(review_frame)
    weights = np.linspace(0.5, 2.0, len(texts)).astype(np.float32) if weighted else None
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss = DistillationLoss(KDLoss(0.5, 2.0, divergence), alpha_end=None, alpha_schedule="constant", hidden=None,
                            hidden_weight=1.0, attention=None, attention_weight=1.0)

    result = train_classifier(model, tok, texts, label_ids, loss, val_texts=texts[:32],
                              val_label_ids=label_ids[:32], teacher_logits=teacher_logits,
                              val_teacher_preds=teacher_logits[:32].argmax(-1), device=select_device("auto"),
                              weights=weights, **_knobs(epochs=2))

    assert _on_cuda(model)
    assert result.steps == 2 * math.ceil(len(texts) / 16)
    assert len(result.history) == 2
    for row in result.history:
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
        assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["val_fidelity"] <= 1.0
    after = model.state_dict()
    assert any(not torch.equal(after[k].cpu(), before[k]) for k in before), "training changed no weight"

    # the trained model predicts the same on cuda and on cpu
    gpu, cpu = _logits_on_both(model, tok, texts[:48], batch_size=8, max_length=32)
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spec, changes", [
    ({"kind": "config", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32},
     {"hidden_loss": "mse", "attention_loss": True, "divergence": "js"}),
    ({"kind": "layers", "layers": [1]},
     {"hidden_loss": "cosine", "layer_map": [(0, 0), (1, 2)], "grad_accumulation": 2, "lr_schedule": "cosine",
      "alpha": 0.8, "alpha_end": 0.2, "alpha_schedule": "linear"}),
])
def test_student_with_online_teacher_trains_on_cuda(tiny_model_dir, review_frame, spec, changes):
    """Hidden-state (with a projection) and attention-map matching run the teacher online on cuda."""
    pytest.importorskip("prefect", reason="tasks.distill imports prefect at module level")
    from flows.config import DistillConfig
    from tasks.distill import kd_loss

    teacher, tok = load_classifier(tiny_model_dir)
    student = build_student(teacher, tok, spec)
    texts, label_ids, teacher_logits = _split(review_frame, 64)
    loop_knobs = {k: v for k, v in changes.items() if k in ("grad_accumulation", "lr_schedule")}
    section = DistillConfig(**{"alpha": 0.5, **{k: v for k, v in changes.items() if k not in loop_knobs}})
    loss = kd_loss(section, student, teacher)

    result = train_classifier(student, tok, texts, label_ids, loss, val_texts=texts[:32],
                              val_label_ids=label_ids[:32], teacher_logits=teacher_logits, device="cuda",
                              teacher_model=teacher, **_knobs(**loop_knobs))

    assert _on_cuda(student) and _on_cuda(teacher)
    assert math.isfinite(result.history[0]["train_loss"]) and result.history[0]["train_loss"] > 0
    if changes.get("alpha_schedule") == "linear":
        assert result.history[0]["alpha"] == pytest.approx(0.2, abs=0.05)


def test_distill_student_on_cuda(tiny_model_dir, review_frame, tmp_path):
    """The whole stage function (student build, teacher predictions, training, save) with device='cuda'."""
    pytest.importorskip("prefect", reason="tasks.distill imports prefect at module level")
    pytest.importorskip("pydantic", reason="flows.config (DistillConfig) needs pydantic")
    from flows.config import DistillConfig
    from tasks.distill import distill_student

    texts, label_ids, teacher_logits = _split(review_frame)
    cfg = DistillConfig(student_layers=[1], epochs=2, learning_rate=1e-3, batch_size=16, patience=2)
    res = distill_student(tiny_model_dir, tmp_path / "s", train_texts=texts, train_label_ids=label_ids,
                          teacher_logits=teacher_logits, val_texts=texts[:32], val_label_ids=label_ids[:32],
                          distill_cfg=cfg, max_length=32, seed=3, device="cuda")

    assert (res.path / "model.safetensors").is_file()
    assert all(math.isfinite(row["train_loss"]) for row in res.history) and "val_fidelity" in res.history[0]
    student, _ = load_classifier(res.path)
    assert student.config.num_hidden_layers == 1


# ---- inference


@pytest.fixture(scope="module")
def spread_classifier(review_frame):
    """A tiny BERT (hidden 32, 2 layers) whose logits spread ~0.1 across texts, and its in-process tokenizer.

    The default initializer (0.02) gives logits that differ ~1e-5 from text to text, and sharpening
    the head (tests.helpers) multiplies float noise by ~1e4; a wider initializer does neither.
    """
    from transformers import BertConfig, BertForSequenceClassification

    from distill_gap.models.from_scratch import train_wordpiece_tokenizer

    tok = train_wordpiece_tokenizer(review_frame["text"].tolist())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=len(LABELS), initializer_range=0.3)
    return BertForSequenceClassification(config).eval(), tok


def test_predict_logits_on_cuda_matches_cpu(spread_classifier, review_frame):
    """Same logits on both devices, and across batch sizes (padding is masked the same way on cuda)."""
    model, tok = spread_classifier
    texts = review_frame["text"].tolist()[:60]

    gpu = predict_logits(model, tok, texts, batch_size=7, max_length=64, device="cuda")
    assert _on_cuda(model)
    cpu = predict_logits(model, tok, texts, batch_size=32, max_length=64, device="cpu")

    assert gpu.shape == (60, len(LABELS)) and gpu.dtype == np.float32
    assert gpu.std(0).mean() > 0.05, "logits barely differ from text to text: the comparison would prove nothing"
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-4)
    assert (gpu.argmax(-1) == cpu.argmax(-1)).all()


# ---- losses


def _both(*tensors):
    """The same tensors on cpu and on cuda, each a leaf that takes gradients when floating point."""
    def leaf(t, device):
        t = t.detach().to(device)
        return t.requires_grad_(True) if t.is_floating_point() else t
    return [leaf(t, "cpu") for t in tensors], [leaf(t, "cuda") for t in tensors]


def _assert_same(cpu_out, gpu_out, cpu_in, gpu_in, tol=1e-5):
    """Same loss value and same gradients of every floating-point input, cuda vs cpu."""
    assert gpu_out.device.type == "cuda"
    torch.testing.assert_close(gpu_out.detach().cpu(), cpu_out.detach(), rtol=tol, atol=tol)
    cpu_out.backward()
    gpu_out.backward()
    for c, g in zip(cpu_in, gpu_in):
        assert (c.grad is None) == (g.grad is None)  # inputs the loss does not use get no gradient on either
        if c.grad is not None:
            torch.testing.assert_close(g.grad.cpu(), c.grad, rtol=tol, atol=tol)


def _logits(b=32, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 3, torch.randn(b, c, generator=g) * 3, torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "js"])
@pytest.mark.parametrize("alpha, T, weighted", [(0.5, 2.0, False), (0.0, 4.0, True), (0.3, 1.0, True)])
def test_kd_loss_on_cuda_matches_cpu(divergence, alpha, T, weighted):
    s, t, y = _logits()
    w = torch.rand(len(y), generator=torch.Generator().manual_seed(1)) + 0.1 if weighted else None
    (s_c, t_c, y_c), (s_g, t_g, y_g) = _both(s, t, y)
    loss = KDLoss(alpha, T, divergence)
    _assert_same(loss(s_c, y_c, t_c, weight=w), loss(s_g, y_g, t_g, weight=None if w is None else w.cuda()),
                 [s_c, t_c], [s_g, t_g])


def test_low_precision_and_extreme_logits_on_cuda():
    """bf16 student logits (autocast) and fp16 teacher logits are upcast on cuda as on cpu; +-1e4 stays finite."""
    s, t, y = _logits(seed=3)
    s16, t16 = s.bfloat16(), t.half()
    loss = KDLoss(0.5, 2.0, "forward_kl")
    got = loss(s16.cuda(), y.cuda(), t16.cuda())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), loss(s16, y, t16), rtol=1e-5, atol=1e-5)

    big_s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], device="cuda", requires_grad=True)
    big_t = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, -1e4]], device="cuda")
    for divergence in ("forward_kl", "reverse_kl", "js"):
        out = KDLoss(0.0, 1.0, divergence)(big_s, torch.tensor([0, 1], device="cuda"), big_t)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(big_s.grad).all()
        big_s.grad = None


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_on_cuda_matches_cpu(kind):
    """Same value and gradients, including those of the learned student->teacher projection."""
    g = torch.Generator().manual_seed(0)
    s_dims, t_dims, pairs = [16, 16, 16], [32, 32, 32, 32], [(0, 0), (1, 2), (2, 3)]
    s_h = [torch.randn(4, 10, d, generator=g) for d in s_dims]
    t_h = [torch.randn(4, 10, d, generator=g) for d in t_dims]
    mask = (torch.arange(10)[None, :] < torch.tensor([10, 7, 3, 1])[:, None]).long()  # (B, L), padded rows
    cpu_loss = HiddenStateLoss(s_dims, t_dims, pairs, kind=kind)
    gpu_loss = copy.deepcopy(cpu_loss).cuda()
    cpu_in, gpu_in = _both(*s_h, *t_h)
    n = len(s_dims)
    _assert_same(cpu_loss(tuple(cpu_in[:n]), tuple(cpu_in[n:]), mask),
                 gpu_loss(tuple(gpu_in[:n]), tuple(gpu_in[n:]), mask.cuda()), cpu_in, gpu_in)
    for c, gp in zip(cpu_loss.parameters(), gpu_loss.parameters()):
        torch.testing.assert_close(gp.grad.cpu(), c.grad, rtol=1e-5, atol=1e-5)


def test_attention_kl_on_cuda_matches_cpu():
    """Attention maps with exactly-zero padded keys (as HF returns them): same value and gradients."""
    g = torch.Generator().manual_seed(0)
    keys = torch.tensor([6, 4, 2])  # real tokens per example
    pad = torch.arange(6)[None, :] >= keys[:, None]  # (B, L)

    def maps(n_layers):
        scores = torch.randn(n_layers, 3, 2, 6, 6, generator=g).masked_fill(pad[None, :, None, None, :], -float("inf"))
        return list(torch.softmax(scores, -1).unbind(0))  # n_layers x (B, heads, L, L)

    s_a, t_a = maps(2), maps(3)
    cpu_in, gpu_in = _both(*s_a, *t_a)
    loss = AttentionKLLoss([(0, 1), (1, 2)])
    mask = (~pad).long()
    _assert_same(loss(tuple(cpu_in[:2]), tuple(cpu_in[2:]), mask), loss(tuple(gpu_in[:2]), tuple(gpu_in[2:]), mask.cuda()),
                 cpu_in, gpu_in)
