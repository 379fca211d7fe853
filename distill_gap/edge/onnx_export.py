"""The fp32 student as ONNX (optimum) and its ONNX Runtime INT8 copy (static activation scales: a row's result
does not depend on its batch), each a self-contained folder whose logits are compared with the fp32 student's on
held-out texts. Both graphs have a second output, "features" (B, D): the input of the classifier's final Linear
(the pooled features a feature-space scope guard reads)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill_gap.edge.checks import check_student, logit_parity, stage_error
from distill_gap.edge.folder import copy_model_files, replace_dir
from distill_gap.errors import DistillError
from distill_gap.inference.batching import length_sorted_batches, pad_batch
from distill_gap.inference.onnx_runtime import FEATURES_OUTPUT, LOGITS_OUTPUT, ONNX_FILE
from distill_gap.inference.predictor import load_predictor

ORT_INT8_CONFIG = "ort_int8.json"


@dataclass
class OnnxResult:
    path: Path  # folder: model.onnx + config and tokenizer files
    size_bytes: int
    digest: str
    # {"max_abs_logit_diff", "argmax_agreement", "n", "finite"}, ONNX Runtime vs fp32 torch, and
    # "max_abs_feature_diff" when the reference features were at hand
    parity: dict
    seconds: float


def _result(out: Path, reference: np.ndarray, heldout_texts: list[str], max_length: int, start: float,
            reference_features: np.ndarray | None = None) -> OnnxResult:
    """The record of a finished ONNX folder: its size, digest and parity on `heldout_texts` (of its features too,
    given the reference's)."""
    from distill_gap.digest import folder_bytes, model_digest

    logits, features = load_predictor(out, runtime="onnxruntime", max_length=max_length).predict_outputs(heldout_texts)
    parity = logit_parity(reference, logits)
    if reference_features is not None and features is not None:
        diff = np.abs(reference_features - features)  # (N, D)
        parity["max_abs_feature_diff"] = float(diff.max()) if np.isfinite(diff).all() and diff.size else None
    return OnnxResult(path=out, size_bytes=folder_bytes(out), digest=model_digest(out), parity=parity,
                      seconds=time.perf_counter() - start)


def add_features_output(onnx_file: Path) -> int:
    """Add the classifier's input tensor as a second graph output "features" (batch, D) float to `onnx_file`.

    Traced back from the "logits" output: its producer is Gemm(x, W, b), or Add(MatMul(x, W), b); x is the input of
    the final Linear (BERT: the pooler's tanh output). An Identity node x -> "features" exposes it. Returns D.
    """
    import onnx
    from onnx import TensorProto, helper

    fix = ("this student's ONNX graph has no plain Linear head: set quantize.onnx=false and "
           "quantize.onnx_int8=false; the INC INT8 artifact (torch) still gives features")
    model = onnx.load(str(onnx_file), load_external_data=False)  # weights stay where they are; dims suffice here
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    if FEATURES_OUTPUT in outputs:  # added before
        return int(outputs[FEATURES_OUTPUT].type.tensor_type.shape.dim[-1].dim_value)
    logits = outputs.get(LOGITS_OUTPUT)
    if logits is None:
        raise DistillError(f"{onnx_file} has no {LOGITS_OUTPUT!r} output ({list(outputs)})", fix)
    producer = {name: node for node in graph.node for name in node.output}
    weights = {init.name: init for init in graph.initializer}
    head = producer.get(LOGITS_OUTPUT)
    features = width = None
    if head is not None and head.op_type == "Gemm" and head.input[1] in weights:
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        if not attrs.get("transA", 0):
            w = weights[head.input[1]].dims  # (C, D) with transB, else (D, C)
            features, width = head.input[0], int(w[1] if attrs.get("transB", 0) else w[0])
    elif head is not None and head.op_type == "Add":
        for name in head.input:
            matmul = producer.get(name)
            if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in weights:
                features, width = matmul.input[0], int(weights[matmul.input[1]].dims[0])  # W (D, C)
    if features is None:
        raise DistillError(f"the {LOGITS_OUTPUT!r} output of {onnx_file} comes from "
                           f"{head.op_type if head is not None else 'no node'}, not from Gemm(x, W, b) or "
                           "Add(MatMul(x, W), b): the classifier's input cannot be found", fix)
    batch = logits.type.tensor_type.shape.dim[0]
    graph.node.append(helper.make_node("Identity", [features], [FEATURES_OUTPUT], name="pooled_features"))
    graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT,
                                                      [batch.dim_param or batch.dim_value or None, width]))
    onnx.save(model, str(onnx_file))
    onnx.checker.check_model(str(onnx_file))  # by path: also for a graph whose weights are external data
    return width


def export_onnx(student_dir, out_dir, *, heldout_texts: list[str], max_length: int = 128,
                reference: np.ndarray | None = None, reference_features: np.ndarray | None = None) -> OnnxResult:
    """Export the fp32 student to ONNX (dynamic batch and sequence axes, outputs "logits" and "features") and
    compare ORT logits with torch.

    `reference`: the fp32 student's logits on `heldout_texts` when the caller has them (computed here otherwise,
    with its features); `reference_features`: its pooled features, for a features parity number (skipped without).
    """
    from optimum.exporters.onnx import main_export

    start = time.perf_counter()
    root = check_student(student_dir, heldout_texts, max_length)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    # optimum's own validation runs random inputs; ours below runs the held-out texts instead.
    try:
        main_export(str(root), tmp, task="text-classification", do_validation=False, local_files_only=True)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise stage_error("export-onnx: optimum ONNX export of the student", err,
                          "this architecture has no ONNX export; the INC INT8 artifact (torch) is still built") from err
    if not (tmp / ONNX_FILE).is_file():
        raise DistillError(f"optimum wrote no {ONNX_FILE} for {root}", "check that the architecture supports ONNX export")
    try:
        add_features_output(tmp / ONNX_FILE)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, DistillError):
            raise
        raise stage_error("export-onnx: the features output", err, "set quantize.onnx=false and "
                          "quantize.onnx_int8=false; the INC INT8 artifact is still built") from err
    copy_model_files(root, tmp)
    replace_dir(tmp, out)
    if reference is None:
        student = load_predictor(root, runtime="transformers", max_length=max_length)
        reference, features = student.predict_outputs(heldout_texts)
        reference_features = features if reference_features is None else reference_features
    return _result(out, reference, heldout_texts, max_length, start, reference_features)


class CalibrationBatches:
    """The calibration texts as an ONNX graph's inputs, for onnxruntime's quantize_static: tokenized by the
    folder's tokenizer, length-sorted batches of `batch_size`, each padded to its longest row (as at run time).

    A CalibrationDataReader by structure (get_next, then None when done): the class needs no onnxruntime import.
    """

    def __init__(self, folder: Path, texts: list[str], input_names: list[str], *, max_length: int,
                 batch_size: int = 32):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        enc = tokenizer([str(t) for t in texts], truncation=True, max_length=max_length)
        pad_id = tokenizer.pad_token_id or 0
        self.batches = [pad_batch(enc, idx, pad_id, input_names)  # {name: (B, T) int64}
                        for idx in length_sorted_batches([len(ids) for ids in enc["input_ids"]], batch_size)]
        self._next = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)


def _static_int8(src: Path, dst: Path, reader: CalibrationBatches, *, per_channel: bool, gather: bool) -> None:
    """dst/model.onnx: src's MatMuls and the Gemms before the head (and, with `gather`, its embedding tables) as
    int8 with static scales.

    QDQ, weights int8 (per channel or per tensor, symmetric), activations uint8 per tensor from the calibration
    batches' min and max. The MatMuls' outputs stay float (ORT runs MatMulIntegerToFloat): quantizing them too puts
    the FFN output, whose outlier dimension reaches ~200 on the demo student, on a 0.8-wide grid (argmax
    agreement 0.95 there, vs 0.99 without). A row's result depends on nothing but the row (no per-batch scale; the
    int8 Gemm's float rounding follows the batch's shape: ~3e-7 in probability between batch 1 and 32).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    tables = {init.name for init in model.graph.initializer}
    # only Gathers that read a table: those of activations (the pooler's first token) stay float
    activation_gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] not in tables]
    # the Gemms before the head (BERT's pooler, RoBERTa's and DistilBERT's dense layers of the head: a 256-wide
    # student's pooler is 0.26 MB in fp32) as int8 too; the one that writes the logits stays float, as does every
    # Gemm's output, so the "features" output (the head's input) is float
    outputs = {o.name for o in model.graph.output}
    head = [n.name for n in model.graph.node if n.op_type == "Gemm" and set(n.output) & outputs]
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm", *(["Gather"] if gather else [])], per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=[*head, *(activation_gathers if gather else [])],
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})


def quantize_onnx_int8(onnx_dir, out_dir, *, heldout_texts: list[str], calibration_texts: list[str] | None = None,
                       max_length: int = 128, embedding_bits: int = 4, block_size: int = 128,
                       per_channel: bool = True, reference: np.ndarray | None = None,
                       reference_features: np.ndarray | None = None) -> OnnxResult:
    """ONNX Runtime INT8 of an fp32 ONNX folder: int8 MatMuls with static activation scales calibrated on
    `calibration_texts` (_static_int8), then the embedding tables (Gather) as 4-bit blocks with onnxruntime's
    GatherBlockQuantized (or static 8-bit). The source's "features" output stays an output (its Identity reads the
    fp32 input of the unquantized head).

    Static scales make a row's logits independent of its batch-mates; dynamic ones (computed per batch, the
    earlier artifact) moved a demo row's probabilities by up to 0.02 between batch 1 and 32. The word-embedding
    table is most of a small student's bytes (30522 x 384 for MiniLM): 4-bit blocks of 128 asymmetric values cut
    it 8x against fp32 (weight-only: nothing depends on the batch). `calibration_texts` None: the held-out texts
    calibrate (recorded as such in ort_int8.json; the pipeline passes seeded training texts).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from distill_gap.digest import model_digest

    start = time.perf_counter()
    src = Path(onnx_dir)
    if not (src / ONNX_FILE).is_file():
        raise DistillError(f"no {ONNX_FILE} in {src}", "run the ONNX export stage first or fix the path")
    if embedding_bits not in (4, 8):
        raise DistillError(f"quantize.onnx_embedding_bits={embedding_bits} is not supported", "use 4 or 8")
    if len(heldout_texts) == 0:
        raise DistillError("no held-out texts for the ONNX INT8 parity check", "pass the validation texts")
    calibration = list(heldout_texts if calibration_texts is None else calibration_texts)
    if not calibration:
        raise DistillError("no calibration texts for the ONNX INT8 activation scales",
                           "set quantize.calibration_samples >= 1 and check the training split")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        inputs = [i.name for i in onnx.load(str(src / ONNX_FILE), load_external_data=False).graph.input]
        reader = CalibrationBatches(src, calibration, inputs, max_length=max_length)
        _static_int8(src / ONNX_FILE, tmp / ONNX_FILE, reader, per_channel=per_channel, gather=embedding_bits == 8)
        if embedding_bits == 4:
            model = onnx.load(str(tmp / ONNX_FILE))
            nbits = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
                block_size=block_size, is_symmetric=False, quant_format=QuantFormat.QOperator,
                op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),)))
            # a block whose values are all equal (an all-zero embedding row) has scale 0: ORT's np.where picks its
            # fallback zero point 8 for it, after numpy has computed (and warned about) the 0/0 it discards
            with np.errstate(divide="ignore", invalid="ignore"):
                nbits.process()
            nbits.model.save_model_to_file(str(tmp / ONNX_FILE), use_external_data_format=False)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise stage_error("quantize-onnx-int8: ONNX Runtime quantization", err,
                          "set quantize.onnx_int8=false; the INC INT8 artifact is still built") from err
    copy_model_files(src, tmp)
    texts = "texts" if calibration_texts is not None else "held-out texts (no calibration texts given)"
    (tmp / ORT_INT8_CONFIG).write_text(json.dumps({
        "matmul": {"mode": "static", "format": "QDQ",
                   "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
                   "activations": f"uint8 per-tensor, static scales calibrated on {len(calibration)} {texts} "
                                  "(MinMax)",
                   "outputs": "float (not re-quantized)", "tool": "onnxruntime quantize_static"},
        "embeddings": ({"mode": "weight-only", "bits": 4, "block_size": block_size, "symmetric": False,
                        "tool": "onnxruntime MatMulNBitsQuantizer (GatherBlockQuantized)"}
                       if embedding_bits == 4 else
                       {"mode": "static", "bits": 8, "tool": "onnxruntime quantize_static (QDQ Gather)"}),
        "source_digest": model_digest(src)}, indent=2))
    replace_dir(tmp, out)
    if reference is None:  # the fp32 ONNX model (itself within ~1e-6 of the torch student)
        source = load_predictor(src, runtime="onnxruntime", max_length=max_length)
        reference, features = source.predict_outputs(heldout_texts)
        reference_features = features if reference_features is None else reference_features
    return _result(out, reference, heldout_texts, max_length, start, reference_features)
