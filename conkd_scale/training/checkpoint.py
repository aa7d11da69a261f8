"""Step-numbered DeepSpeed checkpoints that survive a crash and a damaged disk.

Layout under ``OUT/checkpoints``::

    step_00000040/                DeepSpeed's files (model/optimizer partitions of every rank)
    step_00000040/meta.json       step, data position, counters, time, world size, the run
                                  config and resolved DeepSpeed config (resume_check.py)
    step_00000040/universal/      the checkpoint converted for another number of ranks
    step_00000040/manifest.json   every other file's size and SHA-256, written last
    .step_00000040.tmp/           a save in progress (never resumed from)
    step_00000030.corrupt/        a checkpoint that failed verification at resume (kept)
    latest                        the newest complete tag (DeepSpeed's pointer)
    zero_to_fp32.py               DeepSpeed's offline consolidation script

A save (:func:`save_checkpoint`, collective) writes into the hidden temp directory; every rank
fsyncs and hashes its share of the files; rank 0 writes ``meta.json`` and ``manifest.json``
(atomic, fsynced), renames the directory into place and fsyncs the parent, then points
``latest`` at it and prunes. So a ``step_*`` directory is always complete: a crash leaves at
most a temp directory, removed by the next save. A write that fails for lack of space raises
:class:`~conkd_scale.utils.errors.StorageError` (exit code 74) saying so.

Resume (:func:`resolve_resume`) verifies the newest checkpoint against its manifest (sizes and
checksums) and falls back to the next older one until one is intact, moving each damaged one
to ``step_*.corrupt`` and saying why; with none intact it stops with a clear error. A
checkpoint without a manifest (an older version of this code) is accepted unverified. If
DeepSpeed still fails to load a verified checkpoint, it is moved aside too and the job exits
with 75 when an older intact one remains (a retry resumes from it).

A checkpoint written by another number of ranks (with the same global batch: the resume
check refuses any other) is converted once, on rank 0, with DeepSpeed's
``ds_to_universal`` into ``universal/`` inside it, and loaded with DeepSpeed's universal
loader; a failed conversion or load is a :class:`UniversalError` (exit 2) that says what
to do.

Keep-last-k counts complete checkpoints only and never removes the one just written, so the
newest intact checkpoint always survives pruning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conkd_scale.distributed import (
    barrier,
    get_rank,
    get_world_size,
    is_initialized,
    print0,
    run_on_main,
)
from conkd_scale.training.data import DataPosition
from conkd_scale.utils.errors import ConfigError, RetryError, storage_error
from conkd_scale.utils.io import atomic_open, sha256_file, write_json

META = "meta.json"
MANIFEST = "manifest.json"
CORRUPT_SUFFIX = ".corrupt"
UNIVERSAL = "universal"  # the checkpoint converted for another number of ranks, inside it
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
    """Delete all but the ``keep_last`` newest complete checkpoints, incomplete ones older
    than the newest complete one, and stale temp directories (unfinished saves, replaced
    checkpoints). Returns what was removed
    (rank 0 calls this)."""
    root = Path(root)
    complete = list_checkpoints(root)
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for _, p in complete[: -max(keep_last, 1)]]
    doomed += [
        p
        for s, p in list_checkpoints(root, complete_only=False)
        if not (p / META).is_file() and s < newest
    ]
    doomed += [p for p in (*root.glob(".step_*.tmp"), *root.glob(".step_*.old")) if p.is_dir()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------- files
def _files(path: Path) -> list[str]:
    """Relative paths of the regular files under ``path`` except the manifest, sorted."""
    return sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_share(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """fsync and hash this rank's share of ``names`` (every world_size-th file)."""
    rank, world = get_rank(), get_world_size()
    out = {}
    for name in names[rank::world]:
        f = path / name
        _fsync(f)
        out[name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank (a list of one without a process group)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def verify_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` is not an intact checkpoint, or None if it is (every file of its
    manifest present with its size and SHA-256; no manifest: accepted unverified)."""
    path = Path(path)
    if not (path / META).is_file():
        return f"no {META} (the save did not finish)"
    try:
        json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        return f"{META} is unreadable ({e})"
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['size']}"
        if sha256_file(f) != want["sha256"]:
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    return None


def _quarantine(path: Path, why: str) -> Path:
    """Move a damaged checkpoint aside (``step_*.corrupt``) so nothing counts it again."""
    dest = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{n}")
    os.replace(path, dest)
    print(f"warning: skipping checkpoint {path}: {why}; moved it to {dest}", flush=True)
    return dest


# ----------------------------------------------------------------------------- save / load
def _raise_storage(e: BaseException, root: Path, what: str) -> None:
    """Re-raise a failed write as :class:`StorageError` when the disk is full (torch's zip
    writer reports ENOSPC as a RuntimeError without errno, so the disk is probed)."""
    if isinstance(e, OSError) and e.errno is not None:
        raise storage_error(e, what) from e
    probe = root / f".space_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as pe:
        if pe.errno in (errno.ENOSPC, errno.EDQUOT):
            raise storage_error(pe, what) from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def save_checkpoint(
    engine: Any,
    root: str | Path,
    step: int,
    position: DataPosition,
    *,
    keep_last: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a DeepSpeed checkpoint for ``step`` (collective); visible under its final name
    only once complete, fsynced and listed with checksums in its manifest."""
    root = Path(root)
    tag = checkpoint_tag(step)
    tmp = root / f".{tag}.tmp"

    def clear() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    run_on_main(clear, phase=f"clearing an unfinished save of {tag}")
    try:
        engine.save_checkpoint(
            str(root), tag=tmp.name, client_state={"conkd_step": step}, save_latest=False
        )
        barrier()
        names = _files(tmp) if tmp.is_dir() else []
        shares = _gather(_hash_share(tmp, names))
    except (OSError, RuntimeError) as e:
        _raise_storage(e, root, f"checkpoint {root / tag}")
        raise
    meta = {
        "step": step,
        "epoch": position.epoch,
        "batch_offset": position.batch_offset,
        **({"epoch_done": position.done} if position.done is not None else {}),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "world_size": get_world_size(),
        **(extra or {}),
    }

    def finish() -> None:
        try:
            write_json(tmp / META, meta)
            files = {k: v for share in shares for k, v in share.items()}
            files[META] = {"size": (tmp / META).stat().st_size, "sha256": sha256_file(tmp / META)}
            write_json(tmp / MANIFEST, {"step": step, "files": files})
            _fsync(tmp)
            final, old = root / tag, root / f".{tag}.old"
            if final.exists():  # a re-save of the same step (e.g. after a fallback)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)  # kept until the new one is in place
            os.replace(tmp, final)
            _fsync(root)
            with atomic_open(root / "latest", "w") as f:
                f.write(tag)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise storage_error(e, f"checkpoint {root / tag}") from e
        prune_checkpoints(root, keep_last)

    run_on_main(finish, phase=f"finishing checkpoint {tag} (manifest, rename, pruning)")
    return root / tag


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / META
    if not p.is_file():
        raise ConfigError(
            f"{path} is not a complete checkpoint (no {META}): point train.resume at a "
            "step_* directory that has one, or use train.resume=auto (the newest intact one) "
            "or train.resume=none (start over)"
        )
    return json.loads(p.read_text())


def load_checkpoint(engine: Any, path: str | Path) -> dict[str, Any]:
    """Load model, optimizer and LR-scheduler state from a checkpoint dir (collective).

    A checkpoint that DeepSpeed cannot load is moved aside; the error is a
    :class:`RetryError` (exit 75) when an older intact checkpoint remains to resume from."""
    path = Path(path)
    meta = read_meta(path)
    universal = meta.get("world_size") not in (None, get_world_size())
    if universal:
        run_on_main(
            to_universal,
            path,
            int(meta["world_size"]),
            phase=f"converting {path.name} to a universal checkpoint",
        )
        try:
            load_universal(engine, path / UNIVERSAL)
        except Exception as e:
            raise UniversalError(
                f"loading {path / UNIVERSAL} (converted from {meta['world_size']} ranks) on "
                f"{get_world_size()} ranks failed ({type(e).__name__}: {str(e)[:300]}). Resume "
                f"on {meta['world_size']} ranks, or start a new run (train.resume=none or "
                "another output_dir)"
            ) from e
        return meta
    try:
        _load_engine_state(engine, path)
    except Exception as e:
        why = f"DeepSpeed could not load it ({type(e).__name__}: {str(e)[:300]})"
        barrier()
        run_on_main(
            lambda: path.is_dir() and _quarantine(path, why),
            phase=f"moving {path.name} aside",
        )
        older = [p for s, p in list_checkpoints(path.parent) if s < int(meta["step"])]
        msg = f"checkpoint {path}: {why}; moved it to {path.name}{CORRUPT_SUFFIX}. "
        if older:
            raise RetryError(
                msg + f"An older checkpoint ({older[-1].name}) remains: run the job again "
                "to resume from it (a requeued job does so)"
            ) from e
        raise ConfigError(
            msg + "No older checkpoint remains: start over with train.resume=none"
        ) from e
    return meta


class UniversalError(ConfigError):
    """A checkpoint could not be resharded to this job's number of ranks."""


def to_universal(path: Path, world_size: int) -> Path:
    """``path/universal``: ``path`` (written by ``world_size`` ranks) converted to DeepSpeed's
    universal checkpoint format, which any number of ranks can load (once; rank 0)."""
    out = path / UNIVERSAL
    if (out / "zero").is_dir():
        return out
    tmp = path / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {path} ({world_size} ranks) to a universal checkpoint", flush=True)
    t0 = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(path),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise UniversalError(
            f"converting {path} to a universal checkpoint failed (deepspeed.checkpoint."
            f"ds_to_universal, exit {proc.returncode}): {' | '.join(tail)}. Resume on "
            f"{world_size} ranks, or start a new run (train.resume=none or another output_dir)"
        )
    os.replace(tmp, out)
    _fsync(path)
    print(f"converted in {time.monotonic() - t0:.1f} s: {out}", flush=True)
    return out


def load_universal(engine: Any, folder: Path) -> None:
    """Load a universal checkpoint (model, optimizer and LR-scheduler state; collective).

    DeepSpeed reads the format from ``checkpoint.load_universal`` of the engine's config;
    it is switched on for this load only."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        _load_engine_state(engine, folder)
    finally:
        config.load_universal_checkpoint = before


def _load_engine_state(engine: Any, folder: Path) -> None:
    """DeepSpeed's model, optimizer and LR-scheduler state from ``folder`` (collective)."""
    load_path, _ = engine.load_checkpoint(
        str(folder.parent),
        tag=folder.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint files in {folder}")


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """``train.resume``: ``auto`` (the newest intact checkpoint under ``root``, if any),
    ``none``, or a path (a checkpoint, or a checkpoints folder: its newest intact one).
    Damaged checkpoints on the way are moved aside with a warning (rank 0 calls this)."""
    if resume in ("none", "", "false"):
        return None
    if resume == "auto":
        return _newest_intact(Path(root), required=False)
    p = Path(resume)
    if _TAG_RE.fullmatch(p.name) or (p / META).exists():
        read_meta(p)
        why = verify_checkpoint(p)
        if why is not None:
            raise ConfigError(
                f"train.resume={p}: the checkpoint is damaged ({why}); point train.resume at "
                "another checkpoint or use train.resume=auto (the newest intact one)"
            )
        return p
    return _newest_intact(p, required=True)


def _newest_intact(root: Path, *, required: bool) -> Path | None:
    complete = list_checkpoints(root)
    skipped = []
    for _, path in reversed(complete):
        why = verify_checkpoint(path)
        if why is None:
            if skipped:
                print0(f"resuming from {path.name}, the newest intact checkpoint")
            return path
        skipped.append(_quarantine(path, why))
    if skipped:
        raise ConfigError(
            f"no intact checkpoint in {root}: every one failed verification (moved to "
            f"{', '.join(p.name for p in skipped)}). Start over with train.resume=none, or "
            "copy an intact checkpoint there"
        )
    if required:
        raise ConfigError(
            f"train.resume={root}: no complete checkpoint there (a complete one is a step_* "
            f"directory with {META}); point train.resume at one, or use train.resume=none"
        )
    partial = [p.name for p in root.glob(".step_*.tmp")] + [
        p.name for _, p in list_checkpoints(root, complete_only=False)
    ]
    if partial:
        names = ", ".join(sorted(partial))
        print0(f"note: {root} has only unfinished saves ({names}): starting over")
    return None
