"""The edge folder format: edge.json (which artifacts, which is primary), scope.json + scope_stats.npz (the
primary's scope guard; distill_gap/edge/guard.py owns those two) and reference.json (the drift monitor's reference
profile), beside one subfolder per artifact; EdgeBuild is the quantize stage's record of one such folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from distill_gap.digest import model_digest
from distill_gap.edge.lean import EDGE_FILE, EDGE_FORMAT, read_manifest  # noqa: F401  (the checks live where the
# lean edge runtime, which loads no torch-side module, can use them too; this module re-exports them)
from distill_gap.errors import DistillError

REFERENCE_FILE = "reference.json"
# artifact name in edge.json (and its subfolder) -> (runtime, model name in the gap report)
EDGE_ARTIFACTS = {"int8": ("torch-pt2", "student-int8"), "onnx-int8": ("onnxruntime", "student-onnx-int8"),
                  "onnx": ("onnxruntime", "student-onnx"), "fp32": ("transformers", "student")}
INT8_ARTIFACTS = ("int8", "onnx-int8")
# Files copied next to an exported model so its folder loads on its own (tokenizer + the student's config).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
               "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class EdgeBuild:
    """The edge folder: every artifact built, its checks against the fp32 student, which one is primary, and the
    folder's digest (taken when edge.json is written, again by evaluate after it adds the scope guard and
    reference.json; attestation and registration reuse it)."""

    path: Path
    primary: str  # key of `artifacts`
    quantized: bool  # the primary is an INT8 artifact
    artifacts: dict  # name -> {"path", "runtime", "report_name", "size_bytes", "digest", "parity", "validation", ...}
    tuning: dict | None  # autotune_int8's record (every trial)
    errors: list  # [{"stage", "problem", "fix"}] for artifacts that could not be built
    reason: str  # why the primary is what it is
    labels: list[str]  # the label order of every artifact's logits
    max_length: int
    digest: str = ""  # distill_gap.digest.model_digest of the whole folder, set by write()

    @property
    def report_name(self) -> str:
        return self.artifacts[self.primary]["report_name"]

    @property
    def primary_ok(self) -> bool:
        return bool(self.artifacts[self.primary].get("ok"))

    def manifest(self) -> dict:
        """What edge.json holds."""
        return {"format": EDGE_FORMAT, "primary": self.primary, "labels": self.labels, "max_length": self.max_length,
                "quantized": self.quantized, "reason": self.reason, "errors": self.errors, "tuning": self.tuning,
                "artifacts": self.artifacts}

    def write(self) -> str:
        """Write edge.json next to the artifacts and take the folder's digest."""
        write_manifest(self.path, self.manifest())
        self.digest = model_digest(self.path)
        return self.digest


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy the config and tokenizer files of `src` (those that exist) into `dst`."""
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place, so a failed run never leaves half an artifact at `out`."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write edge.json (indented; paths and other objects as strings)."""
    path = Path(folder) / EDGE_FILE
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def read_reference(folder: str | Path) -> dict:
    """reference.json of `folder`: the drift monitor's reference profile."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        raise DistillError(f"{folder} ships no {REFERENCE_FILE}",
                           "re-run the pipeline: the evaluate stage writes it next to the edge artifacts")
    return json.loads(path.read_text())


def write_reference(folder: str | Path, profile: dict) -> Path:
    """Write reference.json (the reference profile of validation + test predictions)."""
    path = Path(folder) / REFERENCE_FILE
    path.write_text(json.dumps(profile))
    return path
