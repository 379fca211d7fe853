"""INT8 quantization of the student (Intel Neural Compressor, PT2E) and its fp32 ONNX export (optimum).

Both artifacts are self-contained folders (weights + config + tokenizer) whose logits are compared with the
fp32 student on held-out texts, so a later gate can reject a quantization that changed the model too much.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import DistillError

APPROACHES = ("static", "dynamic")
INT8_FILE = "model.pt2"
INT8_META = "int8_meta.json"
ONNX_FILE = "model.onnx"
# Files copied next to model.pt2 so the INT8 folder loads on its own (tokenizer + the student's config).
_COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                 "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class Int8Result:
    path: Path  # folder: model.pt2 + int8_meta.json + config and tokenizer files
    approach: str  # "static" | "dynamic"
    calibration_examples: int  # texts whose activation ranges set the static scales (0 for dynamic)
    size_bytes: int
    digest: str
    parity: dict  # {"max_abs_logit_diff", "argmax_agreement", "n"} vs the fp32 student
    seconds: float


@dataclass
class OnnxResult:
    path: Path  # folder: model.onnx + config and tokenizer files
    size_bytes: int
    digest: str
    parity: dict  # same keys as Int8Result.parity, ONNX Runtime vs fp32 torch
    seconds: float


def logit_parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far `candidate` logits (N, C) are from `reference`: worst absolute gap and top-1 agreement."""
    assert reference.shape == candidate.shape, (reference.shape, candidate.shape)
    n = int(reference.shape[0])
    if n == 0:
        return {"max_abs_logit_diff": 0.0, "argmax_agreement": 1.0, "n": 0}
    return {"max_abs_logit_diff": float(np.abs(reference - candidate).max()),
            "argmax_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean()), "n": n}


def _check_inputs(student_dir, heldout_texts: Sequence[str], max_length: int) -> Path:
    """The student folder is a loadable HF model and there is something to measure parity on."""
    from tasks.modeling import check_model_dir

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


def _copy_model_files(src: Path, dst: Path) -> None:
    for name in _COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place, so a failed run never leaves half an artifact at `out`."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# ----------------------------------------------------------------------------------------------------------------
# INT8 with Intel Neural Compressor (PT2E)


def _logits_module(model):
    """An nn.Module returning only the logits tensor from (input_ids, attention_mask, token_type_ids)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, classifier):
            super().__init__()
            self.classifier = classifier

        def forward(self, input_ids, attention_mask, token_type_ids):  # each (B, T) int64 -> (B, C) float32
            return self.classifier(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids, return_dict=False)[0]

    return LogitsOnly(model).eval()


def _int8_embedding(embedding):
    """The word-embedding table as int8 rows with one fp32 scale per row (4x smaller, rows dequantized on lookup).

    PT2E's X86 quantizer leaves embeddings fp32, and the 30k x 384 table is most of a small student's bytes.
    """
    import torch

    class Int8Embedding(torch.nn.Module):
        def __init__(self, weight):  # weight (V, D) float32
            super().__init__()
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (V, 1)
            self.register_buffer("weight_int8", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.to(torch.float32))

        def forward(self, input_ids):  # (B, T) -> (B, T, D)
            rows = torch.nn.functional.embedding(input_ids, self.weight_int8).to(torch.float32)
            return rows * torch.nn.functional.embedding(input_ids, self.scale)

    return Int8Embedding(embedding.weight.detach())


def _encode(tokenizer, texts: Sequence[str], max_length: int, pad_to_max: bool = False) -> tuple:
    """(input_ids, attention_mask, token_type_ids), each (B, T) int64; T = longest text or max_length."""
    import torch

    enc = tokenizer([str(t) for t in texts], truncation=True, max_length=max_length,
                    padding="max_length" if pad_to_max else "longest", return_tensors="pt")
    ids = enc["input_ids"]
    tt = enc.get("token_type_ids")
    return ids, enc["attention_mask"], tt if tt is not None else torch.zeros_like(ids)


def _drop_unused_attributes(gm) -> None:
    """Delete fp32 weights the converted graph no longer reads (folded into int8 constants) before saving."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            delattr(mod, attr)
    gm.delete_all_unused_submodules()


def _export_int8(student, tokenizer, calibration_texts, *, approach, max_length, batch_size, int8_embeddings):
    """Steps 1-4 of quantize_int8: export, prepare, calibrate, convert. Returns (exported program, n calibrated)."""
    import torch
    from neural_compressor.torch.algorithms.pt2e_quant.core import W8A8PT2EQuantizer
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig, prepare
    from torch.export import Dim

    import logging

    logging.getLogger("neural_compressor").setLevel(logging.ERROR)  # INC logs every rewrite pass at INFO
    if int8_embeddings:
        student.set_input_embeddings(_int8_embedding(student.get_input_embeddings()))
    module = _logits_module(student)
    # 1. export with a dynamic batch and sequence: any number of texts, padding only to the longest in a batch
    batch, seq = Dim("batch", min=1), Dim("seq", min=2, max=max_length)
    dynamic_shapes = ({0: batch, 1: seq},) * 3
    example = _encode(tokenizer, ["example input", "a second, longer example input"], max_length, pad_to_max=True)
    graph = export(module, example, dynamic_shapes=dynamic_shapes)
    # 2. insert observers (X86 inductor quantizer: int8 weights, uint8 activations)
    # per-channel weights for dynamic too: INC's per-tensor default lost ~10 points of argmax agreement on MiniLM-L6
    config = StaticQuantConfig() if approach == "static" else DynamicQuantConfig(w_granularity="per_channel")
    prepared = prepare(graph, config, example_inputs=example)
    # 3. calibrate: static scales come from calibration_texts; dynamic needs one pass for the weight observers
    texts = list(calibration_texts) if approach == "static" else ["example input"]
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            prepared(*_encode(tokenizer, texts[i:i + batch_size], max_length))
    # 4. convert with int8 weight constants folded in. INC's convert() does not pass fold_quantize through,
    #    so call its PT2E quantizer directly: without folding the artifact keeps fp32 weights and is no smaller.
    converted = W8A8PT2EQuantizer(quant_config=config).convert(prepared, fold_quantize=True)
    _drop_unused_attributes(converted)
    program = torch.export.export(converted, example, dynamic_shapes=dynamic_shapes)
    return program, len(texts) if approach == "static" else 0


def quantize_int8(student_dir, calibration_texts: list[str], heldout_texts: list[str], out_dir, *,
                  approach: str = "static", max_length: int = 128, batch_size: int = 32, seed: int = 13,
                  int8_embeddings: bool = True) -> Int8Result:
    """Quantize the fp32 student to INT8 with INC PT2E, save a reloadable model.pt2 folder, measure parity.

    Parity is measured on the artifact reloaded from disk (eager), against the fp32 student on `heldout_texts`.
    """
    import torch

    from tasks.digest import folder_bytes, model_digest
    from tasks.inference import predict_logits
    from tasks.modeling import load_classifier, model_labels

    start = time.perf_counter()
    if approach not in APPROACHES:
        raise DistillError(f"unknown quantization approach {approach!r}", f"use one of {list(APPROACHES)}")
    root = _check_inputs(student_dir, heldout_texts, max_length)
    if approach == "static" and len(calibration_texts) == 0:
        raise DistillError("static INT8 quantization needs calibration texts and got none",
                           "pass training texts as calibration_texts, or use approach='dynamic'")
    torch.manual_seed(seed)
    student, tokenizer = load_classifier(root)
    student.eval()
    labels = model_labels(student)
    reference = predict_logits(student, tokenizer, heldout_texts, batch_size=batch_size, max_length=max_length)

    program, n_calibrated = _export_int8(student, tokenizer, calibration_texts, approach=approach,
                                         max_length=max_length, batch_size=batch_size,
                                         int8_embeddings=int8_embeddings)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.export.save(program, tmp / INT8_FILE)
    _copy_model_files(root, tmp)
    import neural_compressor

    meta = {"format": "torch.export pt2 (PT2E q/dq)", "approach": approach, "labels": labels,
            "max_length": max_length, "calibration_examples": n_calibrated, "int8_embeddings": int8_embeddings,
            "source_digest": model_digest(root), "torch": torch.__version__,
            "neural_compressor": neural_compressor.__version__}
    (tmp / INT8_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    _replace_dir(tmp, out)

    candidate = load_int8(out).predict_logits(heldout_texts, batch_size=batch_size)
    return Int8Result(path=out, approach=approach, calibration_examples=n_calibrated, size_bytes=folder_bytes(out),
                      digest=model_digest(out), parity=logit_parity(reference, candidate),
                      seconds=time.perf_counter() - start)


class Int8Predictor:
    """Logits from a saved INT8 folder; `compile=True` runs it through inductor (real int8 kernels, faster)."""

    def __init__(self, path: Path, module, tokenizer, labels: list[str], max_length: int, compiled: bool):
        self.path, self.module, self.tokenizer = path, module, tokenizer
        self.labels, self.max_length, self.compiled = labels, max_length, compiled
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
            self._run(_encode(self.tokenizer, ["warm up"] * batch_size, self.max_length, pad_to_max=True))
        self.compile_seconds = time.perf_counter() - start if self.compiled else 0.0
        return self.compile_seconds

    def predict_logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Logits (N, num_labels) float32 in the order of `texts`."""
        import torch

        from tasks.inference import length_sorted_batches

        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        if not texts:
            return out
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
        with torch.no_grad():
            for idx in length_sorted_batches(lengths, batch_size):
                chunk = [texts[i] for i in idx]
                if self.compiled:
                    # one shape (batch_size, max_length) for every call: no recompiles; pad rows are dropped below
                    chunk = chunk + [""] * (batch_size - len(chunk))
                batch = _encode(self.tokenizer, chunk, self.max_length, pad_to_max=self.compiled)
                out[idx] = self._run(batch)[: len(idx)].float().numpy()  # (B, C)
        return out


def load_int8(path, *, compile: bool = False) -> Int8Predictor:
    """Reload a folder written by quantize_int8 (any process); `compile=True` trades a first compile for speed."""
    import torch
    # Registers the quantized_decomposed ops the saved graph calls, and (for compile) the x86 int8 fusions.
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from transformers import AutoTokenizer

    root = Path(path)
    if not (root / INT8_FILE).is_file() or not (root / INT8_META).is_file():
        raise DistillError(f"{root} is not an INT8 model folder (no {INT8_FILE} / {INT8_META})",
                           "point to the folder written by the quantize stage")
    meta = json.loads((root / INT8_META).read_text())
    module = torch.export.load(root / INT8_FILE).module()
    if compile:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers fusion passes)

        module = torch.compile(module, dynamic=False)
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    return Int8Predictor(root, module, tokenizer, list(meta["labels"]), int(meta["max_length"]), compile)


# ----------------------------------------------------------------------------------------------------------------
# fp32 ONNX with optimum, run with ONNX Runtime


def export_onnx(student_dir, out_dir, *, heldout_texts: list[str], max_length: int = 128) -> OnnxResult:
    """Export the fp32 student to ONNX (dynamic batch and sequence axes) and compare ORT logits with torch."""
    from optimum.exporters.onnx import main_export

    from tasks.digest import folder_bytes, model_digest
    from tasks.inference import predict_logits
    from tasks.modeling import load_classifier

    start = time.perf_counter()
    root = _check_inputs(student_dir, heldout_texts, max_length)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    # optimum's own validation runs random inputs; ours below runs the held-out texts instead.
    main_export(str(root), tmp, task="text-classification", do_validation=False, local_files_only=True)
    if not (tmp / ONNX_FILE).is_file():
        raise DistillError(f"optimum wrote no {ONNX_FILE} for {root}", "check that the architecture supports ONNX export")
    _copy_model_files(root, tmp)
    _replace_dir(tmp, out)

    student, tokenizer = load_classifier(root)
    reference = predict_logits(student, tokenizer, heldout_texts, max_length=max_length)
    candidate = onnx_predict_logits(out, heldout_texts, max_length=max_length)
    return OnnxResult(path=out, size_bytes=folder_bytes(out), digest=model_digest(out),
                      parity=logit_parity(reference, candidate), seconds=time.perf_counter() - start)


def onnx_session(onnx_dir):
    """An ONNX Runtime session on the folder's model.onnx (CUDA when this onnxruntime build has it, else CPU)."""
    import onnxruntime as ort

    path = Path(onnx_dir) / ONNX_FILE
    if not path.is_file():
        raise DistillError(f"no {ONNX_FILE} in {onnx_dir}", "run the ONNX export stage first or fix the path")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), providers=providers)


def onnx_predict_logits(onnx_dir, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                        session=None) -> np.ndarray:
    """Logits (N, C) float32 from ONNX Runtime, in the order of `texts` (length-sorted batches, dynamic padding)."""
    from transformers import AutoTokenizer

    from tasks.inference import length_sorted_batches, pad_batch

    session = session or onnx_session(onnx_dir)
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir, trust_remote_code=False)
    names = [i.name for i in session.get_inputs()]
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), session.get_outputs()[0].shape[-1]), dtype=np.float32)
    if not texts:
        return out
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    for idx in length_sorted_batches([len(ids) for ids in enc["input_ids"]], batch_size):
        out[idx] = session.run(None, pad_batch(enc, idx, tokenizer.pad_token_id or 0, names))[0]  # (B, C)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Prefect tasks


@task(name="quantize-int8", cache_policy=NO_CACHE)
def quantize_student_task(student_dir, calibration_texts, heldout_texts, out_dir, *, approach: str = "static",
                          max_length: int = 128, batch_size: int = 32, seed: int = 13,
                          int8_embeddings: bool = True) -> Int8Result:
    """Quantize the student to INT8 with INC and measure parity (never retried: a failure is deterministic)."""
    return quantize_int8(student_dir, calibration_texts, heldout_texts, out_dir, approach=approach,
                         max_length=max_length, batch_size=batch_size, seed=seed, int8_embeddings=int8_embeddings)


@task(name="export-onnx", cache_policy=NO_CACHE)
def export_onnx_task(student_dir, out_dir, *, heldout_texts, max_length: int = 128) -> OnnxResult:
    """Export the fp32 student to ONNX and measure ONNX Runtime parity (never retried: deterministic)."""
    return export_onnx(student_dir, out_dir, heldout_texts=heldout_texts, max_length=max_length)
