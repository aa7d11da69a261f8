"""ConKD distillation: one student from a dialogue teacher D and a recommendation teacher R.

    deepspeed --num_gpus 2 launch/distill.py --deepspeed ds_configs/zero3.json \
        [--config configs/distill_redial.json] [key=value ...]

With no --config: the built-in default (synthetic corpus, tiny models), training missing
teachers first. Also runs under torchrun, srun and mpirun (conkd_scale/distributed.py).
Outputs: see conkd_scale/distill/recipe.py.
"""

from __future__ import annotations

import sys
from typing import Any

from conkd_scale.distill.config import DistillConfig
from conkd_scale.distill.recipe import DistillRecipe
from conkd_scale.launching import launch_main
from conkd_scale.training.ds_config import load_ds_config


def make_recipe(cfg: DistillConfig, ds_config: dict[str, Any], ds_path: str) -> DistillRecipe:
    # D's inference config is validated here too, before any collective
    inference = load_ds_config(cfg.teachers.inference_ds_config)
    return DistillRecipe(cfg, ds_config, ds_path, inference_ds_config=inference)


if __name__ == "__main__":
    sys.exit(launch_main(__doc__, DistillConfig, make_recipe))
