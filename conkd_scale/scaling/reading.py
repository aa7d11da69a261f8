"""The written reading of a scaling study: every sentence computed from ``summary.json``."""

from __future__ import annotations

import math
from typing import Any

from conkd_scale.scaling.analysis import rate_stderr, size_trend


def fmt(v: Any, digits: int = 3) -> str:
    """A number for the report (``–`` for a missing or undefined one)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def param_label(p: int | None) -> str:
    """A parameter count as ``2.21 M`` or ``190 k``."""
    return "?" if not p else (f"{p / 1e6:.2f} M" if p >= 1e5 else f"{p / 1e3:.0f} k")


def compare(summary: dict[str, Any], a: str, b: str, metric: str) -> list[dict[str, Any]]:
    """Per size: ``metric`` of variant ``a`` minus ``b``, and whether the gap exceeds twice
    the binomial standard error of the difference (rates on the recommendation turns)."""
    by = {(r["size"], r["variant"]): r for r in summary["runs"]}
    out = []
    for size in summary["sizes"]:
        ra, rb = by.get((size, a)), by.get((size, b))
        if ra is None or rb is None:
            continue
        va, vb = ra["metrics"].get(metric), rb["metrics"].get(metric)
        if va is None or vb is None:
            continue
        n = ra["recommendation_turns"]
        sa, sb = rate_stderr(va, n), rate_stderr(vb, n)
        se = math.hypot(sa, sb) if sa is not None and sb is not None else None
        diff = va - vb
        out.append(
            {
                "size": size,
                "params": ra["params"],
                "diff": diff,
                "se": se,
                "clear": se is not None and se > 0 and abs(diff) > 2 * se,
            }
        )
    return out


def reading(summary: dict[str, Any]) -> list[str]:
    """The written reading, one markdown bullet per finding."""
    return [
        *_teacher_gate(summary),
        *_student_gates(summary),
        *_hard_vs_soft(summary),
        *_perplexity(summary),
    ]


def _teacher_gate(summary: dict[str, Any]) -> list[str]:
    t = summary["teacher"]["gate"]
    eta = summary["eta"]
    lines = [
        f"- **D's gate.** D puts a mean item mass of {fmt(t['m_gold'])} on the next token "
        f"where the gold token is an item ({t['n_gold']} tokens) and {fmt(t['m_other'])} "
        f"elsewhere ({t['n_other']} tokens). Its hard gate (η = {eta}) opens on "
        f"{fmt(100 * t['fires'], 1)}% of the tokens, with precision {fmt(t['precision'])} "
        f"and recall {fmt(t['recall'])} against the gold item positions. Per turn, the soft "
        f"gate's maximum averages {fmt(t['profile']['mean_rec_turn'])} on recommendation "
        f"turns and {fmt(t['profile']['mean_chat_turn'])} on chit-chat turns. D is the same "
        "for every student, so λ_t is the same at every size; what changes with size is how "
        "well each student follows it."
    ]
    if t["fires"] == 0:
        lines.append(
            f"- **The hard gate is closed everywhere:** D's item mass never exceeds η = {eta}, "
            "so every hard-gate student here was trained with dialogue-only KD (λ_t = 0), "
            "and hard vs soft compares dialogue-only KD with the soft gate."
        )
    return lines


def _student_gates(summary: dict[str, Any]) -> list[str]:
    t = summary["teacher"]["gate"]
    eta = summary["eta"]
    lines = []
    for variant in summary["variants"]:
        rs = [r for r in summary["runs"] if r["variant"] == variant and r["params"]]
        if len(rs) < 2:
            continue
        first, last = rs[0], rs[-1]
        masses = (
            f"its item mass at gold item tokens goes from {fmt(first['gate']['m_gold'])} "
            f"({first['size']}) to {fmt(last['gate']['m_gold'])} ({last['size']}; D: "
            f"{fmt(t['m_gold'])}), and elsewhere from {fmt(first['gate']['m_other'])} to "
            f"{fmt(last['gate']['m_other'])}"
        )
        f1 = [r["gate"]["f1"] for r in rs]
        if all(x is None for x in f1):
            lines.append(
                f"- **Students' own gate ({variant}).** At no size does the student's hard gate "
                f"(η = {eta}) open on a gold item token; {masses}."
            )
            continue
        slope = size_trend([r["params"] for r in rs], f1)
        if slope is None:
            trend = "too few sizes where it opens to call a trend"
        elif abs(slope) < 0.02:
            trend = f"it shows no clear change with size (slope {slope:.3f} per decade)"
        else:
            better = "improves" if slope > 0 else "worsens"
            trend = f"it {better} with size (slope {slope:.3f} per decade of parameters)"
        lines.append(
            f"- **Students' own gate ({variant}).** The student's hard gate as a detector of "
            f"gold item tokens has F1 {_f1_at(first)} at {first['size']} "
            f"({param_label(first['params'])}) and {_f1_at(last)} at {last['size']} "
            f"({param_label(last['params'])}): {trend}; {masses}."
        )
    return lines


def _f1_at(run: dict[str, Any]) -> str:
    f = run["gate"]["f1"]
    return fmt(f) if f is not None else "undefined (it never opens on one)"


def _hard_vs_soft(summary: dict[str, Any]) -> list[str]:
    if not {"hard", "soft"} <= set(summary["variants"]):
        return []
    lines = []
    for metric in ("F1@1", "ReR@1"):
        cmp = compare(summary, "hard", "soft", metric)
        if cmp:
            parts = [
                f"{c['size']} {c['diff']:+.3f}" + ("" if c["clear"] else " (within 2 SE)")
                for c in cmp
            ]
            lines.append(f"- **Hard − soft, {metric}:** " + "; ".join(parts) + ".")
    cmp = compare(summary, "hard", "soft", "F1@1")
    if len(cmp) < 2:
        return lines
    small, large = cmp[0], cmp[-1]
    appears = small["diff"] > 0 and large["diff"] < 0
    if appears and small["clear"] and large["clear"]:
        verdict = "appears, and both gaps exceed twice their standard error"
    elif appears:
        verdict = (
            "appears in direction, but not clearly: at least one of the two gaps is "
            "within twice its standard error"
        )
    else:
        verdict = (
            f"does not appear: on F1@1, {_leader(small['diff'])} at the smallest size "
            f"and {_leader(large['diff'])} at the largest"
        )
    lines.append(
        "- **The paper's pattern** (the hard gate helps smaller students, the soft "
        f"gate larger ones) {verdict} ({small['size']}: {small['diff']:+.3f}, "
        f"{large['size']}: {large['diff']:+.3f})."
    )
    return lines


def _leader(diff: float) -> str:
    return "the two gates tie" if diff == 0 else f"the {'hard' if diff > 0 else 'soft'} gate leads"


def _perplexity(summary: dict[str, Any]) -> list[str]:
    first = summary["variants"][0]
    ppl = [(r["size"], r["metrics"]["PPL"]) for r in summary["runs"] if r["variant"] == first]
    if len(ppl) < 2 or any(p is None for _, p in ppl):
        return []
    return [
        f"- **PPL ({first})** goes "
        + " → ".join(f"{fmt(p, 2)} ({s})" for s, p in ppl)
        + f" (D: {fmt(summary['teacher']['metrics']['PPL'], 2)})."
    ]
