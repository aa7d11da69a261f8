"""Step-numbered DeepSpeed checkpoints with a metadata JSON, keep-latest-k, exact resume.

Layout under ``OUT/checkpoints``::

    step_00000040/            DeepSpeed's files (model/optimizer partitions of every rank)
    step_00000040/meta.json   written last, by rank 0: step, data position, counters, time
    latest                    DeepSpeed's pointer to the newest tag
    zero_to_fp32.py           DeepSpeed's offline consolidation script

A checkpoint counts only once its ``meta.json`` exists, so a save cut short (pre-emption in
the middle of writing) is never resumed from; it is removed by the next successful save.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from conkd_scale.distributed import barrier, get_world_size, run_on_main
from conkd_scale.training.data import DataPosition
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import write_json

META = "meta.json"
_TAG_RE = re.compile(r"step_(\d+)")


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _TAG_RE.fullmatch(p.name)
        if m and p.is_dir() and (not complete_only or (p / META).is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints, and incomplete ones
    older than the newest complete one. Returns what was removed (rank 0 calls this)."""
    complete = list_checkpoints(root)
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for _, p in complete[:-keep_last]] if keep_last > 0 else []
    doomed += [
        p
        for s, p in list_checkpoints(root, complete_only=False)
        if not (p / META).is_file() and s < newest
    ]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def save_checkpoint(
    engine: Any,
    root: str | Path,
    step: int,
    position: DataPosition,
    *,
    keep_last: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a DeepSpeed checkpoint for ``step`` (collective), then meta.json and pruning."""
    root = Path(root)
    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"conkd_step": step}, save_latest=True)
    barrier()
    meta = {
        "step": step,
        "epoch": position.epoch,
        "batch_offset": position.batch_offset,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "world_size": get_world_size(),
        **(extra or {}),
    }

    def finish() -> None:
        write_json(root / tag / META, meta)
        prune_checkpoints(root, keep_last)

    run_on_main(finish)
    return root / tag


def read_meta(path: str | Path) -> dict[str, Any]:
    import json

    p = Path(path) / META
    if not p.is_file():
        raise ConfigError(f"{path} is not a complete checkpoint (no {META})")
    return json.loads(p.read_text())


def load_checkpoint(engine: Any, path: str | Path) -> dict[str, Any]:
    """Load model, optimizer and LR-scheduler state from a checkpoint dir (collective)."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("world_size") not in (None, get_world_size()):
        raise ConfigError(
            f"{path} was written by {meta['world_size']} ranks; ZeRO checkpoints resume on the "
            f"same number of ranks (this job has {get_world_size()}). Start a new run from "
            "its weights instead (zero_to_fp32.py in the checkpoints folder, or the export)"
        )
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint {path}")
    return meta


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """``train.resume``: ``auto`` (newest complete checkpoint, if any), ``none``, or a path."""
    if resume in ("none", "", "false"):
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    p = Path(resume)
    read_meta(p)
    return p
