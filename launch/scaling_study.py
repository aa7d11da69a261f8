"""Scaling study of ConKD's gate against student size: distil and evaluate each (size, gate),
then analyse the gate and write a report with figures.

    python launch/scaling_study.py --sizes tiny,mini,small --gates hard,soft \
        --dataset synthetic --output-dir runs/scaling/synthetic
    python launch/scaling_study.py --sizes mini,small,medium --gates hard,soft,static \
        --dataset redial --data-dir ../shared/data/redial --launcher slurm \
        --output-dir runs/scaling/redial sbatch=--partition=gpu,--time=12:00:00
    python launch/scaling_study.py ... --ablations oracle,no_kg     # ablation runs by name

Finished runs are skipped, so the same command resumes a study (and, after a SLURM sweep,
analyses it). Writes report.md, summary.json and figures/*.png into OUT (or report_dir=DIR).
Options:
conkd_scale/scaling/config.py (StudyConfig); per-student settings go in
distill=key=value,... (launch/distill.py's).
"""

from __future__ import annotations

import argparse
import sys

from conkd_scale.config import build_config
from conkd_scale.scaling.config import StudyConfig
from conkd_scale.scaling.sweep import Study
from conkd_scale.utils.errors import ConkdError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", help="student presets, comma-separated (e.g. tiny,mini,small)")
    p.add_argument("--gates", help="gate modes, comma-separated: hard,soft,static,oracle")
    p.add_argument("--ablations", help="extra runs by name, e.g. static,oracle,no_kg,onehot")
    p.add_argument("--dataset", choices=["redial", "inspired", "synthetic"])
    p.add_argument("--data-dir")
    p.add_argument("--launcher", choices=["local", "slurm"])
    p.add_argument("--output-dir")
    p.add_argument("--config", help="JSON/YAML file of StudyConfig fields")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides before and after flags
    over = list(args.overrides)
    for key in ("sizes", "gates", "ablations", "dataset", "data_dir", "launcher", "output_dir"):
        value = getattr(args, key)
        if value is not None:
            over.append(f"{key}={value}")
    try:
        cfg = build_config(StudyConfig, args.config, over)
        summary = Study(cfg).run()
    except (ConkdError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if summary is not None:
        print(f"report: {cfg.report / 'report.md'}")
        print((cfg.report / "report.md").read_text(encoding="utf-8").split("## Metrics")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
