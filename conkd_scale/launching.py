"""The common ``main`` of the DeepSpeed entry scripts (``launch/distill.py``,
``launch/train_dialog_teacher.py``): parse, validate, set up, train, export, clean up.

Arguments: ``--deepspeed PATH`` (defined here: DeepSpeed's own parser treats ``--deepspeed``
as a flag), ``--config FILE``, ``--output-dir DIR``, ``--local_rank`` (set by launchers) and
``key=value`` overrides. The run config and the DeepSpeed JSON are validated on every rank
before any collective, so bad input fails all ranks at once with exit code 2 and no hang.
Every user-facing error exits with its class's code (``utils/errors.py``: 2 configuration or
data, 3 divergence, 74 storage, 75 try again); a pre-emption exits with 75
(``training/preemption.py``).

Where ``CONKD_EXIT_DIR`` is set (the SLURM job scripts), each rank also writes its exit code
there (:func:`record_exit_code`), for the script to report the first rank's code.

Under the local ``deepspeed`` launcher, a signal that kills the ``deepspeed`` command itself
(it forwards none on a single node) would leave the ranks training under its orphaned
``deepspeed.launcher.launch`` child: :func:`watch_launcher` notices that the command is gone
and asks the ranks to save and stop as if pre-empted (exit 75).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conkd_scale.config import build_config
from conkd_scale.training import preemption
from conkd_scale.training.ds_config import load_ds_config
from conkd_scale.utils.errors import ConkdError, storage_error

MakeRecipe = Callable[[Any, dict[str, Any], str], Any]


def parse_launch_args(
    doc: str | None,
    argv: list[str] | None = None,
    default_ds_config: str = "ds_configs/zero3.json",
) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--deepspeed",
        metavar="PATH",
        default=default_ds_config,
        help="DeepSpeed JSON config (default: %(default)s)",
    )
    p.add_argument("--config", metavar="FILE", default=None, help="run config (JSON/YAML)")
    p.add_argument("--output-dir", default=None, help="same as output_dir=DIR")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def _proc_ppid(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (None if it is gone or /proc is absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def watch_launcher(interval_s: float = 2.0) -> bool:
    """If this rank runs under ``deepspeed.launcher.launch``, start a daemon thread that
    requests a pre-emption stop once the ``deepspeed`` command above it has exited.
    Returns whether it watches (False under other launchers or without /proc)."""
    launch = os.getppid()
    try:
        cmdline = Path(f"/proc/{launch}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    runner = _proc_ppid(launch)
    if b"deepspeed.launcher.launch" not in cmdline or runner in (None, 0, 1):
        return False

    def watch() -> None:
        while _proc_ppid(launch) == runner:
            threading.Event().wait(interval_s)
        preemption.request(f"the deepspeed launcher (pid {runner}) has exited")

    threading.Thread(target=watch, name="conkd-launcher-watch", daemon=True).start()
    return True


def is_collective_timeout(e: BaseException) -> bool:
    """Whether ``e`` is a collective that gave up waiting (gloo: "Timed out waiting ...")."""
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def report_collective_timeout(cfg: Any) -> None:
    """Say that a peer rank is hung or dead and dump where every thread of this rank is
    (the traceback that follows shows the collective it waited in)."""
    minutes = getattr(getattr(cfg, "train", None), "collective_timeout_minutes", None)
    sys.stderr.write(
        f"error: [rank {os.environ.get('RANK', '?')}] a collective waited longer than "
        f"train.collective_timeout_minutes ({minutes} min) for another rank, which is hung or "
        "has died (its own stack follows when it is stopped). Where this rank's threads are:\n"
    )
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


ENV_EXIT_DIR = "CONKD_EXIT_DIR"


def record_exit_code(code: int) -> None:
    """Write ``$CONKD_EXIT_DIR/rank<R>`` (``"<code> <unix time>"``) when the variable is set.

    The SLURM job scripts set it (slurm/common.sh): ``srun --kill-on-bad-exit`` reports the
    other ranks it terminated (143) rather than the code of the rank that failed first, e.g.
    2 for a bad config, and the job script reads the first code back from here."""
    folder = os.environ.get(ENV_EXIT_DIR)
    if not folder:
        return
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or f"pid{os.getpid()}"
    with contextlib.suppress(OSError):
        Path(folder, f"rank{rank}").write_text(f"{code} {time.time():.6f}\n")


def launch_main(
    doc: str | None,
    config_cls: type,
    make_recipe: MakeRecipe,
    argv: list[str] | None = None,
    *,
    output_key: str = "output_dir",  # the config key that --output-dir sets
    default_ds_config: str = "ds_configs/zero3.json",
) -> int:
    """Run a recipe (``setup/train/export/cleanup``) from the command line; the exit code
    (also recorded for the job scripts: :func:`record_exit_code`)."""
    code = 1  # an exception that escapes: Python exits with 1
    try:
        code = _launch(doc, config_cls, make_recipe, argv, output_key, default_ds_config)
    except SystemExit as e:  # a pre-emption (75), argparse's usage error (2)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        record_exit_code(code)
    return code


def _launch(
    doc: str | None,
    config_cls: type,
    make_recipe: MakeRecipe,
    argv: list[str] | None,
    output_key: str,
    default_ds_config: str,
) -> int:
    args = parse_launch_args(doc, argv, default_ds_config)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"{output_key}={args.output_dir}")
    try:
        cfg = build_config(config_cls, args.config, overrides)
        recipe = make_recipe(cfg, load_ds_config(args.deepspeed), args.deepspeed)
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    ok = False
    watch_launcher()
    try:
        recipe.setup()
        recipe.train()
        recipe.export()
        ok = True
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        err = storage_error(e, f"into {getattr(e, 'filename', None) or cfg.output_dir}")
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except RuntimeError as e:
        if is_collective_timeout(e):
            report_collective_timeout(cfg)
        raise
    finally:
        recipe.cleanup(success=ok)
    return 0
