"""Loading a classifier folder for prediction, one way for every runtime: load_predictor -> Predictor.

Runtimes, detected from the folder unless given: an INC INT8 folder (int8_meta.json) -> "torch-pt2", an ONNX
export (model.onnx) -> "onnxruntime", otherwise a Hugging Face folder -> "transformers".
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.inference.batching import classifier_head, predict_logits, predict_outputs
from distill_gap.inference.inc_int8 import INT8_META, load_int8
from distill_gap.inference.onnx_runtime import ONNX_FILE, OnnxPredictor
from distill_gap.models.loading import check_no_code

RUNTIMES = ("onnxruntime", "torch-pt2", "transformers")


class Predictor(Protocol):
    """A loaded classifier: logits (N, C) float32 for texts, in their order; `labels` in logit order when known.

    predict_outputs adds the model's pooled features (N, D) float32: the input of the final Linear that produces
    the logits, as this artifact computes them (quantization moves them); None when the artifact does not give
    them (an ONNX graph or INT8 program exported without a "features" output).
    """

    labels: list[str] | None
    num_labels: int

    def predict_logits(self, texts: Sequence[str], *, batch_size: int = 32,
                       desc: str | None = None) -> np.ndarray: ...

    def predict_outputs(self, texts: Sequence[str], *, batch_size: int = 32,
                        desc: str | None = None) -> tuple[np.ndarray, np.ndarray | None]: ...


class TransformersPredictor:
    """A Hugging Face classifier folder (safetensors, no remote code) run with torch."""

    def __init__(self, path, *, max_length: int = 128, device: str = "cpu"):
        from distill_gap.models.loading import load_classifier, model_labels

        self.path, self.max_length, self.device = Path(path), max_length, device
        self.model, self.tokenizer = load_classifier(self.path)
        self.labels = model_labels(self.model)
        self.num_labels = int(self.model.config.num_labels)
        try:  # D of predict_outputs' features; None where the head is no Linear (predict_outputs then raises)
            self.num_features: int | None = int(classifier_head(self.model).in_features)
        except DistillError:
            self.num_features = None

    def predict_logits(self, texts: Sequence[str], *, batch_size: int = 32, desc: str | None = None) -> np.ndarray:
        """Logits (N, C) float32 in the order of `texts`."""
        return predict_logits(self.model, self.tokenizer, texts, batch_size=batch_size, max_length=self.max_length,
                              device=self.device, desc=desc)

    def predict_outputs(self, texts: Sequence[str], *, batch_size: int = 32,
                        desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, C), pooled features (N, D)) float32 in the order of `texts`."""
        return predict_outputs(self.model, self.tokenizer, texts, batch_size=batch_size, max_length=self.max_length,
                               device=self.device, desc=desc)


def detect_runtime(path: Path) -> str:
    """The runtime a folder's files call for (see the module docstring)."""
    if (path / INT8_META).is_file():
        return "torch-pt2"
    if (path / ONNX_FILE).is_file():
        return "onnxruntime"
    return "transformers"


def load_predictor(path, *, runtime: str | None = None, max_length: int = 128, device: str = "cpu",
                   threads: int | None = None) -> Predictor:
    """The classifier in folder `path`, loaded with `runtime` (None: detected) and checked for code first.

    `device` applies to "transformers" (INT8 and ONNX Runtime pick their own); `threads` sets torch's or ONNX
    Runtime's intra-op threads (None: the runtime's default). A folder that is missing, asks for code, or cannot
    be read by its runtime raises DistillError.
    """
    root = Path(path)
    if not root.is_dir():
        raise DistillError(f"model folder {root} does not exist", "point to a model folder written by the pipeline")
    runtime = runtime or detect_runtime(root)
    if runtime not in RUNTIMES:
        raise DistillError(f"unknown runtime {runtime!r} for {root}", f"use one of {list(RUNTIMES)}")
    check_no_code(root)  # pickle files, auto_map in its config or tokenizer config: refused before any load
    try:
        if runtime == "onnxruntime":
            return OnnxPredictor(root, max_length=max_length, threads=threads)
        if threads:
            import torch

            torch.set_num_threads(threads)
        if runtime == "torch-pt2":
            return load_int8(root)  # eager: a first compile would cost more than most calls save
        return TransformersPredictor(root, max_length=max_length, device=device)
    except DistillError:
        raise
    except Exception as err:  # noqa: BLE001 - a runtime that cannot read its files: the folder is damaged
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise DistillError(f"{root} cannot be loaded with {runtime}: {type(err).__name__}: {first}",
                           "the model folder is damaged or incomplete: fetch or export it again") from None
