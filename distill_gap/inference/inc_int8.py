"""INC INT8 folders (model.pt2 + int8_meta.json + tokenizer): checked, loaded weights-only, predicted in batches.

The saved program returns (logits (B, C), pooled features (B, D)); programs saved before the features were added
return logits alone and still load (their features are None).

A torch.export archive can carry pickled objects, so every load refuses archives that would unpickle anything
but tensors (check_torch_archive) and runs under the weights-only unpickler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.inference.batching import pad_batch, run_batched_outputs

INT8_FILE = "model.pt2"
INT8_META = "int8_meta.json"
# the exported graph's inputs, in order: (input_ids, attention_mask, token_type_ids), each (B, T) int64
GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PT2_PAYLOADS = ("weight_", "tensor_")  # raw tensor bytes in a torch.export archive; anything else is pickled
# sha256 of a model.pt2 -> (ExportedProgram, its module): a pipeline run reads the same INT8 artifact in the
# quantize checks, evaluate, the edge folder and registration, ~1-2 s per torch.export.load; keyed by content, so
# a copy loads once and a changed file loads again. Only archives that passed check_torch_archive get in.
_PROGRAMS: dict[str, tuple] = {}
_PROGRAMS_KEPT = 4


def encode(tokenizer, texts: Sequence[str], max_length: int, pad_to_max: bool = False) -> tuple:
    """(input_ids, attention_mask, token_type_ids), each (B, T) int64; T = longest text or max_length."""
    import torch

    enc = tokenizer([str(t) for t in texts], truncation=True, max_length=max_length,
                    padding="max_length" if pad_to_max else "longest", return_tensors="pt")
    ids = enc["input_ids"]
    tt = enc.get("token_type_ids")
    return ids, enc["attention_mask"], tt if tt is not None else torch.zeros_like(ids)


def check_torch_archive(file: Path) -> None:
    """Refuse a torch.export archive (model.pt2) that would unpickle anything but tensors.

    torch.export.load unpickles parts of the archive, and when its weights-only unpickler refuses one it retries
    with plain pickle, which runs whatever the file says. So: every pickled member must pass the weights-only
    unpickler here, and objects stored as plain pickles (custom or opaque constants, pickled payloads) are refused.
    """
    import io
    import pickle
    import zipfile

    import torch

    fix = "this is not an archive the quantize stage writes: export the INT8 artifact again, from a trusted student"
    try:
        with zipfile.ZipFile(file) as archive:
            for name in archive.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    entries = json.loads(archive.read(name)).get("config") or {}
                    pickled = sorted(k for k, meta in entries.items() if meta.get("use_pickle")
                                     or not str(meta.get("path_name", "")).startswith(_PT2_PAYLOADS))
                    if pickled:
                        raise DistillError(f"{file} stores {pickled[:3]} as pickled objects ({name}); "
                                           "unpickling them could run code, so the artifact is refused", fix)
                elif name.endswith(".pt"):
                    try:
                        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                    except pickle.UnpicklingError as err:
                        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
                        reason = f"it references {found.group(1)}" if found else "weights-only unpickling failed"
                        raise DistillError(f"{file}: member {name} holds pickled objects other than tensors "
                                           f"({reason}); unpickling it could run code, so the artifact is refused",
                                           fix) from None
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, KeyError, AttributeError, TypeError) as err:
        raise DistillError(f"{file} is not a readable torch.export archive ({type(err).__name__}: {err})",
                           "the INT8 artifact is truncated or damaged: fetch or export it again") from None


@contextlib.contextmanager
def weights_only_unpickling():
    """Every torch.load inside uses the weights-only unpickler, also where torch.export.load asks for plain pickle.

    A second line of defence after check_torch_archive (TORCH_FORCE_WEIGHTS_ONLY_LOAD is read per torch.load call;
    the variable is process-wide, so other threads loading meanwhile are held to weights-only too).
    """
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def features_width(program) -> int | None:
    """D of a saved program's pooled-features output (its second user output), None for one returning logits only."""
    outputs = list(program.graph_signature.user_outputs)
    if len(outputs) < 2:
        return None
    node = next((n for n in program.graph.nodes if n.name == outputs[1]), None)
    width = node.meta["val"].shape[-1] if node is not None and "val" in node.meta else None
    return width if isinstance(width, int) else None


class Int8Predictor:
    """Logits and pooled features from a saved INT8 folder; `compile=True` runs it through inductor (real int8
    kernels, faster). `num_features`: D of the features, None for a program that returns logits alone."""

    def __init__(self, path: Path, module, tokenizer, labels: list[str], max_length: int, compiled: bool,
                 num_features: int | None = None):
        self.path, self.module, self.tokenizer = path, module, tokenizer
        self.labels, self.max_length, self.compiled = labels, max_length, compiled
        self.num_labels, self.num_features = len(labels), num_features
        self.compile_seconds: float | None = None

    def _run(self, batch: tuple):
        import torch

        if not self.compiled:
            return self.module(*batch)
        with torch._inductor.config.patch(freezing=True):
            return self.module(*batch)

    def warm_up(self, batch_size: int = 32) -> float:
        """Trigger the first compile on the fixed shape and return its seconds (0 when not compiled)."""
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            self._run(encode(self.tokenizer, ["warm up"] * batch_size, self.max_length, pad_to_max=True))
        self.compile_seconds = time.perf_counter() - start if self.compiled else 0.0
        return self.compile_seconds

    def _fixed_shape(self, arrays: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
        """`arrays` as the one compiled shape (batch_size, max_length): padded columns, then rows of "" texts."""
        blank = self.tokenizer([""], truncation=True, max_length=self.max_length)
        pad_id = self.tokenizer.pad_token_id or 0
        out = {}
        for k, rows in arrays.items():
            full = np.full((batch_size, self.max_length), pad_id if k == "input_ids" else 0, dtype=np.int64)
            full[:rows.shape[0], :rows.shape[1]] = rows
            if batch_size > rows.shape[0]:
                filler = pad_batch(blank, [0], pad_id, [k])[k][0]  # (T0,) the row of an empty text
                full[rows.shape[0]:, :len(filler)] = filler
            out[k] = full
        return out

    def predict_outputs(self, texts: Sequence[str], *, batch_size: int = 32,
                        desc: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, C), pooled features (N, D)) float32 in the order of `texts`; features None for a program
        saved with logits alone."""
        import torch

        def run_batch(arrays: dict[str, np.ndarray]):
            n = len(arrays["input_ids"])
            if self.compiled:
                # one shape (batch_size, max_length) for every call: no recompiles; pad rows are dropped below
                arrays = self._fixed_shape(arrays, batch_size)
            out = self._run(tuple(torch.from_numpy(arrays[k]) for k in GRAPH_INPUTS))
            if isinstance(out, torch.Tensor):  # an older program: logits (B, C) alone
                return out[:n].float().numpy()
            logits, features = out
            return logits[:n].float().numpy(), features[:n].float().numpy()  # (B, C), (B, D)

        with torch.no_grad():
            return run_batched_outputs(self.tokenizer, texts, run_batch, num_labels=self.num_labels,
                                       num_features=self.num_features, batch_size=batch_size,
                                       max_length=self.max_length, keys=GRAPH_INPUTS, desc=desc)

    def predict_logits(self, texts: Sequence[str], *, batch_size: int = 32, desc: str | None = None) -> np.ndarray:
        """Logits (N, num_labels) float32 in the order of `texts`."""
        return self.predict_outputs(texts, batch_size=batch_size, desc=desc)[0]


def _load_program(file: Path) -> tuple:
    """(ExportedProgram, module) of a checked archive, loaded weights-only once per process and content."""
    import torch

    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    if digest not in _PROGRAMS:
        check_torch_archive(file)
        with weights_only_unpickling():
            program = torch.export.load(file)
            _PROGRAMS[digest] = (program, program.module())
        while len(_PROGRAMS) > _PROGRAMS_KEPT:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
    return _PROGRAMS[digest]


def load_int8(path, *, compile: bool = False) -> Int8Predictor:
    """Reload a folder written by the INT8 quantization (any process); `compile=True` trades a first compile for speed.

    The archive is checked first and loaded weights-only (see the module docstring).
    """
    import torch
    # Registers the quantized_decomposed ops the saved graph calls, and (for compile) the x86 int8 fusions.
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from transformers import AutoTokenizer

    root = Path(path)
    if not (root / INT8_FILE).is_file() or not (root / INT8_META).is_file():
        raise DistillError(f"{root} is not an INT8 model folder (no {INT8_FILE} / {INT8_META})",
                           "point to the folder written by the quantize stage")
    meta = json.loads((root / INT8_META).read_text())
    program, module = _load_program(root / INT8_FILE)
    if compile:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers fusion passes)

        module = torch.compile(module, dynamic=False)
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    return Int8Predictor(root, module, tokenizer, list(meta["labels"]), int(meta["max_length"]), compile,
                         num_features=features_width(program))
