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

from distill_gap.edge.folder import EDGE_FILE, write_manifest
from distill_gap.errors import DistillError
from distill_gap.inference.inc_int8 import INT8_FILE, INT8_META, encode, load_int8
from distill_gap.inference.onnx_runtime import ONNX_FILE, onnx_predict_logits
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
    tuning: "Tuning | None" = None  # set by autotune_int8


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
        return {"max_abs_logit_diff": 0.0, "argmax_agreement": 1.0, "n": 0, "finite": True}
    finite = bool(np.isfinite(candidate).all())
    # NaN/inf outputs: no meaningful distance (None), and agreement counts those rows as disagreeing
    agree = (reference.argmax(-1) == candidate.argmax(-1)) & np.isfinite(candidate).all(-1)
    return {"max_abs_logit_diff": float(np.abs(reference - candidate).max()) if finite else None,
            "argmax_agreement": float(agree.mean()), "n": n, "finite": finite}


def _check_inputs(student_dir, heldout_texts: Sequence[str], max_length: int) -> Path:
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
    import inspect

    import torch

    accepted = set(inspect.signature(model.forward).parameters)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, classifier):
            super().__init__()
            self.model = classifier  # module names in the graph: model.bert.encoder.layer.0..., model.classifier

        def forward(self, input_ids, attention_mask, token_type_ids):  # each (B, T) int64 -> (B, C) float32
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{k: v for k, v in given.items() if k in accepted}, return_dict=False)[0]

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


def _drop_unused_attributes(gm) -> None:
    """Delete fp32 weights the converted graph no longer reads (folded into int8 constants) before saving."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            delattr(mod, attr)
    gm.delete_all_unused_submodules()


# Candidate INC configurations, tried in this order by autotune. Weights are per-channel throughout: INC's
# per-tensor default for dynamic lost ~10 points of argmax agreement on MiniLM-L6. The fp32 fallbacks keep the
# layers most sensitive in BERT (the classification head, then the FFN output projections) in fp32.
CANDIDATES = ("static", "static-kl", "static-sym", "dynamic", "static-fp32-head", "static-fp32-ffn-out")
APPROACHES = CANDIDATES


def inc_config(name: str, num_layers: int):
    """The INC config object of a named candidate (a fresh object each call)."""
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig

    if name not in CANDIDATES:
        raise DistillError(f"unknown quantization candidate {name!r}", f"use one of {list(CANDIDATES)}")
    if name == "dynamic":
        return DynamicQuantConfig(w_granularity="per_channel")
    config = StaticQuantConfig(act_algo="kl" if name == "static-kl" else "minmax", act_sym=name == "static-sym")
    fp32 = {"static-fp32-head": ["model.classifier", "model.bert.pooler.dense"],
            "static-fp32-ffn-out": [f"model.bert.encoder.layer.{i}.output.dense" for i in range(num_layers)]}
    for op in fp32.get(name, []):
        config.set_local(op, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    return config


def _config_record(name: str, config) -> dict:
    d = config.to_dict()
    return {"name": name, "inc": json.loads(json.dumps(d, default=str))}


def _operator_in(err: BaseException) -> str | None:
    """What an export/quantization error is about: the aten/torch op, the dynamic dimension or the architecture."""
    import re

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


def _export_graph(student, tokenizer, *, max_length: int, int8_embeddings: bool):
    """The student as an INC-exported graph (dynamic batch and sequence) + its example inputs."""
    import torch
    from torch.export import Dim

    import logging

    logging.getLogger("neural_compressor").setLevel(logging.ERROR)  # INC logs every rewrite pass at INFO
    if int8_embeddings:
        try:
            table = student.get_input_embeddings()
        except NotImplementedError:  # e.g. character-level models without one word-embedding table
            table = None
        if isinstance(table, torch.nn.Embedding):
            student.set_input_embeddings(_int8_embedding(table))
    module = _logits_module(student)
    batch, seq = Dim("batch", min=1), Dim("seq", min=2, max=max_length)
    dynamic_shapes = ({0: batch, 1: seq},) * 3
    example = encode(tokenizer, ["example input", "a second, longer example input"], max_length, pad_to_max=True)
    # What INC's export() does (strict torch.export, then non-strict), but keeping the exception: INC logs it and
    # raises "check the logs above", which names no operator.
    errors = []
    graph = None
    for strict in (True, False):
        try:
            with torch.no_grad():
                graph = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=strict).module()
            break
        except Exception as err:  # torch.export raises many types (Unsupported, UserError, guard failures)
            errors.append(err)
    if graph is None:
        raise stage_error("quantize-int8: torch.export of the student", errors[-1],
                          "this architecture cannot be exported for INT8; the edge model falls back to fp32 "
                          "(quantize.require_int8=false to deploy it)") from errors[-1]
    graph._exported, graph.dynamic_shapes = True, dynamic_shapes
    return graph, example, dynamic_shapes


def _calibrate(prepared, tokenizer, texts, *, max_length: int, batch_size: int) -> None:
    import torch

    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            prepared(*encode(tokenizer, texts[i:i + batch_size], max_length))


def _convert_folded(graph, config, tokenizer, texts, example, dynamic_shapes, *, max_length, batch_size):
    """prepare -> calibrate -> convert with int8 weight constants folded in -> re-export.

    INC's convert() does not pass fold_quantize through, so its PT2E quantizer is called directly:
    without folding the artifact keeps fp32 weights and is no smaller.
    """
    import copy

    import torch
    from neural_compressor.torch.algorithms.pt2e_quant.core import W8A8PT2EQuantizer
    from neural_compressor.torch.quantization import prepare

    graph = copy.deepcopy(graph)
    graph._exported, graph.dynamic_shapes = True, dynamic_shapes
    prepared = prepare(graph, config, example_inputs=example)
    _calibrate(prepared, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    converted = W8A8PT2EQuantizer(quant_config=config).convert(prepared, fold_quantize=True)
    _drop_unused_attributes(converted)
    return torch.export.export(converted, example, dynamic_shapes=dynamic_shapes)


def _save_int8(program, root: Path, out: Path, meta: dict) -> None:
    import neural_compressor
    import torch

    from distill_gap.digest import model_digest

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.export.save(program, tmp / INT8_FILE)
    _copy_model_files(root, tmp)
    meta = {"format": "torch.export pt2 (PT2E q/dq)", "source_digest": model_digest(root), "torch": torch.__version__,
            "neural_compressor": neural_compressor.__version__, **meta}
    (tmp / INT8_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    _replace_dir(tmp, out)


def _load_student(root: Path, heldout_texts, *, batch_size: int, max_length: int, seed: int):
    """(student in eval mode, tokenizer, labels, fp32 held-out logits (N, C)) for the parity checks."""
    import torch

    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier, model_labels

    torch.manual_seed(seed)
    student, tokenizer = load_classifier(root)
    student.eval()
    reference = predict_logits(student, tokenizer, heldout_texts, batch_size=batch_size, max_length=max_length)
    return student, tokenizer, model_labels(student), reference


def _num_layers(root: Path) -> int:
    return int(json.loads((root / "config.json").read_text()).get("num_hidden_layers", 0))


def quantize_int8(student_dir, calibration_texts: list[str], heldout_texts: list[str], out_dir, *,
                  approach: str = "static", max_length: int = 128, batch_size: int = 32, seed: int = 13,
                  int8_embeddings: bool = True) -> Int8Result:
    """Quantize the fp32 student with one INC candidate (`approach`), save a reloadable model.pt2 folder.

    Parity is measured on the artifact reloaded from disk (eager), against the fp32 student on `heldout_texts`.
    """
    from distill_gap.digest import folder_bytes, model_digest

    start = time.perf_counter()
    if approach not in CANDIDATES:
        raise DistillError(f"unknown quantization approach {approach!r}", f"use one of {list(CANDIDATES)}")
    root = _check_inputs(student_dir, heldout_texts, max_length)
    static = approach != "dynamic"
    if static and len(calibration_texts) == 0:
        raise DistillError("static INT8 quantization needs calibration texts and got none",
                           "pass training texts as calibration_texts, or use approach='dynamic'")
    student, tokenizer, labels, reference = _load_student(root, heldout_texts, batch_size=batch_size,
                                                          max_length=max_length, seed=seed)
    config = inc_config(approach, _num_layers(root))
    graph, example, dyn = _export_graph(student, tokenizer, max_length=max_length, int8_embeddings=int8_embeddings)
    # static scales come from calibration_texts; dynamic needs one pass for the weight observers
    texts = list(calibration_texts) if static else ["example input"]
    try:
        program = _convert_folded(graph, config, tokenizer, texts, example, dyn, max_length=max_length,
                                  batch_size=batch_size)
    except Exception as err:
        raise stage_error(f"quantize-int8: INC {approach}", err,
                          "try another quantize.candidates entry, or quantize.require_int8=false") from err
    out = Path(out_dir)
    _save_int8(program, root, out, {"approach": approach, "config": _config_record(approach, config),
                                    "labels": labels, "max_length": max_length,
                                    "calibration_examples": len(texts) if static else 0,
                                    "int8_embeddings": int8_embeddings})
    candidate = load_int8(out).predict_logits(heldout_texts, batch_size=batch_size)
    return Int8Result(path=out, approach=approach, calibration_examples=len(texts) if static else 0,
                      size_bytes=folder_bytes(out), digest=model_digest(out), parity=logit_parity(reference, candidate),
                      seconds=time.perf_counter() - start)


@dataclass
class Tuning:
    """The record of an accuracy-aware INC autotune: every trial, the goal, and whether a trial met it."""

    metric: str  # what eval_fn measured, e.g. "validation accuracy (64 rows)"
    baseline: float  # the fp32 student on that metric
    tolerable_loss: float  # relative, as INC defines it
    goal: float  # baseline * (1 - tolerable_loss)
    max_trials: int
    trials: list[dict]  # {"index", "name", "config", "metric", "relative_loss", "met_goal", "seconds"}
    best: str | None  # the candidate the artifact was built from
    met: bool  # a trial reached the goal
    reason: str  # one sentence for the registry and the report

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _accuracy(logits: np.ndarray, label_ids: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(np.asarray(label_ids), logits.argmax(-1)))


def autotune_int8(student_dir, calibration_texts: list[str], val_texts: list[str], val_label_ids, heldout_texts,
                  out_dir, *, tolerable_loss: float = 0.01, max_trials: int = 6,
                  candidates: Sequence[str] = CANDIDATES, max_length: int = 128, batch_size: int = 32,
                  seed: int = 13, int8_embeddings: bool = True, log=None) -> Int8Result:
    """Accuracy-aware INT8 with INC `autotune`: try `candidates` in order until one stays within
    `tolerable_loss` (relative) of the fp32 student's validation accuracy, then save that candidate.

    Every trial is recorded (`result.tuning`). When no candidate meets the goal, the best trial is still built and
    saved, and `tuning.met` is False: the caller marks the edge model as failing the quantization gate.
    """
    import torch
    from neural_compressor.common.base_tuning import TuningConfig
    from neural_compressor.torch.quantization import autotune

    from distill_gap.digest import folder_bytes, model_digest
    from distill_gap.inference.batching import predict_logits

    start = time.perf_counter()
    log = log or (lambda *a: None)
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown or not candidates:
        raise DistillError(f"quantize.candidates {list(candidates)} has unknown or no entries {unknown}",
                           f"choose from {list(CANDIDATES)}")
    if not 0 <= tolerable_loss < 1:
        raise DistillError(f"tolerable_loss={tolerable_loss} is not a relative loss in [0, 1)",
                           "set quantize.tolerable_loss to e.g. 0.01 (1%)")
    root = _check_inputs(student_dir, heldout_texts, max_length)
    label_ids = np.asarray(val_label_ids)
    if len(val_texts) == 0 or len(label_ids) != len(val_texts):
        raise DistillError(f"autotune needs labelled validation texts; got {len(val_texts)} texts and "
                           f"{len(label_ids)} labels", "pass the validation split's texts and label ids")
    needs_calibration = any(c != "dynamic" for c in candidates)
    if needs_calibration and len(calibration_texts) == 0:
        raise DistillError("static INT8 candidates need calibration texts and got none",
                           "pass training texts as calibration_texts, or use quantize.candidates=[dynamic]")
    student, tokenizer, labels, reference = _load_student(root, heldout_texts, batch_size=batch_size,
                                                          max_length=max_length, seed=seed)
    baseline = _accuracy(predict_logits(student, tokenizer, val_texts, batch_size=batch_size, max_length=max_length),
                         label_ids)
    goal = baseline * (1 - tolerable_loss)
    num_layers = _num_layers(root)
    configs = [(name, inc_config(name, num_layers)) for name in candidates]
    graph, example, dyn = _export_graph(student, tokenizer, max_length=max_length, int8_embeddings=int8_embeddings)
    calib = list(calibration_texts) or ["example input"]

    trials: list[dict] = []
    evaluations: list[float] = []
    tick = [time.perf_counter()]

    def eval_fn(model) -> float:
        # INC evaluates the unquantized model first (its baseline): answer with the fp32 student's own accuracy, so
        # the goal is relative to the fp32 student as configured, not to the exported copy with int8 embeddings.
        if not evaluations:
            evaluations.append(baseline)
            tick[0] = time.perf_counter()
            return baseline
        logits = np.zeros((len(val_texts), len(labels)), dtype=np.float32)
        with torch.no_grad():
            for i in range(0, len(val_texts), batch_size):
                logits[i:i + batch_size] = model(*encode(tokenizer, val_texts[i:i + batch_size], max_length)).float().numpy()
        metric = _accuracy(logits, label_ids) if np.isfinite(logits).all() else 0.0
        name, config = configs[len(evaluations) - 1]
        evaluations.append(metric)
        trials.append({"index": len(trials) + 1, **_config_record(name, config), "metric": metric,
                       "relative_loss": (baseline - metric) / baseline if baseline else 0.0,
                       "met_goal": metric >= goal, "finite": bool(np.isfinite(logits).all()),
                       "seconds": round(time.perf_counter() - tick[0], 2)})
        log(f"autotune trial {len(trials)}/{min(max_trials, len(configs))} {name}: validation accuracy "
            f"{metric:.4f} (fp32 {baseline:.4f}, goal >= {goal:.4f}) {'met' if metric >= goal else 'not met'}")
        tick[0] = time.perf_counter()
        return metric

    def run_fn(prepared) -> None:
        _calibrate(prepared, tokenizer, calib, max_length=max_length, batch_size=batch_size)

    tune = TuningConfig(config_set=[c for _, c in configs], tolerable_loss=tolerable_loss, max_trials=max_trials)
    try:
        autotune(graph, tune, eval_fn=eval_fn, run_fn=run_fn, example_inputs=example)
    except Exception as err:
        name = configs[len(trials)][0] if len(trials) < len(configs) else "?"
        raise stage_error(f"quantize-int8: INC autotune (candidate {name})", err,
                          "remove that candidate from quantize.candidates, or quantize.require_int8=false") from err
    if not trials:
        raise DistillError("INC autotune ran no trial", "check quantize.max_trials >= 1 and quantize.candidates")
    met = [t for t in trials if t["met_goal"]]
    best = met[0] if met else max(trials, key=lambda t: t["metric"])  # INC stops at the first trial meeting the goal
    if met:
        reason = (f"{best['name']} kept validation accuracy {best['metric']:.4f} within {tolerable_loss:.1%} of the "
                  f"fp32 student ({baseline:.4f}) at trial {best['index']}")
    else:
        reason = (f"no candidate of {len(trials)} tried stayed within {tolerable_loss:.1%} of the fp32 student's "
                  f"validation accuracy {baseline:.4f}; the best, {best['name']}, reached {best['metric']:.4f} "
                  f"(goal {goal:.4f}); it is kept for the record and fails the quantization gate")
    tuning = Tuning(metric=f"validation accuracy ({len(val_texts)} rows)", baseline=baseline,
                    tolerable_loss=tolerable_loss, goal=goal, max_trials=max_trials, trials=trials,
                    best=best["name"], met=bool(met), reason=reason)
    config = inc_config(best["name"], num_layers)
    static = best["name"] != "dynamic"
    texts = calib if static else ["example input"]
    try:
        program = _convert_folded(graph, config, tokenizer, texts, example, dyn, max_length=max_length,
                                  batch_size=batch_size)
    except Exception as err:
        raise stage_error(f"quantize-int8: INC {best['name']}", err, "remove that candidate from quantize.candidates") from err
    out = Path(out_dir)
    _save_int8(program, root, out, {"approach": best["name"], "config": _config_record(best["name"], config),
                                    "labels": labels, "max_length": max_length,
                                    "calibration_examples": len(texts) if static else 0,
                                    "int8_embeddings": int8_embeddings, "tuning": tuning.to_dict()})
    candidate = load_int8(out).predict_logits(heldout_texts, batch_size=batch_size)
    result = Int8Result(path=out, approach=best["name"], calibration_examples=len(texts) if static else 0,
                        size_bytes=folder_bytes(out), digest=model_digest(out),
                        parity=logit_parity(reference, candidate), seconds=time.perf_counter() - start)
    result.tuning = tuning
    return result


# ----------------------------------------------------------------------------------------------------------------
# fp32 ONNX with optimum, run with ONNX Runtime


def export_onnx(student_dir, out_dir, *, heldout_texts: list[str], max_length: int = 128) -> OnnxResult:
    """Export the fp32 student to ONNX (dynamic batch and sequence axes) and compare ORT logits with torch."""
    from optimum.exporters.onnx import main_export

    from distill_gap.digest import folder_bytes, model_digest
    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier

    start = time.perf_counter()
    root = _check_inputs(student_dir, heldout_texts, max_length)
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
    _copy_model_files(root, tmp)
    _replace_dir(tmp, out)

    student, tokenizer = load_classifier(root)
    reference = predict_logits(student, tokenizer, heldout_texts, max_length=max_length)
    candidate = onnx_predict_logits(out, heldout_texts, max_length=max_length)
    return OnnxResult(path=out, size_bytes=folder_bytes(out), digest=model_digest(out),
                      parity=logit_parity(reference, candidate), seconds=time.perf_counter() - start)


ORT_INT8_CONFIG = "ort_int8.json"


def quantize_onnx_int8(onnx_dir, out_dir, *, heldout_texts: list[str], max_length: int = 128,
                       embedding_bits: int = 4, block_size: int = 128, per_channel: bool = True,
                       reference: np.ndarray | None = None) -> OnnxResult:
    """ONNX Runtime INT8 of an fp32 ONNX folder: optimum's ORTQuantizer (dynamic, per-channel MatMul weights),
    then the embedding tables (Gather) as 4-bit blocks with onnxruntime's GatherBlockQuantized (or 8-bit).

    The word-embedding table is most of a small student's bytes (30522 x 384 for MiniLM): 4-bit blocks of 128
    asymmetric values cut it 8x against fp32 while the MatMuls carry the int8 speed-up.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from distill_gap.digest import folder_bytes, model_digest

    start = time.perf_counter()
    src = Path(onnx_dir)
    if not (src / ONNX_FILE).is_file():
        raise DistillError(f"no {ONNX_FILE} in {src}", "run the ONNX export stage first or fix the path")
    if embedding_bits not in (4, 8):
        raise DistillError(f"quantize.onnx_embedding_bits={embedding_bits} is not supported", "use 4 or 8")
    if len(heldout_texts) == 0:
        raise DistillError("no held-out texts for the ONNX INT8 parity check", "pass the validation texts")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ops = ["MatMul"] if embedding_bits == 4 else ["MatMul", "Gather"]
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=per_channel, operators_to_quantize=ops)
    try:
        ORTQuantizer.from_pretrained(src, file_name=ONNX_FILE).quantize(save_dir=tmp, quantization_config=qconfig,
                                                                        file_suffix="")
        if embedding_bits == 4:
            model = onnx.load(str(tmp / ONNX_FILE))
            nbits = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
                block_size=block_size, is_symmetric=False, quant_format=QuantFormat.QOperator,
                op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),)))
            nbits.process()
            nbits.model.save_model_to_file(str(tmp / ONNX_FILE), use_external_data_format=False)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise stage_error("quantize-onnx-int8: ONNX Runtime quantization", err,
                          "set quantize.onnx_int8=false; the INC INT8 artifact is still built") from err
    _copy_model_files(src, tmp)
    (tmp / ORT_INT8_CONFIG).write_text(json.dumps({
        "matmul": {"mode": "dynamic", "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
                   "activations": "uint8 per-tensor, computed at run time", "tool": "optimum ORTQuantizer"},
        "embeddings": ({"mode": "weight-only", "bits": 4, "block_size": block_size, "symmetric": False,
                        "tool": "onnxruntime MatMulNBitsQuantizer (GatherBlockQuantized)"}
                       if embedding_bits == 4 else {"mode": "dynamic", "bits": 8, "tool": "optimum ORTQuantizer"}),
        "source_digest": model_digest(src)}, indent=2))
    _replace_dir(tmp, out)
    if reference is None:  # the fp32 ONNX model (itself within ~1e-6 of the torch student)
        reference = onnx_predict_logits(src, heldout_texts, max_length=max_length)
    candidate = onnx_predict_logits(out, heldout_texts, max_length=max_length)
    return OnnxResult(path=out, size_bytes=folder_bytes(out), digest=model_digest(out),
                      parity=logit_parity(reference, candidate), seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------------
# Prefect tasks


# artifact name in edge.json -> (runtime, model name in the gap report)
EDGE_ARTIFACTS = {"int8": ("torch-pt2", "student-int8"), "onnx-int8": ("onnxruntime", "student-onnx-int8"),
                  "onnx": ("onnxruntime", "student-onnx"), "fp32": ("transformers", "student")}
INT8_ARTIFACTS = ("int8", "onnx-int8")


@dataclass
class EdgeBuild:
    """The edge folder: every artifact built, its checks against the fp32 student, and which one is primary."""

    path: Path
    primary: str  # key of `artifacts`
    quantized: bool  # the primary is an INT8 artifact
    artifacts: dict  # name -> {"path", "runtime", "report_name", "size_bytes", "digest", "parity", "validation", ...}
    tuning: dict | None  # autotune_int8's record (every trial)
    errors: list  # [{"stage", "problem", "fix"}] for artifacts that could not be built
    reason: str  # why the primary is what it is

    @property
    def report_name(self) -> str:
        return self.artifacts[self.primary]["report_name"]

    @property
    def primary_ok(self) -> bool:
        return bool(self.artifacts[self.primary].get("ok"))

    def manifest(self, labels: list[str], max_length: int) -> dict:
        return {"format": 1, "primary": self.primary, "labels": labels, "max_length": max_length,
                "quantized": self.quantized, "reason": self.reason, "errors": self.errors, "tuning": self.tuning,
                "artifacts": self.artifacts}


def _check(parity: dict, validation: dict | None, min_agreement: float) -> tuple[bool, str]:
    """An artifact passes when its outputs are finite, agree with the fp32 student, and met the accuracy goal."""
    if not parity.get("finite", True):
        return False, "outputs contain NaN or inf"
    if parity["argmax_agreement"] < min_agreement:
        return False, (f"argmax agreement with the fp32 student {parity['argmax_agreement']:.3f} < "
                       f"{min_agreement:.3f}")
    if validation is not None and not validation["met_goal"]:
        return False, (f"validation accuracy {validation['accuracy']:.4f} below the goal {validation['goal']:.4f} "
                       f"(fp32 {validation['baseline']:.4f})")
    return True, "finite, agrees with the fp32 student and meets the accuracy goal"


def quantize_stage(student_dir, out_dir, *, calibration_texts: list[str], val_texts: list[str], val_label_ids,
                   heldout_texts: list[str], qcfg, max_length: int, batch_size: int = 32, seed: int = 13,
                   min_agreement: float = 0.95, log=print) -> EdgeBuild:
    """Build every edge artifact (Prefect tasks), check each against the fp32 student, pick the primary.

    A stage that cannot build its artifact (an architecture torch.export or optimum cannot handle) is recorded
    with its error and the others go on; with no INT8 artifact at all the edge model is the fp32 student,
    marked as not quantized.
    """
    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier, model_labels

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    student, tokenizer = load_classifier(student_dir)
    labels = model_labels(student)
    reference = predict_logits(student, tokenizer, heldout_texts, batch_size=batch_size, max_length=max_length)
    del student
    artifacts: dict[str, dict] = {}
    errors: list[dict] = []
    tuning = None

    def record(name: str, result, validation: dict | None, **extra) -> None:
        ok, why = _check(result.parity, validation, min_agreement)
        runtime, report_name = EDGE_ARTIFACTS[name]
        artifacts[name] = {"path": name, "runtime": runtime, "report_name": report_name,
                           "size_bytes": result.size_bytes, "digest": result.digest, "parity": result.parity,
                           "validation": validation, "ok": ok, "check": why, "seconds": round(result.seconds, 1),
                           **extra}
        log(f"{name}: {result.size_bytes / 1e6:.1f} MB, argmax agreement {result.parity['argmax_agreement']:.3f}, "
            f"max |logit diff| {result.parity['max_abs_logit_diff']}; {'ok' if ok else 'FAILS: ' + why}")

    def failed(err: DistillError) -> None:
        errors.append({"stage": str(err.problem).split(":")[0], "problem": err.problem, "fix": err.fix})
        log(f"not built: {err.problem} (fix: {err.fix})")

    try:
        int8 = autotune_task(student_dir, calibration_texts, val_texts, val_label_ids, heldout_texts, out / "int8",
                             tolerable_loss=qcfg.tolerable_loss, max_trials=qcfg.max_trials,
                             candidates=list(qcfg.candidates), max_length=max_length, batch_size=batch_size,
                             seed=seed)
        tuning = int8.tuning.to_dict()
        best = next(t for t in tuning["trials"] if t["name"] == tuning["best"])
        record("int8", int8, {"accuracy": best["metric"], "baseline": tuning["baseline"], "goal": tuning["goal"],
                              "met_goal": tuning["met"]}, candidate=int8.approach)
    except DistillError as err:
        failed(err)
    onnx = None
    if qcfg.onnx or qcfg.onnx_int8:
        try:
            onnx = export_onnx_task(student_dir, out / "onnx", heldout_texts=heldout_texts, max_length=max_length)
            record("onnx", onnx, None)
        except DistillError as err:
            failed(err)
    if onnx is not None and qcfg.onnx_int8:
        try:
            oq = quantize_onnx_task(onnx.path, out / "onnx-int8", heldout_texts=heldout_texts, max_length=max_length,
                                    embedding_bits=qcfg.onnx_embedding_bits, reference=reference)
            val = onnx_predict_logits(oq.path, val_texts, batch_size=batch_size, max_length=max_length)
            base = (tuning or {}).get("baseline")
            if base is None:
                base = _accuracy(onnx_predict_logits(onnx.path, val_texts, max_length=max_length),
                                 np.asarray(val_label_ids))
            acc, goal = _accuracy(val, np.asarray(val_label_ids)), base * (1 - qcfg.tolerable_loss)
            # dynamic activation scales are computed per batch: measure how much a row's logits depend on its batch
            one_by_one = onnx_predict_logits(oq.path, heldout_texts[:32], batch_size=1, max_length=max_length)
            batched = onnx_predict_logits(oq.path, heldout_texts[:32], batch_size=batch_size, max_length=max_length)
            record("onnx-int8", oq, {"accuracy": acc, "baseline": base, "goal": goal, "met_goal": acc >= goal},
                   batch_dependence_max_abs_logit_diff=float(np.abs(one_by_one - batched).max()))
        except DistillError as err:
            failed(err)
    if not qcfg.onnx and "onnx" in artifacts:  # exported only as the source of the ONNX INT8 model
        shutil.rmtree(out / "onnx", ignore_errors=True)
        del artifacts["onnx"]
    # auto: ONNX INT8 first. Measured on the demo (benchmarks/RESULTS.md, 2-core AVX2 CPU): 1.93x the fp32 student
    # at batch 32 vs 1.58x for compiled INC INT8, 11.2 vs 17.9 MB, 273 vs 751 MB RSS, 0.3 s load vs 23 s compile
    built = [a for a in (qcfg.primary if qcfg.primary != "auto" else "onnx-int8,int8").split(",") if a in artifacts]
    passing = [a for a in built if artifacts[a]["ok"]]
    if passing:
        primary = passing[0]
        reason = f"{primary}: {artifacts[primary]['check']}"
    elif built:
        primary = built[0]
        reason = f"no INT8 artifact passed its checks; {primary} kept for the record: {artifacts[primary]['check']}"
    else:
        shutil.copytree(student_dir, out / "fp32")
        from distill_gap.digest import folder_bytes, model_digest

        artifacts["fp32"] = {"path": "fp32", "runtime": "transformers", "report_name": "student",
                             "size_bytes": folder_bytes(out / "fp32"), "digest": model_digest(out / "fp32"),
                             "parity": logit_parity(reference, reference), "validation": None, "ok": True,
                             "check": "the fp32 student itself"}
        primary = "fp32"
        reason = ("not quantized: " + "; ".join(e["problem"] for e in errors)) if errors else \
            "not quantized: no INT8 artifact was requested"
        log(f"edge model is the fp32 student, NOT quantized ({reason})")
    build = EdgeBuild(path=out, primary=primary, quantized=primary in INT8_ARTIFACTS, artifacts=artifacts,
                      tuning=tuning, errors=errors, reason=reason)
    write_manifest(out, build.manifest(labels, max_length))
    return build


def tuning_markdown(edge: EdgeBuild) -> str:
    """The quantize stage for the Prefect UI: every autotune trial and every artifact with its checks."""
    lines = [f"## Quantization: primary `{edge.primary}` ({'INT8' if edge.quantized else 'NOT quantized'})", "",
             edge.reason, ""]
    t = edge.tuning
    if t:
        lines += [f"INC autotune on {t['metric']}: fp32 student {t['baseline']:.4f}, goal >= {t['goal']:.4f} "
                  f"(tolerable loss {t['tolerable_loss']:.1%}, max {t['max_trials']} trials). {t['reason']}.", "",
                  "| trial | candidate | accuracy | relative loss | goal met | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['index']} | {r['name']} | {r['metric']:.4f} | {r['relative_loss']:+.2%} | "
                  f"{'yes' if r['met_goal'] else 'no'} | {r['seconds']} |" for r in t["trials"]]
        lines.append("")
    lines += ["| artifact | runtime | size MB | argmax agreement | max abs logit diff | check |",
              "|---|---|---|---|---|---|"]
    for name, a in edge.artifacts.items():
        p = a["parity"]
        diff = "NaN/inf" if p["max_abs_logit_diff"] is None else f"{p['max_abs_logit_diff']:.4f}"
        lines.append(f"| {name}{' (primary)' if name == edge.primary else ''} | {a['runtime']} | "
                     f"{a['size_bytes'] / 1e6:.1f} | {p['argmax_agreement']:.3f} | {diff} | "
                     f"{'ok' if a['ok'] else 'FAIL'}: {a['check']} |")
    for e in edge.errors:
        lines.append(f"\n**not built**: {e['problem']} (fix: {e['fix']})")
    return "\n".join(lines) + "\n"


def quantize_edge(cfg, splits, student_dir, out_dir, *, client=None, run_id: str | None = None) -> EdgeBuild:
    """The pipeline's quantize stage: seeded calibration sample, validation goal, edge folder, records.

    Called from the flow (its artifacts are Prefect tasks); logs the trials and edge.json to MLflow and a
    markdown artifact to the Prefect UI.
    """
    import tempfile

    from prefect.artifacts import create_markdown_artifact
    from prefect.logging import get_run_logger

    train, val = splits["train"], splits["validation"]
    calib = train.sample(min(cfg.quantize.calibration_samples, len(train)), random_state=cfg.seed)["text"].tolist()
    label_id = {label: i for i, label in enumerate(splits.labels)}
    val_texts = val["text"].tolist()
    edge = quantize_stage(student_dir, out_dir, calibration_texts=calib, val_texts=val_texts,
                          val_label_ids=val["label"].map(label_id).to_numpy(), heldout_texts=val_texts,
                          qcfg=cfg.quantize, max_length=cfg.runtime.max_length, seed=cfg.seed,
                          min_agreement=cfg.evaluate.min_edge_agreement, log=get_run_logger().info)
    md = tuning_markdown(edge)
    create_markdown_artifact(key=f"{cfg.name}-quantization", markdown=md,
                             description=f"INC autotune trials and edge artifacts of {cfg.name}")
    if client is not None:
        for t in (edge.tuning or {}).get("trials", []):
            client.log_metric(run_id, "quantize.trial_accuracy", t["metric"], step=t["index"])
        for name, a in edge.artifacts.items():
            client.log_metric(run_id, f"edge.{name}.size_bytes", a["size_bytes"])
            client.log_metric(run_id, f"edge.{name}.argmax_agreement", a["parity"]["argmax_agreement"])
        client.set_tag(run_id, "edge.primary", edge.primary)
        client.set_tag(run_id, "edge.quantized", str(edge.quantized).lower())
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "quantization.md").write_text(md)
            shutil.copy2(edge.path / EDGE_FILE, Path(tmp) / EDGE_FILE)
            client.log_artifacts(run_id, tmp, "quantization")
    return edge


@task(name="quantize-int8", cache_policy=NO_CACHE)
def autotune_task(student_dir, calibration_texts, val_texts, val_label_ids, heldout_texts, out_dir, **kwargs):
    """INC accuracy-aware autotune (never retried: a failure is deterministic)."""
    from prefect.logging import get_run_logger

    return autotune_int8(student_dir, calibration_texts, val_texts, val_label_ids, heldout_texts, out_dir,
                         log=get_run_logger().info, **kwargs)


@task(name="export-onnx", cache_policy=NO_CACHE)
def export_onnx_task(student_dir, out_dir, *, heldout_texts, max_length: int = 128) -> OnnxResult:
    """Export the fp32 student to ONNX and measure ONNX Runtime parity (never retried: deterministic)."""
    return export_onnx(student_dir, out_dir, heldout_texts=heldout_texts, max_length=max_length)


@task(name="quantize-onnx-int8", cache_policy=NO_CACHE)
def quantize_onnx_task(onnx_dir, out_dir, **kwargs) -> OnnxResult:
    """ONNX Runtime INT8 of the fp32 ONNX student (never retried: deterministic)."""
    return quantize_onnx_int8(onnx_dir, out_dir, **kwargs)
