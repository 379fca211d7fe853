"""ONNX Runtime for exported classifiers: the session (providers, threads) and its logits through run_batched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.inference.batching import run_batched

ONNX_FILE = "model.onnx"


def onnx_session(onnx_dir, *, threads: int | None = None):
    """An ONNX Runtime session on the folder's model.onnx (CUDA when this onnxruntime build has it, else CPU).

    `threads`: intra-op threads (None: ONNX Runtime's default, every core).
    """
    import onnxruntime as ort

    path = Path(onnx_dir) / ONNX_FILE
    if not path.is_file():
        raise DistillError(f"no {ONNX_FILE} in {onnx_dir}", "run the ONNX export stage first or fix the path")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=providers)


def _config_labels(folder: Path) -> list[str] | None:
    """The label order in the folder's config.json (id2label), or None without one."""
    if not (folder / "config.json").is_file():
        return None
    id2label = json.loads((folder / "config.json").read_text()).get("id2label") or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)] or None


class OnnxPredictor:
    """Logits of an exported classifier folder (model.onnx + tokenizer files) with ONNX Runtime."""

    def __init__(self, path, *, max_length: int = 128, threads: int | None = None, session=None):
        from transformers import AutoTokenizer

        self.path, self.max_length = Path(path), max_length
        self.session = session or onnx_session(self.path, threads=threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.labels = _config_labels(self.path)
        width = self.session.get_outputs()[0].shape[-1]  # an int, or a symbolic name for a dynamic axis
        self.num_labels = width if isinstance(width, int) else len(self.labels or [])

    def predict_logits(self, texts: Sequence[str], *, batch_size: int = 32, desc: str | None = None) -> np.ndarray:
        """Logits (N, C) float32 in the order of `texts` (length-sorted batches, dynamic padding)."""
        return run_batched(self.tokenizer, texts, lambda arrays: self.session.run(None, arrays)[0],
                           num_labels=self.num_labels, batch_size=batch_size, max_length=self.max_length,
                           keys=self.input_names, desc=desc)


def onnx_predict_logits(onnx_dir, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                        session=None) -> np.ndarray:
    """Logits (N, C) float32 from ONNX Runtime in one call (loads the tokenizer and, unless given, a session)."""
    return OnnxPredictor(onnx_dir, max_length=max_length, session=session).predict_logits(texts, batch_size=batch_size)
