"""The size sweep's decisions (distill_gap/kd/sweep.py) on real paired checks, and its config's bad input."""

from __future__ import annotations

import numpy as np
import pytest

from distill_gap.errors import DistillError
from distill_gap.evaluation.gates import check_gate
from distill_gap.evaluation.noninferiority import compare
from distill_gap.kd.sweep import (choose, failed_candidate, pareto_front, summarize, sweep_markdown, sweep_plot,
                                  why_not)
from flows.config import EvaluateConfig, load_config

MARGINS = EvaluateConfig().margins
LABELS = ["negative", "neutral", "positive"]


def _row(name, pred, truth, teacher, parameters, latency=1.0, slices=None):
    """A candidate judged by the non-inferiority gates (keyed as evaluate_gates keys them) on synthetic rows."""
    checks = compare(truth, {"teacher": teacher, "candidate": pred}, LABELS, margins=MARGINS, slices=slices or {},
                     floor=0.5, seed=0)["candidate"]
    gates = {f"noninferior:{c['check']}": check_gate(c) for c in checks}
    return summarize(name, gates, accuracy=float((pred == truth).mean()), parameters=parameters, size_mb=parameters / 2.5e5,
                     latency_ms=latency)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 3000)
    teacher = truth.copy()  # the teacher is right everywhere
    same = truth.copy()  # a candidate as good as the teacher: shown not worse on every check
    worse = np.where(rng.random(3000) < 0.3, (truth + 1) % 3, truth)  # 30% wrong: shown worse
    thin_truth, thin_teacher = truth[:20], teacher[:20]  # 20 rows decide nothing at a 3% margin
    return {"pass-big": _row("pass-big", same, truth, teacher, 4_000_000, 2.0),
            "pass-small": _row("pass-small", same, truth, teacher, 2_000_000, 1.0),
            "fail-tiny": _row("fail-tiny", worse, truth, teacher, 500_000, 0.5),
            "thin-tiny": _row("thin-tiny", np.r_[(thin_truth[:1] + 1) % 3, thin_truth[1:]], thin_truth, thin_teacher,
                              400_000, 0.4),  # one row of 20 wrong: 0.95
            "error": failed_candidate("error", "student layers [7]: the teacher has 2 layers")}


def test_the_smallest_that_passes_wins_over_smaller_ones_that_fail_or_lack_evidence(rows):
    assert rows["pass-small"]["outcome"] == "pass" and rows["fail-tiny"]["outcome"] == "fail"
    assert rows["thin-tiny"]["outcome"] == "insufficient"
    assert choose(list(rows.values()))["name"] == "pass-small"
    # without a passing candidate the smallest one with thin evidence goes on (the release gates then decide)
    assert choose([rows["fail-tiny"], rows["thin-tiny"], rows["error"]])["name"] == "thin-tiny"
    assert choose([rows["fail-tiny"], rows["error"]]) is None  # shown worse or broken: nothing goes on
    assert choose([rows["pass-big"], rows["pass-small"]]) == choose([rows["pass-small"], rows["pass-big"]])


def test_a_critical_slice_shown_worse_fails_the_candidate_and_names_the_slice():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 2000)
    pain = np.zeros(2000, dtype=bool)
    pain[:400] = True
    pred = truth.copy()
    pred[:120] = (truth[:120] + 1) % 3  # 30% of the Pain rows wrong, 6% overall
    row = _row("c", pred, truth, truth.copy(), 1, slices={"condition=Pain": pain,
                                                          "condition=Rare": np.zeros(2000, dtype=bool)})
    assert row["outcome"] == "fail" and row["worst_slice"] == "condition=Pain"
    assert row["worst_slice_drop"] == pytest.approx(0.3)
    assert row["gates"]["noninferior:slice:condition=Rare"]["outcome"] == "insufficient"  # no rows: never a pass


def test_pareto_front_report_and_plot(rows):
    front = pareto_front(list(rows.values()))
    assert "pass-big" not in front  # pass-small is smaller, as accurate and faster
    assert sorted(front) == ["pass-small", "thin-tiny"]  # smallest, and most accurate: neither beats the other
    md = sweep_markdown(list(rows.values()), choose(list(rows.values())), teacher_accuracy=1.0, minutes=2.5,
                        plot_link="http://x/p.png")
    assert md.startswith("**Size sweep: `pass-small` goes on**")
    lines = md.splitlines()
    order = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and "candidate" not in line]
    assert order == ["thin-tiny", "fail-tiny", "pass-small", "pass-big", "error"]  # smallest first, errors last
    assert "shown worse than the teacher: accuracy" in md and "could not be trained: student layers [7]" in md
    ood = {**rows["pass-big"]["gates"], "ood_auroc_vs_teacher:code": {"outcome": "fail"}}
    assert why_not({**rows["pass-big"], "outcome": "fail", "gates": ood}) == "failed ood_auroc_vs_teacher:code"
    none = sweep_markdown([rows["fail-tiny"]], None, teacher_accuracy=1.0, minutes=1.0)
    assert none.startswith("**Size sweep: no candidate holds**")
    assert sweep_plot(list(rows.values()), rows["pass-small"], teacher_accuracy=1.0)[:4] == b"\x89PNG"


@pytest.mark.parametrize("override, message", [
    (["sweep.enabled=true", "sweep.candidates=[]"], "sweep.enabled needs sweep.candidates"),
    ("sweep.candidates=[{name: a}, {name: a}]", "names must differ"),
    ("sweep.candidates=[{name: a, distill: {epoch: 3}}]", "sweep candidate 'a': distill.epoch: unknown key"),
    ("sweep.candidates=[{name: a, distill: {student: {kind: config, hidden_size: 250, num_heads: 4}}}]",
     "hidden_size 250 is not divisible by num_heads 4: pick num_heads dividing it (e.g. 2)"),
    ("sweep.candidates=[{name: a, distill: {augment: {copies: 2}}}]", "share one set of soft labels"),
    ("sweep.candidates=[{name: 'a b'}]", "sweep.candidates.0.name"),
    ("sweep.candidates=[{name: a, quantize: {onnx_embedding_bits: 3}}]",
     "sweep candidate 'a': quantize.onnx_embedding_bits: Input should be 4 or 8"),
    ("sweep.candidates=[{name: a, quantize: {inc: false, onnx_int8: false}}]",
     "sweep candidate 'a': quantize: quantize.inc and quantize.onnx_int8 are both false"),
])
def test_a_bad_ladder_is_refused_when_the_config_loads(override, message):
    with pytest.raises(DistillError) as err:
        load_config("configs/demo.yaml", override if isinstance(override, list) else [override])
    assert message in str(err.value) and "(got {" not in str(err.value)
