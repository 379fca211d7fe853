"""The gap report as one self-contained HTML page: verdict first, then tables and plots ops teams scan.

`render_html(report, title=..., gates=...)` takes the JSON-able report dict (models, suites with bootstrap
intervals, flags, calibration, OOD, stress, scope, not_evaluated, worst_slices; any section may be missing)
and returns a page with inline CSS and plots as inline base64 PNG: no JavaScript, no external URLs, so it
opens offline from an MLflow artifact or a Prefect link. Every text from the data is HTML-escaped (slice
names are user data) and drawn in plots with mathtext off (a `$` in a slice name stays a dollar sign).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Iterable

from distill_gap.edge.guard import NAMES
from distill_gap.evaluation.gates import MIN_SLICE_ROWS  # smaller slices are never flagged
from distill_gap.evaluation.noninferiority import would_decide
from distill_gap.evaluation.regions import summary as region_summary
from distill_gap.outcomes import FAIL, INSUFFICIENT, by_outcome

PLOT_DPI = 100  # 100 dpi keeps ~30 slices x 5 models well under 1 MB of PNG
MAX_SLICES_PLOTTED = 30  # the gap plot shows the worst 30 slices of MIN_SLICE_ROWS+ rows; the tables list all
MAX_LABEL_CHARS = 48  # slice names in plot axes are cut here (the table shows them in full)
# Colour-blind-safe (Okabe-Ito); the teacher is always grey so compressed models stand out beside it
TEACHER_COLOUR = "#7f7f7f"
MODEL_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442")
DASH = "–"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
 margin:0 auto;max-width:1360px;padding:16px 20px 48px}
h1{font-size:22px;margin:8px 0 12px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;
 padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
nav a{margin-right:14px;color:#0969da;text-decoration:none}
.verdict{border-radius:8px;padding:12px 16px;margin:8px 0 12px;border:1px solid}
.verdict.pass{background:#e6f4ea;border-color:#34a853}.verdict.fail{background:#fce8e6;border-color:#d93025}
.verdict.insufficient{background:#fff8c5;border-color:#bf8700}.verdict.none{background:#f6f8fa;border-color:#d0d7de}.verdict .big{font-size:20px;font-weight:700}
.verdict ul{margin:6px 0 0 18px;padding:0}
.summary{font-size:15px;margin:6px 0 4px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:3px 8px;white-space:nowrap}
th{background:#f6f8fa;font-weight:600;text-align:center}
td{text-align:right}td.name{text-align:left;white-space:normal;min-width:12em;max-width:24em;overflow-wrap:normal;word-break:normal;hyphens:none}
.ci{color:#57606a;font-size:12px}td.flag .ci{color:#a50e0e}
tr:nth-child(even) td{background:#fbfcfd}
td.flag,tr:nth-child(even) td.flag{background:#fde2e1;color:#a50e0e;font-weight:600}
td.gain{color:#1a7f37}td.loss{color:#a50e0e}td.warn{color:#9a6700}td.muted{color:#8c959f}
td.pass{color:#1a7f37;font-weight:600}td.fail{color:#a50e0e;font-weight:600}
.legend{color:#57606a;font-size:12.5px;margin:2px 0 8px}
.plot{max-width:100%;height:auto;border:1px solid #eaeef2;margin:4px 0 10px}
.ok{color:#1a7f37}
.findings{margin:6px 0 10px 18px;padding:0}.findings li{margin:3px 0}
details{margin:6px 0 12px}summary{cursor:pointer;color:#0969da}
"""


# ---------------------------------------------------------------------------------------------
# Formatting (every data text goes through _e; numbers through _num)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x, fmt: str = ".3f") -> str:
    return format(x, fmt) if _finite(x) else DASH


def _interval_text(metrics: dict, key: str = "accuracy") -> tuple[str, str | None]:
    """("0.720 [0.671, 0.768]" or "0.60 (n too small)" or "0.720", note for a title attribute)."""
    ci = (metrics.get("ci") or {}).get(key) or {}
    value = ci.get("value", metrics.get(key))
    if _finite(ci.get("low")) and _finite(ci.get("high")):
        return f"{_num(value)} [{_num(ci['low'])}, {_num(ci['high'])}]", None
    if ci.get("note"):
        # two digits: the point estimate of a tiny slice does not deserve three
        return f"{_num(value, '.2f')} ({ci['note']})", ci["note"]
    return _num(value), None


def _acc_html(metrics: dict, key: str = "accuracy", *, small: bool = False) -> tuple[str, str | None]:
    """(escaped cell html, note): the value, its interval in a smaller grey span; `small` (a slice under
    MIN_SLICE_ROWS rows, said once above its table): two digits and no note."""
    ci = (metrics.get("ci") or {}).get(key) or {}
    value = ci.get("value", metrics.get(key))
    if small:
        return _num(value, ".2f"), None
    if _finite(ci.get("low")) and _finite(ci.get("high")):
        return f'{_num(value)} <span class="ci">[{_num(ci["low"])}, {_num(ci["high"])}]</span>', None
    text, note = _interval_text(metrics, key)
    return _e(text), note


def _plot_text(s: str) -> str:
    s = str(s)
    return s if len(s) <= MAX_LABEL_CHARS else s[:MAX_LABEL_CHARS - 1] + "…"


def _table(head: list[list[tuple[str, int]]], rows: Iterable[str]) -> str:
    """head: header rows of (escaped html, colspan); rows: ready <tr> strings."""
    thead = "".join("<tr>" + "".join(f'<th colspan="{span}">{text}</th>' if span > 1 else f"<th>{text}</th>"
                                     for text, span in row) + "</tr>" for row in head)
    return f'<div class="scroll"><table><thead>{thead}</thead><tbody>{"".join(rows)}</tbody></table></div>'


def _td(text: str, cls: str = "", title: str | None = None) -> str:
    """A cell; `text` must already be escaped."""
    attrs = (f' class="{cls}"' if cls else "") + (f' title="{_e(title)}"' if title else "")
    return f"<td{attrs}>{text}</td>"


# ---------------------------------------------------------------------------------------------
# Report shape helpers


def _models(report: dict) -> list[str]:
    models = list(report.get("models") or [])
    for by_model in (report.get("suites") or {}).values():
        models += [m for m in by_model if m not in models]
    return models


def _suite_groups(suites: dict) -> list[tuple[str, str, list[str]]]:
    """(anchor, heading, suite names) for held-out splits, test slices and OOD suites, in report order."""
    splits = [s for s in suites if not s.startswith(("slice:", "ood:"))]
    slices = [s for s in suites if s.startswith("slice:")]
    ood = [s for s in suites if s.startswith("ood:")]
    groups = [("splits", "Held-out splits", splits), ("slices", "Test slices", slices),
              ("ood-suites", "Out-of-distribution suites", ood)]
    return [g for g in groups if g[2]]


def _gap(suites: dict, suite: str, model: str, teacher: str) -> float | None:
    by_model = suites.get(suite) or {}
    acc, ref = (by_model.get(model) or {}).get("accuracy"), (by_model.get(teacher) or {}).get("accuracy")
    # rounded to what the page shows, so that a float residue never reads as "-0.000" in loss colour
    return round(acc - ref, 3) + 0.0 if _finite(acc) and _finite(ref) else None


def _worst_slices(report: dict, model: str, teacher: str, k: int = 3) -> list[tuple[str, float]]:
    """Slice losses (gap < 0) from the report's worst_slices, else the model's flags, else the slice suites."""
    if report.get("worst_slices"):
        return [(s, g) for s, g in report["worst_slices"].get(model) or [] if _finite(g) and g < 0][:k]
    flagged = sorted(((f["suite"], f["gap"]) for f in report.get("flags") or []
                      if f.get("model") == model and str(f.get("suite", "")).startswith("slice:")
                      and _finite(f.get("gap"))), key=lambda x: x[1])
    if flagged:
        return flagged[:k]
    suites = report.get("suites") or {}
    gaps = [(s, _gap(suites, s, model, teacher)) for s in suites if s.startswith("slice:")
            and ((suites[s].get(teacher) or {}).get("n") or 0) >= MIN_SLICE_ROWS]
    return sorted([(s, g) for s, g in gaps if g is not None and g < 0], key=lambda x: x[1])[:k]


def _reference(models: list[str], edge: str | None) -> str:
    """The model slices are sorted by: the shipped one where known, else the student, else the first compressed."""
    if edge in models[1:]:
        return edge
    return "student" if "student" in models[1:] else (models[1] if len(models) > 1 else models[0])


def _slices_by_size(suites: dict, models: list[str], ref: str) -> tuple[list[str], list[str]]:
    """(slices of MIN_SLICE_ROWS+ teacher rows sorted by ref's gap, worst first; the smaller ones, by name order)."""
    teacher = models[0]
    slices = [s for s in suites if s.startswith("slice:")]
    big = [s for s in slices if ((suites[s] or {}).get(teacher) or {}).get("n", 0) >= MIN_SLICE_ROWS]
    gaps = {s: _gap(suites, s, ref, teacher) for s in big}
    big.sort(key=lambda s: (gaps[s] is None, gaps[s] if gaps[s] is not None else 0.0))
    return big, sorted((s for s in slices if s not in big), key=_natural)


def _natural(name: str) -> list:
    """Sort key that puts "Condition 2" before "Condition 10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------
# Sections


def _verdict(gates: dict | None, report: dict) -> str:
    flags = report.get("flags") or []
    flag_note = (f"{len(flags)} suite/model pair(s) lose more than {_num(report.get('threshold'), '.0%')} "
                 f"accuracy against the teacher." if flags else "")
    if not gates:
        return (f'<div class="verdict none"><div class="big">No promotion gates in this report</div>'
                f"{_e(flag_note)}</div>")
    failed, thin = by_outcome(gates, FAIL), by_outcome(gates, INSUFFICIENT)
    if thin and not failed:
        items = "".join(f"<li><b>{_e(k)}</b>: {_e(g.get('detail', ''))}</li>" for k, g in thin.items())
        passed = [k for k in gates if k not in thin]
        return (f'<div class="verdict insufficient"><div class="big">? {len(thin)} of {len(gates)} gates: '
                "insufficient evidence (@challenger only; @champion needs a named approver's signed waiver)</div>"
                f"<ul>{items}</ul><div>Passed: {_e(', '.join(passed)) or DASH}</div>{_e(flag_note)}</div>")
    if not failed:
        items = "".join(f"<li>{_e(k)}: {_num(g.get('value'))} (threshold {_num(g.get('threshold'))})"
                        + (f" – {_e(g['detail'])}" if g.get("detail") else "") + "</li>" for k, g in gates.items())
        return (f'<div class="verdict pass"><div class="big">✔ All {len(gates)} gates passed</div>'
                f"<ul>{items}</ul>{_e(flag_note)}</div>")
    items = "".join(f"<li><b>{_e(k)}</b>: measured {_num(g.get('value'))}, threshold {_num(g.get('threshold'))}"
                    + (f" – {_e(g['detail'])}" if g.get("detail") else "") + "</li>" for k, g in failed.items())
    passed = [k for k in gates if k not in failed and k not in thin]
    tail = (f"<div>Passed: {_e(', '.join(passed))}</div>" if passed else "") + (
        f"<div>Insufficient evidence: {_e(', '.join(thin))}</div>" if thin else "")
    return (f'<div class="verdict fail"><div class="big">✘ {len(failed)} of {len(gates)} gates failed: '
            f"{_e(', '.join(failed))}</div><ul>{items}</ul>{tail}{_e(flag_note)}</div>")


def _summary(report: dict, models: list[str]) -> str:
    teacher, others = models[0], models[1:]
    flagged = {(f.get("suite"), f.get("model")) for f in report.get("flags") or []}
    parts = []
    for m in others:
        worst = _worst_slices(report, m, teacher)
        if worst:
            parts.append(f"<b>{_e(m)}</b> on " + ", ".join(
                f"{_e(s.removeprefix('slice:'))} ({_num(g, '+.3f')}{' ⚠' if (s, m) in flagged else ''})"
                for s, g in worst))
    if not parts:
        return '<p class="summary">No slice where a compressed model loses accuracy against the teacher.</p>'
    key = " (⚠ = flagged: beyond the threshold)" if flagged else ""
    return f'<p class="summary">Compression lost most on: {"; ".join(parts)}.{key}</p>'


def _findings(report: dict, models: list[str], labels: list[str]) -> str:
    """What matters, in words: a detector at chance, a class no model predicts, a teacher weakness the compressed
    models inherited, and whether the teacher beats always answering the majority class."""
    items = _chance_findings(report) + _class_findings(report, models, labels) + _inherited_findings(report)
    base = next((c for c in (report.get("noninferiority") or {}).get("teacher") or []
                 if c.get("check") == "accuracy vs majority class" and c.get("n")), None)
    if base:  # the teacher's own check: "teacher" holds the constant answer's accuracy, "model" the teacher's
        said = {"pass": "is shown better than", "fail": "is shown no better than"}.get(
            base["outcome"], "is not shown better than")
        needed = ("; " + would_decide(base["rows_needed"])
                  if base["outcome"] == "insufficient" and base.get("rows_needed") else "")
        items.append(f"The teacher {said} always answering <b>{_e(base.get('baseline', '?'))}</b>: accuracy "
                     f"{_num(base.get('model'))} vs {_num(base.get('teacher'))} on {_e(base['n'])} test rows{needed}.")
    return f'<ul class="findings">{"".join(f"<li>{i}</li>" for i in items)}</ul>' if items else ""


def _chance_findings(report: dict) -> list[str]:
    """One statement per OOD set and detector whose AUROC interval holds 0.5 for some model (the shipped first)."""
    shipped = {m: g.get("detector") for m, g in (report.get("scope") or {}).items()}
    out = []
    for suite, by_model in (report.get("ood") or {}).items():
        at_chance: dict[str, list[str]] = {}
        for m, dets in (by_model or {}).items():
            for det, r in (dets or {}).items():
                ci = (r or {}).get("ci") if isinstance(r, dict) else None
                if ci and _finite(ci.get("low")) and _finite(ci.get("high")) and ci["low"] <= 0.5 <= ci["high"]:
                    at_chance.setdefault(det, []).append(
                        f"{_e(m)} {_num(r.get('auroc'), '.2f')} [{_num(ci['low'], '.2f')}, {_num(ci['high'], '.2f')}]")
        for det, which in sorted(at_chance.items(), key=lambda kv: (kv[0] not in shipped.values(), kv[0])):
            guard = " (the shipped scope guard's detector)" if det in shipped.values() else ""
            out.append(f"<b>The {_e(det)} detector{guard} is at chance on {_e(suite.removeprefix('ood:'))}</b>: "
                       f"its AUROC interval holds 0.5 for {'; '.join(which)}: it does not tell these rows from test "
                       "rows.")
    return out


def _class_findings(report: dict, models: list[str], labels: list[str]) -> list[str]:
    """A class with test rows that no model predicts: recall 0 for every model (bootstrap point estimates, else
    the non-inferiority checks' recall values)."""
    test = (report.get("suites") or {}).get("test") or {}
    recall: dict[str, dict[str, float]] = {}  # label -> model -> recall
    support: dict[str, int] = {}
    for m in models:
        for i, r in enumerate(((test.get(m) or {}).get("ci") or {}).get("per_class_recall") or []):
            if i < len(labels) and _finite(r.get("value")):
                recall.setdefault(labels[i], {})[m] = r["value"]
                support[labels[i]] = r.get("support") or 0
    for m, checks in (report.get("noninferiority") or {}).items():
        for c in checks:
            label = str(c.get("check", "")).removeprefix("recall:")
            if c.get("check", "").startswith("recall:") and c.get("n"):
                recall.setdefault(label, {}).setdefault(m, c.get("model"))
                recall[label].setdefault(models[0], c.get("teacher"))
                support.setdefault(label, c["n"])
    out = []
    for label, by_model in recall.items():
        if set(models) <= set(by_model) and all(_finite(v) and v == 0 for v in by_model.values()):
            out.append(f"<b>No model predicts {_e(label)}</b>: its recall on test is 0 for every model, the teacher "
                       f"included ({_e(support.get(label, '?'))} rows of it).")
    return out


def _inherited_findings(report: dict) -> list[str]:
    """Non-inferiority checks flagged `inherited`: the teacher itself is below its floor there."""
    by_check: dict[str, list[tuple[str, dict]]] = {}
    for m, checks in (report.get("noninferiority") or {}).items():
        if m == "teacher":
            continue
        for c in checks:
            if c.get("inherited"):
                by_check.setdefault(c["check"], []).append((m, c))
    out = []
    for check, pairs in by_check.items():
        models = ", ".join(f"{_e(m)} {_num(c.get('model'))}" for m, c in pairs)
        out.append(f"<b>Inherited from the teacher: {_e(check)}</b>: the teacher itself is at "
                   f"{_num(pairs[0][1].get('teacher'))} here (below its floor); the compressed models' "
                   f"{models} is the teacher's weakness, not a loss from compression.")
    return out


def _suite_table(report: dict, names: list[str], models: list[str], *, compact: bool = False,
                 small: bool = False) -> str:
    """Teacher beside each compressed model, one row per suite. compact: accuracy and its gap only (the slice
    tables; macro-F1, fidelity and KL per slice are in the JSON); small: suites under MIN_SLICE_ROWS rows."""
    suites = report["suites"]
    teacher, others = models[0], models[1:]
    flagged = {(f.get("suite"), f.get("model")) for f in report.get("flags") or []}
    per_model = ("accuracy [CI]", "Δ acc") if compact else ("accuracy [CI]", "Δ acc", "macro-F1", "fidelity", "KL")
    if small:
        per_model = ("accuracy", "Δ acc")
    teacher_cols = per_model[:1] if compact or small else ("accuracy [CI]", "macro-F1")
    head = [[("slice" if compact or small else "suite", 1), ("n", 1), (_e(teacher), len(teacher_cols))]
            + [(_e(m), len(per_model)) for m in others],
            [("", 1), ("", 1)] + [(h, 1) for h in teacher_cols] + [(h, 1) for _ in others for h in per_model]]
    rows = []
    for suite in names:
        by_model = suites[suite] or {}
        t = by_model.get(teacher) or {}
        n = t.get("n", next((v.get("n") for v in by_model.values() if v and "n" in v), None))
        acc, note = _acc_html(t, small=small)
        cells = [_td(_e(suite.removeprefix("slice:")), "name", suite), _td(_e(n if n is not None else DASH)),
                 _td(acc, "muted" if note else "", note)]
        if not (compact or small):
            cells.append(_td(_num(t.get("macro_f1"))))
        for m in others:
            s = by_model.get(m)
            if not s:
                cells += [_td(DASH, "muted")] * len(per_model)
                continue
            acc, note = _acc_html(s, small=small)
            gap = _gap(suites, suite, m, teacher)
            flag = (suite, m) in flagged
            gap_cls = "flag" if flag else ("loss" if gap is not None and gap < 0 else "gain" if gap else "")
            cells += [_td(acc, "flag" if flag else ("muted" if note else ""), note),
                      _td(_num(gap, "+.3f"), gap_cls, "flagged: loses more than the threshold" if flag else None)]
            if not (compact or small):
                cells += [_td(_num(s.get("macro_f1"))), _td(_num(s.get("fidelity"))),
                          _td(_num(s.get("kl_teacher"), ".4f"))]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table(head, rows)


def _per_class_recall(report: dict, models: list[str], labels: list[str]) -> str:
    test = (report.get("suites") or {}).get("test") or {}
    per_model = {m: ((test.get(m) or {}).get("ci") or {}).get("per_class_recall") for m in models}
    per_model = {m: r for m, r in per_model.items() if r}
    if not per_model:
        return ""
    width = max(len(r) for r in per_model.values())
    names = list(labels) + [f"class {i}" for i in range(len(labels), width)]
    rows = []
    for i in range(width):
        cells = [_td(_e(names[i]), "name")]
        for m in per_model:
            r = per_model[m][i] if i < len(per_model[m]) else {}
            text, note = _interval_text({"ci": {"recall": r}}, "recall")
            support = f" (n={r['support']})" if r.get("support") is not None else ""
            cells.append(_td(_e(text + support), "muted" if note else "", note))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = [[("class", 1)] + [(_e(m), 1) for m in per_model]]
    return "<h3>Per-class recall on test [CI]</h3>" + _table(head, rows)


def _calibration_table(calibration: dict) -> str:
    rows = []
    for m, c in calibration.items():
        before, after = c.get("ece_before"), c.get("ece_after")
        better = _finite(before) and _finite(after) and after <= before
        rows.append("<tr>" + _td(_e(m), "name") + _td(_num(c.get("temperature"), ".2f")) + _td(_num(before))
                    + _td(_num(after), "gain" if better else "loss" if _finite(after) else "")
                    + "</tr>")
    return _table([[("model", 1), ("temperature T", 1), ("ECE before", 1), ("ECE after", 1)]], rows)


_OOD_COLUMNS = ("energy", "mahalanobis", "knn", "lexical", "mahalanobis+lexical")  # after MSP, in this order


def _ood_table(ood: dict) -> str:
    rows, notes = [], []
    tpr = 0.95
    for suite, by_model in ood.items():
        for m, o in (by_model or {}).items():
            msp, energy = o.get("msp") or {}, o.get("energy") or {}
            tpr = msp.get("tpr", energy.get("tpr", tpr))
            cells = [_td(_e(suite.removeprefix("ood:")), "name"), _td(_e(m), "name"), _td(_num(msp.get("auroc"))),
                     _td(_e(drop_cell(msp.get("drop_vs_teacher")))), _td(_num(msp.get("fpr_at_tpr")))]
            for det in _OOD_COLUMNS:
                d = o.get(det) or {}
                cells += [_td(_num(d.get("auroc")), "loss" if d.get("note") else ""), _td(_num(d.get("fpr_at_tpr")))]
                if d.get("note"):
                    notes.append(f"{suite.removeprefix('ood:')}, {m}, {det}: {d['note']}")
            cells += [_td(_e(msp.get("n_in", energy.get("n_in", DASH)))),
                      _td(_e(msp.get("n_out", energy.get("n_out", DASH))))]
            rows.append("<tr>" + "".join(cells) + "</tr>")
    at = f"FPR@{_num(tpr * 100 if _finite(tpr) else None, '.0f')}"
    head = [[("OOD suite", 1), ("model", 1), ("MSP", 3), *[(NAMES[d], 2) for d in _OOD_COLUMNS], ("n in", 1),
             ("n out", 1)],
            [("", 1), ("", 1), ("AUROC", 1), ("drop vs teacher [paired 95%]", 1), (at, 1)]
            + [(h, 1) for _ in _OOD_COLUMNS for h in ("AUROC", at)] + [("", 1), ("", 1)]]
    table = _table(head, rows)
    if notes:  # a detector that does not separate a set is said in words, not only shown as a number
        table += "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes[:12]) + "</ul>"
    return table


def drop_cell(drop: dict | None) -> str:
    if not drop or not _finite(drop.get("value")):
        return DASH
    if drop.get("low") is None:
        return f"{drop['value']:+.3f} (n too small)"
    return f"{drop['value']:+.3f} [{drop['low']:+.3f}, {drop['high']:+.3f}]"


def _stress_table(stress: dict, models: list[str]) -> str:
    present = [m for m in models if any(m in (v or {}) for v in stress.values())]
    present += [m for v in stress.values() for m in (v or {}) if m not in present]
    head = [[("variant", 1)] + [(_e(m), 4) for m in present],
            [("", 1)] + [(h, 1) for _ in present for h in ("clean acc", "stressed acc", "drop", "flip rate")]]
    rows = []
    for variant, by_model in stress.items():
        cells = [_td(_e(variant), "name")]
        for m in present:
            s = (by_model or {}).get(m) or {}
            drop = s.get("accuracy_drop")
            cells += [_td(_num(s.get("clean_accuracy"))), _td(_num(s.get("stressed_accuracy"))),
                      _td(_num(drop, "+.3f"), "loss" if _finite(drop) and drop > 0 else ""),
                      _td(_num(s.get("flip_rate")))]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table(head, rows)


def _scope_table(scope: dict) -> str:
    rows = ["<tr>" + _td(_e(m), "name") + _td(_e(s.get("detector", s.get("score", DASH))), "name")
            + _td(_num(s.get("threshold"), ".4g")) + _td(_num(s.get("tpr"), ".0%"))
            + _td(_num(s.get("temperature"), ".2f"))
            + _td(_e(", ".join(f"{k.removeprefix('ood:')} {v:.0%}" for k, v in (s.get("ood_in_scope") or {}).items())
                     or DASH), "name") + _td(_e(region_summary(s.get("regions")) or DASH), "name") + "</tr>"
            for m, s in scope.items()]
    return _table([[("model", 1), ("detector", 1), ("threshold (in scope if score ≥)", 1), ("in-scope rate kept", 1),
                    ("temperature", 1), ("OOD rows still in scope", 1), ("regions", 1)]], rows)


def _noninferiority_table(noninferiority: dict) -> str:
    """Every paired check of every compressed model: drop with its one-sided bounds, margin, outcome."""
    cls = {"pass": "gain", "fail": "loss", "insufficient": "warn"}
    rows = []
    for m, checks in noninferiority.items():
        for c in checks:
            bounds = (f"{c['drop']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" if c.get("n") else "no rows")
            rows.append("<tr>" + _td(_e(m), "name")
                        + _td(_e(c["check"] + (" (inherited: the teacher is weak here)" if c.get("inherited") else "")),
                              "name") + _td(_e(c.get("n"))) + _td(_num(c.get("teacher"))) + _td(_num(c.get("model")))
                        + _td(_e(bounds)) + _td(_num(c.get("margin"))) + _td(_e(c["outcome"]), cls.get(c["outcome"], ""))
                        + _td(_e(f"{c['rows_needed']:,}" if c.get("rows_needed") else DASH)) + "</tr>")
    return _table([[("model", 1), ("check", 1), ("n", 1), ("teacher", 1), ("model", 1),
                    ("drop vs teacher [one-sided 95% bounds]", 1), ("margin", 1), ("outcome", 1),
                    ("labelled rows that would decide it", 1)]], rows)


def _not_evaluated(items: list[dict]) -> str:
    rows = ["<tr>" + _td(_e(i.get("model", DASH)), "name") + _td(_e(i.get("suite", DASH)), "name")
            + _td(_e(i.get("reason", "")), "name") + "</tr>" for i in items]
    return _table([[("model", 1), ("suite", 1), ("reason", 1)]], rows)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib Figure + Agg canvas: no pyplot state, no GUI backend). Margins are fixed in inches
# instead of tight_layout / bbox_inches="tight": each of those draws the whole figure once more (3x slower).


def _colours(models: list[str]) -> dict[str, str]:
    return {m: TEACHER_COLOUR if i == 0 else MODEL_COLOURS[(i - 1) % len(MODEL_COLOURS)]
            for i, m in enumerate(models)}


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _figure(width: float, height: float, *, left: float, right: float, top: float, bottom: float):
    """A Figure of the given size (inches) whose axes area leaves fixed margins (inches) for labels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height)
    return fig


def _panels(n: int, panel_w: float, panel_h: float, *, ncols: int = 4, title: str | None = None,
            gap_h: float = 0.55, **share):
    """A figure with n equal panels on a grid (shared axes: tick labels drawn once per row / column)."""
    cols = min(n, ncols)
    rows = -(-n // cols)
    gap_w, left, bottom, top = 0.25, 0.6, 0.5, 0.35 + (0.3 if title else 0.0)
    width = left + 0.15 + cols * panel_w + (cols - 1) * gap_w
    height = bottom + top + rows * panel_h + (rows - 1) * gap_h
    fig = _figure(width, height, left=left, right=0.15, top=top, bottom=bottom)
    fig.subplots_adjust(wspace=gap_w / panel_w, hspace=gap_h / panel_h)
    axes = fig.subplots(rows, cols, squeeze=False, **share).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    return fig, axes[:n]


def _top_legend(ax, n: int) -> None:
    """The legend in one row between the title and the axes, where it never hides a bar."""
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=min(n, 6), frameon=False,
              borderaxespad=0.2, handlelength=1.2, columnspacing=1.0)


def _gap_plot(report: dict, models: list[str], slices: list[str], ref: str) -> str | None:
    """Per slice (already sorted, worst first), each compressed model's accuracy gap to the teacher in points with
    its paired interval; a line at 0 (the teacher) and at the flag threshold."""
    import numpy as np

    suites = report.get("suites") or {}
    teacher, shown = models[0], slices[:MAX_SLICES_PLOTTED]
    plotted = [m for m in models[1:] if any(_gap(suites, s, m, teacher) is not None for s in shown)]
    if not shown or not plotted:
        return None
    labels = [_plot_text(s.removeprefix("slice:")) + f"  (n={(suites[s].get(teacher) or {}).get('n', '?')})"
              for s in shown]
    label_w = 0.3 + 0.058 * max(len(t) for t in labels)  # DejaVu Sans 8 pt: ~0.06 in per character
    k = len(plotted)
    plot_h = len(shown) * (0.07 * k + 0.14)
    fig = _figure(label_w + 6.5, plot_h + 1.3, left=label_w, right=0.2, top=0.75, bottom=0.55)
    ax = fig.subplots()
    colours = _colours(models)
    y = np.arange(len(shown))
    flagged = {(f.get("suite"), f.get("model")) for f in report.get("flags") or []}
    lows, highs = [], []
    for j, m in enumerate(plotted):
        gap, lo, hi = [], [], []
        for s in shown:
            g = _gap(suites, s, m, teacher)
            ci = ((suites[s].get(m) or {}).get("ci") or {}).get("gap_vs_teacher") or {}
            ok = g is not None and _finite(ci.get("low")) and _finite(ci.get("high"))
            gap.append(100 * g if g is not None else np.nan)
            lo.append(100 * max(g - ci["low"], 0.0) if ok else 0.0)
            hi.append(100 * max(ci["high"] - g, 0.0) if ok else 0.0)
            if ok:
                lows.append(100 * ci["low"])
                highs.append(100 * ci["high"])
        ys = y - 0.4 + 0.8 * (j + 0.5) / k
        ax.errorbar(gap, ys, xerr=[lo, hi], fmt="o", ms=4.5, color=colours[m], ecolor=colours[m], elinewidth=1.1,
                    capsize=2, label=m)
        marks = [(g, yy) for g, yy, s in zip(gap, ys, shown) if (s, m) in flagged]
        if marks:
            ax.scatter(*zip(*marks), s=70, facecolors="none", edgecolors="#d93025", linewidths=1.2, zorder=4)
    threshold = report.get("threshold")
    ax.axvline(0, color=TEACHER_COLOUR, lw=1.2)
    if _finite(threshold):
        ax.axvline(-100 * threshold, color="#d93025", lw=1, ls="--")
    finite = [v for v in [*lows, *highs] if _finite(v)] + [
        100 * g for s in shown for m in plotted if (g := _gap(suites, s, m, teacher)) is not None]
    span = max([abs(v) for v in finite] + [100 * (threshold or 0.0) + 1, 5.0]) * 1.08
    ax.set_xlim(-span, span)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.5)  # worst slice on top
    for edge in y[:-1] + 0.5:
        ax.axhline(edge, color="#eaeef2", lw=0.8)
    ax.set_xlabel("accuracy gap to the teacher (points; whiskers: paired 90% interval on the same rows)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    extra = f", worst {len(shown)} of {len(slices)}" if len(shown) < len(slices) else ""
    ax.set_title(f"Accuracy gap to the teacher per test slice of {MIN_SLICE_ROWS}+ rows, worst first for "
                 f"{_plot_text(ref)}{extra}", fontsize=10, pad=22)
    _top_legend(ax, len(plotted))
    return _img(_png(fig), "accuracy gap to the teacher per slice")


def _reliability_plot(calibration: dict) -> str | None:
    """One panel per model: accuracy vs confidence per bin, before and after temperature scaling."""
    models = [m for m, c in calibration.items() if c.get("reliability_before") or c.get("reliability_after")]
    if not models:
        return None
    fig, axes = _panels(len(models), 2.3, 2.3, sharex=True, sharey=True,
                        title="Reliability: accuracy vs confidence per bin (dotted = perfectly calibrated)")
    for i, (ax, m) in enumerate(zip(axes, models)):
        c = calibration[m]
        ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=1)
        for key, colour, name, ece in (("reliability_before", "#D55E00", "before", c.get("ece_before")),
                                       ("reliability_after", "#0072B2", "after T", c.get("ece_after"))):
            bins = [b for b in c.get(key) or [] if _finite(b.get("confidence")) and _finite(b.get("accuracy"))]
            if not bins:
                continue
            total = sum(b.get("count") or 0 for b in bins) or 1
            x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
            ax.plot(x, y, color=colour, lw=1.2, label=f"{name}: ECE {_num(ece)}")
            ax.scatter(x, y, color=colour, zorder=3, s=[6 + 100 * (b.get("count") or 0) / total for b in bins])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        ax.set_title(_plot_text(f"{m} (T={_num(c.get('temperature'), '.2f')})"), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left", handlelength=1.2, borderpad=0.3)
        if ax.get_subplotspec().is_last_row() or i + 4 >= len(models):
            ax.set_xlabel("confidence", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("accuracy", fontsize=8)
    return _img(_png(fig), "reliability diagrams")


def _ood_plot(suite: str, by_model: dict) -> str | None:
    """One panel per model: histogram of the OOD score on in-distribution vs OOD rows (share of each)."""
    import numpy as np

    models = [m for m, o in (by_model or {}).items()
              if len((o.get("hist") or {}).get("edges") or []) >= 2]
    if not models:
        return None
    fig, axes = _panels(len(models), 2.6, 1.8, sharey=True, gap_h=0.75,
                        title=f"{_plot_text(suite)}: score histograms, in-distribution vs OOD")
    for ax, m in zip(axes, models):
        h = by_model[m]["hist"]
        edges = np.asarray(h["edges"], dtype=float)
        for key, colour, name in (("in", "#0072B2", "in-distribution"), ("out", "#D55E00", "OOD")):
            counts = np.asarray(h.get(key) or [], dtype=float)
            if len(counts) != len(edges) - 1 or not counts.sum() > 0:
                continue
            ax.stairs(counts / counts.sum(), edges, fill=True, alpha=0.35, color=colour, label=name)
            ax.stairs(counts / counts.sum(), edges, color=colour, lw=1)
        auroc = (by_model[m].get(h.get("score", "msp")) or {}).get("auroc")
        ax.set_title(_plot_text(f"{m} (AUROC {_num(auroc)})"), fontsize=9)
        ax.set_xlabel(f"{h.get('score', 'score')} (higher = in scope)", fontsize=8)
        ax.locator_params(axis="x", nbins=4)
        ax.tick_params(labelsize=7)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("share of rows", fontsize=8)
            ax.legend(fontsize=7, loc="upper left", handlelength=1.2, borderpad=0.3)
    return _img(_png(fig), f"OOD score histograms for {suite}")


def _stress_plot(stress: dict, models: list[str]) -> str | None:
    """Grouped bars: flip rate per stress variant, one bar per model."""
    import numpy as np

    variants = [v for v, by_model in stress.items() if by_model]
    present = [m for m in models if any(_finite((stress[v].get(m) or {}).get("flip_rate")) for v in variants)]
    present += [m for v in variants for m in stress[v] if m not in present
                and _finite((stress[v][m] or {}).get("flip_rate"))]
    if not variants or not present:
        return None
    colours = {**_colours(models), **{m: MODEL_COLOURS[i % len(MODEL_COLOURS)]
                                       for i, m in enumerate(present) if m not in models}}
    x, bar = np.arange(len(variants)), 0.8 / len(present)
    fig = _figure(max(5.0, 0.3 * len(variants) * len(present) + 1.5), 3.3, left=0.6, right=0.2, top=0.65, bottom=0.75)
    ax = fig.subplots()
    for j, m in enumerate(present):
        rates = [(stress[v].get(m) or {}).get("flip_rate") for v in variants]
        ax.bar(x - 0.4 + bar * (j + 0.5), [r if _finite(r) else np.nan for r in rates], width=bar,
               color=colours[m], label=m)
    ax.set_xticks(x, [_plot_text(v) for v in variants], fontsize=8, rotation=20, ha="right")
    ax.set_xlim(-0.5, len(variants) - 0.5)
    ax.set_ylabel("flip rate", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Stress suites: share of predictions that flip under each perturbation", fontsize=10, pad=20)
    _top_legend(ax, len(present))
    return _img(_png(fig), "stress flip rates")


# ---------------------------------------------------------------------------------------------
# The page


def render_html(report: dict, *, title: str, gates: dict | None = None, edge: str | None = None) -> str:
    """One self-contained HTML page (inline CSS and PNG plots) for the gap report dict and optional gates; slices
    are sorted by the gap of `edge` (the shipped model) where given."""
    from matplotlib import rc_context

    models = _models(report)
    if not models:
        models = ["teacher"]
    labels = list(report.get("labels") or [])
    suites = report.get("suites") or {}
    calibration, ood, stress = report.get("calibration") or {}, report.get("ood") or {}, report.get("stress") or {}
    scope, not_evaluated = report.get("scope") or {}, report.get("not_evaluated") or []
    threshold = report.get("threshold")
    ref = _reference(models, edge)
    body, nav = [], []

    def section(anchor: str, heading: str, *parts: str | None) -> None:
        nav.append(f'<a href="#{anchor}">{_e(heading)}</a>')
        body.append(f'<h2 id="{anchor}">{_e(heading)}</h2>' + "".join(p for p in parts if p))

    flag_words = (f"Red cells: flagged, the model loses more than {_e(_num(threshold, '.0%'))} accuracy against the "
                  f"teacher (slices under {MIN_SLICE_ROWS} rows are never flagged).")
    # mathtext off: a '$' in a slice name must stay a dollar sign, not start a formula (or raise)
    with rc_context({"text.parse_math": False}):
        # 1. Test slices: the gap plot, the slices with enough rows, the small ones collapsed
        big, small = _slices_by_size(suites, models, ref)
        if big or small:
            legend = (f'<p class="legend">Slices of {MIN_SLICE_ROWS}+ rows, worst first for {_e(ref)}. Plot: each '
                      "dot is a compressed model's accuracy minus the teacher's on the same rows (0 = the teacher), "
                      "whiskers its paired 90% interval, the dashed line the flag threshold, a red ring a flagged "
                      "slice. Table: Δ acc = model accuracy − teacher accuracy; accuracy intervals are bootstrap "
                      f"percentile intervals. {flag_words} Macro-F1, fidelity and KL per slice are in "
                      "gap_report.json.</p>")
            details = ""
            if small:
                details = (f"<details><summary>{len(small)} slice(s) under {MIN_SLICE_ROWS} rows: n too small for "
                           "an interval, never flagged (accuracy to two digits)</summary>"
                           + _suite_table(report, small, models, small=True) + "</details>")
            section("slices", "Test slices: gap to the teacher", _gap_plot(report, models, big, ref),
                    legend if big else None, _suite_table(report, big, models, compact=True) if big else
                    f"<p>No slice has {MIN_SLICE_ROWS} rows or more.</p>", details)
        # 2. Held-out splits and OOD suites, teacher beside each compressed model
        legend = ('<p class="legend">Δ acc = model accuracy − teacher accuracy. ' + flag_words + " Intervals are "
                  "bootstrap percentile intervals; KL = mean KL(teacher ‖ model).</p>")
        for anchor, heading, names in _suite_groups(suites):
            if anchor == "slices":
                continue
            recall = _per_class_recall(report, models, labels) if anchor == "splits" else None
            section(anchor, heading, legend if anchor == "splits" else None, _suite_table(report, names, models),
                    recall)
        if report.get("noninferiority"):
            section("noninferiority", "Non-inferiority vs the teacher (same rows)",
                    '<p class="legend">Drop = teacher − model on the same test rows. Pass: the upper one-sided 95% '
                    "bound is below the margin; fail: the lower bound is above it; otherwise the evidence is "
                    "insufficient, and the last column says how many labelled rows would decide it.</p>",
                    _noninferiority_table(report["noninferiority"]))
        # 3. Calibration
        if calibration:
            section("calibration", "Calibration (temperature scaling)",
                    '<p class="legend">T fitted on validation; ECE over 15 equal-width confidence bins; '
                    "points sized by the share of rows in the bin, dotted line = perfect calibration.</p>",
                    _calibration_table(calibration), _reliability_plot(calibration))
        # 4. OOD
        if ood:
            section("ood", "Out-of-distribution detection",
                    '<p class="legend">AUROC with in-distribution as positive; FPR = share of OOD rows still '
                    "accepted at the threshold keeping the given share of in-distribution rows.</p>",
                    _ood_table(ood), *[_ood_plot(s, by_model) for s, by_model in ood.items()])
        if scope:
            section("scope", "Scope guard (ships with the edge model)", _scope_table(scope))
        # 5. Stress
        if stress:
            section("stress", "Stress suites", _stress_table(stress, models), _stress_plot(stress, models))
    if not_evaluated:
        section("not-evaluated", "Not evaluated", _not_evaluated(not_evaluated))
    elif "not_evaluated" in report:  # an empty list is a statement; a missing key is not
        section("not-evaluated", "Not evaluated", '<p class="ok">Every model was evaluated on every suite.</p>')

    head = (f'<h1>{_e(title)}</h1>{_verdict(gates, report)}{_summary(report, models)}'
            f"{_findings(report, models, labels)}"
            f'<p class="legend">Models: {_e(", ".join(models))} (teacher: {_e(models[0])}'
            + (f"; shipped: {_e(edge)}" if edge in models else "") + f').</p><nav>{"".join(nav)}</nav>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{head}{''.join(body)}</body></html>\n")
