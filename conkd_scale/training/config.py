"""The training-loop config shared by every DeepSpeed job (``train.<field>`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from conkd_scale.utils.errors import ConfigError


@dataclass
class TrainConfig:
    """Schedule, batching, checkpointing and logging of one training run."""

    micro_batch: int = 8  # sequences per rank per forward (DeepSpeed micro batch)
    grad_accum: int = 1  # micro batches per optimizer step (filled into the DeepSpeed config)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.01  # AdamW decay on weight matrices (not on biases / norms)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    optimizer: Literal["adamw", "cpu_adam"] = "adamw"  # client optimizer (ds_configs/README)
    warmup_steps: int = 100  # linear warm-up from 0 to `lr`
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / linear)
    max_steps: int = 0  # optimizer steps; 0: derived from `epochs`
    epochs: float = 1.0  # used when max_steps == 0
    eval_every: int = 0  # steps between validation runs; 0: only at the end
    eval_max_batches: int = 0  # micro batches per rank per validation run; 0: the whole split
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    save_every_minutes: float = 0.0  # also save when this much wall time passed; 0: off
    keep_last: int = 2  # checkpoints kept (the newest ones)
    log_every: int = 10  # steps between metrics.jsonl rows
    seed: int = 0  # model init, data order and dropout (reseeded per micro step)
    num_workers: int = 0  # DataLoader workers per rank
    group_by_length: bool = True  # batch sequences of similar length (less padding)
    resume: str = "auto"  # auto: newest checkpoint in OUT/checkpoints; none; or a path
    stop_at_step: int = 0  # stop cleanly after this step (checkpoint written), as if pre-empted
    # steps in a row with a non-finite loss or gradient norm (or an update DeepSpeed skipped)
    # before the job stops with exit code 3; such steps are not counted (training/divergence.py).
    # Above the ~16 skips fp16's dynamic loss scale may need at the start.
    max_nonfinite_steps: int = 25
    # a collective that waits longer than this for a hung or dead rank fails on every live
    # rank (exit 1, with where each rank waited); rank-0-only work does not count against it
    collective_timeout_minutes: float = 10.0
    # rank-0-only work (training a missing R, a checkpoint's manifest, a universal conversion,
    # the export's writes) that runs longer than this ends the job on every rank (exit 1;
    # rank 0 dumps its threads); 0: no limit. A rank 0 that stops sending its heartbeat
    # (frozen, stopped) is given up after collective_timeout_minutes either way.
    rank0_timeout_minutes: float = 120.0
    progress: bool = True  # tqdm progress bar on rank 0
    # also send the train/eval rows to DeepSpeed's monitors (rank 0), written under the run
    # dir: OUT/tensorboard (needs the tensorboard package) and OUT/csv_monitor/*.csv; a
    # monitor block enabled in the DeepSpeed JSON works the same (ds_configs/README.md)
    tensorboard: bool = False
    csv_monitor: bool = False
    # recompute each transformer block in the backward instead of keeping its activations
    # (the model's own activation checkpointing): less memory, ~1/3 more compute, same math
    activation_checkpointing: bool = False
    # distillation job: trace each rank's resident memory by phase (setup, then the micro
    # steps of the first N optimizer steps) into OUT/memory_trace/rank_R.jsonl
    # (training/memtrace.py); 0: off
    memory_trace: int = 0

    def __post_init__(self) -> None:
        for name in ("micro_batch", "grad_accum", "log_every", "keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected >= 1, got {getattr(self, name)}")
        for name in (
            "max_steps",
            "warmup_steps",
            "eval_every",
            "save_every",
            "stop_at_step",
            "eval_max_batches",
            "num_workers",
            "memory_trace",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected >= 0, got {getattr(self, name)}")
        if not self.save_every_minutes >= 0:
            raise ConfigError(
                f"train.save_every_minutes: expected >= 0 (0: off), got {self.save_every_minutes}"
            )
        if not self.collective_timeout_minutes > 0:
            raise ConfigError(
                "train.collective_timeout_minutes: expected > 0, got "
                f"{self.collective_timeout_minutes}"
            )
        if not self.rank0_timeout_minutes >= 0:
            raise ConfigError(
                "train.rank0_timeout_minutes: expected >= 0 (0: no limit), got "
                f"{self.rank0_timeout_minutes}"
            )
        if self.lr <= 0:
            raise ConfigError(f"train.lr: expected > 0, got {self.lr}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("train.epochs must be > 0 when train.max_steps is 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas: expected two numbers, got {self.adam_betas}")


def check_sequence_run(
    dataset: str, data_dir: str | None, max_length: int, model: Any, model_key: str
) -> None:
    """Checks shared by the LM jobs' configs: data dir, a local model directory, sequence
    length vs the model's (errors name the model's key, ``model_key``)."""
    local = model.pretrained is not None and Path(model.pretrained).is_dir()
    if local and not (Path(str(model.pretrained)) / "config.json").is_file():
        raise ConfigError(
            f"{model_key}.pretrained={model.pretrained}: the directory has no config.json, so "
            "it is not a Hugging Face model directory; point it at one (e.g. the hf/ folder "
            "of a training run) or at a hub model name"
        )
    if dataset != "synthetic" and data_dir is None:
        raise ConfigError(f"data_dir is required for dataset={dataset!r}")
    if max_length < 16:
        raise ConfigError(f"max_length: expected >= 16, got {max_length}")
    limit = model.max_positions
    if limit is not None and max_length > limit:
        what = "n_positions" if model.pretrained is None else "pretrained's context length"
        raise ConfigError(f"max_length {max_length} exceeds {model_key}.{what} {limit}")
