"""The scope guard an edge model ships with: which detector, its reference statistics, its threshold; scoring with
numpy alone, so the lean edge runtime (onnxruntime, tokenizers, numpy) runs it without the training stack.

Files in the edge folder (both covered by the folder's digest and signature):
- scope.json: {"format": 2, "detector", "threshold", "tpr", "temperature", "stats": {"file", "sha256"},
  "standardise"? (mahalanobis+lexical), ... the evidence it was evaluated on}
- scope_stats.npz: the detector's reference statistics in fp16 (numpy's own format, read with allow_pickle=False);
  the lexicon's bucket ids as int32.

Detectors: MSP and energy read the logits; Mahalanobis and kNN the pooled features; `lexical` reads the text alone
(the mean log-probability of the row's words under the word frequencies of the training sample: code, package
descriptions, spam and other languages use words the reviews never do, whatever the model's width);
`mahalanobis+lexical` adds the two scores, each standardised on validation, so a narrow student whose features
separate less still ships a guard that holds (benchmarks/RESULTS.md, "Scope guard").

Score convention: higher = more like the rows the model was trained and evaluated on; a row is in scope when
`score >= threshold` (the threshold keeps `tpr` of validation rows in scope).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill_gap.errors import DistillError, read_json_object

SCOPE_FILE = "scope.json"
STATS_FILE = "scope_stats.npz"
SCOPE_FORMAT = 2
DETECTORS = ("msp", "energy", "mahalanobis", "knn", "lexical", "mahalanobis+lexical")
FEATURE_DETECTORS = ("mahalanobis", "knn", "mahalanobis+lexical")  # need the artifact's pooled features
TEXT_DETECTORS = ("lexical", "mahalanobis+lexical")  # need the rows' text
NAMES = {"msp": "MSP", "energy": "energy", "mahalanobis": "Mahalanobis", "knn": "kNN", "lexical": "lexical",
         "mahalanobis+lexical": "Mahalanobis + lexical"}
LEXICON_BUCKETS = 1 << 22  # words hash (crc32) into this many buckets: two words of a 10k-word lexicon share one
_WORD = re.compile(r"\w+")  # at a rate of ~0.2%; only the buckets seen in training are stored
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


def word_buckets(text: str) -> np.ndarray:
    """The bucket id of each word of `text` (lower-cased `\\w+` runs), int64 (may be empty)."""
    return np.fromiter((zlib.crc32(w.encode()) % LEXICON_BUCKETS for w in _WORD.findall(str(text).lower())),
                       dtype=np.int64)


def lexical(texts, buckets: np.ndarray, logp: np.ndarray, unseen: float) -> np.ndarray:
    """Mean log-probability of each text's words under the training lexicon, (N,); a word the training sample never
    used scores `unseen`, and so does a text without words. `buckets` sorted, `logp` aligned with them."""
    buckets, logp = np.asarray(buckets, dtype=np.int64), np.asarray(logp, dtype=np.float64)
    out = np.empty(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        b = word_buckets(text)
        if not len(b):
            out[i] = unseen
            continue
        at = np.minimum(np.searchsorted(buckets, b), len(buckets) - 1)
        out[i] = np.where(buckets[at] == b, logp[at], unseen).mean()
    return out


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
    # mahalanobis+lexical: {"mahalanobis": [mean, std], "lexical": [mean, std]} of the validation scores
    standardise: dict[str, list[float]] = field(default_factory=dict)

    @property
    def needs_features(self) -> bool:
        return self.detector in FEATURE_DETECTORS

    @property
    def needs_texts(self) -> bool:
        return self.detector in TEXT_DETECTORS

    def score(self, logits: np.ndarray, features: np.ndarray | None = None, texts=None) -> np.ndarray:
        """The detector's score per row, (N,); higher = more in scope. `texts`: the rows' text, which the lexical
        detectors read."""
        if self.detector == "msp":
            return msp(logits)
        if self.detector == "energy":
            return energy(logits)
        if self.needs_texts and texts is None:
            raise DistillError(f"the {self.detector} scope guard reads the rows' text, and none was given",
                               "pass the texts the logits were computed from")
        if self.detector == "lexical":
            return self.part("lexical", texts=texts)
        if features is None:
            raise DistillError(f"the {self.detector} scope guard needs the model's pooled features, and this "
                               "artifact returns only logits", "export the edge model again with this version")
        if self.detector == "knn":
            return knn(features, self.stats["bank"], self.k)
        if self.detector == "mahalanobis":
            return self.part("mahalanobis", features=features)
        return sum((self.part(p, features=features, texts=texts) - self.standardise[p][0]) / self.standardise[p][1]
                   for p in ("mahalanobis", "lexical"))

    def part(self, name: str, *, features=None, texts=None) -> np.ndarray:
        """One component's raw score: "mahalanobis" (features) or "lexical" (texts)."""
        if name == "mahalanobis":
            return mahalanobis(features, self.stats["means"], self.stats["precision"])
        return lexical(texts, self.stats["lexicon_buckets"], self.stats["lexicon_logp"],
                       float(self.stats["lexicon_unseen"][0]))

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
            if np.asarray(v).dtype.kind in "iu":  # ids (the lexicon's buckets): exact, int32
                arrays[k] = np.asarray(v, dtype=np.int32)
                continue
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
        if self.standardise:
            record["standardise"] = {k: [float(x) for x in v] for k, v in self.standardise.items()}
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


def stats_from_bytes(data: bytes, scales: dict[str, float]) -> dict[str, np.ndarray]:
    """The statistics of a scope_stats.npz (ScopeGuard.stats_bytes): each fp16 array times its scale, as float32;
    integer arrays (the lexicon's bucket ids) as stored."""
    out = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for k in npz.files:
            v = npz[k]
            out[k] = v if v.dtype.kind in "iu" else v.astype(np.float32) * np.float32(scales.get(k, 1.0))
    return out


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
    if detector in (*FEATURE_DETECTORS, *TEXT_DETECTORS):
        stats = _read_stats(folder, record.get("stats"), detector)
    standardise = _read_standardise(path, record.get("standardise")) if detector == "mahalanobis+lexical" else {}
    info = {k: v for k, v in record.items()
            if k not in ("format", "detector", "threshold", "tpr", "temperature", "k", "stats", "standardise")}
    return ScopeGuard(detector=detector, threshold=float(threshold), tpr=float(record.get("tpr", 0.95)),
                      temperature=float(temperature), stats=stats, k=int(record.get("k", 10)), info=info,
                      standardise=standardise)


def _read_standardise(path: Path, record) -> dict[str, list[float]]:
    """The per-component [mean, std] of a combined guard: both components, finite, std > 0."""
    ok = isinstance(record, dict) and all(
        isinstance(record.get(k), list) and len(record[k]) == 2
        and all(isinstance(x, (int, float)) and np.isfinite(x) for x in record[k]) and record[k][1] > 0
        for k in ("mahalanobis", "lexical"))
    if not ok:
        raise DistillError(f"{path} has no usable `standardise` record ([mean, std > 0] of the mahalanobis and "
                           "lexical scores): the combined guard cannot score without it", _FIX)
    return {k: [float(x) for x in record[k]] for k in ("mahalanobis", "lexical")}


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
    lexicon = ("lexicon_buckets", "lexicon_logp", "lexicon_unseen")
    needed = {"mahalanobis": ("means", "precision"), "knn": ("bank",), "lexical": lexicon,
              "mahalanobis+lexical": ("means", "precision", *lexicon)}[detector]
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
        stats = stats_from_bytes(data, meta.get("scales") or {})
    except (ValueError, OSError, TypeError) as err:
        raise DistillError(f"{path} is not a readable statistics file ({err})", _FIX) from None
    missing = [k for k in needed if k not in stats]
    if missing:
        raise DistillError(f"{path} lacks {missing} for the {detector} guard", _FIX)
    if not all(np.isfinite(v).all() for v in stats.values()):
        raise DistillError(f"{path} holds non-finite values", _FIX)
    return stats
