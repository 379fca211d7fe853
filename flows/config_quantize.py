"""The quantize section of flows/config.py's schema: which INT8 artifacts the quantize stage builds (tasks/quantize.py),
how each is checked against the fp32 student, and which one is the edge model's primary."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from flows.config_section import Section


class QuantizeConfig(Section):
    """The quantize stage: INC INT8 and/or ONNX Runtime INT8, each checked against the fp32 student."""

    # INC accuracy-aware autotune: candidates tried in order until one keeps validation accuracy within
    # tolerable_loss (relative) of the fp32 student; names from distill_gap.edge.inc_quantization.CANDIDATES
    candidates: list[Literal["static", "static-kl", "static-sym", "dynamic", "static-fp32-head",
                             "static-fp32-ffn-out"]] = Field(
        default_factory=lambda: ["static", "static-kl", "static-sym", "dynamic", "static-fp32-head",
                                 "static-fp32-ffn-out"], min_length=1)
    tolerable_loss: float = Field(0.01, ge=0, lt=1)  # relative to the fp32 student's validation accuracy
    max_trials: int = Field(6, ge=1)
    calibration_samples: int = Field(128, ge=1)  # seeded sample of the training split
    # the accuracy goal is decided on enough rows that one row cannot flip it (issue 19): an artifact must agree with
    # the fp32 student (argmax) on at least evaluate.min_edge_agreement of this many training texts (unlabelled use:
    # no labels needed, disjoint from the calibration sample), and must not be shown (one-sided 95% bound, paired
    # rows) to lose more than tolerable_loss of the student's validation accuracy
    agreement_samples: int = Field(1000, ge=1)
    # INC INT8 (torch.export + accuracy-aware autotune over `candidates`); false: ONNX Runtime INT8 only (onnx_int8),
    # which skips torch.export and INC's convert (a tiny `distill run`: 30 -> 24 CPU-s; the demo's primary is onnx-int8)
    inc: bool = True
    onnx: bool = True  # keep the fp32 student exported to ONNX (optimum) in the edge folder
    onnx_int8: bool = True  # ONNX Runtime INT8 (int8 MatMuls with static activation scales + 4-bit embeddings)
    onnx_embedding_bits: Literal[4, 8] = 4
    # which INT8 artifact is the edge model's primary when several pass: auto = onnx-int8 (fastest, smallest and
    # leanest measured on the demo, benchmarks/RESULTS.md) then int8 (INC, torch.compile); or a list "int8,onnx-int8"
    primary: str = Field("auto", pattern=r"^(auto|(int8|onnx-int8)(,(int8|onnx-int8))*)$")
    require_int8: bool = True  # gate: an fp32-only edge model (quantization impossible) is never promoted
    # every artifact: a held-out row's softmax probabilities alone vs in a batch of 32 may differ by at most this,
    # or it cannot be primary (one patient's result must not depend on another's; per-batch activation scales fail)
    max_batch_prob_diff: float = Field(1e-5, ge=0, le=1)

    @model_validator(mode="after")
    def _some_int8_when_required(self) -> "QuantizeConfig":
        if self.require_int8 and not (self.inc or self.onnx_int8):
            raise ValueError("quantize.inc and quantize.onnx_int8 are both false: no INT8 artifact would be built and "
                             "the quantization gate (require_int8) would fail every run; set one of them true, or "
                             "require_int8: false for an fp32 edge model")
        return self
