"""Summarise recommendation-teacher runs (the ``metrics.json`` of ``launch/train_rec_teacher.py``)
as markdown tables, validation split then test split: mean ± sd over the seeds of each model,
under the repeat baseline and popularity, which every run evaluates on the same turns as R
(``rec/train.py::RecTeacherTrainer.evaluate_baselines``; their popularity tie-break is seeded,
so they are averaged over the seeds of the runs too).

    python scripts/rec_summary.py results/rec_teacher/redial/*/ > results/rec_teacher/redial.md

A run directory's name without its ``_sN`` seed suffix names its model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

KEYS = ("R@1", "R@10", "R@50", "new/R@1", "new/R@10", "new/R@50")
SPLITS = {"valid": "valid/", "test": ""}
BASELINES = {"repeat baseline": "repeat/", "popularity": "popularity/"}


def _fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def table(groups: dict[str, list[dict]], split: str) -> list[str]:
    """The markdown lines of one split's table."""
    prefix = SPLITS[split]
    runs = [r for rs in groups.values() for r in rs if f"{prefix}n" in r]
    by_seed = {r["seed"]: r for r in runs}  # one evaluation of the baselines per seed
    n, n_new = int(runs[0][f"{prefix}n"]), int(runs[0][f"{prefix}new/n"])
    out = [
        f"{split.capitalize()} split: {n} gold items ({n_new} not mentioned before: the `new/` "
        "columns).",
        "",
        f"| model ({split}) | seeds | " + " | ".join(KEYS) + " |",
        "|---|---|" + "---|" * len(KEYS),
    ]
    for name, base in BASELINES.items():
        cells = [_fmt([r[f"{prefix}{base}{k}"] for r in by_seed.values()]) for k in KEYS]
        out.append(f"| {name} | {len(by_seed)} | " + " | ".join(cells) + " |")
    wins = []
    for name, rs in sorted(groups.items()):
        rs = [r for r in rs if f"{prefix}n" in r]
        if rs:
            cells = [_fmt([r[f"{prefix}{k}"] for r in rs]) for k in KEYS]
            out.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
        if len(rs) > 1:  # per seed: above the same seed's baseline?
            above = [
                sum(r[f"{prefix}{k}"] > r[f"{prefix}{base}{k}"] for r in rs)
                for k, base in [(k, "repeat/") for k in KEYS[:3]]
                + [(k, "popularity/") for k in KEYS[3:]]
            ]
            wins.append(
                f"- {name}: seeds above the repeat baseline at R@1/10/50 "
                f"{'/'.join(map(str, above[:3]))}, above popularity at new/R@1/10/50 "
                f"{'/'.join(map(str, above[3:]))} (of {len(rs)})"
            )
    return [*out, "", *wins] if wins else out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories, each with metrics.json")
    a = p.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in a.runs:
        d = Path(run)
        metrics = json.loads((d / "metrics.json").read_text())
        metrics["seed"] = json.loads((d / "config.json").read_text())["seed"]
        groups[d.name.rsplit("_s", 1)[0]].append(metrics)
    lines = []
    for split in SPLITS:
        lines += [*table(groups, split), ""]
    print("\n".join(lines).rstrip())


if __name__ == "__main__":
    main()
