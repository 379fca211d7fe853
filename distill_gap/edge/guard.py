"""The scope guard an edge model ships with: which detector, its reference statistics, its threshold; scoring with
numpy alone, so the lean edge runtime (onnxruntime, tokenizers, numpy) runs it without the training stack.

Files in the edge folder (both covered by the folder's digest and signature):
- scope.json: {"format": 2, "detector", "threshold", "tpr", "temperature", "stats": {"file", "sha256"}, ...
  the evidence it was evaluated on}
- scope_stats.npz: the detector's reference statistics in fp16 (numpy's own format, read with allow_pickle=False).

Score convention: higher = more like the rows the model was trained and evaluated on; a row is in scope when
`score >= threshold` (the threshold keeps `tpr` of validation rows in scope).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill_gap.errors import DistillError, read_json_object

SCOPE_FILE = "scope.json"
STATS_FILE = "scope_stats.npz"
SCOPE_FORMAT = 2
DETECTORS = ("msp", "energy", "mahalanobis", "knn")
FEATURE_DETECTORS = ("mahalanobis", "knn")  # need the artifact's pooled features, not only its logits
_FIX = "the edge folder is damaged or from another version: run the pipeline again (evaluate writes the scope)"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, (N, C)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (a zero row stays zero)."""
    f = np.asarray(features, dtype=np.float32)
    norm = np.linalg.norm(f, axis=-1, keepdims=True)
    return f / np.maximum(norm, 1e-12)


def msp(logits: np.ndarray) -> np.ndarray:
    """Maximum softmax probability per row, (N,)."""
    return softmax(logits).max(axis=-1)


def energy(logits: np.ndarray) -> np.ndarray:
    """Negative energy logsumexp(logits) per row, (N,) (Liu et al. 2020)."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=-1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=-1))


def mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Minus the smallest squared Mahalanobis distance to a class mean (shared precision), (N,) (Lee et al. 2018)."""
    f = np.asarray(features, dtype=np.float64)
    mu, p = np.asarray(means, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    # d_c(x) = (x - mu_c)^T P (x - mu_c) = x^T P x - 2 x^T P mu_c + mu_c^T P mu_c, for every class at once
    fp = f @ p  # (N, D)
    d = (fp * f).sum(-1)[:, None] - 2 * fp @ mu.T + ((mu @ p) * mu).sum(-1)[None, :]  # (N, C)
    return -d.min(axis=-1)


def knn(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Cosine similarity to the k-th nearest reference feature, (N,) (minus the kNN distance of Sun et al. 2022,
    on unit-normalised features)."""
    bank = np.asarray(bank, dtype=np.float32)
    k = max(1, min(int(k), len(bank)))
    sims = normalise(features) @ bank.T  # (N, M); bank rows are already unit-normalised
    return -np.partition(-sims, k - 1, axis=-1)[:, k - 1]


@dataclass
class ScopeGuard:
    """A fitted detector, its threshold, and the temperature that calibrates the shipped probabilities."""

    detector: str
    threshold: float
    tpr: float
    temperature: float = 1.0
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # "means", "precision" | "bank"; fp16 on disk
    k: int = 10  # knn only
    info: dict = field(default_factory=dict)  # the evidence (fitted on, OOD results, rule), kept in scope.json

    @property
    def needs_features(self) -> bool:
        return self.detector in FEATURE_DETECTORS

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """The detector's score per row, (N,); higher = more in scope."""
        if self.detector == "msp":
            return msp(logits)
        if self.detector == "energy":
            return energy(logits)
        if features is None:
            raise DistillError(f"the {self.detector} scope guard needs the model's pooled features, and this "
                               "artifact returns only logits", "export the edge model again with this version")
        if self.detector == "mahalanobis":
            return mahalanobis(features, self.stats["means"], self.stats["precision"])
        return knn(features, self.stats["bank"], self.k)

    def in_scope(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.threshold

    @property
    def region_column(self) -> str | None:
        """The row key that names a row's region (scope.json `regions`), or None when the scope has no regions."""
        return (self.info.get("regions") or {}).get("column") or None

    def outside_regions(self, rows) -> list[str | None]:
        """Per row, why the region it names is outside the scope (None: no region named as a non-empty string, or
        one in scope).

        scope.json `regions` (distill_gap/evaluation/regions.py): a row naming `column` (a key of the input row, or
        of its "meta") is in scope only for the training split's regions and those added on evidence."""
        column = self.region_column
        if column is None:
            return [None] * len(rows)
        regions = self.info["regions"]
        inside = {*regions["trained"], *(r["region"] for r in regions["added"])}
        out = []
        for row in rows:
            value = (row.get("meta") or {}).get(column, row.get(column))
            out.append(None if not isinstance(value, str) or not value or value in inside else
                       f"{column} {value!r} is not in the scope this model was proven on")
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: softmax(logits / temperature), float64 (rows sum to 1)."""
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    # ------------------------------------------------------------------------------------------------------------
    # files

    def stats_bytes(self) -> tuple[bytes, dict[str, float]]:
        """The statistics as fp16 arrays in numpy's .npz format, each divided by its largest magnitude (returned
        as `scales`) so that no value overflows fp16's range (a precision matrix can reach 1e5)."""
        buf, scales = io.BytesIO(), {}
        arrays = {}
        for k, v in self.stats.items():
            v = np.asarray(v, dtype=np.float64)
            scales[k] = float(np.abs(v).max()) or 1.0
            arrays[k] = (v / scales[k]).astype(np.float16)
        np.savez(buf, **arrays)
        return buf.getvalue(), scales

    def write(self, folder: str | Path) -> Path:
        """scope.json (+ scope_stats.npz for a feature detector) in `folder`; returns scope.json's path."""
        folder = Path(folder)
        record = {"format": SCOPE_FORMAT, "detector": self.detector, "threshold": float(self.threshold),
                  "tpr": float(self.tpr), "temperature": float(self.temperature), **self.info}
        if self.detector == "knn":
            record["k"] = int(self.k)
        stats_path = folder / STATS_FILE
        if self.stats:
            data, scales = self.stats_bytes()
            stats_path.write_bytes(data)
            record["stats"] = {"file": STATS_FILE, "sha256": hashlib.sha256(data).hexdigest(), "dtype": "float16",
                               "arrays": {k: list(np.shape(v)) for k, v in self.stats.items()}, "scales": scales}
        else:
            stats_path.unlink(missing_ok=True)
        path = folder / SCOPE_FILE
        path.write_text(json.dumps(record, indent=2, default=str))
        return path


def read_guard(folder: str | Path) -> ScopeGuard | None:
    """The scope guard shipped in `folder`, checked; None when the folder ships no scope.json.

    A scope.json that is malformed, names an unknown detector, or whose statistics file is missing or does not
    match its recorded sha256 raises DistillError naming the file: a guard that cannot be read never answers
    "in scope".
    """
    folder = Path(folder)
    path = folder / SCOPE_FILE
    if not path.is_file():
        return None
    record = read_json_object(path, _FIX)
    if record.get("format") != SCOPE_FORMAT:
        raise DistillError(f"{path} has scope format {record.get('format')!r}; this version reads format "
                           f"{SCOPE_FORMAT} (a feature-space guard)", _FIX)
    detector = record.get("detector")
    if detector not in DETECTORS:
        raise DistillError(f"{path} names detector {detector!r}", f"use one of {list(DETECTORS)}; {_FIX}")
    threshold, temperature = record.get("threshold"), record.get("temperature", 1.0)
    if not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise DistillError(f"{path} has no finite threshold", _FIX)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise DistillError(f"{path} has temperature {temperature!r}; it must be a number > 0", _FIX)
    _check_regions(path, record.get("regions"))
    stats = {}
    if detector in FEATURE_DETECTORS:
        stats = _read_stats(folder, record.get("stats"), detector)
    info = {k: v for k, v in record.items()
            if k not in ("format", "detector", "threshold", "tpr", "temperature", "k", "stats")}
    return ScopeGuard(detector=detector, threshold=float(threshold), tpr=float(record.get("tpr", 0.95)),
                      temperature=float(temperature), stats=stats, k=int(record.get("k", 10)), info=info)


def _check_regions(path: Path, regions) -> None:
    """A `regions` record the guard can apply: {"column": str, "trained": [str], "added": [{"region": str}]}."""
    if regions is None:
        return
    ok = isinstance(regions, dict) and isinstance(regions.get("column"), str) \
        and isinstance(regions.get("trained"), list) and all(isinstance(v, str) for v in regions["trained"]) \
        and isinstance(regions.get("added"), list) \
        and all(isinstance(r, dict) and isinstance(r.get("region"), str) for r in regions["added"])
    if not ok:
        raise DistillError(f"{path} has a malformed regions record: the guard cannot tell which regions are in scope",
                           _FIX)


def _read_stats(folder: Path, meta, detector: str) -> dict[str, np.ndarray]:
    needed = {"mahalanobis": ("means", "precision"), "knn": ("bank",)}[detector]
    if not isinstance(meta, dict) or meta.get("file") != STATS_FILE or not isinstance(meta.get("sha256"), str):
        raise DistillError(f"{folder / SCOPE_FILE} names no statistics file for the {detector} guard", _FIX)
    path = folder / STATS_FILE
    if not path.is_file():
        raise DistillError(f"{path} is missing: the {detector} scope guard cannot score without it", _FIX)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise DistillError(f"{path} does not match the sha256 in {SCOPE_FILE}: the scope statistics were changed "
                           "after evaluation", _FIX)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            scales = meta.get("scales") or {}
            stats = {k: npz[k].astype(np.float32) * float(scales.get(k, 1.0)) for k in npz.files}
    except (ValueError, OSError, TypeError) as err:
        raise DistillError(f"{path} is not a readable statistics file ({err})", _FIX) from None
    missing = [k for k in needed if k not in stats]
    if missing:
        raise DistillError(f"{path} lacks {missing} for the {detector} guard", _FIX)
    if not all(np.isfinite(v).all() for v in stats.values()):
        raise DistillError(f"{path} holds non-finite values", _FIX)
    return stats
