"""Loading and saving Hugging Face sequence classifiers safely (safetensors only, no remote code)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.errors import DistillError

# Weight formats that execute code on load; refused unless the pipeline wrote them itself.
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_model_dir(path: str | Path) -> Path:
    """Refuse folders that are not plain safetensors HF models (no pickle, no remote code)."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise DistillError(f"{root} is not a Hugging Face model folder (no config.json)",
                           "point to a folder saved with save_pretrained(), with config.json and model.safetensors")
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("auto_map") or cfg.get("trust_remote_code"):
        raise DistillError(f"{root}/config.json asks for remote code (auto_map)",
                           "use a model whose architecture ships with transformers; trust_remote_code stays off")
    unsafe = sorted(p.name for p in root.iterdir() if p.suffix in _UNSAFE_SUFFIXES)
    if unsafe:
        raise DistillError(f"{root} holds pickle-based weight files {unsafe}",
                           "convert the model to safetensors (save_pretrained(safe_serialization=True)) and remove them")
    if not any(root.glob("*.safetensors")):
        raise DistillError(f"{root} has no .safetensors weights", "save the model with safe_serialization=True")
    return root


def load_classifier(path: str | Path, num_labels: int | None = None, labels: list[str] | None = None):
    """Load (model, tokenizer) from a checked folder; optionally set a fresh label head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = check_model_dir(path)
    kwargs = {"use_safetensors": True, "trust_remote_code": False}
    if labels is not None:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={l: i for i, l in enumerate(labels)}, ignore_mismatched_sizes=True)
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        model = AutoModelForSequenceClassification.from_pretrained(root, **kwargs)
    except (ValueError, OSError, RuntimeError) as err:
        raise DistillError(f"cannot load the model in {root}: {err}", "check that config.json matches the weights") from None
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    return model, tokenizer


def model_labels(model) -> list[str]:
    """The label order of a classifier's logits (config.id2label)."""
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def config_labels(path: str | Path) -> list[str]:
    """The label order of a saved classifier's logits, read from config.json (weights not loaded)."""
    cfg = json.loads((check_model_dir(path) / "config.json").read_text())
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
