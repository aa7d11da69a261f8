"""Train the recommendation teacher R (R-GCN + attention pooling, KBRD-style).

    python launch/train_rec_teacher.py --dataset redial --data-dir ../shared/data/redial \
        --output-dir runs/rec_redial [--kg kbrd|dbpedia|none] [--no-kg] \
        [--config configs/rec_teacher_redial.json] [key=value ...]

Also runs under torchrun / the DeepSpeed launcher (``WORLD_SIZE > 1``): rank 0 trains and
the other ranks wait for it (see conkd_scale/rec/train.py). Writes OUT/config.json,
OUT/metrics.jsonl, OUT/metrics.json and OUT/checkpoint/.
"""

from __future__ import annotations

import argparse
import json
import sys

from conkd_scale.config import build_config
from conkd_scale.distributed import print0
from conkd_scale.rec.train import RecTeacherConfig, run_rec_teacher
from conkd_scale.utils.errors import ConkdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=["redial", "inspired", "synthetic"])
    p.add_argument("--data-dir")
    p.add_argument("--kg", choices=["kbrd", "dbpedia", "none"], help="default: the dataset's")
    p.add_argument("--output-dir")
    p.add_argument("--no-kg", action="store_true", help="ablation: plain item embeddings")
    p.add_argument("--config", help="JSON/YAML file of RecTeacherConfig fields")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # launchers
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_intermixed_args(argv)


SHOWN = [
    "R@1",
    "R@10",
    "R@50",
    "new/R@10",
    "new/R@50",
    "popularity/R@1",
    "popularity/R@10",
    "popularity/R@50",
    "popularity/new/R@10",
    "popularity/new/R@50",
    "best_epoch",
    "train_seconds",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "kg": args.kg,
        "output_dir": args.output_dir,
        "use_kg": False if args.no_kg else None,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    try:
        cfg = build_config(RecTeacherConfig, args.config, overrides)
        cfg.check_paths()
        metrics = run_rec_teacher(cfg)
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print0(json.dumps({k: metrics[k] for k in SHOWN}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
