"""PipelineConfig: the one pydantic schema of a run, loaded from YAML, overridable with --set.

Unknown keys fail loudly and name the nearest valid key. The config digest (sha256 of the
canonical JSON of the validated config) is recorded with every run and registry version.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from distill_gap.digest import sha256_json
from distill_gap.errors import DistillError


from flows.config_quantize import QuantizeConfig
from flows.config_section import Section as _Section
from flows.config_student import (AugmentConfig, PruneConfig, RedistillConfig, StudentConfig, SweepConfig,
                                  VocabConfig)


class HoldoutConfig(_Section):
    """Rows whose `column` is in `values` leave every split and form an OOD set (a real domain shift)."""

    name: str = "held_out"
    column: str
    values: list[str] = Field(min_length=1)


class DataConfig(_Section):
    train: str  # path, s3:// URI, or builtin:drugreview/train
    validation: str | None = None  # None: a seeded stratified split of train
    test: str | None = None  # None: a seeded stratified split of train
    ood: dict[str, str] = Field(default_factory=dict)  # name -> path of an extra OOD set
    format: Literal["csv", "tsv", "parquet", "jsonl"] | None = None  # None: from the extension
    text_column: str = "text"
    label_column: str = "label"
    id_column: str | None = None  # None: ids are "<file stem>:<row number>"
    labels: list[str] = Field(min_length=2)  # the label set, in the order of the logits
    slice_columns: list[str] = Field(default_factory=list)
    critical_slices: dict[str, list[str]] = Field(default_factory=dict)  # column -> values that matter most
    holdout: HoldoutConfig | None = None
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    # share of the test split moved into validation (seeded, stratified) as well: rows for the fits validation feeds
    # (temperature, scope threshold, INT8 goal) that cost no training row; 0 = validation comes from train only
    validation_from_test: float = Field(0.0, ge=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    max_rows: int | None = Field(None, gt=0)  # per-split cap (stratified sample) for quick runs

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.validation and self.validation_from_test:
            raise ValueError(f"data.validation names a file ({self.validation}) and data.validation_from_test is "
                             f"{self.validation_from_test}: the validation rows come from one place; drop one of them")
        if self.validation_from_test and not self.test:
            raise ValueError("data.validation_from_test moves rows of the test split, and data.test names no file "
                             "(the test split is cut from train): set data.validation_fraction instead")
        return self

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"labels must be unique, got {v}")
        return v


class ScratchModelConfig(_Section):
    """A BERT built from a config with a WordPiece tokenizer trained on the training texts."""

    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 64
    vocab_size: int = 600


class TeacherConfig(_Section):
    """The teacher: where the pipeline finds it (alias, version) and how `distill teacher bootstrap` fine-tunes it
    (plain cross-entropy; the rest of the recipe is fixed in distill_gap/kd/teacher.py)."""

    base: str = "builtin:all-MiniLM-L6-v2"  # HF model folder, builtin:all-MiniLM-L6-v2 or scratch
    scratch: ScratchModelConfig = Field(default_factory=ScratchModelConfig)
    license: str = "apache-2.0"  # recorded on the registered teacher
    alias: str = "pinned"  # registry alias the pipeline distills from
    version: int | None = None  # pin an exact registry version instead of the alias
    epochs: int = Field(4, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)


class SoftLabelConfig(_Section):
    store: str = "file://.distill/soft-labels"  # or s3://bucket/prefix (AWS_* env, AWS_ENDPOINT_URL)
    batch_size: int = Field(8, ge=1)  # length-sorted teacher batches; 8 is fastest for ORT on 2 CPU cores
    shard_size: int = Field(256, ge=1)  # examples per Parquet shard (one mapped Prefect task each)
    dtype: Literal["float16", "float32"] = "float16"
    top_k: int | None = Field(None, ge=1)  # store only the k largest logits + log-sum-exp of the rest (large label spaces)
    # Teacher runtime for labelling. onnxruntime: the teacher exported once per digest (~11 s for the demo
    # teacher), then ~10% faster than torch on 2 CPU cores; pays off when one teacher labels repeatedly.
    # auto = onnxruntime on CPU, torch on CUDA.
    engine: Literal["auto", "torch", "onnxruntime"] = "torch"
    # Where the shard tasks run: local = one after another in this process; dask = a Dask cluster
    # (prefect-dask), a LocalCluster of dask_workers processes unless dask_address names a scheduler.
    task_runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None  # e.g. tcp://scheduler:8786; the teacher folder must be readable there
    dask_workers: int = Field(2, ge=1)  # LocalCluster processes (runtime.threads are split between them)
    # seconds before each retry of a store call that failed (S3 down, throttled): [5, 15] rides out ~20 s of outage
    retry_delays: list[float] = Field(default_factory=lambda: [5.0, 15.0], max_length=10)


class DistillConfig(_Section):
    """The distill stage (tasks/distill.py) builds the student, its loss and the training loop's arguments from this
    section: these defaults are the only ones (the loss and the loop take every knob as an argument)."""

    # --- the student (distill_gap.kd.students.build_student)
    student: StudentConfig = Field(default_factory=lambda: StudentConfig())
    student_layers: list[int] = Field(default_factory=lambda: [0, 5], min_length=1)  # kind layers: teacher layers kept
    # --- the loss: alpha * CE(hard labels) + (1 - alpha) * T^2 * divergence(teacher_T, student_T)
    temperature: float = Field(2.0, gt=0)  # softens both distributions in the KD term
    alpha: float = Field(0.5, ge=0, le=1)  # weight of hard-label CE (at the start when alpha_schedule is set)
    alpha_end: float | None = Field(None, ge=0, le=1)  # with alpha_schedule linear/cosine: alpha at the last step
    alpha_schedule: Literal["constant", "linear", "cosine"] = "constant"
    divergence: Literal["forward_kl", "reverse_kl", "js"] = "forward_kl"
    hidden_loss: Literal["none", "mse", "cosine"] = "none"  # match hidden states (teacher runs online)
    hidden_weight: float = Field(1.0, ge=0)
    layer_map: list[tuple[int, int]] | None = None  # (student, teacher) hidden-state indices, 0 = embeddings
    attention_loss: bool = False  # TinyBERT-style attention-map KL on the layer_map pairs (heads must match)
    attention_weight: float = Field(1.0, ge=0)
    # --- rare-case emphasis: per-example weights of both loss terms
    critical_weight: float = Field(1.0, ge=1)  # weight of training rows in data.critical_slices
    uncertainty_weight: float = Field(0.0, ge=0)  # + this * (1 - teacher max probability) per row
    # --- optimisation
    epochs: int = Field(8, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_schedule: Literal["linear", "cosine"] = "linear"  # after warmup
    batch_size: int = Field(16, ge=1)
    grad_accumulation: int = Field(1, ge=1)  # optimizer step every n batches
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    patience: int = Field(3, ge=1)  # epochs without validation improvement before stopping
    # validation metric for the best checkpoint; balanced_accuracy: the mean of the per-class recalls
    select_metric: Literal["accuracy", "balanced_accuracy", "fidelity"] = "accuracy"
    # the student's own seed (its initialisation, batch order, dropout, projections); None: the run's `seed`. Set it
    # (in a sweep candidate too) to measure a recipe's spread over seeds on the same splits and soft labels
    seed: int | None = Field(None, ge=0)
    baseline: bool = False  # also train the same student on hard labels only and report it beside the KD student
    freeze_embeddings: bool = False  # keep the student's word embeddings fixed (the teacher's, for kind layers):
    # AdamW then skips ~12M of MiniLM's 15.6M student parameters, a faster step on small data
    vocab: VocabConfig = Field(default_factory=lambda: VocabConfig())  # trim the student's vocabulary after training
    prune: PruneConfig = Field(default_factory=lambda: PruneConfig())  # heads / FFN neurons removed before training
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig())  # teacher-labelled extra texts (KD only)

    @model_validator(mode="after")
    def _schedule_needs_end(self) -> "DistillConfig":
        if self.alpha_schedule != "constant" and self.alpha_end is None:
            raise ValueError(f"distill.alpha_schedule {self.alpha_schedule!r} needs distill.alpha_end (alpha at the "
                             "last step)")
        if (self.augment.copies or self.augment.unlabelled) and self.alpha == 1 and self.alpha_end in (None, 1):
            raise ValueError("distill.augment rows have no hard label and learn from the KD term only, which "
                             "distill.alpha 1 switches off: lower distill.alpha (e.g. 0.5) or set augment.copies 0")
        if (self.prune.heads or self.prune.hidden) and self.attention_loss:
            raise ValueError("distill.attention_loss matches attention maps head by head, which distill.prune."
                             f"{'heads' if self.prune.heads else 'hidden'} removes: set one of them off")
        return self


class MarginsConfig(_Section):
    """Non-inferiority margins (distill_gap/evaluation/noninferiority.py): how much worse than the teacher, on the
    same rows, a compressed model may be shown to be at most (upper bound of the one-sided 95% interval)."""

    aggregate: float = Field(0.03, ge=0, le=1)  # relative: 3% of the teacher's test accuracy
    critical_slice: float = Field(0.03, ge=0, le=1)  # accuracy points on each of data.critical_slices
    class_recall: float = Field(0.05, ge=0, le=1)  # recall points on each class
    # the teacher against always answering the training split's most frequent class, same rows: 0 = the teacher
    # must be shown better (a teacher that collapsed onto one class passes every comparison with itself)
    teacher_vs_majority: float = Field(0.0, ge=0, le=1)


class EvaluateConfig(_Section):
    batch_size: int = Field(32, ge=1)
    gap_threshold: float = Field(0.02, ge=0, le=1)  # accuracy loss vs teacher that is flagged
    bootstrap_samples: int = Field(1000, ge=0)  # resamples per suite and model for the 95% intervals (0: none)
    stress_rows: int = Field(200, ge=0)  # seeded sample of test rows for the stress suites (0: no stress suites)
    # gates (each with its evidence in the verdict; a failed gate never moves @champion)
    max_edge_drop: float = Field(0.01, ge=0, le=1)  # edge test accuracy at most this far below the fp32 student
    min_edge_agreement: float = Field(0.95, ge=0, le=1)  # share of held-out argmax equal to the fp32 student
    max_ece: float = Field(0.05, ge=0, le=1)  # edge ECE on test after temperature scaling
    # edge MSP AUROC at least the teacher's minus this, unless the drop's paired 95% interval still holds 0
    max_ood_auroc_drop: float = Field(0.03, ge=0, le=1)
    max_flip_rate_increase: float = Field(0.05, ge=0, le=1)  # edge stress flip rate at most the teacher's + this
    margins: MarginsConfig = Field(default_factory=MarginsConfig)  # non-inferiority vs the teacher, paired rows
    teacher_floor: float = Field(0.5, ge=0, le=1)  # a class or slice where the teacher is below this: inherited


class ScopeConfig(_Section):
    """The scope guard the edge model ships with (distill_gap/edge/guard.py): which OOD detector, fitted how.
    Every detector is measured in the gap report; this one ships. The default was chosen on the demo's pinned
    teacher and every registered student against standard-library docstrings, by the worst case over those models
    (benchmarks/scope_selection.py), never on the OOD sets the shipped guard is scored on (benchmarks/scope.py,
    benchmarks/RESULTS.md "Scope guard"): Mahalanobis distance on the model's pooled features plus how usual the
    row's words are in the training sample, each standardised on validation. A narrow student's features alone let
    other text through (0.90 against the teacher's 1.00 there); the words do not depend on the student."""

    detector: Literal["msp", "energy", "mahalanobis", "knn", "lexical", "mahalanobis+lexical"] = "mahalanobis+lexical"
    tpr: float = Field(0.95, gt=0, le=1)  # the threshold keeps this share of validation rows in scope
    k: int = Field(10, ge=1)  # knn: cosine similarity to the k-th nearest training feature
    bank_size: int = Field(2000, ge=1)  # knn: training features kept in the edge folder (fp16)
    train_rows: int = Field(4000, ge=10)  # seeded sample of the training split the detectors are fitted on
    # a slice column whose values are regions: a row that names a region the model never trained on is out of scope
    # until a redistillation's held-out human answers there pass the critical-slice non-inferiority check
    region_column: str | None = None


class TrackingConfig(_Section):
    uri: str = "sqlite:///.distill/mlflow.db"  # MLFLOW_TRACKING_URI overrides
    artifact_location: str = ".distill/mlartifacts"  # for a new experiment on a local store
    experiment: str = "distill-gap"
    ui_url: str = "http://127.0.0.1:5000"  # where people open the MLflow UI (`distill ui`): links in Prefect artifacts


class GovernanceConfig(_Section):
    """Who owns the models, which teacher licences may be distilled, and the signing key."""

    owner: str = Field("ml-platform", min_length=1)  # `owner` tag on every registered model and version
    review_days: int = Field(90, ge=1)  # review cadence: versions carry review.due = registration date + this
    # licences (SPDX ids, case-insensitive) of teachers that may be distilled; a teacher with another licence is
    # refused unless license_override_reason says why (recorded on the run, the versions and the attestation)
    allowed_licenses: list[str] = Field(default_factory=lambda: ["apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause",
                                                                 "cc-by-4.0"])
    license_override_reason: str | None = None
    key_dir: str = ".distill/keys"  # local EC signing key pair, created on first use (DISTILL_KEY_DIR overrides)
    # what the edge model is for and what it must not do on its own: tags on every version, the dossier's first
    # section and the model card's "Uses" (issue 19)
    intended_use: str = Field("Classify texts like the training data into the configured labels, inside the scope "
                              "its guard was fitted on.", min_length=1)
    not_for: list[str] = Field(default_factory=lambda: [
        "answering rows its scope guard flags as out of scope: route them to the fallback (the teacher or a person)",
        "deciding on its own where a wrong answer can harm a person: a person reviews those decisions"])


class ApproverConfig(_Section):
    """A named approver with their own signing key: only they can sign a waiver of insufficient-evidence gates."""

    name: str = Field(min_length=1)
    public_key: str  # path to their EC public key (PEM), e.g. from `distill approver-key <name>`


class ApprovalConfig(_Section):
    """A named approver answers in the Prefect UI before @champion moves (gates must pass first), and only an
    approver with a public_key may sign a waiver of gates whose evidence is insufficient (`distill approve`)."""

    required: bool = False
    # who may approve; empty: anyone who names themselves (but nobody can sign a waiver)
    approvers: list[str | ApproverConfig] = Field(default_factory=list)

    @property
    def approver_names(self) -> list[str]:
        return [a if isinstance(a, str) else a.name for a in self.approvers]
    timeout_seconds: int = Field(3600, ge=1)  # no answer by then: the run fails and nothing is promoted
    poll_seconds: int = Field(5, ge=1)  # how often the paused run checks for the answer


class DriftConfig(_Section):
    """drift-monitor: production rows against the champion's reference profile (distill_gap.monitoring.drift). An effect must
    exceed its threshold AND its test be significant at p_value to count as drift."""

    max_psi: float = Field(0.2, ge=0)  # population stability index of the predicted labels
    max_js: float = Field(0.1, ge=0, le=1)  # Jensen-Shannon distance (base 2) of the predicted-label shares
    max_ks: float = Field(0.1, ge=0, le=1)  # KS statistic of a text statistic (length, words, digits, case, ASCII)
    max_out_of_scope_increase: float = Field(0.10, ge=0, le=1)  # share of rows beyond the scope threshold, absolute
    p_value: float = Field(0.01, gt=0, lt=1)  # text tests Holm-corrected across the statistics
    min_accuracy: float | None = Field(None, ge=0, le=1)  # labelled rows: overall / slice accuracy below this is drift
    min_slice_rows: int = Field(20, ge=1)
    min_rows: int = Field(50, ge=1)  # fewer production rows: too few to judge (a clear error, no event)
    sample_size: int = Field(2000, ge=10)  # production rows scored by the model (text statistics use every row)

    def thresholds(self):
        from distill_gap.monitoring.drift import DriftThresholds

        return DriftThresholds(**self.model_dump(exclude={"sample_size"}))


class FeedbackConfig(_Section):
    """Answers to the rows the edge model abstained on (distill_gap/monitoring/feedback.py): `distill feedback add`
    checks a file and stores it here, one create-only part per file; redistillation reads them."""

    store: str = "file://.distill/feedback"  # a folder or s3://bucket/prefix


class RuntimeConfig(_Section):
    max_length: int = Field(128, ge=8)  # tokens per example (part of the soft-label key)
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None: torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available


class PipelineConfig(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")  # registered models <name>-teacher|student|edge
    seed: int = 13
    data: DataConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    soft_labels: SoftLabelConfig = Field(default_factory=SoftLabelConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    scope: ScopeConfig = Field(default_factory=ScopeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig)
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    redistill: RedistillConfig = Field(default_factory=RedistillConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)  # the size sweep: a ladder of students (issue 21)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _layers_non_negative(self) -> "PipelineConfig":
        if any(i < 0 for i in self.distill.student_layers):
            raise ValueError("distill.student_layers must be teacher layer indices >= 0")
        unknown = sorted(set(self.data.critical_slices) - set(self.data.slice_columns))
        if unknown:
            raise ValueError(f"data.critical_slices names {unknown}, which are not in data.slice_columns "
                             f"{self.data.slice_columns}")
        columns = [*self.data.slice_columns, *([self.data.holdout.column] if self.data.holdout else [])]
        if self.scope.region_column is not None and self.scope.region_column not in columns:
            raise ValueError(f"scope.region_column {self.scope.region_column!r} is not one of data.slice_columns "
                             f"{columns}: add it there, or leave scope.region_column out")
        self.sweep.resolve(self.distill, self.quantize)  # a bad candidate fails at load, naming it
        return self

    def digest(self) -> str:
        return sha256_json(self.model_dump(mode="json"))

    @property
    def teacher_model_name(self) -> str:
        return f"{self.name}-teacher"

    @property
    def student_model_name(self) -> str:
        return f"{self.name}-student"

    @property
    def edge_model_name(self) -> str:
        return f"{self.name}-edge"


# ---------------------------------------------------------------------------------------------
# loading, overrides and readable errors


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                keys.extend(_valid_keys(cand, prefix + name + "."))
    return keys


def _nearest(key: str) -> str | None:
    keys = _valid_keys(PipelineConfig)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in keys if k.startswith(parent) and "." not in k[len(parent):]]
    match = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5) or difflib.get_close_matches(
        key, keys, n=1, cutoff=0.6
    )
    return match[0] if match else None


def _explain(err: ValidationError, source: str) -> DistillError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            near = _nearest(loc)
            hint = f" (did you mean '{near}'?)" if near else ""
            lines.append(f"unknown key '{loc}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{loc}'")
        else:  # a section's own check (loc ''): its message names the keys, the input would be the whole config
            lines.append(f"'{loc}': {e['msg']} (got {e.get('input')!r})" if loc else e["msg"].removeprefix("Value error, "))
    return DistillError(
        f"invalid config {source}:\n    " + "\n    ".join(lines),
        "correct the keys above in the YAML file or the --set overrides",
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise DistillError(f"override '{item}' has no '='", "write overrides as --set section.key=value")
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise DistillError(f"override '{key}': '{p}' is not a section", "override a leaf key")
            node = node[p]
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise _explain(err, source) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config, apply --set overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"config file not found: {path}", "pass --config with an existing YAML file, e.g. configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DistillError(f"config {path} is not valid YAML: {err}", "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise DistillError(f"config {path} must be a mapping at the top level", "see configs/demo.yaml")
    return config_from_dict(apply_overrides(raw, list(overrides or [])), str(path))
