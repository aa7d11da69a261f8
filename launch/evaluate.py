"""Evaluate one system of the results table; writes OUT/metrics.json and OUT/generations.jsonl.

    python launch/evaluate.py --system student --model runs/distill/hf \
        --dataset redial --data-dir ../shared/data/redial --output-dir runs/eval/student \
        [--split test] [--max-turns N] [--decoding greedy|beam|sample] [key=value ...]
    python launch/evaluate.py --system pipeline --model runs/dialog_teacher/hf \
        --rec-teacher runs/rec_redial --dataset redial --data-dir ../shared/data/redial \
        --output-dir runs/eval/pipeline
    torchrun --nproc_per_node 4 launch/evaluate.py ...   # turns sharded across ranks

Systems: student | dialog (an exported HF LM), rec (R alone), pipeline (D + R). Other
options are EvalConfig fields (conkd_scale/eval/run.py), e.g. ``generation.max_new_tokens=40``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conkd_scale.config import build_config
from conkd_scale.eval.run import SYSTEMS, EvalConfig, run_evaluation
from conkd_scale.utils.errors import ConkdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", choices=SYSTEMS)
    p.add_argument("--model", help="exported HF model dir (student, dialog, pipeline's D)")
    p.add_argument("--rec-teacher", help="R's output dir or its checkpoint/ (rec, pipeline)")
    p.add_argument("--dataset", choices=["redial", "inspired", "synthetic"])
    p.add_argument("--data-dir")
    p.add_argument("--output-dir")
    p.add_argument("--split", choices=["train", "valid", "test"])
    p.add_argument("--max-turns", type=int, help="evaluate the first N recommender turns")
    p.add_argument("--decoding", choices=["greedy", "beam", "sample"])
    p.add_argument("--config", help="JSON/YAML file of EvalConfig fields")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = {
        "system": args.system,
        "model": args.model,
        "rec_teacher": args.rec_teacher,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "output_dir": args.output_dir,
        "split": args.split,
        "max_turns": args.max_turns,
        "generation.decoding": args.decoding,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    try:
        cfg = build_config(EvalConfig, args.config, overrides)
        metrics = run_evaluation(cfg)
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if metrics is not None:
        shown = {k: v for k, v in metrics.items() if not isinstance(v, dict) and "/" not in k}
        print(json.dumps(shown, indent=1))
        print(f"wrote {Path(cfg.output_dir) / 'metrics.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
