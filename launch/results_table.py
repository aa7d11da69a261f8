"""Train and evaluate METHOD.md's results table on one dataset (rows 0-6; --ablations: 7).

    python launch/results_table.py --dataset synthetic              # what `make demo` runs
    python launch/results_table.py --dataset redial --data-dir ../shared/data/redial \
        --ablations [key=value ...]

Writes results/<dataset>/results.md and results.json; runs under runs/results/<dataset>/
(finished rows are reused; relative paths are taken from the project root). Options:
conkd_scale/results/table.py (ResultsConfig) and conkd_scale/jobs.py (JobOptions). A list
option is comma-separated, or a JSON list when an item holds a comma:
dialog='["train.adam_betas=0.9,0.95"]'.
"""

from __future__ import annotations

import sys

from conkd_scale.jobs import cli_overrides, cli_parser, run_cli
from conkd_scale.results.table import ResultsConfig, ResultsTable, render_markdown


def main(argv: list[str] | None = None) -> int:
    p = cli_parser(__doc__, ResultsConfig)
    p.add_argument("--dataset", choices=["redial", "inspired", "synthetic"])
    p.add_argument("--data-dir")
    p.add_argument(
        "--ablations", action="store_const", const="true", help="also the ablation rows (7a-7f)"
    )
    args = p.parse_intermixed_args(argv)  # key=value overrides before and after flags
    over = cli_overrides(args, ("dataset", "data_dir", "ablations"))
    done = run_cli(ResultsConfig, args.config, over, lambda cfg: ResultsTable(cfg).run())
    if done is None:
        return 2
    print(render_markdown(done[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
