"""The written reading of a scaling study: every sentence computed from ``summary.json``."""

from __future__ import annotations

import math
from typing import Any

from conkd_scale.scaling.analysis import size_trend


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


def eta_text(summary: dict[str, Any]) -> str:
    """η as the report states it: its value, and where it came from."""
    eta = summary["eta"]
    if summary.get("eta_config") != "auto":
        return f"η = {fmt(eta, 3)} (configured)"
    cal = summary.get("eta_calibration") or {}
    at, paper = cal.get("at_eta") or {}, cal.get("at_0.5") or {}
    text = f"η = {fmt(eta, 3)} (η = auto: the F1-best hard-gate threshold on the validation split"
    if at:
        text += (
            f", where D's hard gate has precision {fmt(at.get('precision'))} and recall "
            f"{fmt(at.get('recall'))}; at the paper's η = 0.5: precision "
            f"{fmt(paper.get('precision'))}, recall {fmt(paper.get('recall'))}"
        )
    return text + ")"


def reading(summary: dict[str, Any]) -> list[str]:
    """The written reading, one markdown bullet per finding."""
    return [
        *_verdict(summary),
        *_seeds(summary),
        *_teacher_gate(summary),
        *_student_gates(summary),
        *_perplexity(summary),
    ]


def _teacher_gate(summary: dict[str, Any]) -> list[str]:
    t = summary["teacher"]["gate"]
    st = summary.get("gate_status") or {}
    lines = [
        f"- **D's gate.** {eta_text(summary)}. D puts a mean item mass of {fmt(t['m_gold'])} "
        f"on the next token where the gold token is an item ({t['n_gold']} tokens) and "
        f"{fmt(t['m_other'])} elsewhere ({t['n_other']} tokens). On the test split its hard "
        f"gate opens on {fmt(100 * t['fires'], 1)}% of the tokens, with precision "
        f"{fmt(t['precision'])} and recall {fmt(t['recall'])} against the gold item "
        f"positions; on the hard students' training batches it was open on "
        f"{_pct(st.get('train_rate'))} of the tokens. Per turn, the soft gate's maximum "
        f"averages {fmt(t['profile']['mean_rec_turn'])} on recommendation turns and "
        f"{fmt(t['profile']['mean_chat_turn'])} on chit-chat turns. D is the same for every "
        "student, so λ_t is the same at every size; what changes with size is how well each "
        "student follows it."
    ]
    if st.get("closed"):
        lines.append(
            "- **Closed gate: hard row = dialogue-only KD.** D's item mass never exceeded "
            f"η = {fmt(summary['eta'], 3)} on the hard students' training batches, so every "
            "hard-gate student here was trained with λ_t = 0, and hard vs soft compares "
            "dialogue-only KD with the soft gate, not the two gates."
        )
    return lines


def _pct(rate: float | None) -> str:
    return "– (not logged)" if rate is None else f"{fmt(100 * rate, 2)}%"


def _seeds(summary: dict[str, Any]) -> list[str]:
    seeds = summary.get("seeds") or []
    seeded = summary.get("seed_sizes") or []
    others = [s for s in summary["sizes"] if s not in seeded]
    if len(seeds) < 2:
        return [
            f"- **Seeds.** Every student ran one seed ({', '.join(map(str, seeds))}): no "
            "seed spread was measured, so the intervals below cover the test turns only."
        ]
    line = (
        f"- **Seeds.** The seed spread was measured at {', '.join(seeded)} (seeds "
        f"{', '.join(map(str, seeds))}; mean ± sd over them)"
    )
    if others:
        line += (
            f"; {', '.join(others)} ran seed {seeds[0]} only (single-seed rows), and their "
            "gaps are judged against the seed sd measured at "
            f"{', '.join(seeded)}"
        )
    return [line + "."]


def _student_gates(summary: dict[str, Any]) -> list[str]:
    t = summary["teacher"]["gate"]
    eta = fmt(summary["eta"], 3)
    lines = []
    for variant in summary["variants"]:
        rs = [r for r in summary["groups"] if r["variant"] == variant and r["params"]]
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


def gap_text(e: dict[str, Any], n_seeds: int) -> str:
    """One hard − soft gap: ``+0.012 ± 0.004 (3 seeds) [95% CI −0.002, +0.020]``."""
    if e.get("diff") is None:
        return "undefined"
    text = f"{e['diff']:+.3f}"
    text += f" ± {e['sd']:.3f} ({n_seeds} seeds)" if e.get("sd") is not None else " (1 seed)"
    if e.get("ci95"):
        lo, hi = e["ci95"]
        text += f" [95% CI {lo:+.3f}, {hi:+.3f}]"
    return text


PATTERN_TEXT = {
    "appears": "appears: both gaps are clear",
    "direction": "appears in direction only: at least one of the two gaps is not clear",
    "absent": "does not appear",
    "undecided": "cannot be judged (fewer than two sizes, or an undefined gap)",
}


def _verdict(summary: dict[str, Any]) -> list[str]:
    v = summary.get("verdict")
    if not v or not v["sizes"]:
        return []
    m = v["metric"]
    per = [
        f"{c['size']} {gap_text(c['metrics'][m], len(c['seeds']))}"
        + ("" if c["metrics"][m]["clear"] else ", not clear")
        for c in v["sizes"]
    ]
    text = (
        "- **Verdict on the paper's pattern** (the hard gate helps smaller students, the soft "
        f"gate larger ones): it {PATTERN_TEXT[v['pattern']]}. Hard − soft {m} per size: "
        + "; ".join(per)
        + "."
    )
    if v["pattern"] == "absent":
        small, large = (v["sizes"][i]["metrics"][m]["diff"] for i in (0, -1))
        text += (
            f" On {m}, {_leader(small)} at the smallest size and {_leader(large)} at the largest."
        )
    if v.get("closed_gate"):
        text += (
            " The hard gate never opened (closed gate: hard row = dialogue-only KD), so this "
            "says nothing about the hard gate itself."
        )
    b = summary.get("bootstrap", {})
    text += (
        " A gap is clear when its 95% paired-bootstrap interval over test "
        f"{b.get('unit', 'turn')}s ({b.get('resamples')} resamples) excludes 0 and it exceeds "
        "twice the seed noise of its mean (2 sd/√n, sd of the paired per-seed differences; "
        "single-seed sizes use the sd measured at a seeded size)."
    )
    return [text]


def _leader(diff: float) -> str:
    """Which gate is ahead on a mean hard − soft gap, and by how much (4 decimals)."""
    if round(diff, 4) == 0:
        return "the two gates are level to 4 decimals"
    return f"the {'hard' if diff > 0 else 'soft'} gate leads by {abs(diff):.4f}"


def _perplexity(summary: dict[str, Any]) -> list[str]:
    first = summary["variants"][0]
    ppl = [(r["size"], r["metrics"]["PPL"]) for r in summary["groups"] if r["variant"] == first]
    if len(ppl) < 2 or any(p is None for _, p in ppl):
        return []
    return [
        f"- **PPL ({first})** goes "
        + " → ".join(f"{fmt(p, 2)} ({s})" for s, p in ppl)
        + f" (D: {fmt(summary['teacher']['metrics']['PPL'], 2)})."
    ]
