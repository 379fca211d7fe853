"""HTML gap report: one self-contained page from the report dict, every section optional, user text escaped."""

import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from distill_gap.evaluation.html_report import render_html

LABELS = ["negative", "neutral", "positive"]
FLAGGED = "slice:condition=Depression"
SMALL = "slice:condition=Rare disease"
GATES = {"edge_accuracy_drop_vs_student": {"value": 0.031, "threshold": 0.02, "passed": False,
                                           "detail": "student-int8 test accuracy vs the fp32 student"},
         "edge_argmax_agreement_vs_student": {"value": 0.97, "threshold": 0.95, "passed": True, "detail": "validation"},
         "edge_outputs_finite": {"value": 1.0, "threshold": 1.0, "passed": True, "detail": "no NaN"}}


def _ci(value: float, n: int) -> dict:
    if n < 10:
        return {"value": value, "low": None, "high": None, "note": "n too small"}
    half = 1.96 * (value * (1 - value) / n) ** 0.5
    return {"value": value, "low": max(value - half, 0.0), "high": min(value + half, 1.0)}


def _metrics(rng, acc: float, n: int, teacher: bool) -> dict:
    out = {"n": n, "accuracy": acc, "macro_f1": acc - 0.2,
           "ci": {"accuracy": _ci(acc, n), "macro_f1": _ci(acc - 0.2, n),
                  "per_class_recall": [{**_ci(r, n // 3), "support": n // 3} for r in rng.uniform(0.3, 0.9, 3)]}}
    if not teacher:
        out |= {"fidelity": float(rng.uniform(0.8, 0.95)), "kl_teacher": float(rng.uniform(0.01, 0.2))}
    return out


def _bins(rng) -> list[dict]:
    edges = np.linspace(0, 1, 16)
    return [{"low": float(lo), "high": float(hi), "count": int(c),
             "confidence": float((lo + hi) / 2) if c else None, "accuracy": float(rng.uniform(0, 1)) if c else None}
            for lo, hi, c in zip(edges[:-1], edges[1:], [0] * 5 + list(rng.integers(0, 60, 10)))]


def synthetic_report(n_models: int = 4, n_slices: int = 20, slice_names: list[str] | None = None) -> dict:
    """A report dict shaped like the evaluate stage's: every section, one flag, one n-too-small slice."""
    rng = np.random.default_rng(0)
    models = ["teacher", "student", "student-int8", "student-onnx", "student-int4"][:n_models]
    names = slice_names or [FLAGGED, SMALL] + [f"slice:condition=Condition {i}" for i in range(n_slices - 2)]
    suites = {"test": None, **{s: None for s in names}, "ood:unseen_conditions": None}
    for suite in suites:
        n = 6 if suite == SMALL else 325 if suite == "test" else int(rng.integers(20, 120))
        base = float(rng.uniform(0.6, 0.85))
        suites[suite] = {m: _metrics(rng, base - (0.08 if suite == FLAGGED and m == "student" else
                                                  float(rng.uniform(0, 0.015)) * (m != "teacher")), n, m == "teacher")
                         for m in models}
    hist = {"edges": list(np.linspace(0.33, 1.0, 21)), "in": list(rng.integers(0, 40, 20)),
            "out": list(rng.integers(0, 20, 20)), "score": "msp"}
    det = {"auroc": 0.61, "fpr_at_tpr": 0.9, "tpr": 0.95, "n_in": 325, "n_out": 126}
    return {
        "models": models, "labels": LABELS, "threshold": 0.02, "suites": suites,
        "flags": [{"suite": FLAGGED, "model": "student", "gap": -0.08, "n": suites[FLAGGED]["student"]["n"]}],
        "calibration": {m: {"temperature": 1.4, "ece_before": 0.08, "ece_after": 0.03,
                            "reliability_before": _bins(rng), "reliability_after": _bins(rng)} for m in models},
        "ood": {"ood:unseen_conditions": {m: {"msp": det, "energy": {**det, "auroc": 0.66},
                                              "hist": {**hist, "in": [int(c) for c in hist["in"]],
                                                       "out": [int(c) for c in hist["out"]]}} for m in models}},
        "stress": {v: {m: {"n": 200, "clean_accuracy": 0.7, "stressed_accuracy": 0.66, "accuracy_drop": 0.04,
                           "flip_rate": float(rng.uniform(0, 0.2))} for m in models}
                   for v in ("typos", "casing", "whitespace", "punctuation", "truncation", "negation", "domain_swap")},
        "scope": {m: {"score": "msp", "threshold": 0.55, "tpr": 0.95} for m in models},
        "not_evaluated": [{"model": "student-onnx", "suite": "all", "reason": "onnxruntime not installed"}],
        "worst_slices": {m: [[FLAGGED, -0.08]] if m == "student" else [] for m in models[1:]},
    }


def _text(page: str) -> str:
    """The page without its inline PNGs (base64 may spell anything)."""
    return re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", page)


def test_full_report_shows_verdict_flags_and_every_section():
    page = render_html(synthetic_report(), title="Gap report: drugs", gates=GATES)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "1 of 3 gates failed" in page and "edge_accuracy_drop_vs_student" in page
    assert "<b>student</b> on condition=Depression (-0.080 ⚠)" in page  # summary names the flagged slice
    assert re.search(r'<td class="flag"[^>]*>[^<]*<span class="ci">\[', page), "the flagged accuracy cell is highlighted"
    assert "n too small" in page
    assert page.count('src="data:image/png;base64,') >= 4  # slices, reliability, OOD, stress
    for heading in ("Held-out splits", "Test slices", "Out-of-distribution suites", "Calibration",
                    "Out-of-distribution detection", "Scope guard (ships with the edge model)", "Stress suites", "Not evaluated",
                    "Per-class recall"):
        assert heading in page, heading
    assert "onnxruntime not installed" in page and "FPR@95" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained


def test_all_gates_passed_and_no_gates_read_differently():
    passed = {k: {**g, "passed": True} for k, g in GATES.items()}
    assert "All 3 gates passed" in render_html(synthetic_report(3, 4), title="t", gates=passed)
    assert "No promotion gates" in render_html(synthetic_report(3, 4), title="t")


def test_user_text_is_escaped_in_tables_and_plots():
    evil = 'slice:condition=<script>alert("x")</script> $5 co-pay $x^2$'
    page = render_html(synthetic_report(3, 3, slice_names=[FLAGGED, SMALL, evil]), title="<b>title</b>")
    assert "<script" not in page and "<b>title</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and "&lt;b&gt;title&lt;/b&gt;" in page


def test_report_with_only_models_and_suites_renders():
    suites = {"test": {"teacher": {"n": 40, "accuracy": 0.8, "macro_f1": 0.7},
                       "student": {"n": 40, "accuracy": 0.75, "macro_f1": 0.6, "fidelity": 0.9}},
              "slice:site=s1": {"teacher": {"n": 20, "accuracy": 0.9, "macro_f1": 0.8},
                                "student": {"n": 20, "accuracy": 0.7, "macro_f1": 0.5, "fidelity": 0.8}},
              "slice:site=s2": {"teacher": {"n": 3, "accuracy": float("nan"), "macro_f1": None}, "student": {}}}
    page = render_html({"models": ["teacher", "student"], "suites": suites}, title="minimal")
    assert page.startswith("<!DOCTYPE html>") and "site=s1" in page and "site=s2" in page
    assert "site=s1 (-0.200)" in page  # worst slice computed from the suites when the report has none
    assert "nan" not in _text(page).lower() and "None" not in _text(page)  # missing numbers render as a dash
    assert page.count('src="data:image/png;base64,') == 1  # only the slice plot has data


def test_equal_accuracy_reads_as_no_change():
    suites = {"test": {"teacher": {"n": 40, "accuracy": 0.7, "macro_f1": 0.7},
                       "student": {"n": 40, "accuracy": 0.1 + 0.6, "macro_f1": 0.7}}}  # 0.6999999999999999
    page = render_html({"models": ["teacher", "student"], "suites": suites}, title="equal")
    assert "-0.000" not in page and "<td>+0.000</td>" in page
    assert "No slice where a compressed model loses accuracy" in page


def test_current_gap_report_dict_renders():
    from distill_gap.evaluation.gap_report import GapReport

    report = GapReport(models=["teacher", "student"], threshold=0.02,
                       suites={"test": {"teacher": {"n": 40, "accuracy": 0.8, "macro_f1": 0.7},
                                        "student": {"n": 40, "accuracy": 0.7, "macro_f1": 0.6, "fidelity": 0.9}}},
                       flags=[{"suite": "test", "model": "student", "gap": -0.1, "n": 40}])
    page = render_html(report.to_dict(), title="from GapReport")
    assert '<td class="flag"' in page and "-0.100" in page


def test_demo_sized_report_is_small_and_fast():
    report = synthetic_report(5, 30)
    render_html(synthetic_report(2, 2), title="warm-up")  # first matplotlib import and font cache
    start = time.perf_counter()
    page = render_html(report, title="demo", gates=GATES)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"render took {elapsed:.1f} s"
    assert len(page.encode()) < 2_000_000, f"{len(page.encode()) / 1e6:.2f} MB"


def test_noninferiority_checks_show_their_outcome_bounds_and_rows_needed():
    from types import SimpleNamespace

    from distill_gap.evaluation.noninferiority import compare

    truth = np.array([0, 1, 2] * 10)
    edge = truth.copy()
    edge[:4] = (edge[:4] + 1) % 3
    checks = compare(truth, {"teacher": truth, "edge": edge}, ["neg", "neu", "pos"],
                     margins=SimpleNamespace(aggregate=0.03, class_recall=0.05, critical_slice=0.03),
                     slices={"site=<x>": np.zeros(30, bool)})
    page = render_html({"models": ["teacher", "edge"], "suites": {}, "noninferiority": checks}, title="ni")
    assert 'id="noninferiority"' in page and "labelled rows that would decide it" in page
    assert "slice:site=&lt;x&gt;" in page and "no rows" in page  # escaped, and missing evidence said
    assert re.search(r'<td class="(warn|loss)">(insufficient|fail)</td>', page)


def _gap_ci(report: dict) -> dict:
    """The report with a paired gap interval on every compressed model's slice of 10+ rows, as gap_report adds."""
    for by_model in report["suites"].values():
        for m, v in by_model.items():
            if m != "teacher" and v["n"] >= 10:
                gap = v["accuracy"] - by_model["teacher"]["accuracy"]
                v["ci"]["gap_vs_teacher"] = {"value": gap, "low": gap - 0.05, "high": gap + 0.05, "level": 0.9}
    return report


def test_the_gap_plot_comes_first_then_the_slices_worst_first_and_the_small_ones_collapsed():
    report = _gap_ci(synthetic_report(3, 8))
    page = _text(render_html(report, title="t", gates=GATES, edge="student-int8"))
    slices = page[page.index('<h2 id="slices">'):page.index('<h2 id="splits">')]
    assert page.index('<h2 id="slices">') < page.index('<h2 id="splits">')  # the first section
    assert slices.index('alt="accuracy gap to the teacher per slice"') < slices.index("<table>")
    big, small = slices.split("<details>")
    names = re.findall(r'<td class="name" title="slice:([^"]+)"', big)
    gaps = [report["suites"][f"slice:{n}"]["student-int8"]["accuracy"]
            - report["suites"][f"slice:{n}"]["teacher"]["accuracy"] for n in names]
    assert len(names) == 7 and gaps == sorted(gaps)  # every slice of 10+ rows, worst first for the shipped model
    assert "Rare disease" not in big and "condition=Rare disease" in small and "n too small" in small
    assert "shipped: student-int8" in page


def test_what_matters_is_said_in_words():
    report = synthetic_report(3, 4)
    for m in report["models"]:  # nobody predicts "neutral"
        report["suites"]["test"][m]["ci"]["per_class_recall"][1] |= {"value": 0.0}
    knn = {"auroc": 0.52, "ci": {"value": 0.52, "low": 0.44, "high": 0.6}}
    report["ood"]["ood:unseen_conditions"]["student"]["knn"] = knn
    report["scope"]["student"]["detector"] = "knn"
    report["noninferiority"] = {
        "student": [{"check": "recall:neutral", "n": 33, "teacher": 0.06, "model": 0.03, "inherited": True,
                     "drop": 0.03, "low": -0.05, "high": 0.1, "margin": 0.05, "outcome": "insufficient",
                     "rows_needed": 400}],
        "teacher": [{"check": "accuracy vs majority class", "n": 325, "teacher": 0.597, "model": 0.751,
                     "baseline": "positive", "outcome": "pass", "rows_needed": None, "drop": -0.154, "low": -0.19,
                     "high": -0.11, "margin": 0.0, "inherited": False}]}
    findings = render_html(report, title="t", gates=GATES).split('<ul class="findings">')[1].split("</ul>")[0]
    assert "<b>No model predicts neutral</b>: its recall on test is 0 for every model" in findings
    assert ("<b>The knn detector (the shipped scope guard's detector) is at chance on unseen_conditions</b>: "
            "its AUROC interval holds 0.5 for student 0.52 [0.44, 0.60]") in findings
    assert "<b>Inherited from the teacher: recall:neutral</b>: the teacher itself is at 0.060" in findings
    assert "The teacher is shown better than always answering <b>positive</b>: accuracy 0.751 vs 0.597" in findings
    report["ood"]["ood:unseen_conditions"]["student"]["knn"]["ci"]["low"] = 0.51  # above chance: nothing said
    report["noninferiority"]["student"][0]["inherited"] = False
    report["suites"]["test"]["teacher"]["ci"]["per_class_recall"][1]["value"] = 0.1
    page = render_html(report, title="t", gates=GATES)
    assert "at chance" not in page and "No model predicts" not in page and "Inherited from" not in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_gap_report_reads_at_1400_px_in_a_real_browser(tmp_path):
    """Laid out by Chromium at 1,400 px: slice names are never squeezed into fragments, and the plot is on top."""
    probe = ("<script>const r = s => document.querySelector(s).getBoundingClientRect();"
             "const w = [...document.querySelectorAll('#slices ~ div td.name, #slices ~ details td.name')];"
             "document.body.dataset.probe = JSON.stringify({name: Math.min(...w.map(c => c.getBoundingClientRect().width)),"
             "plot: r('img[alt^=\"accuracy gap\"]').top, table: r('h2#slices ~ div table').top,"
             "page: document.documentElement.scrollWidth});</script>")
    page = tmp_path / "gap.html"
    page.write_text(render_html(_gap_ci(synthetic_report(5, 30)), title="t", gates=GATES, edge="student-int4")
                    .replace("</body>", probe + "</body>"))
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import html
    import json

    probe = json.loads(html.unescape(re.search(r'data-probe="([^"]+)"', done.stdout).group(1)))
    assert probe["name"] >= 160, probe  # 12em: "condition=Birth Control" on one or two whole-word lines
    assert probe["plot"] < probe["table"], probe  # the gap plot before the slice table
    assert probe["page"] <= 1400, probe  # the page itself never scrolls sideways (wide tables scroll in their box)
