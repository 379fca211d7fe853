"""The three outcomes of a gate (issue 19), shared by the gates that decide them (distill_gap/evaluation/gates.py)
and the registry and promotion steps that act on them: pass, fail (harm shown) or insufficient (neither shown).
Plain functions over gate dicts ({"passed", "outcome"?, ...}); imports nothing, so any layer may use them."""

from __future__ import annotations

PASS, FAIL, INSUFFICIENT = "pass", "fail", "insufficient"


def gate_outcome(gate: dict) -> str:
    """pass / fail / insufficient (a gate recorded before outcomes existed: from its `passed`)."""
    return gate.get("outcome") or (PASS if gate["passed"] else FAIL)


def overall_outcome(gates: dict[str, dict]) -> str:
    """fail when any gate failed, else insufficient when any lacks evidence, else pass (no gates: insufficient)."""
    outcomes = {gate_outcome(g) for g in gates.values()}
    return FAIL if FAIL in outcomes else INSUFFICIENT if INSUFFICIENT in outcomes or not gates else PASS


def by_outcome(gates: dict[str, dict], outcome: str) -> dict[str, dict]:
    """The gates with this outcome, in order."""
    return {k: g for k, g in gates.items() if gate_outcome(g) == outcome}
