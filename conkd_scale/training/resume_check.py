"""What a resume may change: the run's settings compared with its checkpoint's, before any
file of the output directory is written.

Every checkpoint's ``meta.json`` carries the run config and the resolved DeepSpeed config it
was written under (``run_config``; an older checkpoint without them is compared with
``OUT/config.json`` and ``OUT/ds_config.json``). A resume compares them, field by field, with
this run's, on every rank (files only, no collective):

- fields in :data:`MAY_CHANGE` (schedule length, cadence of evaluation, saving and logging,
  progress, output and export settings, how a missing teacher would be trained, and the
  memory levers that compute the same function: activation checkpointing, the attention
  kernel, the dtype a checkpoint is read in) may differ;
- any other difference (micro batch, accumulation, seed, learning rate, loss and gate,
  data, sequence layout, model, DeepSpeed settings) is refused with a :class:`ConfigError`
  (exit 2) that names each field with both values;
- another number of ranks is allowed when the global batch (micro batch x accumulation x
  ranks) is the same: the checkpoint is converted to DeepSpeed's universal format and the
  data position remapped (``checkpoint.py``, ``data.py``); otherwise it is refused, naming
  both world sizes and the ``train.grad_accum`` that would keep the global batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conkd_scale.training.checkpoint import META, list_checkpoints
from conkd_scale.utils.errors import ConfigError

# Settings that do not change the function a run computes (dotted config keys; a key covers
# its sub-keys): where outputs go, cadence of evaluation, saving and logging, time limits,
# the memory levers (activation checkpointing, the attention kernel, the dtype a checkpoint
# is read in) and the memory trace, how a missing teacher would be trained and where its
# cache lies (a moved cache: its fingerprint is checked against the run).
NEUTRAL = (
    "output_dir",
    "export",
    "debug_dump_dir",
    "save_reference_logits",
    "train.eval_every",
    "train.eval_max_batches",
    "train.save_every",
    "train.save_every_minutes",
    "train.keep_last",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
    "train.csv_monitor",
    "train.resume",
    "train.num_workers",
    "train.collective_timeout_minutes",
    "train.rank0_timeout_minutes",
    "train.activation_checkpointing",
    "train.memory_trace",
    "model.attn_implementation",
    "student.attn_implementation",
    "model.dtype",
    "student.dtype",
    "teachers.auto_train",
    "teachers.rec_config",
    "teachers.rec_overrides",
    "teachers.dialog_preset",
    "teachers.dialog_pretrained",
    "teachers.dialog_attn_implementation",
    "teachers.dialog_overrides",
    "teachers.dialog_train_ds_config",
    "teachers.cache_dir",
    "teachers.cache_shard_sequences",
)
# Settings a resumed run may change: the neutral ones and the schedule's length.
MAY_CHANGE = (
    *NEUTRAL,
    "train.epochs",
    "train.max_steps",
    "train.stop_at_step",
    "train.max_nonfinite_steps",
)
# DeepSpeed keys that are derived from the run config or only affect logging.
DS_IGNORED = (
    "tensorboard",
    "csv_monitor",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "steps_per_print",
    "wall_clock_breakdown",
    "checkpoint",
    "comms_logger",
    "flops_profiler",
    "tensorboard",
    "wandb",
    "csv_monitor",
)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples compare as lists)."""
    if not isinstance(d, dict):
        return {prefix: list(d) if isinstance(d, tuple) else d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _covered(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples, Paths ... as in the saved JSON


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, saved, current)`` for every run-config field that differs and may not."""
    a, b = flatten(_norm(saved)), flatten(_norm(current))
    return [
        (k, a.get(k, "<absent>"), b.get(k, "<absent>"))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not _covered(k, MAY_CHANGE)
    ]


def ds_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The same for the resolved DeepSpeed configs (``ds_config.<key>``)."""
    a, b = flatten(_norm(saved)), flatten(_norm(current))
    return [
        (f"ds_config.{k}", a.get(k, "<absent>"), b.get(k, "<absent>"))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not _covered(k, DS_IGNORED)
    ]


def resume_candidate(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint ``train.resume`` would start from, found without changing anything
    (the newest complete one; verification happens when it is loaded)."""
    if resume in ("none", "", "false"):
        return None
    root = ckpt_dir if resume == "auto" else Path(resume)
    if (root / META).is_file():
        return root
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def saved_run_config(ckpt: Path, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The run config, resolved DeepSpeed config and world size ``ckpt`` was written under
    (empty dicts where unknown)."""
    meta = json.loads((ckpt / META).read_text())
    run = meta.get("run_config") or {}
    cfg, ds = run.get("config"), run.get("ds_config")
    for name, value in (("config.json", cfg), ("ds_config.json", ds)):
        if value is None and (out_dir / name).is_file():
            loaded = json.loads((out_dir / name).read_text())
            cfg, ds = (loaded, ds) if name == "config.json" else (cfg, loaded)
    world = int(meta.get("world_size") or 0)
    return cfg or {}, ds or {}, world


def check_resume_drift(
    cfg: dict[str, Any],
    ds: dict[str, Any],
    world_size: int,
    out_dir: str | Path,
    resume: str,
) -> Path | None:
    """Refuse a resume whose settings differ from its checkpoint's (module docstring).

    Returns the checkpoint it would resume from (None: a new run). Reads files only."""
    out_dir = Path(out_dir)
    ckpt = resume_candidate(resume, out_dir / "checkpoints")
    if ckpt is None:
        return None
    try:
        saved_cfg, saved_ds, saved_world = saved_run_config(ckpt, out_dir)
    except (OSError, ValueError):
        return ckpt  # an unreadable meta.json: the verification at load says why
    diffs = config_drift(saved_cfg, cfg) if saved_cfg else []
    diffs += ds_drift(saved_ds, ds) if saved_ds else []
    lines = [f"  {k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in diffs]
    if saved_world and saved_world != world_size:
        train = cfg.get("train", {})
        old_train = saved_cfg.get("train", train)
        old_global = old_train.get("micro_batch", 0) * old_train.get("grad_accum", 0) * saved_world
        new_global = train.get("micro_batch", 0) * train.get("grad_accum", 0) * world_size
        if old_global == new_global and {k for k, _, _ in diffs} <= {"train.grad_accum"}:
            return ckpt  # resharded through a universal checkpoint at load
        keep = old_global / max(train.get("micro_batch", 1) * world_size, 1)
        hint = (
            f"set train.grad_accum={int(keep)} to keep its global batch of {old_global} "
            "sequences and resume through a universal checkpoint, or "
            if keep == int(keep) and keep >= 1
            else ""
        )
        lines.append(
            f"  world size: {saved_world} ranks in the checkpoint, {world_size} now (global "
            f"batch {old_global} then, {new_global} now): {hint}resume on {saved_world} ranks"
        )
    if not lines:
        return ckpt
    raise ConfigError(
        f"refusing to resume from {ckpt}: these settings differ from the ones it was written "
        "with, and they decide the data order or the optimisation:\n"
        + "\n".join(lines)
        + f"\nRe-run with the checkpoint's settings (its config: {out_dir / 'config.json'}, "
        f"a valid --config), or start a new run: train.resume=none (it overwrites "
        f"{out_dir}) or another output_dir. Nothing in {out_dir} was changed."
    )
