"""The figures of a scaling study's report (matplotlib's Agg backend: no display needed).

Each ``plot_*`` draws one figure from ``summary.json``'s contents into a PNG file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conkd_scale.scaling.collect import HIGHER_IS_BETTER, METRICS, size_params
from conkd_scale.scaling.reading import param_label


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_variants(
    ax: Any,
    summary: dict[str, Any],
    value: Callable[[dict], Any],
    prefix: str,
    sd: Callable[[dict], Any] | None = None,
) -> bool:
    """One line per variant: ``value(group)`` (the mean over a size's seeds) against the
    student's parameters, with ``sd(group)`` as an error bar where several seeds ran
    (sizes where it is undefined are left out); whether any point was drawn."""
    plotted = False
    for variant in summary["variants"]:
        rs = [r for r in summary["groups"] if r["variant"] == variant and r["params"]]
        pts = [(r["params"], value(r), sd(r) if sd else None) for r in rs]
        pts = [(x, y, e or 0.0) for x, y, e in pts if y is not None]
        if pts:
            xs, ys, es = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=3, label=f"{prefix}{variant}")
            plotted = True
    return plotted


def first_seed_runs(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of the study's first seed (one per size and variant)."""
    first = (summary.get("seeds") or [None])[0]
    return [r for r in summary["runs"] if r.get("seed", first) == first]


def plot_metrics(summary: dict[str, Any], path: Path) -> None:
    """Each metric against student size, one line per variant, D as a dashed line."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        plotted = _plot_variants(
            ax,
            summary,
            lambda r, m=metric: r["metrics"][m],
            "",
            lambda r, m=metric: r["metrics_sd"].get(m),
        )
        d = summary["teacher"]["metrics"].get(metric)
        if d is not None:
            ax.axhline(d, ls="--", c="gray", lw=1, label="D")
        _log_x(ax, plotted, summary)
        ax.set_xlabel("student parameters")
        ax.set_title(metric + ("" if HIGHER_IS_BETTER[metric] else " (lower is better)"))
    _finish(fig, axes[0], 8, path)


def plot_histograms(summary: dict[str, Any], path: Path) -> None:
    """Per size: the histogram of D's item mass (the soft gate) and of each student's (its
    first seed)."""
    plt = _plt()
    sizes = summary["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.2), squeeze=False)
    t = summary["teacher"]["gate"]["histogram"]
    for ax, size in zip(axes[0], sizes, strict=True):
        centers = _centers(t["edges"])
        ax.plot(centers, t["fraction"], "k--", lw=1.2, label="D (the gate λ, soft)")
        for r in first_seed_runs(summary):
            if r["size"] == size:
                h = r["gate"]["histogram"]
                ax.plot(_centers(h["edges"]), h["fraction"], drawstyle="steps-mid",
                        label=f"student {r['variant']}")  # fmt: skip
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("item mass m_t")
        ax.set_title(f"{size} ({param_label(size_params(summary, size))})")
    axes[0][0].set_ylabel("fraction of reply tokens")
    _finish(fig, axes[0][0], 7, path)


def plot_gate_pr(summary: dict[str, Any], path: Path) -> None:
    """The hard gate's precision and recall against student size, D as a dashed line."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    t = summary["teacher"]["gate"]
    for ax, key in zip(axes, ("precision", "recall"), strict=True):
        plotted = _plot_variants(
            ax,
            summary,
            lambda r, k=key: r["gate"][k],
            "student ",
            lambda r, k=key: r["gate_sd"].get(k),
        )
        if t[key] is not None:
            ax.axhline(t[key], ls="--", c="gray", lw=1, label="D")
        _log_x(ax, plotted, summary)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("student parameters")
        ax.set_title(f"hard gate {key} vs gold item tokens (η = {summary['eta']:.3g})")
    _finish(fig, axes[0], 8, path)


def plot_profiles(summary: dict[str, Any], path: Path) -> None:
    """The mean turn gate over the recommender turns of a conversation: D, then each
    student of the first variant (its first seed)."""
    plt = _plt()
    first = summary["variants"][0]
    panels = [("D (teacher)", summary["teacher"]["gate"]["profile"])]
    panels += [
        (f"student {r['size']} {first}", r["gate"]["profile"])
        for r in first_seed_runs(summary)
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
    _finish(fig, axes[0][0], 7, path)


def plot_training(summary: dict[str, Any], path: Path) -> None:
    """Each student's own gate and PPL on the validation split during training."""
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
    _finish(fig, axes[0], 6, path)


def _finish(fig: Any, legend_ax: Any, fontsize: int, path: Path) -> None:
    """Legend on one panel (when it has labelled lines: an empty study panel has none),
    layout, and the PNG written atomically."""
    if legend_ax.get_legend_handles_labels()[0]:
        legend_ax.legend(fontsize=fontsize)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)


def _log_x(ax: Any, plotted: bool, summary: dict[str, Any]) -> None:
    """Log-scaled parameter axis ticked at the students' sizes; a panel without any point
    says so instead."""
    if plotted:
        ax.set_xscale("log")
        ps = sorted({r["params"] for r in summary["runs"] if r["params"]})
        ax.set_xticks(ps, labels=[param_label(p) for p in ps], fontsize=8)
        ax.minorticks_off()
    else:
        ax.text(0.5, 0.5, "undefined for every run", ha="center", transform=ax.transAxes)


def _centers(edges: list[float]) -> list[float]:
    return [(a + b) / 2 for a, b in itertools.pairwise(edges)]


FIGURES = {
    "metrics_vs_size.png": plot_metrics,
    "lambda_hist.png": plot_histograms,
    "gate_pr_vs_size.png": plot_gate_pr,
    "gate_profiles.png": plot_profiles,
    "gate_training.png": plot_training,
}
