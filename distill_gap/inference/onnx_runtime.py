"""ONNX Runtime for exported classifiers: the session (providers, threads) and its logits (and pooled features,
where the graph has them) through run_batched_outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.inference.batching import run_batched, run_batched_outputs

ONNX_FILE = "model.onnx"
# graph outputs, read by name: "logits" (B, C) as optimum exports it, and "features" (B, D), the classifier's
# input that distill_gap.edge.onnx_export adds (older exports lack it)
LOGITS_OUTPUT, FEATURES_OUTPUT = "logits", "features"


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
    """Logits (and pooled features) of an exported classifier folder (model.onnx + tokenizer files) with ONNX
    Runtime."""

    def __init__(self, path, *, max_length: int = 128, threads: int | None = None, session=None):
        from transformers import AutoTokenizer

        self.path, self.max_length = Path(path), max_length
        self.session = session or onnx_session(self.path, threads=threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.labels = _config_labels(self.path)
        outputs = {o.name: o for o in self.session.get_outputs()}
        features = outputs.pop(FEATURES_OUTPUT, None)
        # by name, wherever it sits; a graph without a "logits" output (not written by optimum): its first other one
        logits = outputs[LOGITS_OUTPUT] if LOGITS_OUTPUT in outputs else next(iter(outputs.values()))
        self.output_names = [logits.name] + ([features.name] if features is not None else [])
        width = logits.shape[-1]  # an int, or a symbolic name for a dynamic axis
        self.num_labels = width if isinstance(width, int) else len(self.labels or [])
        width = features.shape[-1] if features is not None else None
        self.num_features = width if isinstance(width, int) else None  # D of predict_outputs' features

    def predict_logits(self, texts: Sequence[str], *, batch_size: int = 32, desc: str | None = None) -> np.ndarray:
        """Logits (N, C) float32 in the order of `texts` (length-sorted batches, dynamic padding)."""
        return run_batched(self.tokenizer, texts, lambda arrays: self.session.run(self.output_names[:1], arrays)[0],
                           num_labels=self.num_labels, batch_size=batch_size, max_length=self.max_length,
                           keys=self.input_names, desc=desc)

    def predict_outputs(self, texts: Sequence[str], *, batch_size: int = 32,
                        desc: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, C), pooled features (N, D)) float32 in the order of `texts`; features None when the graph
        has no "features" output."""
        if len(self.output_names) == 1:
            return self.predict_logits(texts, batch_size=batch_size, desc=desc), None

        def run_batch(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            logits, features = self.session.run(self.output_names, arrays)  # (B, C), (B, D)
            return logits, features

        return run_batched_outputs(self.tokenizer, texts, run_batch, num_labels=self.num_labels,
                                   num_features=self.num_features, batch_size=batch_size, max_length=self.max_length,
                                   keys=self.input_names, desc=desc)


def onnx_predict_logits(onnx_dir, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                        session=None) -> np.ndarray:
    """Logits (N, C) float32 from ONNX Runtime in one call (loads the tokenizer and, unless given, a session)."""
    return OnnxPredictor(onnx_dir, max_length=max_length, session=session).predict_logits(texts, batch_size=batch_size)
