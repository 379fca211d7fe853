"""Student builders: a slice of the teacher's layers, a fresh smaller config, or a pretrained model.

Every builder returns a sequence classifier whose logits follow the teacher's label order and whose
inputs come from the teacher's tokenizer, so cached soft labels stay valid for any student.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from distill_gap.errors import DistillError

# Encoder layer containers of the architectures we can slice: <base>.encoder.layer.N (BERT, RoBERTa, XLM-RoBERTa,
# DeBERTa-v2), <base>.transformer.layer.N (DistilBERT), <base>.layers.N (ModernBERT).
_LAYER_KEY = re.compile(r"^(?P<pre>.*\.(?:(?:encoder|transformer)\.layer|layers)\.)(?P<idx>\d+)(?P<post>\..*)$")
_SLICE_FAMILIES = "BERT, RoBERTa, XLM-RoBERTa, DeBERTa-v2, DistilBERT, ModernBERT"
STUDENT_KINDS = ("layers", "config", "pretrained")
_SPEC_FIELDS = {
    "layers": ({"layers", "every"}, set()),  # (allowed, required); exactly one of layers/every
    "config": ({"num_layers", "hidden_size", "num_heads", "intermediate_size"},
               {"num_layers", "hidden_size", "num_heads", "intermediate_size"}),
    "pretrained": ({"path"}, {"path"}),
}
_LAYERS_FIX = "give distinct increasing layer indices such as [0, {last}], or every-k-th layer as {{'every': 2}}"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# Which teacher layers a student keeps


def _every_k(k, n_teacher_layers: int) -> list[int]:
    if not _is_int(k) or not 1 <= k <= n_teacher_layers:
        raise DistillError(f"every-k-th layer: k={k!r} is not an integer in 1..{n_teacher_layers} "
                           f"(the teacher has {n_teacher_layers} layers)",
                           f"pick k from 1..{n_teacher_layers}, e.g. {{'every': 2}}")
    layers = list(range(k - 1, n_teacher_layers, k))
    return layers if layers[-1] == n_teacher_layers - 1 else layers + [n_teacher_layers - 1]


def resolve_layers(spec, n_teacher_layers: int) -> list[int]:
    """Teacher layer indices a student keeps: an explicit list, or {"every": k}.

    Every k-th layer is k-1, 2k-1, ... and always the last layer (n=6, k=4 -> [3, 5]).
    """
    assert _is_int(n_teacher_layers) and n_teacher_layers >= 1, n_teacher_layers
    last = n_teacher_layers - 1
    if isinstance(spec, dict):
        if set(spec) != {"every"}:
            raise DistillError(f"student layers {spec!r}: a dict must be exactly {{'every': k}}",
                               _LAYERS_FIX.format(last=last))
        return _every_k(spec["every"], n_teacher_layers)
    if not isinstance(spec, (list, tuple)) or not spec:
        raise DistillError(f"student layers {spec!r} must be a non-empty list of teacher layer indices",
                           _LAYERS_FIX.format(last=last))
    where = f"student layers {list(spec)}"
    for i in spec:
        if not _is_int(i) or not 0 <= i <= last:
            raise DistillError(f"{where}: {i!r} is not a teacher layer; valid indices are 0..{last} "
                               f"(the teacher has {n_teacher_layers} layers)", _LAYERS_FIX.format(last=last))
    dupes = sorted({i for i in spec if list(spec).count(i) > 1})
    if dupes:
        raise DistillError(f"{where}: layer {dupes[0]} appears twice; layers must be distinct (0..{last})",
                           _LAYERS_FIX.format(last=last))
    if list(spec) != sorted(spec):
        # A student that runs layer 5 before layer 0 is almost surely a typo, not a design.
        raise DistillError(f"{where} are not in increasing order; the student runs them in list order",
                           f"sort them: {sorted(spec)}")
    return list(spec)


# ---------------------------------------------------------------------------------------------
# Builders


def _layer_indices(teacher) -> set[int]:
    return {int(m["idx"]) for key in teacher.state_dict() if (m := _LAYER_KEY.match(key))}


def _check_layer_kinds(config, layers: list[int]) -> None:
    """Refuse a slice that would change what a kept layer computes.

    ModernBERT decides per layer index: layer i attends globally when i % global_attn_every_n_layers == 0 (else
    within a local window, with another rotary base), and layer 0 alone has no attention LayerNorm. Teacher layer
    layers[j] becomes student layer j, so both must be of the same kind.
    """
    every = getattr(config, "global_attn_every_n_layers", None)
    if config.model_type != "modernbert" or not _is_int(every) or every < 1:
        return
    kind = lambda i: "global" if i % every == 0 else "local"  # noqa: E731
    wrong = [(j, old) for j, old in enumerate(layers) if kind(j) != kind(old)]
    if layers[0] != 0 or wrong:
        j, old = wrong[0] if wrong else (0, layers[0])
        why = (f"teacher layer {old} ({kind(old)} attention) would become student layer {j} ({kind(j)} attention)"
               if wrong else f"student layer 0 must be teacher layer 0 (the only layer without attention LayerNorm), "
                             f"not {old}")
        raise DistillError(f"distill: a student of kind 'layers' cannot slice this modernbert teacher as "
                           f"{layers}: {why}; layer i attends globally when i % {every} == 0",
                           f"keep layer 0 and put the teacher's global layers (multiples of {every}) at student "
                           f"positions that are multiples of {every}, e.g. "
                           f"{list(range(min(every, int(config.num_hidden_layers))))}, or use a student "
                           "of kind 'config'")


def student_from_layers(teacher, layers: list[int]):
    """A copy of `teacher` keeping only the encoder `layers` (DistilBERT-style init).

    Embeddings, pooler and classifier head are copied as they are; teacher layer layers[j] becomes
    student layer j.
    """
    family = teacher.config.model_type
    n_teacher = getattr(teacher.config, "num_hidden_layers", None)
    if not _is_int(n_teacher) or _layer_indices(teacher) != set(range(n_teacher)):
        raise DistillError(f"distill: a student of kind 'layers' cannot slice the layers of a {family} model "
                           f"(supported: {_SLICE_FAMILIES}, whose layers are encoder.layer.N, transformer.layer.N "
                           "or layers.N)", "use a student of kind 'config' or 'pretrained' for this teacher")
    layers = resolve_layers(layers, n_teacher)
    _check_layer_kinds(teacher.config, layers)
    student_cfg = copy.deepcopy(teacher.config)
    student_cfg.num_hidden_layers = len(layers)  # attribute_map turns this into n_layers for DistilBERT
    student = type(teacher)(student_cfg)
    new_of_old = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value.detach().clone()
        elif int(m["idx"]) in new_of_old:
            state[f"{m['pre']}{new_of_old[int(m['idx'])]}{m['post']}"] = value.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:  # a layer whose parameters depend on its index (e.g. ModernBERT's layer 0)
        raise DistillError(f"distill: a student of kind 'layers' on a {family} teacher with layers {layers}: the "
                           f"student's layers do not take the teacher's weights one to one (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})", "pick other layers, or use a student of kind 'config'")
    return student


def _intermediate_attr(config) -> str | None:
    cfg = config.to_dict()
    return "intermediate_size" if "intermediate_size" in cfg else "hidden_dim" if "hidden_dim" in cfg else None


def student_from_config(teacher, *, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int):
    """A fresh, randomly initialised model of the teacher's type with smaller dimensions.

    Vocabulary, max positions, label maps and pad token come from the teacher's config. When the
    width equals the teacher's, the teacher's embedding block is copied (word, position, token-type
    embeddings and their LayerNorm), so the student starts from the same input representation.
    """
    dims = {"num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads,
            "intermediate_size": intermediate_size}
    for name, value in dims.items():
        if not _is_int(value) or value < 1:
            raise DistillError(f"student config {name}={value!r} must be a positive integer",
                               "set num_layers, hidden_size, num_heads and intermediate_size to integers >= 1")
    if hidden_size % num_heads:
        raise DistillError(f"student config hidden_size={hidden_size} is not divisible by num_heads={num_heads}",
                           f"pick num_heads dividing {hidden_size}, or a hidden_size that is a multiple of "
                           f"{num_heads}, e.g. hidden_size={num_heads * max(1, round(hidden_size / num_heads))}")
    t_cfg = teacher.config
    inter_attr = _intermediate_attr(t_cfg)
    dims_known = all(hasattr(t_cfg, a) for a in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    if inter_attr is None or not dims_known:
        raise DistillError(f"cannot build a fresh student config for a {t_cfg.model_type} teacher",
                           "use a BERT-like or DistilBERT teacher, or a student of kind 'pretrained'")
    cfg = copy.deepcopy(t_cfg)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads = num_layers, hidden_size, num_heads
    setattr(cfg, inter_attr, intermediate_size)
    cfg._name_or_path = ""
    student = type(teacher)(cfg)
    if hidden_size == t_cfg.hidden_size:
        _copy_embeddings(teacher, student)
    return student


def _copy_embeddings(teacher, student) -> None:
    """Copy the teacher's embedding block (<base>.embeddings.*) into a student of the same width."""
    import torch

    prefix = f"{teacher.base_model_prefix}.embeddings."
    s_state = student.state_dict()
    copied = {k: v for k, v in teacher.state_dict().items() if k.startswith(prefix) and k in s_state
              and v.shape == s_state[k].shape}
    table = teacher.get_input_embeddings().weight  # word_embeddings; ModernBERT's tok_embeddings
    assert any(v.data_ptr() == table.data_ptr() for v in copied.values()), sorted(copied)
    with torch.no_grad():
        student.load_state_dict(copied, strict=False)


def _special_ids(tokenizer) -> dict[str, int | None]:
    return {name: getattr(tokenizer, f"{name}_id", None) for name in tokenizer.SPECIAL_TOKENS_ATTRIBUTES
            if name != "additional_special_tokens"}


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, where: str) -> None:
    """Refuse a student whose tokenizer maps any token or special token to another id than the teacher's."""
    fix = ("use a student that shares the teacher's tokenizer (same vocabulary and special tokens), or build one "
           "from the teacher's layers (kind 'layers') or a fresh config (kind 'config')")
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        order = sorted(t_vocab, key=t_vocab.get) + sorted(set(s_vocab) - set(t_vocab), key=s_vocab.get)
        tok = next(t for t in order if t_vocab.get(t) != s_vocab.get(t))
        raise DistillError(
            f"{where} has another tokenizer than the teacher: token {tok!r} is id {t_vocab.get(tok)} for the teacher "
            f"and id {s_vocab.get(tok)} for the student (vocabularies of {len(t_vocab)} and {len(s_vocab)} tokens); "
            "the student must read the same token ids the soft labels were computed from", fix)
    t_special, s_special = _special_ids(teacher_tokenizer), _special_ids(student_tokenizer)
    for name, t_id in t_special.items():
        if s_special.get(name) != t_id:
            raise DistillError(
                f"{where} has another tokenizer than the teacher: {name} {getattr(student_tokenizer, name, None)!r} "
                f"is id {s_special.get(name)} for the student and {getattr(teacher_tokenizer, name, None)!r} "
                f"(id {t_id}) for the teacher", fix)


def student_from_pretrained(path: str | Path, teacher_tokenizer, labels: list[str]):
    """A local pretrained model with a classifier head for `labels`; refused unless it shares the teacher's tokenizer.

    A head of another size is re-initialised (ignore_mismatched_sizes).
    """
    from transformers import AutoConfig, AutoTokenizer

    from distill_gap.models.loading import check_model_dir, load_classifier

    root = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise DistillError(f"the student in {root} has no usable tokenizer: {err}",
                           "save the student's tokenizer next to its weights (tokenizer.save_pretrained)") from None
    check_same_tokenizer(tokenizer, teacher_tokenizer, f"the student in {root}")
    vocab_size = getattr(AutoConfig.from_pretrained(root, trust_remote_code=False), "vocab_size", None)
    if vocab_size is not None and vocab_size < len(teacher_tokenizer):
        raise DistillError(f"the student in {root} embeds {vocab_size} token ids, but the teacher's tokenizer "
                           f"has {len(teacher_tokenizer)} tokens (ids up to {len(teacher_tokenizer) - 1})",
                           "use a student whose config.vocab_size covers the teacher's tokenizer, "
                           "or build one from the teacher's layers or a fresh config")
    model, _ = load_classifier(root, labels=list(labels))
    return model


def _check_spec(spec: dict) -> str:
    if not isinstance(spec, dict) or spec.get("kind") not in STUDENT_KINDS:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise DistillError(f"student kind {kind!r} is unknown; valid kinds are {list(STUDENT_KINDS)}",
                           "set student.kind to 'layers' (slice the teacher), 'config' (fresh smaller model) "
                           "or 'pretrained' (a local model folder sharing the teacher's tokenizer)")
    kind = spec["kind"]
    allowed, required = _SPEC_FIELDS[kind]
    fields = set(spec) - {"kind"}
    if fields - allowed or required - fields or (kind == "layers" and len(fields) != 1):
        need = "exactly one of ['every', 'layers']" if kind == "layers" else f"{sorted(required)}"
        raise DistillError(f"student of kind {kind!r} has fields {sorted(fields)}; it needs {need}",
                           f"remove {sorted(fields - allowed)}" if fields - allowed else f"give {need}")
    return kind


def build_student(teacher, tokenizer, spec: dict, labels: list[str] | None = None):
    """The student described by `spec` (kind 'layers', 'config' or 'pretrained'), with the teacher's label order."""
    from distill_gap.models.loading import check_teacher_labels, model_labels

    kind = _check_spec(spec)
    teacher_labels = model_labels(teacher)
    if labels is None:
        labels = teacher_labels
    check_teacher_labels(teacher_labels, list(labels), "the teacher")
    if kind == "layers":
        layers = spec["layers"] if "layers" in spec else {"every": spec["every"]}
        return student_from_layers(teacher, layers)
    if kind == "config":
        return student_from_config(teacher, num_layers=spec["num_layers"], hidden_size=spec["hidden_size"],
                                   num_heads=spec["num_heads"], intermediate_size=spec["intermediate_size"])
    return student_from_pretrained(spec["path"], tokenizer, list(labels))


# ---------------------------------------------------------------------------------------------
# Hidden-state matching: which student hidden state learns from which teacher hidden state


def default_layer_map(n_student_layers: int, n_teacher_layers: int) -> list[tuple[int, int]]:
    """Evenly spaced (student, teacher) hidden-state pairs, from the embeddings (0) to the last layer."""
    for name, n in (("student", n_student_layers), ("teacher", n_teacher_layers)):
        if not _is_int(n) or n < 1:
            raise DistillError(f"the {name} has {n!r} layers; a layer map needs at least 1 on each side",
                               "pass the models' num_hidden_layers")
    return [(i, round(i * n_teacher_layers / n_student_layers)) for i in range(n_student_layers + 1)]


def check_layer_map(layer_map, n_student_hidden: int, n_teacher_hidden: int) -> list[tuple[int, int]]:
    """Validate (student, teacher) indices into hidden_states tuples; return them as int pairs.

    `n_student_hidden`/`n_teacher_hidden` are the models' num_hidden_layers; index 0 is the
    embeddings, so valid indices are 0..num_hidden_layers. An empty map means no matching.
    """
    ranges = f"student 0..{n_student_hidden}, teacher 0..{n_teacher_hidden} (0 = embeddings)"
    fix = f"use (student, teacher) pairs within {ranges}, e.g. {default_layer_map(n_student_hidden, n_teacher_hidden)}"
    if not isinstance(layer_map, (list, tuple)):
        raise DistillError(f"layer map {layer_map!r} must be a list of (student, teacher) pairs", fix)
    pairs = []
    for pair in layer_map:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_is_int(i) for i in pair)
                or not 0 <= pair[0] <= n_student_hidden or not 0 <= pair[1] <= n_teacher_hidden):
            raise DistillError(f"layer map pair {pair!r} is out of range or not two integers; valid: {ranges}", fix)
        if tuple(pair) in pairs:
            raise DistillError(f"layer map pair {tuple(pair)} appears twice", "list each pair once")
        pairs.append(tuple(pair))
    return pairs


def hidden_widths(model) -> list[int]:
    """Width of each hidden state (embeddings first): the config's hidden size, num_layers + 1 times."""
    cfg = model.config
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim")
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers")
    return [width] * (layers + 1)


def use_eager_attention(model) -> None:
    """Attention maps need the eager implementation (SDPA does not return them)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"
