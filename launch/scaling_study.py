"""Scaling study of ConKD's gate against student size: distil and evaluate each (size, gate),
then analyse the gate and write a report with figures.

    python launch/scaling_study.py --sizes tiny,mini,small --gates hard,soft \
        --dataset synthetic --output-dir runs/scaling/synthetic
    python launch/scaling_study.py --sizes mini,small,medium --gates hard,soft,static \
        --dataset redial --data-dir ../shared/data/redial --launcher slurm \
        --output-dir runs/scaling/redial sbatch=--partition=gpu,--time=12:00:00
    python launch/scaling_study.py ... --ablations oracle,no_kg     # ablation runs by name
    python launch/scaling_study.py ... seeds=0,1,2 seed_sizes=tiny eta=auto \
        teachers_dir=runs/results/redial/teachers   # seed spread at tiny; the table's D, R
    python launch/scaling_study.py --config configs/scaling_redial.yaml \
        teachers_dir=runs/results/redial/teachers   # the ReDial study (its header says more)

Finished runs are skipped, so the same command resumes a study (and, after a SLURM sweep,
analyses it); a trained student whose settings differ from the command's (η, seed, epochs,
...) stops the study with an error instead of being reused. The report gives each metric
as mean ± sd over seeds where several ran, and hard − soft per size with the seed sd and a
paired-bootstrap interval over test turns, η (auto: the value chosen on the validation
split) and whether D's hard gate opened at all. Writes report.md, summary.json and
figures/*.png into OUT (or report_dir=DIR); relative paths are taken from the project root.
Options: conkd_scale/scaling/config.py (StudyConfig) and conkd_scale/jobs.py (JobOptions);
per-student settings go in distill=key=value,... (launch/distill.py's), or
distill='["k=v,w", ...]' when one holds a comma.
"""

from __future__ import annotations

import sys

from conkd_scale.jobs import cli_overrides, cli_parser, run_cli
from conkd_scale.scaling.config import StudyConfig
from conkd_scale.scaling.sweep import Study

FLAGS = ("sizes", "gates", "ablations", "dataset", "data_dir", "launcher", "output_dir")


def main(argv: list[str] | None = None) -> int:
    p = cli_parser(__doc__, StudyConfig)
    p.add_argument("--sizes", help="student presets, comma-separated (e.g. tiny,mini,small)")
    p.add_argument("--gates", help="gate modes, comma-separated: hard,soft,static,oracle")
    p.add_argument("--ablations", help="extra runs by name, e.g. static,oracle,no_kg,onehot")
    p.add_argument("--dataset", choices=["redial", "inspired", "synthetic"])
    p.add_argument("--data-dir")
    p.add_argument("--launcher", choices=["local", "slurm"])
    p.add_argument("--output-dir")
    args = p.parse_intermixed_args(argv)  # key=value overrides before and after flags
    done = run_cli(StudyConfig, args.config, cli_overrides(args, FLAGS), lambda c: Study(c).run())
    if done is None:
        return 2
    cfg, summary = done
    if summary is not None:
        print(f"report: {cfg.report / 'report.md'}")
        print((cfg.report / "report.md").read_text(encoding="utf-8").split("## Metrics")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
