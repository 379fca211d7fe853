"""Loading and saving Hugging Face sequence classifiers safely (safetensors only, no remote code)."""

from __future__ import annotations

from pathlib import Path

from distill_gap.errors import DistillError, read_json_object

# Weight formats that execute code on load; refused unless the pipeline wrote them itself.
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files whose `auto_map` makes transformers import Python shipped with the model (trust_remote_code).
_REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
_SHOWN = 3  # weight names quoted per kind of mismatch
_DAMAGED = "the model folder is damaged: copy or export it again"


def check_no_code(path: str | Path) -> Path:
    """Refuse a folder that asks for remote code (auto_map, trust_remote_code) or holds pickle files, at any depth.

    Nothing is imported or unpickled here: only JSON is read.
    """
    root = Path(path)
    for name in _REMOTE_CODE_FILES:
        if (root / name).is_file():
            conf = read_json_object(root / name, _DAMAGED)
            asks = [k for k in ("auto_map", "trust_remote_code") if conf.get(k)]
            if asks:
                code = sorted(p.name for p in root.glob("*.py"))
                raise DistillError(f"{root / name} asks for remote code ({', '.join(asks)})"
                                   + (f"; the folder ships Python files {code}" if code else ""),
                                   "use a model whose architecture ships with transformers; trust_remote_code "
                                   "stays off")
    unsafe = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in _UNSAFE_SUFFIXES and p.is_file())
    if unsafe:
        raise DistillError(f"{root} holds pickle-based weight files {unsafe} (unpickling them can run code)",
                           "convert the model to safetensors (save_pretrained(safe_serialization=True)) and remove them")
    return root


def check_model_dir(path: str | Path) -> Path:
    """Refuse folders that are not plain safetensors HF models (no pickle, no remote code, readable weights)."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not (root / "config.json").is_file():
        raise DistillError(f"{root} is not a Hugging Face model folder (no config.json)",
                           "point to a folder saved with save_pretrained(), with config.json and model.safetensors")
    check_no_code(root)
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise DistillError(f"{root} has no .safetensors weights", "save the model with safe_serialization=True")
    for file in weights:  # the header must parse and cover the file: catches truncation and non-safetensors bytes
        try:
            with safe_open(file, framework="numpy"):
                pass
        except (SafetensorError, OSError) as err:
            raise DistillError(f"{file} is not a readable safetensors file ({err})",
                               "the weights are truncated or damaged: copy or export the model again") from None
    return root


def load_classifier(path: str | Path, num_labels: int | None = None, labels: list[str] | None = None):
    """Load (model, tokenizer) from a checked folder; optionally set a fresh label head.

    Every weight of the model must come from the file, and every weight in the file must have a place in the
    model: a config.json that disagrees with the weights (another hidden size, layer count or label count) is
    refused instead of being filled with random values. With `labels` only the classification head may be new.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    root = check_model_dir(path)
    # ignore_mismatched_sizes: a weight of another shape is reported by _check_loading_info, not as a torch error
    kwargs = {"use_safetensors": True, "trust_remote_code": False, "output_loading_info": True,
              "ignore_mismatched_sizes": True}
    if labels is not None:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={l: i for i, l in enumerate(labels)})
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the weights that did not load are judged (and named) below
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(root, **kwargs)
    except (ValueError, OSError, RuntimeError, SafetensorError) as err:
        raise DistillError(f"cannot load the model in {root}: {err}", "check that config.json matches the weights") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loading_info(root, info, new_head=labels is not None, body=f"{model.base_model_prefix}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exceptions on damaged files
        raise DistillError(f"cannot load the tokenizer in {root}: {type(err).__name__}: {err}",
                           "save the tokenizer next to the weights (tokenizer.save_pretrained) or copy it again"
                           ) from None
    return model, tokenizer


def _check_loading_info(root: Path, info: dict, *, new_head: bool, body: str) -> None:
    """Refuse weights that config.json has no place for, or model weights that the file does not hold.

    `new_head`: a fresh classification head was asked for, so head weights (outside `body`, the base model's
    prefix) may be missing from the file, of another shape, or left over (an MLM head of a base checkpoint);
    so may a pooler, which some base checkpoints do not ship and which is trained with the head.
    """
    def allowed(key: str) -> bool:
        return new_head and (not key.startswith(body) or key.startswith(f"{body}pooler."))

    missing = [k for k in info.get("missing_keys", []) if not allowed(k)]
    unexpected = [k for k in info.get("unexpected_keys", []) if not allowed(k)]
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])]
    mismatched = [k for k in mismatched if not allowed(k)]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) of the model are not in the file (e.g. {missing[:_SHOWN]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) in the file have no place in the model "
                        f"(e.g. {unexpected[:_SHOWN]})")
    if mismatched:
        problems.append(f"{len(mismatched)} weight(s) in the file have another shape than config.json gives them "
                        f"(e.g. {mismatched[:_SHOWN]})")
    raise DistillError(f"{root}/config.json does not match the weights in {root}: " + "; ".join(problems),
                       "use the config.json saved with these weights (save_pretrained writes both); "
                       "the folder may be damaged or assembled from two models")


def model_labels(model) -> list[str]:
    """The label order of a classifier's logits (config.id2label)."""
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def config_labels(path: str | Path) -> list[str]:
    """The label order of a saved classifier's logits, read from config.json (weights not loaded)."""
    cfg = read_json_object(check_model_dir(path) / "config.json", _DAMAGED)
    id2label = cfg.get("id2label") or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def check_teacher_labels(found: list[str], labels: list[str], where: str) -> None:
    """The teacher's logits must be in the order of the data's label set (names compared case-insensitively)."""
    if [l.lower() for l in found] != [l.lower() for l in labels]:
        raise DistillError(
            f"{where} predicts {len(found)} labels {found}, but data.labels is {len(labels)} labels {labels} "
            "(names and order must match)",
            "re-bootstrap or re-import the teacher with data.labels (same labels, same order), or fix data.labels",
        )


def save_classifier(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out

