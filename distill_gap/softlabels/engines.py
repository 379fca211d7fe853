"""The teacher pass of soft labelling: torch, or the same teacher exported to ONNX and run by ONNX Runtime.

One loaded teacher per process (and per Dask worker); the ONNX export is cached by the teacher's digest
and checked against torch before it is used.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from distill_gap.digest import model_digest, sha256_file
from distill_gap.errors import DistillError
from distill_gap.inference.batching import length_sorted_batches, pad_batch, predict_logits
from distill_gap.models.loading import load_classifier
from distill_gap.ops.runtime import progress_disabled, select_device

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_CACHE = Path(".distill/onnx")
_ONNX_PARITY_ATOL = 1e-3        # max |ORT - torch| logit difference accepted on the check texts
_PREDICTORS: dict[tuple, object] = {}   # one loaded teacher per process (and per Dask worker)


def resolve_engine(engine: str, device: str) -> str:
    """auto -> torch on CUDA, onnxruntime on CPU (~1.1x torch eager for MiniLM on 2 cores, after its export)."""
    if engine not in ENGINES:
        raise DistillError(f"soft_labels.engine {engine!r} is not one of {list(ENGINES)}",
                           "set soft_labels.engine to auto, torch or onnxruntime")
    if engine == "auto":
        return "torch" if str(device).startswith("cuda") else "onnxruntime"
    return engine


def onnx_teacher(teacher_dir, digest: str, cache_root: str | Path | None = None) -> Path:
    """The teacher exported to ONNX by optimum, cached under `<cache_root>/<teacher digest>/model.onnx`.

    The export is written to a temporary folder and renamed into place; a `model.onnx.sha256` sidecar
    written with it must match before a cached export is used.
    """
    import shutil

    out = Path(cache_root or ONNX_CACHE) / digest
    model, sidecar = out / "model.onnx", out / "model.onnx.sha256"
    if model.is_file() and sidecar.is_file() and sidecar.read_text().strip() == sha256_file(model):
        return out
    from optimum.exporters.onnx import main_export

    tmp = out.with_name(f".{digest}.{uuid.uuid4().hex[:8]}.partial")
    try:
        main_export(str(teacher_dir), tmp, task="text-classification", do_validation=False, local_files_only=True)
        if not (tmp / "model.onnx").is_file():
            raise DistillError(f"optimum wrote no model.onnx for the teacher in {teacher_dir}",
                               "set soft_labels.engine: torch")
        (tmp / "model.onnx.sha256").write_text(sha256_file(tmp / "model.onnx"))
        shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not model.is_file():     # another process renamed its export into place first: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _OrtTeacher:
    """ONNX Runtime session over an exported teacher; same batching as distill_gap.inference.batching.predict_logits."""

    def __init__(self, onnx_dir: Path, tokenizer, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(onnx_dir / "model.onnx"), options, providers=providers)
        self.tokenizer = tokenizer
        self.names = [i.name for i in self.session.get_inputs()]
        self.num_labels = self.session.get_outputs()[0].shape[-1]

    def __call__(self, texts: Sequence[str], *, batch_size: int, max_length: int, desc: str | None) -> np.ndarray:
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.num_labels), dtype=np.float32)     # (N, C)
        if not len(texts):
            return out
        enc = self.tokenizer([str(t) for t in texts], truncation=True, max_length=max_length)
        pad_id = self.tokenizer.pad_token_id or 0
        batches = length_sorted_batches([len(x) for x in enc["input_ids"]], batch_size)
        for idx in tqdm(batches, desc=desc, unit="batch", disable=desc is None or progress_disabled()):
            out[idx] = self.session.run(None, pad_batch(enc, idx, pad_id, self.names))[0]  # (B, C)
        return out


def _predictor(teacher_dir, *, engine: str, device: str, threads: int | None = None):
    """A callable texts -> (N, C) logits for the teacher, loaded once per process and engine.

    The ONNX engine is checked against torch on a few texts the first time (max |diff| <= 1e-3);
    with engine auto an export or parity failure falls back to torch with a warning.
    """
    import torch

    requested = engine
    engine = resolve_engine(engine, device)
    cache_key_ = (str(Path(teacher_dir).resolve()), requested, device, threads)
    if cache_key_ in _PREDICTORS:
        return _PREDICTORS[cache_key_]
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_classifier(teacher_dir)

    def torch_predict(texts, *, batch_size, max_length, desc=None):
        return predict_logits(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, device=device,
                              desc=desc)

    predict = torch_predict
    if engine == "onnxruntime":
        try:
            ort_predict = _OrtTeacher(onnx_teacher(teacher_dir, model_digest(teacher_dir)), tokenizer, threads)
            probe = ["an onnx parity probe", "the teacher must agree with itself " * 8, "short"]
            diff = float(np.abs(ort_predict(probe, batch_size=3, max_length=64, desc=None)
                                - torch_predict(probe, batch_size=3, max_length=64)).max())
            if not diff <= _ONNX_PARITY_ATOL:
                raise DistillError(f"the teacher's ONNX export differs from torch by {diff:.2g} (> {_ONNX_PARITY_ATOL})",
                                   "set soft_labels.engine: torch")
            predict = ort_predict
            model = None                  # the torch copy is no longer needed
        except Exception as err:  # noqa: BLE001 - auto falls back, an explicit request fails
            if requested == "onnxruntime":
                raise
            warn(f"ONNX Runtime teacher unavailable ({err}); labelling with torch instead")
    _PREDICTORS.clear()                   # one teacher at a time: memory stays bounded
    _PREDICTORS[cache_key_] = predict
    return predict


def teacher_logits(model_dir, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                   device: str = "cpu", progress: bool = True, engine: str = "torch",
                   threads: int | None = None) -> np.ndarray:
    """(N, C) float32 logits of the classifier in `model_dir`, row i for texts[i].

    Texts are batched by tokenized length with padding per batch; `engine` picks torch or the
    teacher exported to ONNX Runtime (see resolve_engine).
    """
    import torch

    if device == "auto":
        device = select_device("auto")
    elif str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"device {device!r} asked for but no CUDA device is available",
                           "set runtime.device to auto or cpu")
    predict = _predictor(model_dir, engine=engine, device=device, threads=threads)
    return predict(list(texts), batch_size=batch_size, max_length=max_length, desc="teacher logits" if progress else None)


def warn(message: str) -> None:
    """A warning in the Prefect run log when inside a run, else on the `distill.soft_labels` logger."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        logging.getLogger("distill.soft_labels").warning(message)
