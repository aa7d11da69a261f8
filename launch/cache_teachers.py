"""The offline teacher cache: D's top-k with the exact gate, and R, once per teacher.

    deepspeed --num_gpus 2 launch/cache_teachers.py --deepspeed ds_configs/zero3_inference.json \
        [--config configs/distill_redial.json] [key=value ...] [--output-dir CACHE_DIR]

Takes the distillation job's config (same data, sequence layout, teachers; teachers.cache_k,
teachers.cache_tail_samples, teachers.cache_dtype, teachers.cache_rec_topk) and writes
teachers.cache_dir (--output-dir sets it). --deepspeed is D's inference config. Run again
after a kill: it resumes. Then distil with the same config and teachers.mode=offline. See
conkd_scale/cache/writer.py.
"""

from __future__ import annotations

import sys
from typing import Any

from conkd_scale.cache.writer import CacheJob
from conkd_scale.distill.config import DistillConfig
from conkd_scale.launching import launch_main


def make_job(cfg: DistillConfig, ds_config: dict[str, Any], ds_path: str) -> CacheJob:
    return CacheJob(cfg, ds_config, ds_path)


if __name__ == "__main__":
    sys.exit(
        launch_main(
            __doc__,
            DistillConfig,
            make_job,
            output_key="teachers.cache_dir",
            default_ds_config="ds_configs/zero3_inference.json",
        )
    )
