"""The teacher pass of soft labelling: torch, or the same teacher exported to ONNX and run by ONNX Runtime.

Both load through the one predictor (distill_gap/inference/predictor.py): the teacher folder with runtime
"transformers", its ONNX export with runtime "onnxruntime". One loaded teacher per process (and per Dask
worker); the ONNX export is cached by the teacher's digest and checked against torch before it is used.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from distill_gap.digest import model_digest, sha256_file
from distill_gap.errors import DistillError
from distill_gap.inference.predictor import Predictor, load_predictor
from distill_gap.ops.runtime import select_device

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_CACHE = Path(".distill/onnx")
_ONNX_PARITY_ATOL = 1e-3        # max |ORT - torch| logit difference accepted on the check texts
_PREDICTORS: dict[tuple, Predictor] = {}   # one loaded teacher per process (and per Dask worker)


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
    written with it must match before a cached export is used. optimum writes the teacher's config and
    tokenizer beside model.onnx, so the folder loads with load_predictor(..., runtime="onnxruntime").
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


def _predictor(teacher_dir, *, engine: str, device: str, max_length: int, threads: int | None = None) -> Predictor:
    """The teacher as a Predictor, loaded once per process, engine and settings.

    The ONNX engine is checked against torch on a few texts the first time (max |diff| <= 1e-3);
    with engine auto an export or parity failure falls back to torch with a warning.
    """
    requested = engine
    engine = resolve_engine(engine, device)
    cache_key_ = (str(Path(teacher_dir).resolve()), requested, device, threads, max_length)
    if cache_key_ in _PREDICTORS:
        return _PREDICTORS[cache_key_]
    predictor = load_predictor(teacher_dir, runtime="transformers", max_length=max_length, device=device,
                               threads=threads)
    if engine == "onnxruntime":
        try:
            onnx_dir = onnx_teacher(teacher_dir, model_digest(teacher_dir))
            ort = load_predictor(onnx_dir, runtime="onnxruntime", max_length=max_length, threads=threads)
            probe = ["an onnx parity probe", "the teacher must agree with itself " * 8, "short"]
            diff = float(np.abs(ort.predict_logits(probe, batch_size=3)
                                - predictor.predict_logits(probe, batch_size=3)).max())
            if not diff <= _ONNX_PARITY_ATOL:
                raise DistillError(f"the teacher's ONNX export differs from torch by {diff:.2g} (> {_ONNX_PARITY_ATOL})",
                                   "set soft_labels.engine: torch")
            predictor = ort               # the torch copy is no longer needed
        except Exception as err:  # noqa: BLE001 - auto falls back, an explicit request fails
            if requested == "onnxruntime":
                raise
            warn(f"ONNX Runtime teacher unavailable ({err}); labelling with torch instead")
    _PREDICTORS.clear()                   # one teacher at a time: memory stays bounded
    _PREDICTORS[cache_key_] = predictor
    return predictor


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
    predictor = _predictor(model_dir, engine=engine, device=device, max_length=max_length, threads=threads)
    return predictor.predict_logits(list(texts), batch_size=batch_size, desc="teacher logits" if progress else None)


def warn(message: str) -> None:
    """A warning in the Prefect run log when inside a run, else on the `distill.soft_labels` logger."""
    import logging

    from prefect.logging.loggers import get_run_logger   # not from `prefect`: that import reconfigures logging
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        logging.getLogger("distill.soft_labels").warning(message)
