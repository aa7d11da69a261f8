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
from conkd_scale.scaling.reading import fmt, gap_text, param_label, reading
from conkd_scale.scaling.verdict import VERDICT_METRICS
from conkd_scale.utils.io import atomic_open, write_json


def render(summary: dict[str, Any], info: dict[str, Any]) -> str:
    """``report.md``: the reading, the metrics and gate tables, and the figures (``info``:
    ``logs/study.json``)."""
    eta = fmt(summary["eta"], 3)
    lines = [
        f"# Scaling study: {summary['dataset']}",
        "",
        f"Data: `{summary['data_dir']}` (test split). Date: {summary['date']}. "
        f"Wall time of all runs: {info.get('wall_s_total', 0) / 60:.1f} min "
        f"(study.json). Students: "
        + ", ".join(f"{s} ({param_label(size_params(summary, s))})" for s in summary["sizes"])
        + f"; variants: {', '.join(summary['variants'])}. Student seeds: "
        + _seeds_text(summary)
        + f". The hard gate's η = {eta}"
        + (" (auto: chosen on the validation split)" if summary.get("eta_config") == "auto" else "")
        + ".",
        "",
        "## What the figures show",
        "",
        *reading(summary),
        "",
        *_verdict_table(summary),
        "## Metrics against student size",
        "",
        "![metrics](figures/metrics_vs_size.png)",
        "",
        "Mean ± sd (sample sd) over the seeds in `seeds` where there are several.",
        "",
        "| student | params | variant | seeds | " + " | ".join(METRICS) + " | rec. turns |",
        "|---|---:|---|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for r in summary["groups"]:
        m, sd = r["metrics"], r["metrics_sd"]
        lines.append(
            f"| {r['size']} | {param_label(r['params'])} | {r['variant']} | "
            f"{','.join(map(str, r['seeds']))} | "
            + " | ".join(_cell(m[k], sd.get(k)) for k in METRICS)
            + f" | {r['recommendation_turns']} |"
        )
    tm = summary["teacher"]["metrics"]
    lines.append("| D (teacher) | | | | " + " | ".join(fmt(tm[k]) for k in METRICS) + " | |")
    lines += [
        "",
        "## The gate",
        "",
        "λ_t comes from D (one model for every student); each student's *own* gate is its "
        f"item mass m_t^S on the same tokens (hard: m_t^S > η = {eta}). Precision and recall:"
        " the hard gate as a detector of the reply tokens whose gold token is an item. Turn "
        "gate: max_t m_t over a reply. Students: mean over their seeds.",
        "",
        "| model | m at gold items | m elsewhere | opens on | precision | recall | F1 | "
        "turn gate, rec. turns | turn gate, chit-chat |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("D (teacher)", summary["teacher"]["gate"])]
    rows += [
        (f"student {r['name']}" + (f" ({len(r['seeds'])} seeds)" if len(r["seeds"]) > 1 else ""),
         r["gate"])
        for r in summary["groups"]
    ]  # fmt: skip
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


def _seeds_text(summary: dict[str, Any]) -> str:
    seeds = summary.get("seeds") or []
    if len(seeds) < 2:
        return f"{', '.join(map(str, seeds))} (one seed; no seed spread measured)"
    others = [s for s in summary["sizes"] if s not in summary["seed_sizes"]]
    text = f"{', '.join(map(str, seeds))} at {', '.join(summary['seed_sizes'])}"
    return text + (f"; {seeds[0]} only at {', '.join(others)}" if others else "")


def _cell(v: Any, sd: Any) -> str:
    if v is None or sd is None:
        return fmt(v)
    return f"{fmt(v)} ± {fmt(sd)}"


def _verdict_table(summary: dict[str, Any]) -> list[str]:
    """Hard − soft per size and metric, with the seed sd and the bootstrap interval."""
    v = summary.get("verdict")
    if not v or not v["sizes"]:
        return []
    b = summary.get("bootstrap", {})
    lines = [
        "## Hard − soft",
        "",
        "Per size: the mean of the paired per-seed differences hard − soft ± their sd "
        "(seeded sizes), and the 95% paired-bootstrap interval over test "
        f"{b.get('unit')}s ({b.get('resamples')} resamples, seed {b.get('seed')}; the same "
        "draw for both gates and every seed). `*`: clear (the interval excludes 0 and the "
        "gap exceeds 2 sd/√n of the seed spread; single-seed sizes borrow the sd measured at "
        "a seeded size). PPL: lower is better, so a negative gap favours the hard gate.",
        "",
        "| student | seeds | " + " | ".join(VERDICT_METRICS) + " |",
        "|---|---|" + "---|" * len(VERDICT_METRICS),
    ]
    for c in v["sizes"]:
        cells = []
        for m in VERDICT_METRICS:
            e = c["metrics"][m]
            cells.append(gap_text(e, len(c["seeds"])) + (" *" if e["clear"] else ""))
        lines.append(
            f"| {c['size']} ({param_label(c['params'])}) | {','.join(map(str, c['seeds']))} | "
            + " | ".join(cells)
            + " |"
        )
    st = summary.get("gate_status") or {}
    lines += [
        "",
        f"The hard students' gate: η = {fmt(summary['eta'], 3)}; D's hard gate open on "
        f"{_rate(st.get('train_rate'))} of their training tokens and "
        f"{_rate((st.get('test') or {}).get('fires'))} of the test tokens "
        f"(precision {fmt((st.get('test') or {}).get('precision'))}, recall "
        f"{fmt((st.get('test') or {}).get('recall'))})"
        + (": closed gate: hard row = dialogue-only KD." if st.get("closed") else "."),
        "",
    ]
    return lines


def _rate(r: float | None) -> str:
    return "–" if r is None else f"{fmt(100 * r, 2)}%"


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
