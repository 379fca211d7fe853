"""The config sections that shape the student (distill.student, distill.vocab, distill.prune, distill.augment):
what it is built from, what is cut from it, and what extra text it learns from. Part of flows/config.py's schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from flows.config_section import Section


class StudentConfig(Section):
    """How the student is built: from teacher layers, a fresh smaller config, or a pretrained folder."""

    kind: Literal["layers", "config", "pretrained"] = "layers"
    every: int | None = Field(None, ge=1)  # kind layers: every k-th teacher layer instead of distill.student_layers
    num_layers: int = Field(2, ge=1)  # kind config
    hidden_size: int = Field(128, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(512, ge=1)
    path: str | None = None  # kind pretrained: a local model folder sharing the teacher's tokenizer

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "StudentConfig":
        if self.kind == "config" and self.hidden_size % self.num_heads:
            raise ValueError(f"distill.student.hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}: pick num_heads dividing it (e.g. "
                             f"{next(h for h in (8, 6, 4, 3, 2, 1) if self.hidden_size % h == 0)})")
        return self


class VocabConfig(Section):
    """Vocabulary trimming of the trained student (distill_gap/kd/vocab.py): keep the word pieces the training
    texts use, every special and single-character piece, and the teacher's lowest ids up to `min_tokens`; the
    embedding table shrinks with it. WordPiece tokenizers only."""

    trim: bool = False
    min_tokens: int = Field(0, ge=0)  # floor: at least this many tokens (0: only what the domain needs)


class PruneConfig(Section):
    """Structured pruning of the student before distillation (distill_gap/kd/pruning.py): in every layer this share
    of the least important attention heads and FFN neurons is removed (the dense shapes shrink), and distillation
    then recovers. BERT-style students only."""

    heads: float = Field(0.0, ge=0, lt=1)
    ffn: float = Field(0.0, ge=0, lt=1)
    # share of the residual width removed (384 -> 256 at 0.33 with 32-wide heads; the width left is rounded down to
    # whole heads): a narrower student initialised from its most important dimensions and heads, not a fresh one.
    # It may sit on the majority class for a few epochs before it moves: give it distill.patience to get there
    hidden: float = Field(0.0, ge=0, lt=1)
    sample: int = Field(512, ge=1)  # training texts the importance is measured on (the first ones, in split order)

    @model_validator(mode="after")
    def _width_keeps_whole_layers(self) -> "PruneConfig":
        if self.hidden and self.heads:
            raise ValueError("distill.prune.hidden and distill.prune.heads are both set: a narrower stream keeps as "
                             "many heads as its width holds; set distill.prune.heads to 0")
        return self


class AugmentConfig(Section):
    """Teacher-labelled augmentation (distill_gap/kd/augment.py): extra training texts that only the teacher labels,
    through the soft-label store under their own key, learned with the KD term only (no hard label). Seeded edits of
    the training texts (`copies` per text, one method per copy in turn) and/or unlabelled in-domain texts from a file.
    A text equal to any row of any split is dropped, so nothing of validation or test leaks in."""

    copies: int = Field(0, ge=0, le=20)  # edited copies per training text (0: none)
    methods: list[Literal["delete", "swap", "crop"]] = Field(
        default_factory=lambda: ["delete", "swap", "crop"], min_length=1)
    rate: float = Field(0.15, gt=0, lt=0.5)  # share of a text's words each edit drops, swaps or crops
    unlabelled: str | None = None  # CSV / JSONL / Parquet path or s3:// URI of in-domain texts without labels
    text_column: str = "text"  # of `unlabelled`
    max_unlabelled: int = Field(20000, ge=1)  # seeded sample when the file holds more


class RedistillConfig(Section):
    """What a redistillation learns from production (issue 22; distill_gap/kd/production.py): the rows of a production
    sample (a drift event's: the triggered run gets them as `production` of distill-pipeline-from-file) and the
    answers `distill feedback add` stored. The pinned teacher labels them under their own soft-label key, beside
    distill.augment's rows; a row a person answered also gets that answer as its hard label. Rows equal to a row of
    any split are dropped; the rest pass the data validation suite before anything is labelled."""

    production: str | None = None  # a JSONL file, a folder of them or an s3:// prefix of production rows
    production_digest: str | None = None  # the drift event's sha256 of those rows: changed or gone rows are an error
    feedback: bool = False  # also learn from the answers in feedback.store
    max_rows: int = Field(5000, ge=1)  # seeded sample beyond this (answered rows first)
    weight: float = Field(1.0, gt=0)  # loss weight of these rows, relative to a training row
    # this share of the rows a person answered is held out of training: the `production` suite, evaluated beside test
    # and gated like a critical slice (the edge model not shown worse than the teacher there: evidence before scope)
    holdout_fraction: float = Field(0.5, ge=0, lt=1)

    @property
    def active(self) -> bool:
        """A redistillation: the candidate is also evaluated beside the champion it would replace (vs_champion gates)."""
        return bool(self.production or self.feedback)


class SweepCandidate(Section):
    """One rung of the size sweep: a name and the keys of the distill section it changes (a nested mapping merged
    over distill, e.g. {student: {kind: config, hidden_size: 256}, vocab: {trim: true}})."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")  # MLflow run and Prefect task run names
    distill: dict[str, Any] = Field(default_factory=dict)
    # keys of the quantize section it changes (e.g. {onnx_embedding_bits: 8}): the candidate is quantized and judged
    # with them, and when it is chosen the quantize stage uses them, so the artifact judged is the one that ships
    quantize: dict[str, Any] = Field(default_factory=dict)


class SweepConfig(Section):
    """The size sweep (issue 21; tasks/sweep.py): with `enabled`, the distill stage trains every candidate on the one
    set of soft labels (each its own Prefect task and nested MLflow run), quantizes and evaluates each as the
    quantize and evaluate stages will, judges that artifact by every release gate (non-inferiority against the
    teacher, edge vs student, OOD, calibration, stress, quantization), and the smallest (edge bytes) with no failed
    gate goes on; one whose every gate passed wins over one with thinner evidence. None holds: the run stops, nothing is registered,
    the candidates' runs keep the evidence. Candidates run one at a time here, or on Dask (as soft_labels does)."""

    enabled: bool = False
    candidates: list[SweepCandidate] = Field(default_factory=list)
    task_runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None  # a running scheduler (tcp://host:8786); else a LocalCluster of dask_workers
    dask_workers: int = Field(2, ge=1)

    def resolve(self, distill, quantize) -> list[tuple[str, Any, Any]]:
        """(name, its distill section, its quantize section) for every candidate, each validated like the section
        itself; a bad candidate raises ValueError naming it and the key."""
        from pydantic import ValidationError

        if self.enabled and not self.candidates:
            raise ValueError("sweep.enabled needs sweep.candidates: a list of {name, distill: {changes}}")
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep.candidates names must differ: {names}")
        out = []
        for c in self.candidates:
            if "augment" in c.distill:
                raise ValueError(f"sweep candidate {c.name!r} sets distill.augment: the candidates share one set of "
                                 "soft labels; set distill.augment for all of them, outside sweep.candidates")
            sections = []
            for section, base, change in (("distill", distill, c.distill), ("quantize", quantize, c.quantize)):
                try:
                    sections.append(type(base).model_validate(_merged(base.model_dump(), change)))
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    msg = "unknown key" if first["type"] == "extra_forbidden" else \
                        first["msg"].removeprefix("Value error, ")
                    raise ValueError(f"sweep candidate {c.name!r}: {section}{'.' + where if where else ''}: "
                                     f"{msg}") from None
            out.append((c.name, *sections))
        return out


def _merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
