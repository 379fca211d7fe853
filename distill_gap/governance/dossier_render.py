"""The dossier for people: a self-contained HTML page (no script, no external resource: it opens from a file, an
MLflow artifact or an email) and the Hugging Face model card (README.md with YAML front matter) of the edge folder.
Both render a compiled dossier (distill_gap.governance.dossier); neither reads anything else."""

from __future__ import annotations

import json
from html import escape

import yaml

from distill_gap.evaluation.noninferiority import would_decide

_COLOURS = {"pass": "#1a7f37", "fail": "#cf222e", "insufficient": "#9a6700"}
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 18px;margin:12px 0}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600;margin-right:6px;
white-space:nowrap}
.muted{color:#59636e} code,pre{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;background:#eff2f5;
border-radius:4px;padding:1px 4px} pre{padding:10px;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
table{border-collapse:collapse;width:100%;font-size:14px} th,td{text-align:left;padding:5px 8px;
border-bottom:1px solid #e6e9ec;vertical-align:top} th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} td.gate{white-space:nowrap}
td{overflow-wrap:anywhere}
.warn{background:#fff8c5;border-color:#d4a72c} .bad{background:#ffebe9;border-color:#cf222e}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0} dt{color:#59636e} dd{margin:0;
overflow-wrap:anywhere}
"""


def _badge(outcome: str, text: str | None = None) -> str:
    return (f'<span class="badge" style="background:{_COLOURS.get(outcome, "#59636e")}">'
            f"{escape(text or outcome)}</span>")


def _num(v, fmt: str = "{:+.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def _dl(items: dict) -> str:
    return "<dl>" + "".join(f"<dt>{escape(str(k))}</dt><dd>{v}</dd>" for k, v in items.items()) + "</dl>"


def _code(v) -> str:
    return f"<code>{escape(str(v))}</code>" if v not in (None, "") else '<span class="muted">none</span>'


def _gate_rows(gates: dict) -> str:
    from distill_gap.outcomes import gate_outcome

    order = {"fail": 0, "insufficient": 1, "pass": 2}
    rows = []
    for name, g in sorted(gates.items(), key=lambda kv: (order.get(gate_outcome(kv[1]), 3), kv[0])):
        out = gate_outcome(g)
        interval = (f"[{_num(g.get('low'))}, {_num(g.get('high'))}]" if g.get("low") is not None else "–")
        needed = f"{g['rows_needed']:,}" if g.get("rows_needed") else "–"
        rows.append(f"<tr><td class=gate>{escape(name)}</td><td>{_badge(out)}</td>"
                    f"<td class=num>{_num(g.get('value'), '{:.3f}')}</td><td class=num>{interval}</td>"
                    f"<td class=num>{_num(g.get('threshold'), '{:.3f}')}</td>"
                    f"<td class=num>{g.get('n') if g.get('n') is not None else '–'}</td>"
                    f"<td class=num>{needed}</td><td>{escape(str(g.get('detail', '')))}</td></tr>")
    return ("<table><tr><th>gate</th><th>outcome</th><th>value</th><th>one-sided 95% bounds</th><th>margin / "
            "threshold</th><th>rows</th><th>rows needed</th><th>evidence</th></tr>" + "".join(rows) + "</table>")


def render_dossier(d: dict) -> str:
    """The dossier as one self-contained HTML page."""
    m, ev, lin, gov, scope = d["model"], d["evidence"], d["lineage"], d["governance"], d["scope"]
    title = f"Dossier: {m['name']} v{m['version']}"
    review = gov["review"]
    banners = []
    if review["overdue"]:
        banners.append(f'<section class="bad"><b>Review overdue</b>: due {escape(str(review["due"]))}. The evidence '
                       "below is due for a fresh look; this version cannot be promoted or waived until a new run "
                       "replaces it.</section>")
    if lin.get("problems"):
        banners.append('<section class="bad"><b>Records that could not be used</b><ul>' + "".join(
            f"<li>{escape(p)}</li>" for p in lin["problems"]) + "</ul></section>")
    if ev["outcome"] == "insufficient":
        banners.append('<section class="warn"><b>Insufficient evidence</b> for ' + escape(", ".join(ev["insufficient"]))
                       + ("; " + would_decide(ev["rows_needed_max"], "the thinnest one")
                          if ev.get("rows_needed_max") else "") + ". @champion needs a named approver's signed waiver."
                       + (f" Waived by <b>{escape(str(gov['waiver']['approver']))}</b>: "
                          f"{escape(str(gov['waiver']['reason']))}" if gov.get("waiver") else "") + "</section>")
    head = (f"<h1>{escape(title)}</h1><p>{_badge(ev['outcome'], 'gates: ' + ev['outcome'])}"
            + "".join(_badge("pass" if a == "champion" else "x", "@" + a) for a in d["status"]["aliases"])
            + f' <span class="muted">digest <code>{escape(str(m["digest"]))}</code></span></p>')
    size = f"{m['size_bytes'] / 1e6:.1f} MB" if m.get("size_bytes") else "–"
    use = _dl({"intended use": escape(d["intended_use"]["use"]),
               "must not": "<ul>" + "".join(f"<li>{escape(x)}</li>" for x in d["intended_use"]["not_for"]) + "</ul>",
               "artifact": f"{escape(str(m['primary']))} ({'INT8' if m['quantized'] else 'fp32, not quantized'}), {size}",
               "evaluated on": escape(", ".join(f"{k} {v} rows" for k, v in d["evaluated_on"].items() if v))})
    if scope["shipped"]:
        det = "".join(f"<tr><td>{escape(s)}</td><td class=num>{_num(r.get('auroc'), '{:.3f}')}"
                      + (f" [{_num(r['ci'].get('low'), '{:.2f}')}, {_num(r['ci'].get('high'), '{:.2f}')}]"
                         if r.get("ci") else "") + "</td>"
                      f"<td class=num>{_num(r.get('fpr_at_threshold'), '{:.1%}')}</td>"
                      f"<td class=num>{_num(r.get('fpr_at_tpr'), '{:.1%}')}</td><td class=num>{r.get('n_out', '–')}</td>"
                      f"<td>{escape(str(r.get('note') or ''))}</td></tr>"
                      for s, r in scope["detection"].items())
        scope_html = _dl({"guard": f"{escape(str(scope['detector']))}, threshold {_num(scope['threshold'], '{:.4g}')}"
                                   f" (keeps {_num(scope['in_scope_rate_on_validation'], '{:.0%}')} of validation rows)",
                          "rule": escape(str(scope["rule"])), "fitted on": escape(json.dumps(scope["fitted_on"])),
                          **({"regions": escape(scope["regions_summary"])} if scope.get("regions_summary") else {})}) + (
            "<table><tr><th>out-of-distribution set</th><th>AUROC [95% interval]</th><th>let in at the shipped "
            "threshold</th><th>let in at 95% TPR</th><th>rows</th><th>note</th></tr>"
            + det + "</table>" if det else "")
    else:
        scope_html = f'<p class="bad">{escape(scope["problem"])}</p>'
    test = "".join(f"<tr><td>{escape(k)}</td><td class=num>{_num(v.get('accuracy'), '{:.3f}')}</td>"
                   f"<td class=num>{_num(v.get('macro_f1'), '{:.3f}')}</td><td class=num>{v.get('n', '–')}</td></tr>"
                   for k, v in ev["test"].items())
    worst = "".join(f"<li>{escape(str(s).removeprefix('slice:'))}: {_num(g * 100, '{:+.1f}')} points vs the teacher</li>"
                    for s, g in ev["worst_slices"])
    limits = "".join(f"<li>{escape(x)}</li>" for x in ev["limitations"]) or "<li>none recorded</li>"
    t = lin["teacher"]
    chain = _dl({"teacher": f"{escape(str(t['name']))} v{escape(str(t['version']))}, licence "
                            f"{escape(str(t['license']))}" + (f" (override: {escape(t['license_override'])})"
                                                               if t.get("license_override") else "")
                            + f"<br>{_code(t['digest'])}"
                            + (f"<br>made to replace champion v{escape(str(t['replaces']['version']))}"
                               + (f" (teacher {escape(str(t['replaces']['teacher']))})"
                                  if t["replaces"].get("teacher") else "") if t.get("replaces") else ""),
                 "data": _code(lin["data"]["digest"]) + "".join(f"<br>{escape(k)}: {_code(v)}"
                                                                for k, v in lin["data"]["splits"].items()),
                 "soft labels": f"key {_code(lin['soft_labels']['key'])} in {_code(lin['soft_labels']['uri'])}",
                 "student": _code(lin["student"]), "config digest": _code(lin["config_digest"]),
                 "code version": _code(lin["code_version"]), "trigger": _code(lin["trigger"])})
    steps = "".join(f"<tr><td>{escape(s['step'])}</td><td>{escape(str(s['technique']))}<br><span class=muted>"
                    f"{escape(json.dumps(s['parameters'], default=str))[:600]}</span></td><td>"
                    + "<br>".join(f"{escape(n)}: {_code(v[:16])}" for n, v in s["subjects"].items())
                    + f"</td><td>{_code(s['statement'])}<br>sha256 {_code(str(s['statement_sha256'])[:16])}</td></tr>"
                    for s in lin["steps"])
    appr = gov.get("approver")
    govern = _dl({"owner": escape(str(gov["owner"])),
                  "review due": escape(str(review["due"])) + (" <b>(overdue)</b>" if review["overdue"] else
                                                              f" ({review['days_left']} days left)"),
                  "approver": (f"{escape(appr['name'])} at {escape(str(appr['at']))}: {escape(str(appr['comment']))}"
                               if appr else "not promoted to @champion"),
                  "waiver": (f"{escape(', '.join(gov['waiver']['gates']))} by {escape(str(gov['waiver']['approver']))}"
                             f": {escape(str(gov['waiver']['reason']))}" if gov.get("waiver") else "none"),
                  **({"rollback": f"{escape(gov['rollback']['by'])}: {escape(str(gov['rollback']['reason']))}"}
                     if gov.get("rollback") else {})})
    body = "".join([
        head, *banners,
        "<h2>Intended use and scope</h2><section>", use, "</section><section><b>Scope guard</b>", scope_html,
        "</section>",
        "<h2>Evidence</h2><section>", _gate_rows(ev["gates"]), "</section>",
        "<section><b>Test set</b><table><tr><th>model</th><th>accuracy</th><th>macro-F1</th><th>rows</th></tr>",
        test, "</table></section>",
        f"<section><b>Worst slices</b><ul>{worst or '<li>none measured</li>'}</ul><b>Known limitations</b><ul>"
        f"{limits}</ul></section>",
        "<h2>Lineage</h2><section>", chain, "</section><section><table><tr><th>step</th><th>technique and "
        "parameters</th><th>outputs</th><th>signed Statement</th></tr>", steps, "</table></section>",
        "<h2>Governance</h2><section>", govern, "</section>",
        f"<h2>Verify it</h2><section><pre>{escape(d['verify'])}</pre><p class=muted>recomputes every digest and "
        f"checks every signature behind this page. Compiled {escape(d['status']['as_of'])}.</p></section>"])
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f"<body><main>{body}</main></body></html>")


def model_card(d: dict, *, library: str) -> str:
    """README.md for the edge folder: Hugging Face model card front matter and the dossier's essentials."""
    m, ev, lin, scope = d["model"], d["evidence"], d["lineage"], d["scope"]
    edge_test = ev["test"].get(m.get("edge_model") or "", {})
    metrics = [{"type": k, "value": round(float(edge_test[k]), 4), "name": f"test {k}"}
               for k in ("accuracy", "macro_f1") if isinstance(edge_test.get(k), (int, float))]
    front = {"license": lin["teacher"]["license"], "base_model": f"{lin['teacher']['name']}/{lin['teacher']['version']}",
             "base_model_relation": "quantized" if m["quantized"] else "finetune",
             "library_name": library, "pipeline_tag": "text-classification",
             "tags": ["distillation", "distill-gap"] + (["int8"] if m["quantized"] else []),
             "model-index": [{"name": m["name"], "results": [{"task": {"type": "text-classification"},
                                                             "dataset": {"name": "test split", "type": "custom",
                                                                         "revision": lin["data"]["digest"]},
                                                             "metrics": metrics}]}]}
    gates = "\n".join(f"| {k} | {g.get('outcome', 'pass' if g.get('passed') else 'fail')} | {g.get('detail', '')} |"
                      for k, g in ev["gates"].items())
    guard = (f"a {scope['detector']} scope guard ships in scope.json (threshold {scope['threshold']:.4g}); rows it "
             "flags are out of scope" if scope["shipped"] else scope["problem"])
    return "\n".join([
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {m['name']}", "",
        f"A distilled{' and INT8-quantized' if m['quantized'] else ''} student ({m['primary']}) of "
        f"`{lin['teacher']['name']}` v{lin['teacher']['version']} (the `base_model` above is that registry version; "
        f"digest `{lin['teacher']['digest']}`), made by distill-gap. Model digest: `{m['digest']}`.", "",
        "## Uses", "", d["intended_use"]["use"], "", "Out of scope: " + "; ".join(d["intended_use"]["not_for"]) + ".",
        "", f"Scope: {guard}.", "",
        "## Evaluation", "", f"Gates: **{ev['outcome']}**, compared with the teacher on the same rows.", "",
        "| gate | outcome | evidence |", "|---|---|---|", gates, "",
        "## Limitations", "", *([f"- {x}" for x in ev["limitations"]] or ["- none recorded"]), "",
        "## Provenance", "", f"Every step is signed (in-toto Statements at `{lin['attestations']}`). Verify: "
        f"`{d['verify']}`; the full record: `distill dossier models:/{m['name']}/<version> --html dossier.html`.", ""])
