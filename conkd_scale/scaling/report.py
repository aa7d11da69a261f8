"""The scaling study's report: ``OUT/report.md``, ``OUT/summary.json`` and ``OUT/figures/*.png``.

Every sentence of the written reading is derived from the numbers in ``summary.json``
(:func:`reading`); the figures are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conkd_scale.scaling.analysis import (
    conversation_profiles,
    load_trace,
    rate_stderr,
    read_jsonl,
    size_trend,
    summarise_trace,
    training_curves,
)
from conkd_scale.utils.io import atomic_open, write_json

if TYPE_CHECKING:
    from conkd_scale.scaling.sweep import Study

METRICS = ("F1@1", "ReR@1", "R@10", "PPL", "Dist-2")
HIGHER_IS_BETTER = {"F1@1": True, "ReR@1": True, "R@10": True, "PPL": False, "Dist-2": True}


# ---------------------------------------------------------------------------- collect
def collect(study: Study) -> dict[str, Any]:
    """Per run: size, variant, parameters, metrics, gate summary and training curves."""
    from conkd_scale.scaling.sweep import TEACHER_EVAL

    cfg = study.cfg
    eta = _eta(study)
    runs = []
    for run in cfg.runs():
        ev = study.eval_dir(run.name)
        metrics = json.loads((ev / "metrics.json").read_text(encoding="utf-8"))
        info_path = study.run_dir(run) / "run_info.json"
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        rows = read_jsonl(study.run_dir(run) / "metrics.jsonl")
        runs.append(
            {
                "name": run.name,
                "size": run.size,
                "variant": run.row.key,
                "label": run.row.label,
                "params": info.get("student_params"),
                "metrics": {k: metrics.get(k) for k in METRICS},
                "recommendation_turns": metrics.get("counts", {}).get("recommendation_turns", 0),
                "gate": summarise_trace(load_trace(ev / "gate_trace.jsonl"), eta),
                "curves": training_curves(rows),
            }
        )
    teacher_trace = load_trace(study.eval_dir(TEACHER_EVAL) / "gate_trace.jsonl")
    teacher_metrics = json.loads(
        (study.eval_dir(TEACHER_EVAL) / "metrics.json").read_text(encoding="utf-8")
    )
    return {
        "dataset": cfg.dataset,
        "data_dir": cfg.data,
        "eta": eta,
        "sizes": [s for s in dict.fromkeys(r["size"] for r in runs)],
        "variants": [v.key for v in cfg.variants()],
        "runs": runs,
        "teacher": {
            "gate": summarise_trace(teacher_trace, eta),
            "metrics": {k: teacher_metrics.get(k) for k in METRICS},
            "example": _example_conversation(teacher_trace, eta),
        },
    }


def _eta(study: Study) -> float:
    """η of the students' hard gate (from the first run's resolved config; default 0.5)."""
    for run in study.cfg.runs():
        path = study.run_dir(run) / "config.json"
        if path.is_file():
            return float(json.loads(path.read_text(encoding="utf-8"))["loss"]["gate"]["eta"])
    return 0.5


def _example_conversation(traces: list, eta: float) -> dict[str, Any]:
    """The conversation with the most recommender turns (its soft turn gates, in order)."""
    convs = conversation_profiles(traces, "soft", eta)["conversations"]
    if not convs:
        return {}
    cid = max(convs, key=lambda c: (len(convs[c]), c))
    return {"conv_id": cid, "turns": convs[cid]}


# ---------------------------------------------------------------------------- reading
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _params(p: int | None) -> str:
    return "?" if not p else (f"{p / 1e6:.2f} M" if p >= 1e5 else f"{p / 1e3:.0f} k")


def _by(summary: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["size"], r["variant"]): r for r in summary["runs"]}


def compare(summary: dict[str, Any], a: str, b: str, metric: str) -> list[dict[str, Any]]:
    """Per size: ``metric`` of variant ``a`` minus ``b``, and whether the gap exceeds twice
    the binomial standard error of the difference (rates on the recommendation turns)."""
    by = _by(summary)
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
    """The written reading: each sentence computed from ``summary``."""
    lines = []
    t = summary["teacher"]["gate"]
    eta = summary["eta"]
    lines.append(
        f"- **D's gate.** D puts a mean item mass of {_fmt(t['m_gold'])} on the next token "
        f"where the gold token is an item ({t['n_gold']} tokens) and {_fmt(t['m_other'])} "
        f"elsewhere ({t['n_other']} tokens). Its hard gate (η = {eta}) opens on "
        f"{_fmt(100 * t['fires'], 1)}% of the tokens, with precision {_fmt(t['precision'])} "
        f"and recall {_fmt(t['recall'])} against the gold item positions. Per turn, the soft "
        f"gate's maximum averages {_fmt(t['profile']['mean_rec_turn'])} on recommendation "
        f"turns and {_fmt(t['profile']['mean_chat_turn'])} on chit-chat turns. D is the same "
        "for every student, so λ_t is the same at every size; what changes with size is how "
        "well each student follows it."
    )
    if t["fires"] == 0:
        lines.append(
            f"- **The hard gate is closed everywhere:** D's item mass never exceeds η = {eta}, "
            "so every hard-gate student here was trained with dialogue-only KD (λ_t = 0), "
            "and hard vs soft compares dialogue-only KD with the soft gate."
        )
    runs = summary["runs"]
    for variant in summary["variants"]:
        rs = [r for r in runs if r["variant"] == variant and r["params"]]
        if len(rs) < 2:
            continue
        xs = [r["params"] for r in rs]
        f1 = [r["gate"]["f1"] for r in rs]
        first, last = rs[0], rs[-1]
        masses = (
            f"its item mass at gold item tokens goes from {_fmt(first['gate']['m_gold'])} "
            f"({first['size']}) to {_fmt(last['gate']['m_gold'])} ({last['size']}; D: "
            f"{_fmt(t['m_gold'])}), and elsewhere from {_fmt(first['gate']['m_other'])} to "
            f"{_fmt(last['gate']['m_other'])}"
        )
        if all(x is None for x in f1):
            lines.append(
                f"- **Students' own gate ({variant}).** At no size does the student's hard gate "
                f"(η = {eta}) open on a gold item token; {masses}."
            )
            continue
        slope = size_trend(xs, f1)
        if slope is None:
            trend = "too few sizes where it opens to call a trend"
        elif abs(slope) < 0.02:
            trend = f"it shows no clear change with size (slope {slope:.3f} per decade)"
        else:
            better = "improves" if slope > 0 else "worsens"
            trend = f"it {better} with size (slope {slope:.3f} per decade of parameters)"

        def f1_at(r: dict[str, Any]) -> str:
            f = r["gate"]["f1"]
            return _fmt(f) if f is not None else "undefined (it never opens on one)"

        lines.append(
            f"- **Students' own gate ({variant}).** The student's hard gate as a detector of "
            f"gold item tokens has F1 {f1_at(first)} at {first['size']} "
            f"({_params(first['params'])}) and {f1_at(last)} at {last['size']} "
            f"({_params(last['params'])}): {trend}; {masses}."
        )
    variants = summary["variants"]
    if "hard" in variants and "soft" in variants:
        for metric in ("F1@1", "ReR@1"):
            cmp = compare(summary, "hard", "soft", metric)
            if not cmp:
                continue
            parts = [
                f"{c['size']} {c['diff']:+.3f}" + ("" if c["clear"] else " (within 2 SE)")
                for c in cmp
            ]
            lines.append(f"- **Hard − soft, {metric}:** " + "; ".join(parts) + ".")
        cmp = compare(summary, "hard", "soft", "F1@1")
        if len(cmp) >= 2:
            small, large = cmp[0], cmp[-1]
            appears = small["diff"] > 0 and large["diff"] < 0
            clear = small["clear"] and large["clear"]
            if appears and clear:
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
    ppl = [(r["size"], r["metrics"]["PPL"]) for r in runs if r["variant"] == variants[0]]
    if len(ppl) >= 2 and all(p is not None for _, p in ppl):
        lines.append(
            f"- **PPL ({variants[0]})** goes "
            + " → ".join(f"{_fmt(p, 2)} ({s})" for s, p in ppl)
            + f" (D: {_fmt(summary['teacher']['metrics']['PPL'], 2)})."
        )
    return lines


def _leader(diff: float) -> str:
    return "the two gates tie" if diff == 0 else f"the {'hard' if diff > 0 else 'soft'} gate leads"


# ---------------------------------------------------------------------------- figures
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        plotted = False
        for variant in summary["variants"]:
            rs = [r for r in summary["runs"] if r["variant"] == variant and r["params"]]
            pts = [(r["params"], r["metrics"][metric]) for r in rs]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=variant)
                plotted = True
        d = summary["teacher"]["metrics"].get(metric)
        if d is not None:
            ax.axhline(d, ls="--", c="gray", lw=1, label="D")
        _log_x(ax, plotted, summary)
        ax.set_xlabel("student parameters")
        ax.set_title(metric + ("" if HIGHER_IS_BETTER[metric] else " (lower is better)"))
    _legend(axes[0], 8)
    fig.tight_layout()
    _save(fig, path)


def plot_histograms(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    sizes = summary["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.2), squeeze=False)
    t = summary["teacher"]["gate"]["histogram"]
    for ax, size in zip(axes[0], sizes, strict=True):
        centers = _centers(t["edges"])
        ax.plot(centers, t["fraction"], "k--", lw=1.2, label="D (the gate λ, soft)")
        for r in summary["runs"]:
            if r["size"] == size:
                h = r["gate"]["histogram"]
                ax.plot(_centers(h["edges"]), h["fraction"], drawstyle="steps-mid",
                        label=f"student {r['variant']}")  # fmt: skip
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("item mass m_t")
        ax.set_title(f"{size} ({_params(_size_params(summary, size))})")
    axes[0][0].set_ylabel("fraction of reply tokens")
    _legend(axes[0][0], 7)
    fig.tight_layout()
    _save(fig, path)


def plot_gate_pr(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    t = summary["teacher"]["gate"]
    for ax, key in zip(axes, ("precision", "recall"), strict=True):
        plotted = False
        for variant in summary["variants"]:
            rs = [r for r in summary["runs"] if r["variant"] == variant and r["params"]]
            pts = [(r["params"], r["gate"][key]) for r in rs if r["gate"][key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=f"student {variant}")
                plotted = True
        if t[key] is not None:
            ax.axhline(t[key], ls="--", c="gray", lw=1, label="D")
        _log_x(ax, plotted, summary)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("student parameters")
        ax.set_title(f"hard gate {key} vs gold item tokens (η = {summary['eta']})")
    _legend(axes[0], 8)
    fig.tight_layout()
    _save(fig, path)


def plot_profiles(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    first = summary["variants"][0]
    panels = [("D (teacher)", summary["teacher"]["gate"]["profile"])]
    panels += [
        (f"student {r['size']} {first}", r["gate"]["profile"])
        for r in summary["runs"]
        if r["variant"] == first
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (title, prof) in zip(axes[0], panels, strict=True):
        for kind, style in (("rec", "o-"), ("chat", "s--")):
            ys = prof["by_ordinal"][kind]
            xs = [n + 1 for n, y in enumerate(ys) if y is not None]
            label = "recommendation turns" if kind == "rec" else "chit-chat turns"
            ax.plot(xs, [y for y in ys if y is not None], style, label=label)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recommender turn of the conversation")
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("mean turn gate max_t m_t")
    _legend(axes[0][0], 7)
    fig.tight_layout()
    _save(fig, path)


def plot_training(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    keys = ("val_sgate_precision", "val_sgate_recall", "val_sgate_m_gold", "val_ppl")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys, strict=True):
        for r in summary["runs"]:
            val = r["curves"]["val"]
            if key in val and len(val[key]) == len(val["step"]):
                ax.plot(val["step"], val[key], ".-", label=r["name"])
        ax.set_xlabel("optimizer step")
        ax.set_title(key.replace("val_sgate_", "student gate: "), fontsize=9)
    _legend(axes[0], 6)
    fig.tight_layout()
    _save(fig, path)


def _legend(ax: Any, fontsize: int) -> None:
    """A legend when the panel has labelled lines (an empty study panel has none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def _log_x(ax: Any, plotted: bool, summary: dict[str, Any]) -> None:
    """Log-scaled parameter axis ticked at the students' sizes; a panel without any point
    says so instead."""
    if plotted:
        ax.set_xscale("log")
        ps = sorted({r["params"] for r in summary["runs"] if r["params"]})
        ax.set_xticks(ps, labels=[_params(p) for p in ps], fontsize=8)
        ax.minorticks_off()
    else:
        ax.text(0.5, 0.5, "undefined for every run", ha="center", transform=ax.transAxes)


def _centers(edges: list[float]) -> list[float]:
    return [(a + b) / 2 for a, b in itertools.pairwise(edges)]


def _size_params(summary: dict[str, Any], size: str) -> int | None:
    return next((r["params"] for r in summary["runs"] if r["size"] == size), None)


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)


FIGURES = {
    "metrics_vs_size.png": plot_metrics,
    "lambda_hist.png": plot_histograms,
    "gate_pr_vs_size.png": plot_gate_pr,
    "gate_profiles.png": plot_profiles,
    "gate_training.png": plot_training,
}


# ---------------------------------------------------------------------------- markdown
def render(summary: dict[str, Any], study_info: dict[str, Any]) -> str:
    eta = summary["eta"]
    lines = [
        f"# Scaling study: {summary['dataset']}",
        "",
        f"Data: `{summary['data_dir']}` (test split). Date: {summary['date']}. "
        f"Wall time of all runs: {study_info.get('wall_s_total', 0) / 60:.1f} min "
        f"(study.json). Students: "
        + ", ".join(f"{s} ({_params(_size_params(summary, s))})" for s in summary["sizes"])
        + f"; variants: {', '.join(summary['variants'])}.",
        "",
        "## What the figures show",
        "",
        *reading(summary),
        "",
        "## Metrics against student size",
        "",
        "![metrics](figures/metrics_vs_size.png)",
        "",
        "| student | params | variant | " + " | ".join(METRICS) + " | rec. turns |",
        "|---|---:|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for r in summary["runs"]:
        m = r["metrics"]
        lines.append(
            f"| {r['size']} | {_params(r['params'])} | {r['variant']} | "
            + " | ".join(_fmt(m[k]) for k in METRICS)
            + f" | {r['recommendation_turns']} |"
        )
    tm = summary["teacher"]["metrics"]
    lines.append("| D (teacher) | | | " + " | ".join(_fmt(tm[k]) for k in METRICS) + " | |")
    lines += [
        "",
        "## The gate",
        "",
        "λ_t comes from D (one model for every student); each student's *own* gate is its "
        f"item mass m_t^S on the same tokens (hard: m_t^S > η = {eta}). Precision and recall:"
        " the hard gate as a detector of the reply tokens whose gold token is an item. Turn "
        "gate: max_t m_t over a reply.",
        "",
        "| model | m at gold items | m elsewhere | opens on | precision | recall | F1 | "
        "turn gate, rec. turns | turn gate, chit-chat |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("D (teacher)", summary["teacher"]["gate"])]
    rows += [(f"student {r['name']}", r["gate"]) for r in summary["runs"]]
    for name, g in rows:
        lines.append(
            f"| {name} | {_fmt(g['m_gold'])} | {_fmt(g['m_other'])} | "
            f"{_fmt(100 * g['fires'], 1)}% | {_fmt(g['precision'])} | {_fmt(g['recall'])} | "
            f"{_fmt(g['f1'])} | {_fmt(g['profile']['mean_rec_turn'])} | "
            f"{_fmt(g['profile']['mean_chat_turn'])} |"
        )
    ex = summary["teacher"]["example"]
    lines += [
        "",
        "![histograms](figures/lambda_hist.png)",
        "",
        "![precision and recall](figures/gate_pr_vs_size.png)",
        "",
        "### Over the turns of a conversation",
        "",
        "![profiles](figures/gate_profiles.png)",
        "",
    ]
    if ex:
        seq = ", ".join(f"{'R' if k == 'rec' else 'c'}:{lam:.2f}" for _, k, lam in ex["turns"])
        lines += [
            f"D's soft turn gate over conversation `{ex['conv_id']}` (R: recommendation turn, "
            f"c: chit-chat): {seq}.",
            "",
        ]
    lines += [
        "### During training",
        "",
        "Validation after each evaluation interval: the student's own gate against the gold "
        "item tokens (`val_sgate_*` in each run's metrics.jsonl) and its PPL.",
        "",
        "![training](figures/gate_training.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(study: Study) -> dict[str, Any]:
    """Collect, draw and write ``report.md`` and ``summary.json``; returns the summary."""
    out = study.cfg.report
    summary = collect(study)
    summary["date"] = _dt.date.today().isoformat()
    info_path = study.out / "logs" / "study.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    for name, plot in FIGURES.items():
        plot(summary, out / "figures" / name)
    write_json(out / "summary.json", summary)
    with atomic_open(out / "report.md", "w", encoding="utf-8") as f:
        f.write(render(summary, info))
    return summary
