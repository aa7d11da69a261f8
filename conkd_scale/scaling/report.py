"""The scaling study's report: ``report.md``, ``summary.json`` and ``figures/*.png`` in
``report_dir`` (default: the study's ``OUT``).

The numbers come from :mod:`~conkd_scale.scaling.collect`, the written reading from
:mod:`~conkd_scale.scaling.reading` (every sentence derived from ``summary.json``), the
figures from :mod:`~conkd_scale.scaling.plots`; this module renders and writes them.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from conkd_scale.scaling.collect import METRICS, collect, size_params, study_info
from conkd_scale.scaling.config import StudyConfig
from conkd_scale.scaling.plots import FIGURES
from conkd_scale.scaling.reading import fmt, param_label, reading
from conkd_scale.utils.io import atomic_open, write_json


def render(summary: dict[str, Any], info: dict[str, Any]) -> str:
    """``report.md``: the reading, the metrics and gate tables, and the figures (``info``:
    ``logs/study.json``)."""
    eta = summary["eta"]
    lines = [
        f"# Scaling study: {summary['dataset']}",
        "",
        f"Data: `{summary['data_dir']}` (test split). Date: {summary['date']}. "
        f"Wall time of all runs: {info.get('wall_s_total', 0) / 60:.1f} min "
        f"(study.json). Students: "
        + ", ".join(f"{s} ({param_label(size_params(summary, s))})" for s in summary["sizes"])
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
            f"| {r['size']} | {param_label(r['params'])} | {r['variant']} | "
            + " | ".join(fmt(m[k]) for k in METRICS)
            + f" | {r['recommendation_turns']} |"
        )
    tm = summary["teacher"]["metrics"]
    lines.append("| D (teacher) | | | " + " | ".join(fmt(tm[k]) for k in METRICS) + " | |")
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
            f"| {name} | {fmt(g['m_gold'])} | {fmt(g['m_other'])} | "
            f"{fmt(100 * g['fires'], 1)}% | {fmt(g['precision'])} | {fmt(g['recall'])} | "
            f"{fmt(g['f1'])} | {fmt(g['profile']['mean_rec_turn'])} | "
            f"{fmt(g['profile']['mean_chat_turn'])} |"
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


def write_report(cfg: StudyConfig) -> dict[str, Any]:
    """Collect, draw and write ``report.md`` and ``summary.json``; returns the summary."""
    out = cfg.report
    summary = collect(cfg)
    summary["date"] = _dt.date.today().isoformat()
    for name, plot in FIGURES.items():
        plot(summary, out / "figures" / name)
    write_json(out / "summary.json", summary)
    with atomic_open(out / "report.md", "w", encoding="utf-8") as f:
        f.write(render(summary, study_info(cfg)))
    return summary
