"""INT8 of the student with Intel Neural Compressor (PT2E): accuracy-aware autotune over named candidate configs,
the winner saved as a self-contained model.pt2 folder whose logits are compared with the fp32 student's."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from distill_gap.edge.checks import accuracy, check_student, logit_parity, stage_error
from distill_gap.edge.folder import copy_model_files, replace_dir
from distill_gap.errors import DistillError
from distill_gap.inference.batching import classifier_head
from distill_gap.inference.inc_int8 import INT8_FILE, INT8_META, encode
from distill_gap.inference.predictor import load_predictor


# Candidate INC configurations, tried in this order by autotune. Weights are per-channel throughout: INC's
# per-tensor default for dynamic lost ~10 points of argmax agreement on MiniLM-L6. The fp32 fallbacks keep the
# layers most sensitive in BERT (the classification head, then the FFN output projections) in fp32, found in each
# student's exported graph (fp32_fallbacks), so they hold for every encoder family.
CANDIDATES = ("static", "static-kl", "static-sym", "dynamic", "static-fp32-head", "static-fp32-ffn-out")


@dataclass
class Int8Result:
    path: Path  # folder: model.pt2 + int8_meta.json + config and tokenizer files
    approach: str  # the CANDIDATES entry it was built from
    calibration_examples: int  # texts whose activation ranges set the static scales (0 for dynamic)
    size_bytes: int
    digest: str
    parity: dict  # {"max_abs_logit_diff", "argmax_agreement", "n", "finite"} vs the fp32 student
    seconds: float
    tuning: "Tuning | None" = None  # every autotune trial


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


def _outputs_module(model):
    """An nn.Module returning (logits (B, C), pooled features (B, D)) from (input_ids, attention_mask,
    token_type_ids), and the hook to remove once it is exported.

    The features are the input of the final Linear (classifier_head: BERT's pooler tanh output), caught by a
    forward pre-hook on it while torch.export traces the module: the saved program has both as outputs.
    """
    import inspect

    import torch

    accepted = set(inspect.signature(model.forward).parameters)
    seen: list = []  # the head's input, appended by the hook during forward (not a module attribute: no buffer)

    class LogitsAndFeatures(torch.nn.Module):
        def __init__(self, classifier):
            super().__init__()
            self.model = classifier  # module names in the graph: model.bert.encoder.layer.0..., model.classifier

        def forward(self, input_ids, attention_mask, token_type_ids):  # each (B, T) int64
            seen.clear()
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            logits = self.model(**{k: v for k, v in given.items() if k in accepted}, return_dict=False)[0]
            return logits, seen[-1]  # (B, C), (B, D) float32

    hook = classifier_head(model).register_forward_pre_hook(lambda _head, args: seen.append(args[0]))
    return LogitsAndFeatures(model).eval(), hook


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


FP32_FALLBACKS = {"static-fp32-head": "the classifier head (the Linear giving the logits and the Linear feeding it)",
                  "static-fp32-ffn-out": "the FFN output projections (Linears reading the intermediate width)"}


def _graph_linears(graph) -> list[tuple[str, int, int, object]]:
    """(module name, in_features, out_features, node) of every linear call in an exported graph, in graph order; the
    module name is the one INC's set_local matches (nn_module_stack: model.<path in the student>)."""
    import torch

    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        weight = getattr(node.args[1], "meta", {}).get("val")
        if stack and weight is not None and weight.dim() == 2:
            found.append((str(stack[-1][0]).removeprefix("L['self']."), int(weight.shape[1]), int(weight.shape[0]),
                          node))
    return found


def fp32_fallbacks(graph, config) -> dict[str, list[str]]:
    """The modules each fp32-fallback candidate keeps in fp32, found in the exported graph (not by module names).

    static-fp32-head: the last linear with config.num_labels outputs and the nearest linear upstream of it (BERT's
    pooler, DistilBERT's pre_classifier, RoBERTa's classifier.dense, ModernBERT's head.dense).
    static-fp32-ffn-out: the linears whose input is the intermediate width (intermediate_size; DistilBERT
    hidden_dim). A candidate with nothing to keep is absent.
    """
    linears = _graph_linears(graph)
    by_node = {node: name for name, _, _, node in linears}
    heads = [(name, node) for name, _, out, node in linears if out == int(config.num_labels)]
    out: dict[str, list[str]] = {}
    if heads:
        head, node = heads[-1]
        out["static-fp32-head"] = [head]
        frontier, seen = list(node.args[:1]), set()
        while frontier:  # breadth first from the head's input back to the nearest linear
            n = frontier.pop(0)
            if n in seen or not hasattr(n, "all_input_nodes"):
                continue
            seen.add(n)
            if n in by_node:
                out["static-fp32-head"].append(by_node[n])
                break
            frontier.extend(n.all_input_nodes)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
    ffn_out = [name for name, fan_in, _, _ in linears if inter and fan_in == inter and name not in out.get(
        "static-fp32-head", [])]
    if ffn_out:
        out["static-fp32-ffn-out"] = ffn_out
    return out


def inc_config(name: str, fallbacks: dict[str, list[str]] | None = None, *, family: str = "this"):
    """The INC config object of a named candidate (a fresh object each call); `fallbacks`: fp32_fallbacks' modules.

    A fallback candidate with no modules found in the graph is refused: INC would ignore it and quantize all.
    """
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig

    if name not in CANDIDATES:
        raise DistillError(f"unknown quantization candidate {name!r}", f"use one of {list(CANDIDATES)}")
    if name == "dynamic":
        return DynamicQuantConfig(w_granularity="per_channel")
    config = StaticQuantConfig(act_algo="kl" if name == "static-kl" else "minmax", act_sym=name == "static-sym")
    if name in FP32_FALLBACKS and not (fallbacks or {}).get(name):
        raise DistillError(f"quantize-int8: candidate {name} keeps {FP32_FALLBACKS[name]} in fp32, and the {family} "
                           "student's exported graph has none", f"remove {name} from quantize.candidates")
    for op in (fallbacks or {}).get(name, []) if name in FP32_FALLBACKS else []:
        config.set_local(op, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    return config


def _config_record(name: str, config) -> dict:
    d = config.to_dict()
    return {"name": name, "inc": json.loads(json.dumps(d, default=str))}


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
    module, hook = _outputs_module(student)
    batch, seq = Dim("batch", min=1), Dim("seq", min=2, max=max_length)
    dynamic_shapes = ({0: batch, 1: seq},) * 3
    example = encode(tokenizer, ["example input", "a second, longer example input"], max_length, pad_to_max=True)
    # What INC's export() does (strict torch.export, then non-strict), but keeping the exception: INC logs it and
    # raises "check the logs above", which names no operator.
    errors = []
    graph = None
    try:
        for strict in (True, False):
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    # the hook's append to `seen` is the one side effect, and meant: dynamo warns of it
                    warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
                    graph = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=strict).module()
                break
            except Exception as err:  # torch.export raises many types (Unsupported, UserError, guard failures)
                errors.append(err)
    finally:
        hook.remove()
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
    copy_model_files(root, tmp)
    meta = {"format": "torch.export pt2 (PT2E q/dq)", "source_digest": model_digest(root), "torch": torch.__version__,
            "neural_compressor": neural_compressor.__version__, **meta}
    (tmp / INT8_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    replace_dir(tmp, out)


def autotune_int8(student_dir, calibration_texts: list[str], val_texts: list[str], val_label_ids, heldout_texts,
                  out_dir, *, tolerable_loss: float = 0.01, max_trials: int = 6,
                  candidates: Sequence[str] = CANDIDATES, max_length: int = 128, batch_size: int = 32,
                  seed: int = 13, int8_embeddings: bool = True, reference: np.ndarray | None = None,
                  log=None) -> Int8Result:
    """Accuracy-aware INT8 with INC `autotune`: try `candidates` in order until one stays within
    `tolerable_loss` (relative) of the fp32 student's validation accuracy, then save that candidate.

    Every trial is recorded (`result.tuning`). When no candidate meets the goal, the best trial is still built and
    saved, and `tuning.met` is False: the caller marks the edge model as failing the quantization gate.
    Parity is measured on the saved artifact against `reference`, the fp32 student's logits on `heldout_texts`
    (computed here when not given). One candidate (`candidates=[name]`) builds that configuration.
    """
    import torch
    from neural_compressor.common.base_tuning import TuningConfig
    from neural_compressor.torch.quantization import autotune

    from distill_gap.digest import folder_bytes, model_digest

    # 1. the inputs
    start = time.perf_counter()
    log = log or (lambda *a: None)
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown or not candidates:
        raise DistillError(f"quantize.candidates {list(candidates)} has unknown or no entries {unknown}",
                           f"choose from {list(CANDIDATES)}")
    if not 0 <= tolerable_loss < 1:
        raise DistillError(f"tolerable_loss={tolerable_loss} is not a relative loss in [0, 1)",
                           "set quantize.tolerable_loss to e.g. 0.01 (1%)")
    root = check_student(student_dir, heldout_texts, max_length)
    label_ids = np.asarray(val_label_ids)
    if len(val_texts) == 0 or len(label_ids) != len(val_texts):
        raise DistillError(f"autotune needs labelled validation texts; got {len(val_texts)} texts and "
                           f"{len(label_ids)} labels", "pass the validation split's texts and label ids")
    needs_calibration = any(c != "dynamic" for c in candidates)
    if needs_calibration and len(calibration_texts) == 0:
        raise DistillError("static INT8 candidates need calibration texts and got none",
                           "pass training texts as calibration_texts, or use quantize.candidates=[dynamic]")
    # 2. the fp32 student: the parity reference and the accuracy baseline
    torch.manual_seed(seed)
    fp32 = load_predictor(root, runtime="transformers", max_length=max_length)
    student, tokenizer, labels = fp32.model, fp32.tokenizer, fp32.labels
    if reference is None:
        reference = fp32.predict_logits(heldout_texts, batch_size=batch_size)
    # the quantize stage measures parity on the validation texts: their logits give the baseline too
    same_texts = [str(t) for t in heldout_texts] == [str(t) for t in val_texts]
    baseline = accuracy(reference if same_texts else fp32.predict_logits(val_texts, batch_size=batch_size), label_ids)
    goal = baseline * (1 - tolerable_loss)
    # 3. INC autotune over the candidates, every trial recorded by eval_fn
    family = student.config.model_type
    graph, example, dyn = _export_graph(student, tokenizer, max_length=max_length, int8_embeddings=int8_embeddings)
    fallbacks = fp32_fallbacks(graph, student.config)  # the fp32 modules of each fallback candidate, from the graph
    configs = [(name, inc_config(name, fallbacks, family=family)) for name in candidates]
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
            for i in range(0, len(val_texts), batch_size):  # the graph returns (logits, features)
                batch = encode(tokenizer, val_texts[i:i + batch_size], max_length)
                logits[i:i + batch_size] = model(*batch)[0].float().numpy()
        metric = accuracy(logits, label_ids) if np.isfinite(logits).all() else 0.0
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
    # 4. the chosen candidate built with folded int8 weights, saved, reloaded from disk for parity
    config = inc_config(best["name"], fallbacks, family=family)
    static = best["name"] != "dynamic"
    texts = calib if static else ["example input"]
    try:
        program = _convert_folded(graph, config, tokenizer, texts, example, dyn, max_length=max_length,
                                  batch_size=batch_size)
    except Exception as err:
        raise stage_error(f"quantize-int8: INC {best['name']}", err, "remove that candidate from quantize.candidates") from err
    out = Path(out_dir)
    _save_int8(program, root, out, {"approach": best["name"], "config": _config_record(best["name"], config),
                                    "labels": labels, "max_length": max_length, "outputs": ["logits", "features"],
                                    "calibration_examples": len(texts) if static else 0,
                                    "int8_embeddings": int8_embeddings, "tuning": tuning.to_dict()})
    candidate = load_predictor(out, runtime="torch-pt2").predict_logits(heldout_texts, batch_size=batch_size)
    result = Int8Result(path=out, approach=best["name"], calibration_examples=len(texts) if static else 0,
                        size_bytes=folder_bytes(out), digest=model_digest(out),
                        parity=logit_parity(reference, candidate), seconds=time.perf_counter() - start)
    result.tuning = tuning
    return result


