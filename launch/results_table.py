"""Train and evaluate METHOD.md's results table on one dataset (rows 1-6; --ablations: 7).

    python launch/results_table.py --dataset synthetic              # what `make demo` runs
    python launch/results_table.py --dataset redial --data-dir ../shared/data/redial \
        --ablations [key=value ...]

Writes results/<dataset>/results.md and results.json; runs under runs/results/<dataset>/
(finished rows are reused). Options: conkd_scale/results/table.py (ResultsConfig).
"""

from __future__ import annotations

import argparse
import sys

from conkd_scale.config import build_config
from conkd_scale.results.table import ResultsConfig, ResultsTable
from conkd_scale.utils.errors import ConkdError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default=None, choices=["redial", "inspired", "synthetic"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ablations", action="store_true", help="also the ablation rows (7a-7f)")
    p.add_argument("--config", default=None, help="JSON/YAML file of ResultsConfig fields")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides before and after flags
    over = list(args.overrides)
    over += [f"dataset={args.dataset}"] if args.dataset else []
    over += [f"data_dir={args.data_dir}"] if args.data_dir else []
    over += ["ablations=true"] if args.ablations else []
    try:
        cfg = build_config(ResultsConfig, args.config, over)
        report = ResultsTable(cfg).run()
    except (ConkdError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    from conkd_scale.results.table import render_markdown

    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
