"""Train the dialogue teacher D (causal LM over words + items, NLL on response tokens).

    deepspeed --num_gpus 2 launch/train_dialog_teacher.py --deepspeed ds_configs/zero3.json \
        [--config configs/dialog_teacher_redial.json] [key=value ...]

Also runs under ``torchrun --nproc_per_node N``, ``srun`` and ``mpirun`` (see
conkd_scale/distributed.py). With no --config: the synthetic corpus (generated if missing) and
the ``tiny`` preset. Outputs: see conkd_scale/training/dialog_teacher.py and
docs/dialog_teacher.md.
"""

from __future__ import annotations

import argparse
import sys

from conkd_scale.config import build_config
from conkd_scale.training.dialog_teacher import DialogTeacherConfig, DialogTeacherRecipe
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
        help="DeepSpeed JSON config (default: %(default)s)",
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
        # Validated on every rank before any collective: a bad file fails all ranks at once.
        cfg = build_config(DialogTeacherConfig, args.config, overrides)
        ds_config = load_ds_config(args.deepspeed)
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    recipe = DialogTeacherRecipe(cfg, ds_config, args.deepspeed)
    ok = False
    try:
        recipe.setup()
        recipe.train()
        recipe.export()
        ok = True
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        recipe.cleanup(success=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
