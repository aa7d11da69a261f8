"""Summarise recommendation-teacher runs (the ``metrics.json`` of ``launch/train_rec_teacher.py``)
as a markdown table: mean ± sd over the seeds of each model, under the repeat baseline and
popularity on the same test turns (the evaluation R gets, ``rec/train.py::evaluate_turns``).

    python scripts/rec_summary.py --dataset redial --data-dir ../shared/data/redial \
        results/rec_teacher/redial/*/ > results/rec_teacher/redial.md

A run directory's name without its ``_sN`` seed suffix names its model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from conkd_scale.data.corpus import load_dataset
from conkd_scale.rec.graph import ContextIndex, build_rec_graph
from conkd_scale.rec.repeat import RepeatBaseline
from conkd_scale.rec.train import encode_turns, evaluate_turns

KEYS = ("R@1", "R@10", "R@50", "new/R@1", "new/R@10", "new/R@50")


def _fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def baselines(dataset: str, data_dir: str) -> dict[str, dict[str, float]]:
    """The repeat baseline and popularity, evaluated as R is, on the test split."""
    corpus = load_dataset(dataset, data_dir)
    graph = build_rec_graph(corpus, layers=1, use_kg=False)  # R's item index, no KG needed
    test = encode_turns(corpus.samples("test"), ContextIndex(graph))
    repeat = RepeatBaseline.from_samples(corpus.samples("train"), graph.item_ids)
    return {
        "repeat baseline": evaluate_turns(
            lambda b: repeat.scores_from_recent([r.items for r in b.recent]), test
        ),
        "popularity": evaluate_turns(lambda b: repeat.popularity.scores(len(b)), test),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("runs", nargs="+", help="run directories, each with metrics.json")
    a = p.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in a.runs:
        d = Path(run)
        groups[d.name.rsplit("_s", 1)[0]].append(json.loads((d / "metrics.json").read_text()))
    base = baselines(a.dataset, a.data_dir)
    n = int(base["popularity"]["n"]), int(base["popularity"]["new/n"])
    print(f"Test split: {n[0]} gold items ({n[1]} not mentioned before: the `new/` columns).\n")
    print(f"| model ({a.dataset}, test) | seeds | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for name, m in base.items():
        print(f"| {name} | – | " + " | ".join(f"{m[k]:.3f}" for k in KEYS) + " |")
    for name, runs in sorted(groups.items()):
        cells = [_fmt([r[k] for r in runs]) for k in KEYS]
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
