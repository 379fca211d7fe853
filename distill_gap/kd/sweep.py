"""The size sweep's decisions (issue 21): how a candidate student is judged, which one goes on, what people see.

"Set the size target from the quality requirement, not the other way round": every candidate of the ladder is
quantized and evaluated as the run's own student would be, and judged by the promotion's own gates
(distill_gap/evaluation/gates.py: non-inferiority against the teacher on the aggregate, every class's recall and
every critical slice; edge vs student; OOD and the scope guard; calibration; stress; quantization), so a candidate
holds exactly when the release would not fail it. The choice:

- a candidate with a failed gate or that could not be trained is never chosen;
- among the rest, the candidates whose every gate passed come first, then those with thin evidence (insufficient:
  the release would then go to @challenger, as for any version);
- within that group, the smallest edge artifact (`size_mb`: the bytes that ship), then the fewest parameters, then
  the higher test accuracy.

None left: nothing goes on, and the report says why for each candidate. The Pareto front (no other candidate is
smaller, more accurate, better on its worst critical slice and faster at once) is marked in the table and the plot.
Plain numpy / matplotlib; results are JSON-able dicts.
"""

from __future__ import annotations

import io

from distill_gap.outcomes import FAIL, INSUFFICIENT, PASS, by_outcome, overall_outcome

ERROR = "error"  # the candidate could not be trained or scored (its message is in the result)


def summarize(name: str, gates: dict[str, dict], *, accuracy: float, parameters: int, size_mb: float,
              latency_ms: float, run_id: str | None = None, student: dict | None = None) -> dict:
    """One candidate's row: its size, accuracy, worst critical slice, latency, outcome and the gates behind it."""
    slices = {k.removeprefix("noninferior:slice:"): g for k, g in gates.items()
              if k.startswith("noninferior:slice:") and g.get("n")}
    worst = max(slices, key=lambda k: slices[k]["value"], default=None)  # the largest drop vs the teacher
    return {"name": name, "parameters": int(parameters), "size_mb": float(size_mb), "accuracy": float(accuracy),
            "worst_slice": worst, "worst_slice_drop": None if worst is None else slices[worst]["value"],
            "latency_ms": float(latency_ms), "outcome": overall_outcome(gates), "gates": gates, "run_id": run_id,
            "student": student, "error": None}


def failed_candidate(name: str, error: str, run_id: str | None = None) -> dict:
    """The row of a candidate that could not be trained or scored: never chosen, its message in the report."""
    return {"name": name, "parameters": None, "size_mb": None, "accuracy": None, "worst_slice": None,
            "worst_slice_drop": None, "latency_ms": None, "outcome": ERROR, "gates": {}, "run_id": run_id,
            "student": None, "error": error}


def choose(results: list[dict]) -> dict | None:
    """The candidate that goes on (see the module docstring), or None when every candidate failed or broke."""
    for outcome in (PASS, INSUFFICIENT):
        pool = [r for r in results if r["outcome"] == outcome]
        if pool:
            return min(pool, key=lambda r: (r["size_mb"], r["parameters"], -r["accuracy"], r["name"]))
    return None


def pareto_front(results: list[dict]) -> list[str]:
    """Names of the scored candidates no other one dominates on (edge size, accuracy, worst critical slice drop,
    latency): at least as good on all four and better on one."""
    scored = [r for r in results if r["outcome"] != ERROR]

    def key(r):  # all minimised
        return (r["size_mb"], -r["accuracy"], r["worst_slice_drop"] if r["worst_slice_drop"] is not None else 0.0,
                r["latency_ms"])

    front = []
    for r in scored:
        k = key(r)
        if not any(all(a <= b for a, b in zip(key(o), k)) and key(o) != k for o in scored if o is not r):
            front.append(r["name"])
    return front


def why_not(r: dict) -> str:
    """What kept a candidate from being chosen, in a few words (its failed, else its insufficient checks)."""
    if r["outcome"] == ERROR:
        return f"could not be trained: {r['error']}"
    failed, thin = by_outcome(r["gates"], FAIL), by_outcome(r["gates"], INSUFFICIENT)
    if failed:
        worse = [k.removeprefix("noninferior:") for k in failed if k.startswith("noninferior:")]
        other = [k for k in failed if not k.startswith("noninferior:")]  # OOD, calibration, stress, quantization
        return "; ".join([*(["shown worse than the teacher: " + ", ".join(worse)] if worse else []),
                          *(["failed " + ", ".join(other)] if other else [])])
    if thin:
        return f"insufficient evidence on {len(thin)}: " + ", ".join(k.removeprefix("noninferior:") for k in thin)
    return "every check passed"


def sweep_markdown(results: list[dict], chosen: dict | None, *, teacher_accuracy: float, minutes: float,
                   plot_link: str | None = None) -> str:
    """The sweep report: the decision first, then one row per candidate (smallest first)."""
    front = set(pareto_front(results))
    if chosen is None:
        head = (f"**Size sweep: no candidate holds** ({len(results)} tried in {minutes:.1f} min): each failed a "
                "release gate or could not be trained; nothing goes on, nothing is registered.")
    else:
        how = ("every check passed" if chosen["outcome"] == PASS else
               "none passed every check; it has no failed check, and its thin evidence goes to the release gates "
               "(@challenger unless waived)")
        head = (f"**Size sweep: `{chosen['name']}` goes on** ({chosen['size_mb']:.1f} MB edge artifact, "
                f"{chosen['parameters'] / 1e6:.2f}M parameters, test accuracy {chosen['accuracy']:.3f} vs teacher "
                f"{teacher_accuracy:.3f}): the smallest candidate where "
                f"{how}. {len(results)} candidates in {minutes:.1f} min.")
    rows = ["| candidate | parameters | edge MB | test accuracy | worst critical slice (drop) | ms/row, batch 32 "
            "| outcome | why | Pareto |", "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(results, key=lambda r: (r["size_mb"] is None, r["size_mb"] or 0, r["name"]))
    for r in order:
        if r["outcome"] == ERROR:
            rows.append(f"| {r['name']} | | | | | | error | {why_not(r)} | |")
            continue
        worst = "-" if r["worst_slice"] is None else f"{r['worst_slice']} ({r['worst_slice_drop']:+.3f})"
        mark = "**chosen**" if chosen is not None and r["name"] == chosen["name"] else r["outcome"]
        rows.append(f"| {r['name']} | {r['parameters'] / 1e6:.2f}M | {r['size_mb']:.1f} | {r['accuracy']:.3f} | {worst} "
                    f"| {r['latency_ms']:.2f} | {mark} | {why_not(r)} | {'yes' if r['name'] in front else ''} |")
    tail = [f"Plot: [size, accuracy and worst critical slice]({plot_link})"] if plot_link else []
    return "\n".join([head, "", *rows, "", *tail, ""])


def sweep_plot(results: list[dict], chosen: dict | None, *, teacher_accuracy: float) -> bytes:
    """PNG: test accuracy and worst critical-slice drop against the edge size, one marker per candidate (colour by
    outcome, the chosen one starred, the Pareto front ringed), the teacher's accuracy as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colour = {PASS: "#2e7d32", INSUFFICIENT: "#ef6c00", FAIL: "#c62828"}
    scored = sorted((r for r in results if r["outcome"] != ERROR), key=lambda r: r["size_mb"])
    front = set(pareto_front(results))
    fig = Figure(figsize=(11, 4.6))
    FigureCanvasAgg(fig)
    ax_acc, ax_slice = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.84, wspace=0.22)
    for ax, field, title in ((ax_acc, "accuracy", "test accuracy (higher is better)"),
                             (ax_slice, "worst_slice_drop", "worst critical slice: drop vs teacher (lower is better)")):
        for i, r in enumerate(p for p in scored if p[field] is not None):
            is_chosen = chosen is not None and r["name"] == chosen["name"]
            ax.scatter(r["size_mb"], r[field], s=170 if is_chosen else 45, marker="*" if is_chosen else "o",
                       color=colour[r["outcome"]], zorder=2,
                       edgecolors="#263238" if r["name"] in front else "none", linewidths=1.2)
            ax.annotate(f"{r['name']} ({r['latency_ms']:.1f} ms)", (r["size_mb"], r[field]), fontsize=7,
                        xytext=(5, 7 if i % 2 == 0 else -11), textcoords="offset points")
        ax.margins(x=0.18, y=0.15)
        ax.set_xlabel("edge artifact (MB)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    ax_acc.axhline(teacher_accuracy, color="#455a64", ls="--", lw=1, label=f"teacher {teacher_accuracy:.3f}")
    ax_slice.axhline(0.0, color="#455a64", ls="--", lw=1)
    for outcome, c in colour.items():
        ax_acc.scatter([], [], color=c, s=30, label=outcome)
    ax_acc.scatter([], [], color="white", edgecolors="#263238", s=30, label="on the Pareto front")
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.suptitle("Size sweep: smaller is left; the chosen candidate is the star; latency in brackets (batch 32, per row)",
                 fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()
