"""What an edge build is checked on: the student folder and texts it starts from, each artifact's logits against
the fp32 student, whether a row's probabilities depend on its batch-mates, and errors that name the stage and the
operator that failed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from distill_gap.errors import DistillError


def check_student(student_dir, heldout_texts: Sequence[str], max_length: int) -> Path:
    """The student folder is a loadable HF model and there is something to measure parity on."""
    from distill_gap.models.loading import check_model_dir

    root = Path(student_dir)
    if not root.is_dir():
        raise DistillError(f"student folder {root} does not exist", "run the distill stage first or fix the path")
    check_model_dir(root)
    if len(heldout_texts) == 0:
        raise DistillError("no held-out texts for the quantization parity check",
                           "pass the validation or test texts as heldout_texts")
    max_pos = json.loads((root / "config.json").read_text()).get("max_position_embeddings", 512)
    if not 2 <= max_length <= max_pos:
        raise DistillError(f"max_length={max_length} is outside [2, {max_pos}] for the model in {root}",
                           f"set runtime.max_length to at most {max_pos}")
    return root


def fp32_logits(student_dir, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128) -> np.ndarray:
    """The fp32 student's logits (N, C) on `texts`: what every artifact is compared with."""
    from distill_gap.inference.predictor import load_predictor

    student = load_predictor(student_dir, runtime="transformers", max_length=max_length)
    return student.predict_logits(texts, batch_size=batch_size)


def logit_parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far `candidate` logits (N, C) are from `reference`: worst absolute gap and top-1 agreement."""
    assert reference.shape == candidate.shape, (reference.shape, candidate.shape)
    n = int(reference.shape[0])
    if n == 0:
        return {"max_abs_logit_diff": 0.0, "argmax_agreement": 1.0, "n": 0, "finite": True}
    finite = bool(np.isfinite(candidate).all())
    # NaN/inf outputs: no meaningful distance (None), and agreement counts those rows as disagreeing
    agree = (reference.argmax(-1) == candidate.argmax(-1)) & np.isfinite(candidate).all(-1)
    return {"max_abs_logit_diff": float(np.abs(reference - candidate).max()) if finite else None,
            "argmax_agreement": float(agree.mean()), "n": n, "finite": finite}


def batch_independence(predictor, texts: Sequence[str], *, limit: float, rows: int = 16,
                       batch_size: int = 32) -> dict:
    """How much a row's probabilities depend on the rows batched with it: each of the first `rows` texts predicted
    alone and in one batch of `batch_size` (it and the texts after it, padded to the longest), compared as softmax
    probabilities. One patient's result must not depend on another's: dynamic activation scales, computed per
    batch, fail this; static ones and fp32 give ~0.

    `predictor`: anything with predict_logits(texts, batch_size=...). Returns {"max_abs_prob_diff",
    "max_abs_logit_diff" (None when an output is NaN/inf), "rows", "batch_size", "limit", "ok"}.
    """
    batch = [str(t) for t in texts[:batch_size]]
    k = min(rows, len(batch))
    if k == 0:
        return {"max_abs_prob_diff": 0.0, "max_abs_logit_diff": 0.0, "rows": 0, "batch_size": 0, "limit": limit,
                "ok": True}
    together = predictor.predict_logits(batch, batch_size=batch_size)[:k]  # (k, C), from one padded batch
    alone = np.concatenate([predictor.predict_logits([t], batch_size=1) for t in batch[:k]])  # (k, C)
    finite = bool(np.isfinite(together).all() and np.isfinite(alone).all())
    prob = logit = None
    if finite:
        prob = float(np.abs(_softmax(alone) - _softmax(together)).max())
        logit = float(np.abs(alone - together).max())
    return {"max_abs_prob_diff": prob, "max_abs_logit_diff": logit, "rows": k, "batch_size": len(batch),
            "limit": limit, "ok": finite and prob <= limit}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)  # (N, C)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def accuracy(logits: np.ndarray, label_ids: np.ndarray) -> float:
    """Top-1 accuracy of logits (N, C) against label ids (N,)."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(np.asarray(label_ids), logits.argmax(-1)))


def artifact_check(parity: dict, validation: dict | None, min_agreement: float,
                   batch: dict | None = None) -> tuple[bool, str]:
    """An artifact passes when its outputs are finite, agree with the fp32 student, met the accuracy goal and (given
    `batch`, batch_independence's record) give a row the same probabilities alone as in a batch; else every failed
    check is named."""
    if not parity.get("finite", True):
        return False, "outputs contain NaN or inf"
    fails = []
    # agreement on the unlabelled sample (validation["agreement"], hundreds of rows) decides where it was measured;
    # on the validation rows alone one row moves it by more than a point
    if parity["argmax_agreement"] < min_agreement and (validation or {}).get("agreement") is None:
        fails.append(f"argmax agreement with the fp32 student {parity['argmax_agreement']:.3f} < {min_agreement:.3f}")
    if validation is not None and not validation["met_goal"]:
        fails.append(validation.get("why") or f"validation accuracy {validation['accuracy']:.4f} below the goal "
                     f"{validation['goal']:.4f} (fp32 {validation['baseline']:.4f})")
    if batch is not None and not batch["ok"]:
        diff = batch["max_abs_prob_diff"]
        fails.append(f"a row's probabilities depend on its batch: max |prob diff| "
                     f"{'NaN/inf' if diff is None else f'{diff:.1e}'} between {batch['rows']} rows alone and in a "
                     f"batch of {batch['batch_size']} > {batch['limit']:.0e}")
    if fails:
        return False, "; ".join(fails)
    return True, ("finite, agrees with the fp32 student and meets the accuracy goal" +
                  ("; batch-independent" if batch is not None else ""))


def _operator_in(err: BaseException) -> str | None:
    """What an export/quantization error is about: the aten/torch op, the dynamic dimension or the architecture."""
    text = str(err)
    for pattern, fmt in ((r"(aten\.[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?)", "operator {}"),
                         (r"(torch\.ops\.[A-Za-z_0-9.]+)", "operator {}"),
                         (r"Unsupported ONNX opset version|opset", "ONNX opset"),
                         (r"export an? ([A-Za-z0-9_-]+) model, that is a custom or unsupported architecture",
                          "architecture {} (no ONNX config in optimum)"),
                         (r"Constraints violated \(([^)]+)\)", "dynamic dimension '{}' (shape guards)"),
                         (r"operator '?([A-Za-z_0-9.:]+)'?", "operator {}")):
        m = re.search(pattern, text)
        if m:
            return fmt.format(m.group(1) if m.groups() else m.group(0))
    return None


def stage_error(stage: str, err: BaseException, fix: str) -> DistillError:
    """A DistillError naming the stage and the operator that failed, with the first line of the cause."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    where = _operator_in(err)
    return DistillError(f"{stage} failed{f' at {where}' if where else ''}: {type(err).__name__}: {first}", fix)

