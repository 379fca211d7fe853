"""Content digests: sha256 over content, never paths or mtimes (DESIGN.md, identities and keys)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

# Files that make up a model's identity; everything else in the folder (READMEs, ONNX exports,
# training state) does not change what the model computes.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".onnx", ".pt2")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Digest of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def digest_files(root: str | Path, names: Iterable[str]) -> str:
    """sha256 over (name, file digest) pairs, sorted by name."""
    root = Path(root)
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0" + sha256_file(root / name).encode() + b"\n")
    return h.hexdigest()


def model_files(model_dir: str | Path) -> list[str]:
    """Relative paths of the files that define a saved model (weights, config, tokenizer)."""
    root = Path(model_dir)
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.suffix in _MODEL_SUFFIXES and not p.name.startswith(".")
        and p.name not in {"distill_meta.json"}
    )


def model_digest(model_dir: str | Path) -> str:
    """Digest of a saved model folder: weight files + config + tokenizer files, sorted by name."""
    files = model_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no model files under {model_dir}")
    return digest_files(model_dir, files)


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
    "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
)


def tokenizer_digest(model_dir: str | Path) -> str:
    """Digest of the tokenizer files alone (part of the soft-label cache key)."""
    root = Path(model_dir)
    names = [n for n in TOKENIZER_FILES if (root / n).is_file()]
    if not names:
        raise FileNotFoundError(f"no tokenizer files under {model_dir}")
    return digest_files(root, names)


def folder_bytes(path: str | Path) -> int:
    """Bytes on disk of the model files in a folder (what ships to a device)."""
    root = Path(path)
    return sum((root / name).stat().st_size for name in model_files(root))
