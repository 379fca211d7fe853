"""Drift monitoring statistics: production rows vs a reference profile of the champion (plain functions, no Prefect).

read_production_rows -> drift_report(reference_profile(...), rows, model) -> drift_markdown. A shift counts as drift
only when it is both significant (test p-value below `p_value`) and large (effect size over its threshold), so a big
production sample does not turn every negligible difference into an alert.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.evaluation.ood import msp_score

if TYPE_CHECKING:
    import pandas as pd

PROFILE_FORMAT = 1
PSI_EPSILON = 1e-4  # share given to an empty prediction bin so that PSI stays finite
TEXT_STATS = ("chars", "words", "non_ascii_share", "digit_share", "upper_share")
RESERVED = ("text", "label", "timestamp", "id")  # other string columns of production rows are slice columns
_MAX_REPORTED = 5  # bad lines named in one error
_ROW_EXAMPLE = '{"text": "the tablets helped", "label": "positive", "condition": "Pain", "timestamp": "2026-11-22T10:00:00Z"}'


@dataclass(frozen=True)
class DriftThresholds:
    """When production counts as drifted. Effect sizes must exceed their threshold AND the test be significant."""

    max_psi: float = 0.2  # population stability index of predicted labels (0.1-0.2 is the usual "watch" band)
    max_js: float = 0.1  # Jensen-Shannon distance (base 2, in [0, 1]) of predicted-label shares
    max_ks: float = 0.1  # KS statistic of a text statistic (an effect size: max CDF gap, in [0, 1])
    max_out_of_scope_increase: float = 0.10  # absolute increase of the share of rows with MSP below the threshold
    p_value: float = 0.01  # significance level of every test (text tests are Holm-corrected across statistics)
    min_accuracy: float | None = None  # overall / per-slice accuracy below this is drift (labelled rows only)
    min_slice_rows: int = 20  # labelled scored rows a slice needs to get an accuracy
    min_rows: int = 50  # fewer production rows: too few to judge (an error)

    def __post_init__(self):
        bad = [f"{k}={getattr(self, k)}" for k in ("max_psi", "max_js", "max_ks", "max_out_of_scope_increase")
               if not getattr(self, k) >= 0]
        bad += [f"p_value={self.p_value}"] if not 0 < self.p_value < 1 else []
        bad += [f"min_accuracy={self.min_accuracy}"] if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1 else []
        bad += [f"{k}={getattr(self, k)}" for k in ("min_slice_rows", "min_rows") if getattr(self, k) < 1]
        if bad:
            raise DistillError(f"invalid drift thresholds: {', '.join(bad)}",
                               "thresholds are >= 0, p_value in (0, 1), min_accuracy in [0, 1], row counts >= 1")


# ----------------------------------------------------------------------------------------------------------------
# production rows


def _sources(source: str) -> list[tuple[str, Callable[[], bytes]]]:
    """(name, read) for every JSONL input: one file, the *.jsonl files under a folder, or the objects under s3://."""
    if source.startswith("s3://"):
        from distill_gap.ops.s3 import s3_client, s3_errors

        bucket, _, prefix = source[5:].partition("/")
        client = s3_client()  # honours AWS_ENDPOINT_URL (MinIO, moto)
        errors = dict(setting="the production sample's location", others=True,
                      endpoint=lambda: client.meta.endpoint_url)
        with s3_errors(source, "list", **errors):
            keys = sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                          for o in page.get("Contents", []) if o["Key"].endswith(".jsonl"))
        if not keys:
            raise DistillError(f"no *.jsonl objects under {source}", "check the prefix; production samples are JSONL files")

        def read(key: str) -> bytes:
            with s3_errors(f"s3://{bucket}/{key}", "read", **errors):
                return client.get_object(Bucket=bucket, Key=key)["Body"].read()

        return [(f"s3://{bucket}/{k}", lambda k=k: read(k)) for k in keys]
    path = Path(source.removeprefix("file://"))
    if path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        if not files:
            raise DistillError(f"no *.jsonl files under {path}", "point to a JSONL file or a folder holding *.jsonl files")
        return [(str(f), f.read_bytes) for f in files]
    if not path.is_file():
        raise DistillError(f"production sample {path} does not exist", "pass a JSONL file, a folder of them or s3://bucket/prefix")
    return [(str(path), path.read_bytes)]


def sample_digest(source: str) -> str:
    """sha256 of a production sample's contents (every JSONL input in name order, each by its own sha256): a drift
    event carries it, and the redistillation it starts refuses rows that changed or are gone since."""
    import hashlib

    from distill_gap.digest import sha256_json

    return sha256_json([hashlib.sha256(read()).hexdigest() for _, read in _sources(str(source))])


def bad_lines(problems: list[str], n_bad: int, what: str, fix: str | None = None) -> DistillError:
    """One error for `n_bad` bad lines: the first _MAX_REPORTED of `problems` named, the rest counted; `fix`
    defaults to the production row's format."""
    problems = problems[:_MAX_REPORTED]
    more = f" (and {n_bad - len(problems)} more)" if n_bad > len(problems) else ""
    return DistillError(f"{n_bad} {what}: " + "; ".join(problems) + more,
                        fix or f"write one JSON object per line with a non-empty \"text\", like {_ROW_EXAMPLE}")


def parse_jsonl(data: bytes, name: str) -> tuple[list[dict], list[int]]:
    """Objects of the non-blank lines and their 1-based line numbers; bad lines are named (first 5)."""
    try:
        from orjson import loads
    except ImportError:  # orjson comes with prefect; json is ~3x slower
        from json import loads
    lines = data.split(b"\n")
    numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]
    try:
        rows = [loads(lines[i - 1]) for i in numbers]
        if all(type(r) is dict for r in rows):
            return rows, numbers
    except ValueError:  # json.JSONDecodeError, orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
        pass
    from distill_gap.edge.serving import decode_json_line

    problems, n_bad = [], 0
    for i in numbers:  # the slow path, only to name the bad lines
        _, problem = decode_json_line(lines[i - 1])
        if problem:
            n_bad += 1
            if len(problems) < _MAX_REPORTED:
                problems.append(f"{name} line {i}: {problem}")
    if not n_bad:  # only the fast parser refused (orjson: NaN/Infinity, which json and decode_json_line accept)
        import json

        return [json.loads(lines[i - 1]) for i in numbers], numbers
    raise bad_lines(problems, n_bad, "malformed lines")


def parse_timestamps(values: "pd.Series", where: list[str], field: str = "timestamp") -> "pd.Series":
    """UTC datetimes from ISO 8601 strings or epoch numbers (seconds; milliseconds above 1e11); nulls stay NaT."""
    import pandas as pd

    num = pd.to_numeric(values, errors="coerce")
    is_num = num.notna()
    out = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    if is_num.any():
        n = num[is_num].astype("float64")
        out[is_num] = pd.to_datetime(np.where(n.abs() > 1e11, n / 1000, n), unit="s", utc=True).to_numpy()
    rest = ~is_num & values.notna()
    if rest.any():
        out[rest] = pd.to_datetime(values[rest].astype(str), utc=True, format="ISO8601", errors="coerce")
    bad = np.flatnonzero(rest & out.isna())
    if len(bad):
        raise DistillError(f"{len(bad)} rows with a timestamp that is neither ISO 8601 nor an epoch number: "
                           + "; ".join(f"{where[i]}: {values.iloc[i]!r}" for i in bad[:_MAX_REPORTED]),
                           f'write "{field}" as ISO 8601 (2026-11-22T10:00:00Z) or epoch seconds')
    return out


def read_production_rows(source: str, *, max_rows: int | None = None) -> "pd.DataFrame":
    """Rows of a production sample (JSONL file, folder of *.jsonl, or s3://bucket/prefix): text, label?, slices, timestamp?.

    Every line read is checked; malformed lines and rows without a non-empty "text" are named by line (first 5).
    """
    import pandas as pd

    rows, where = [], []
    for name, read in _sources(str(source)):
        file_rows, numbers = parse_jsonl(read(), name)
        rows += file_rows
        where += [f"{name} line {i}" for i in numbers]
        if max_rows is not None and len(rows) >= max_rows:
            rows, where = rows[:max_rows], where[:max_rows]
            break
    if not rows:
        raise DistillError(f"{source} holds no rows", f"write one JSON object per line, like {_ROW_EXAMPLE}")
    df = pd.DataFrame(rows)
    text = df["text"] if "text" in df else pd.Series([None] * len(df))
    is_str = text.map(lambda v: isinstance(v, str))
    ok = is_str.copy()
    ok[is_str] = text[is_str].astype(str).str.strip().str.len() > 0
    bad = np.flatnonzero(~ok.to_numpy(dtype=bool))
    if len(bad):
        raise bad_lines([f"{where[i]}: " + ('no "text"' if rows[i].get("text") is None else '"text" must be a non-empty string')
                          for i in bad[:_MAX_REPORTED]], len(bad), "rows without a text")
    df["text"] = text.astype(str)
    if "label" in df:
        df["label"] = df["label"].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    if "timestamp" in df:
        df["timestamp"] = parse_timestamps(df["timestamp"], where)
    return df


def slice_columns(df: "pd.DataFrame") -> list[str]:
    """Columns of production rows that hold strings and are not text/label/timestamp/id: slice columns."""
    return [c for c in df.columns if c not in RESERVED and df[c].notna().any()
            and df[c].dropna().map(lambda v: isinstance(v, str)).all()]


# ----------------------------------------------------------------------------------------------------------------
# statistics


def text_statistics(texts) -> dict[str, np.ndarray]:
    """Per text: chars, words (runs of non-space), and the shares of non-ASCII, digit ([0-9]) and uppercase ([A-Z]) chars."""
    import pandas as pd

    s = pd.Series(texts if isinstance(texts, pd.Series) else list(texts)).astype("string[pyarrow]")  # re2 kernels
    chars = s.str.len().to_numpy(dtype=np.float64)
    denom = np.maximum(chars, 1.0)
    count = lambda pattern: s.str.count(pattern).to_numpy(dtype=np.float64)  # noqa: E731
    return {"chars": chars, "words": count(r"\S+"), "non_ascii_share": count(r"[^\x00-\x7F]") / denom,
            "digit_share": count(r"[0-9]") / denom, "upper_share": count(r"[A-Z]") / denom}


def psi(reference_counts, production_counts, *, eps: float = PSI_EPSILON) -> float:
    """Population stability index: sum_i (q_i - p_i) ln(q_i / p_i), shares p (reference), q (production) floored at eps."""
    p, q = (np.maximum(np.asarray(c, dtype=np.float64) / np.sum(c), eps) for c in (reference_counts, production_counts))
    return float(np.sum((q - p) * np.log(q / p)))


def prediction_shift(reference_counts, production_counts) -> dict:
    """PSI, Jensen-Shannon distance (base 2) and the chi-square test of reference vs production predicted-label counts."""
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chi2_contingency

    ref, prod = np.asarray(reference_counts, dtype=np.float64), np.asarray(production_counts, dtype=np.float64)
    used = (ref + prod) > 0  # a label neither side predicts carries no information (and breaks chi-square)
    chi2, p_value = (0.0, 1.0) if used.sum() < 2 else chi2_contingency(np.vstack([ref[used], prod[used]]))[:2]
    return {"psi": psi(ref, prod), "js": float(jensenshannon(ref / ref.sum(), prod / prod.sum(), base=2)),
            "chi2": float(chi2), "p_value": float(p_value)}


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down; controls the family-wise error rate)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def _sample_index(n: int, size: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))


def _msp(logits: np.ndarray) -> np.ndarray:
    return msp_score(logits)


def _check_logits(logits, n: int, labels: Sequence[str]) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != (n, len(labels)) or not np.isfinite(logits).all():
        raise DistillError(f"the model returned logits of shape {logits.shape} (finite: {np.isfinite(logits).all()}) "
                           f"for {n} texts and labels {list(labels)}", "pass the model's logits (N, C) in label order")
    return logits


def _floats(values, digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


def reference_profile(texts: Sequence[str], logits, labels: Sequence[str], *, scope_threshold: float | None,
                      scope_scores=None, sample_size: int = 2000, seed: int = 0) -> dict:
    """JSON-able reference of the champion on its reference texts: predicted-label counts, out-of-scope share, and
    seeded samples (the same rows for all) of the scope score and the text statistics.

    `scope_scores` (N,): the scores of the guard the edge model ships (higher = in scope), so that the monitor
    counts what predictions count; None: the MSP of the logits."""
    texts = [str(t) for t in texts]
    if not texts:
        raise DistillError("no reference texts", "build the reference profile from the validation and test texts")
    logits = _check_logits(logits, len(texts), labels)
    pred = logits.argmax(axis=1)
    score = _msp(logits) if scope_scores is None else np.asarray(scope_scores, dtype=np.float64)
    if score.shape != (len(texts),):
        raise DistillError(f"{score.shape} scope scores for {len(texts)} texts", "pass one scope score per text")
    idx = _sample_index(len(texts), sample_size, seed)
    stats = text_statistics([texts[i] for i in idx])
    return {"format": PROFILE_FORMAT, "labels": list(labels), "n": len(texts), "sample_size": int(len(idx)), "seed": seed,
            "predicted_counts": {l: int(c) for l, c in zip(labels, np.bincount(pred, minlength=len(labels)))},
            "scope": {"threshold": None if scope_threshold is None else float(scope_threshold),
                      "score": "msp" if scope_scores is None else "guard",
                      "out_of_scope_share": None if scope_threshold is None else float(np.mean(score < scope_threshold))},
            "scope_score": _floats(score[idx]), "text": {k: _floats(v) for k, v in stats.items()}}


# ----------------------------------------------------------------------------------------------------------------
# the report


def _accuracy(frame: "pd.DataFrame", pred_labels: np.ndarray, labels: Sequence[str], th: DriftThresholds) -> dict | None:
    """Overall and per-slice accuracy of the scored rows that carry a label (None when none does)."""
    if "label" not in frame:
        return None
    has = frame["label"].notna().to_numpy()
    if not has.any():
        return None
    truth = frame["label"].to_numpy(dtype=object)
    unknown = sorted({str(v) for v in truth[has]} - set(labels))
    if unknown:
        raise DistillError(f"production labels {unknown[:_MAX_REPORTED]} are not among the model's labels {list(labels)}",
                           "map production labels to the model's label names (or drop the label column)")
    correct = pred_labels == truth
    cols = slice_columns(frame)
    labelled = frame[cols].assign(_correct=correct)[has]
    slices = []
    for col in cols:
        stats = labelled.groupby(col)["_correct"].agg(["size", "mean"])
        slices += [{"column": col, "value": str(value), "n": int(row["size"]), "accuracy": float(row["mean"])}
                   for value, row in stats[stats["size"] >= th.min_slice_rows].iterrows()]
    return {"n": int(has.sum()), "accuracy": float(correct[has].mean()),
            "slices": sorted(slices, key=lambda s: (s["accuracy"], s["column"], s["value"]))}


def _window(prod: "pd.DataFrame") -> dict | None:
    import pandas as pd

    if "timestamp" not in prod:
        return None
    ts = prod["timestamp"] if pd.api.types.is_datetime64_any_dtype(prod["timestamp"]) else \
        parse_timestamps(prod["timestamp"], [f"row {i}" for i in range(len(prod))])
    ts = ts.dropna()
    return None if ts.empty else {"first": ts.min().isoformat(), "last": ts.max().isoformat(), "rows": int(len(ts))}


def drift_report(reference: dict, prod: "pd.DataFrame", predict_logits: Callable[[list[str]], np.ndarray],
                 labels: Sequence[str], *, thresholds: DriftThresholds = DriftThresholds(),
                 scope_threshold: float | None, sample_size: int = 2000, seed: int = 0, outside=None) -> dict:
    """Compare production rows with the reference profile: text statistics on all rows, the model on a seeded sample
    of at most `sample_size` rows (predictions, out-of-scope share, accuracy). JSON-able; "drifted" plus reasons.
    `outside` (bool per row): rows naming a region outside the guard's scope, out of scope whatever their score."""
    from scipy.stats import binomtest, ks_2samp, wasserstein_distance

    start, th, labels = time.perf_counter(), thresholds, list(labels)
    if reference.get("format") != PROFILE_FORMAT or reference.get("labels") != labels:
        raise DistillError(f"the reference profile (format {reference.get('format')}, labels {reference.get('labels')}) "
                           f"does not fit this model (format {PROFILE_FORMAT}, labels {labels})",
                           "rebuild the reference profile with reference_profile() for the model being monitored")
    if "text" not in prod or len(prod) < th.min_rows:
        raise DistillError(f"{len(prod)} production rows{'' if 'text' in prod else ' and no text column'}: too few to judge "
                           f"drift (min_rows {th.min_rows})", "collect a larger production sample (or lower min_rows)")
    reasons = []

    # 1. text statistics: every row, KS + Wasserstein against the reference sample, Holm across the statistics
    stats = text_statistics(prod["text"])
    tests = {k: ks_2samp(reference["text"][k], stats[k]) for k in TEXT_STATS}
    adjusted = dict(zip(tests, holm([t.pvalue for t in tests.values()])))
    text = {}
    for k, t in tests.items():
        drifted = bool(adjusted[k] < th.p_value and t.statistic > th.max_ks)
        text[k] = {"ks": float(t.statistic), "p_value": float(t.pvalue), "p_adjusted": float(adjusted[k]),
                   "wasserstein": float(wasserstein_distance(reference["text"][k], stats[k])),
                   "reference_median": float(np.median(reference["text"][k])), "median": float(np.median(stats[k])),
                   "drifted": drifted}
        if drifted:
            reasons.append(f"text statistic {k} shifted: KS {t.statistic:.3f} > {th.max_ks} (Holm p {adjusted[k]:.2g} "
                           f"< {th.p_value}); median {text[k]['reference_median']:.3g} -> {text[k]['median']:.3g}")

    # 2. the model on a seeded sample
    idx = _sample_index(len(prod), sample_size, seed)
    scored = prod.iloc[idx]
    t_model = time.perf_counter()
    out = predict_logits(scored["text"].tolist())  # logits, or (logits, the shipped guard's scope scores)
    logits, guard_scores = out if isinstance(out, tuple) else (out, None)
    logits = _check_logits(logits, len(idx), labels)
    model_seconds = time.perf_counter() - t_model
    pred = logits.argmax(axis=1)
    score = _msp(logits) if guard_scores is None else np.asarray(guard_scores, dtype=np.float64)
    ref_counts = np.array([reference["predicted_counts"][l] for l in labels])
    prod_counts = np.bincount(pred, minlength=len(labels))
    shift = prediction_shift(ref_counts, prod_counts)
    drifted = bool(shift["p_value"] < th.p_value and (shift["psi"] > th.max_psi or shift["js"] > th.max_js))
    prediction = {**shift, "reference_shares": dict(zip(labels, _floats(ref_counts / ref_counts.sum()))),
                  "shares": dict(zip(labels, _floats(prod_counts / prod_counts.sum()))), "drifted": drifted}
    if drifted:
        reasons.append(f"predicted labels shifted: PSI {shift['psi']:.3f} (max {th.max_psi}), JS distance "
                       f"{shift['js']:.3f} (max {th.max_js}), chi-square p {shift['p_value']:.2g} < {th.p_value}")

    # 3. out of scope: the scope score (the guard's, or MSP) below the threshold, against the reference share
    # (recomputed from its score sample when the reference was profiled with another threshold)
    scope = None
    if scope_threshold is not None:
        ref_scope = reference["scope"]
        ref_share = ref_scope["out_of_scope_share"] if ref_scope["threshold"] == scope_threshold else \
            float(np.mean(np.asarray(reference.get("scope_score", reference.get("msp"))) < scope_threshold))
        out = int(np.sum((score < scope_threshold) | (False if outside is None else np.asarray(outside)[idx])))
        p = binomtest(out, len(idx), min(max(ref_share, 1e-9), 1 - 1e-9), alternative="greater").pvalue
        increase = out / len(idx) - ref_share
        drifted = bool(increase > th.max_out_of_scope_increase and p < th.p_value)
        scope = {"threshold": float(scope_threshold), "reference_share": float(ref_share), "share": out / len(idx),
                 "increase": float(increase), "p_value": float(p), "drifted": drifted}
        if drifted:
            reasons.append(f"out-of-scope share rose from {ref_share:.1%} to {out / len(idx):.1%} (+{increase:.1%} > "
                           f"+{th.max_out_of_scope_increase:.0%}, binomial p {p:.2g} < {th.p_value})")

    # 4. accuracy where labels exist
    accuracy = _accuracy(scored, np.asarray(labels, dtype=object)[pred], labels, th)
    if accuracy is not None and th.min_accuracy is not None:
        low = [("overall", accuracy["accuracy"], accuracy["n"])] * (accuracy["accuracy"] < th.min_accuracy) + \
            [(f"{s['column']}={s['value']}", s["accuracy"], s["n"]) for s in accuracy["slices"] if s["accuracy"] < th.min_accuracy]
        reasons += [f"accuracy {name} {acc:.3f} < {th.min_accuracy} (n={n} labelled rows)" for name, acc, n in low]
    return {"drifted": bool(reasons), "reasons": reasons, "rows": int(len(prod)), "scored": int(len(idx)),
            "reference_rows": reference["n"], "window": _window(prod), "prediction": prediction, "scope": scope,
            "text": text, "accuracy": accuracy, "thresholds": asdict(th), "model_seconds": round(model_seconds, 3),
            "seconds": round(time.perf_counter() - start, 3)}


def drift_markdown(report: dict) -> str:
    """Markdown for the Prefect UI: verdict and reasons, a table of statistic / value / threshold / result, slice accuracy."""
    th = report["thresholds"]
    flag = lambda d: "**drift**" if d else "ok"  # noqa: E731
    lines = [f"## {'DRIFT' if report['drifted'] else 'No drift'}: {report['rows']:,} production rows, "
             f"{report['scored']:,} scored by the model"]
    lines += [f"- {r}" for r in report["reasons"]] or ["All statistics are within their thresholds."]
    if report.get("window"):
        lines.append(f"\nWindow: {report['window']['first']} to {report['window']['last']}")
    p, alpha = report["prediction"], th["p_value"]
    rows = [("predicted labels: PSI", f"{p['psi']:.3f}", f"> {th['max_psi']} and chi-square p < {alpha}", flag(p["drifted"])),
            ("predicted labels: JS distance", f"{p['js']:.3f}", f"> {th['max_js']} and chi-square p < {alpha}",
             flag(p["drifted"])),
            ("predicted labels: chi-square p", f"{p['p_value']:.2g}", f"< {alpha} (with PSI or JS over)", "")]
    if report["scope"]:
        s = report["scope"]
        rows.append(("out-of-scope share (scope score below threshold)",
                     f"{s['reference_share']:.1%} -> {s['share']:.1%} ({s['increase']:+.1%}; binomial p {s['p_value']:.2g})",
                     f"rise > +{th['max_out_of_scope_increase']:.0%} and p < {alpha}", flag(s["drifted"])))
    rows += [(f"text {k}: KS", f"{t['ks']:.3f} (Holm p {t['p_adjusted']:.2g})", f"> {th['max_ks']} and Holm p < {alpha}",
              flag(t["drifted"])) for k, t in report["text"].items()]
    acc = report["accuracy"]
    if acc:
        rows.append(("accuracy (labelled scored rows)", f"{acc['accuracy']:.3f} (n={acc['n']})",
                     f"< {th['min_accuracy']}" if th["min_accuracy"] is not None else "not gated",
                     flag(th["min_accuracy"] is not None and acc["accuracy"] < th["min_accuracy"])))
    lines += ["", "| statistic | value | threshold (drift when) | result |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if acc and acc["slices"]:
        lines += ["", f"### Slice accuracy (slices with >= {th['min_slice_rows']} labelled rows, worst first)", "",
                  "| slice | rows | accuracy |", "|---|---|---|"]
        cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731  (a | in a slice value would split the row)
        lines += [f"| {cell(s['column'])}={cell(s['value'])} | {s['n']} | {s['accuracy']:.3f} |" for s in acc["slices"]]
    lines.append(f"\n{report['seconds']:.1f} s ({report['model_seconds']:.1f} s in the model)")
    return "\n".join(lines)
