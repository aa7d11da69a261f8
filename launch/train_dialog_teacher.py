"""Train the dialogue teacher D (causal LM over words + items, NLL on response tokens).

    deepspeed --num_gpus 2 launch/train_dialog_teacher.py --deepspeed ds_configs/zero3.json \
        [--config configs/dialog_teacher_redial.json] [key=value ...]

Also runs under ``torchrun --nproc_per_node N``, ``srun`` and ``mpirun`` (see
conkd_scale/distributed.py). With no --config: the synthetic corpus (generated if missing) and
the ``tiny`` preset. Outputs: see conkd_scale/training/dialog_teacher.py and
docs/dialog_teacher.md.
"""

from __future__ import annotations

import sys

from conkd_scale.launching import launch_main
from conkd_scale.training.dialog_teacher import DialogTeacherConfig, DialogTeacherRecipe

if __name__ == "__main__":
    sys.exit(launch_main(__doc__, DialogTeacherConfig, DialogTeacherRecipe))
