"""ConKD distillation: one student from a dialogue teacher D and a recommendation teacher R.

    deepspeed --num_gpus 2 launch/distill.py --deepspeed ds_configs/zero3.json \
        [--config configs/distill_redial.json] [key=value ...]

With no --config: the built-in default (synthetic corpus, tiny models), training missing
teachers first. Also runs under torchrun, srun and mpirun (conkd_scale/distributed.py).
Outputs: see conkd_scale/distill/recipe.py.
"""

from __future__ import annotations

import argparse
import sys

from conkd_scale.config import build_config
from conkd_scale.distill.config import DistillConfig
from conkd_scale.distill.recipe import DistillRecipe
from conkd_scale.training.ds_config import load_ds_config
from conkd_scale.utils.errors import ConkdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--deepspeed",
        metavar="PATH",
        default="ds_configs/zero3.json",
        help="DeepSpeed JSON config of the student (default: %(default)s)",
    )
    p.add_argument("--config", metavar="FILE", default=None, help="run config (JSON/YAML)")
    p.add_argument("--output-dir", default=None, help="same as output_dir=DIR")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        # Validated on every rank before any collective: bad input fails all ranks at once.
        cfg = build_config(DistillConfig, args.config, overrides)
        ds_config = load_ds_config(args.deepspeed)
        inf_config = load_ds_config(cfg.teachers.inference_ds_config)
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    recipe = DistillRecipe(cfg, ds_config, args.deepspeed, inf_config)
    try:
        recipe.setup()
        recipe.train()
        recipe.export()
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
