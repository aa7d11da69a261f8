"""Pre-emption: a signal asks the job to save a checkpoint and stop, so it can be requeued.

    #SBATCH --signal=B:USR1@300    (slurm/distill.sh; the batch shell forwards it to srun)
    scancel --signal=USR1 --batch JOBID      (by hand, e.g. before maintenance)
    scancel JOBID, a time limit, an eviction (SIGTERM to every rank, SIGKILL ~30 s later)

Protocol (every rank, :class:`~conkd_scale.training.trainer.Trainer`):

1. :func:`install` sets a handler for the pre-emption signals (``SIGTERM`` and ``SIGUSR1``;
   the environment variable ``CONKD_PREEMPT_SIGNALS``, e.g. ``USR1`` or ``USR1,USR2``,
   changes the set; ``none`` keeps every signal's default action). The handler only sets a
   flag, so a signal in the middle of a collective or a checkpoint write is harmless.
   Any rank may receive it, possibly only one (rank 0, say) or the ranks at different steps.
   A SIGTERM gives the job only the cluster's grace period (SLURM's ``KillWait``, 30 s by
   default) before SIGKILL: the save must fit in it; ``--signal=B:USR1@300`` gives more.
2. At every optimizer-step boundary the trainer all-reduces (MAX) the local :func:`flag`
   together with its other per-step flags, so every rank takes the same decision at the same
   step (:func:`requested` is the same on its own).
3. If set: the trainer saves a checkpoint (collective), logs a ``{"kind": "preempted"}``
   row, meets the other ranks in a barrier and calls :func:`stop`, which raises
   :class:`Preempted`, a ``SystemExit`` with code :data:`EXIT_PREEMPTED` (75,
   ``EX_TEMPFAIL``: "try again later"). The launch script's ``finally`` still tears the
   process group down; the process exits with 75.
4. The SLURM scripts (slurm/common.sh) requeue the job when the ranks exit with 75 (or when the
   batch shell itself received the signal and the step failed); the requeued job resumes
   from the newest checkpoint (``train.resume=auto``) and ends at the same total step count.

A signal that arrives after the last training step is ignored: the run finishes normally
(final evaluation, export, exit code 0) and is not requeued.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from typing import Any, NoReturn

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL; slurm/common.sh requeues on it
ENV_SIGNALS = "CONKD_PREEMPT_SIGNALS"
DEFAULT_SIGNALS = "TERM,USR1"

_state: dict[str, Any] = {"flag": False, "signum": None, "installed": ()}


class Preempted(SystemExit):
    """Raised on every rank after the pre-emption checkpoint was saved (exit code 75)."""

    def __init__(self, step: int, signum: int | None) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.step = step
        self.signum = signum

    def __str__(self) -> str:
        return f"pre-empted: checkpoint saved at step {self.step}, exiting with {self.code}"


def signals_from_env(env: Any = os.environ) -> list[signal.Signals]:
    """The pre-emption signals: ``$CONKD_PREEMPT_SIGNALS`` (``USR1,USR2``; ``none``: no
    signal; default TERM,USR1)."""
    out = []
    for name in (env.get(ENV_SIGNALS) or DEFAULT_SIGNALS).split(","):
        name = name.strip().upper()
        if not name or name == "NONE":
            continue
        try:
            out.append(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        except KeyError:
            raise ValueError(f"{ENV_SIGNALS}: unknown signal {name!r}") from None
    return out


def _handler(signum: int, frame: Any) -> None:
    _state["flag"] = True
    _state["signum"] = signum
    # one write: ranks sharing a stdout never interleave mid-line
    sys.stderr.write(
        f"[rank {os.environ.get('RANK', '?')}] received {signal.Signals(signum).name}: "
        "will save a checkpoint and stop at the next step boundary\n"
    )
    sys.stderr.flush()


def install() -> bool:
    """Install the flag-setting handler (idempotent). False where it cannot be installed
    (not the main thread), in which case the signals keep their previous behaviour."""
    sigs = tuple(signals_from_env())
    if _state["installed"] == sigs:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in sigs:
        signal.signal(s, _handler)
        # where every thread is when the signal comes, written at once from C (also when the
        # main thread is stuck in a call): after a peer's failure the launchers send SIGTERM
        faulthandler.register(s, file=sys.stderr, all_threads=True, chain=True)
    _state["installed"] = sigs
    return True


def flag() -> bool:
    """Whether this rank has received a pre-emption signal (local, no collective)."""
    return bool(_state["flag"])


def request(reason: str) -> None:
    """Ask for a pre-emption stop from code rather than a signal (e.g. the launcher died)."""
    _state["flag"] = True
    sys.stderr.write(
        f"[rank {os.environ.get('RANK', '?')}] {reason}: "
        "will save a checkpoint and stop at the next step boundary\n"
    )
    sys.stderr.flush()


def requested() -> bool:
    """Whether any rank has received a pre-emption signal. Collective: every rank calls it
    at the same point (one all-reduce of one scalar; local only without a process group)."""
    from conkd_scale.distributed import all_reduce_max

    (flag,) = all_reduce_max([1.0 if _state["flag"] else 0.0])
    return flag > 0


def stop(step: int) -> NoReturn:
    """Leave this rank with exit code 75, after the pre-emption checkpoint (every rank).

    SIGTERM is ignored from here on: a launcher that stops the remaining ranks as soon as one
    has exited non-zero (``srun --kill-on-bad-exit``, the DeepSpeed launcher) would otherwise
    turn this rank's 75 into 143 while it is tearing down, and the job script could no longer
    tell a pre-emption from a crash. SIGKILL still ends a rank that hangs here. The stack
    dumps registered on the pre-emption signals go first: faulthandler would otherwise put
    its saved handler back while the interpreter shuts down, and a late SIGTERM could then
    crash the rank (exit 139).
    """
    if threading.current_thread() is threading.main_thread():
        for s in _state["installed"]:
            faulthandler.unregister(s)
        _state["installed"] = ()  # a later install() (a new run in this process) redoes it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Preempted(step, _state["signum"])


def reset() -> None:
    """Forget a received signal (tests; a new run in the same process)."""
    _state["flag"] = False
    _state["signum"] = None
