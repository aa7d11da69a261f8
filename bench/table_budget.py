"""The wall of a results table run from nothing, by kind of job, and its metrics against a
reference table of the same rows (e.g. the same table with D online).

    python launch/results_table.py --config configs/results_redial_offline.yaml   # from nothing
    python bench/table_budget.py --results results/redial_offline \
        --reference results/redial --budget-min 120 --out bench/results/redial_table_budget.md

Reads both tables' ``results.json``. The run must have made every job of its rows in the
invocation it records (``run_walls_s`` has every row's evaluation and every seeded row's
training, and their sum fits in its ``wall_s``); otherwise a reused run would hide in the
wall and this exits with an error. The wall is split into the cache jobs (D and R are
trained by the first of them when missing), the students' training, the evaluations, and
the rest (the table's own work: bootstrap intervals, samples). Seeded rows are compared
per metric with ``bench/bench_cache_quality.py``'s rule (|difference of the means| within
the larger seed sd); the teacher and baseline rows, trained once, side by side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_cache_quality import METRICS, compare  # noqa: E402
from conkd_scale.utils.io import atomic_open  # noqa: E402


def _load(d: str) -> dict:
    path = Path(d) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no results.json (run launch/results_table.py first)")
    return json.loads(path.read_text(encoding="utf-8"))


def breakdown(report: dict) -> dict[str, float]:
    """Seconds of the invocation by kind of job; exits if a row's job was not run in it."""
    walls = report.get("run_walls_s", {})
    missing = []
    for key, row in report["rows"].items():
        seeds = row.get("seeds") or []
        for s in seeds:
            missing += [
                k for k in (f"{key}/seed{s}/train", f"{key}/seed{s}/eval") if k not in walls
            ]
        if not seeds and f"{key}/eval" not in walls:
            missing.append(f"{key}/eval")
    jobs = sum(walls.values())
    if missing or jobs > report["wall_s"]:
        raise SystemExit(
            "the table reused runs made before its invocation (missing walls: "
            f"{missing[:5]}; jobs {jobs:.0f} s, invocation {report['wall_s']:.0f} s): run it "
            "from an empty work_dir to measure its wall"
        )
    cache, train = "cache job (D and R trained first when missing)", "student training"
    out = {cache: 0.0, train: 0.0, "evaluation": 0.0}
    for k, v in walls.items():
        kind = cache if k.startswith("cache/") else train if k.endswith("/train") else None
        out[kind or "evaluation"] += v
    out["the table's own work"] = report["wall_s"] - jobs
    return out


def single_rows(run: dict, ref: dict) -> list[str]:
    """The rows trained once (teachers, baselines): each metric side by side."""
    lines = ["| row | metric | reference | this run |", "|---|---|---|---|"]
    for key, row in run["rows"].items():
        if row.get("seeds") or key not in ref["rows"]:
            continue
        for m in METRICS:
            a, b = ref["rows"][key]["metrics"].get(m), row["metrics"].get(m)
            if a is not None and b is not None:
                lines.append(f"| {key} | {m} | {a:.4f} | {b:.4f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", required=True, help="the from-nothing table's results dir")
    p.add_argument("--reference", default=None, help="a results dir of the same rows")
    p.add_argument("--budget-min", type=float, default=120.0)
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args()
    run = _load(args.results)
    parts = breakdown(run)
    wall = run["wall_s"]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    verdict = "within" if wall <= 60 * args.budget_min else "over"
    lines = [
        f"## The {run['dataset']} results table's wall by job (bench/table_budget.py) — {when}",
        "",
        f"- command: `{run['command']}`; summary: "
        f"`{shlex.join(['python', 'bench/table_budget.py', *sys.argv[1:]])}`",
        f"- machine: {run['machine']} ({platform.python_version()}); table run {run['date']}; "
        f"rows {', '.join(run['rows'])}; student seeds {run['seeds']}",
        "",
        f"**Wall: {wall / 60:.1f} min, {verdict} the {args.budget_min:.0f}-minute budget.**",
        "",
        "| part | minutes | share |",
        "|---|---|---|",
        *(f"| {k} | {v / 60:.1f} | {v / wall:.0%} |" for k, v in parts.items()),
    ]
    if args.reference:
        ref = _load(args.reference)
        seeded = [k for k, r in run["rows"].items() if r.get("seeds") and k in ref["rows"]]
        table, within, total = compare(ref, run, seeded)
        lines += [
            "",
            f"Against `{args.reference}` (the reference: 'online' below; this run: 'offline'):",
            "",
            *table,
            "",
            f"**{within} of {total}** (row, metric) pairs: |difference| within the larger seed sd.",
            "",
            *single_rows(run, ref),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with atomic_open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
