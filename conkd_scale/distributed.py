"""Distributed initialisation in one function, rank-0 helpers, and teardown.

Every DeepSpeed job calls :func:`init_distributed` once, before any collective. It finds the
launcher from the environment, in this order:

1. ``env``: ``RANK``/``WORLD_SIZE`` already set (the DeepSpeed launcher, ``torchrun``,
   ``deepspeed --launcher openmpi`` with ``OMPI_*`` mapped by DeepSpeed);
2. ``mpi``: an MPI launch (``mpirun``, ``srun --mpi=pmix``): ``OMPI_COMM_WORLD_SIZE``,
   ``PMI_SIZE`` or ``PMIX_RANK`` present. DeepSpeed's MPI discovery (mpi4py) fills
   ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
3. ``slurm``: a plain ``srun`` step (``SLURM_STEPID`` set): ``RANK = SLURM_PROCID``,
   ``WORLD_SIZE = SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``), ``LOCAL_RANK = SLURM_LOCALID``,
   ``MASTER_ADDR`` = first host of ``SLURM_JOB_NODELIST``, ``MASTER_PORT`` from the job id
   (unless set). The batch script itself (no step id) is *not* a SLURM launch: running
   ``python launch/x.py`` there is a single process, not rank 0 of many that never arrive;
4. ``single``: none of these: one process, world size 1, on a free local port.

Backend: ``nccl`` when CUDA is available, else ``gloo`` (DeepSpeed's CPU accelerator).
``MASTER_ADDR`` must resolve on every rank's host; where it does not, every rank stops at once
with a :class:`~conkd_scale.utils.errors.ConfigError` (exit 2) that says what to do.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from conkd_scale.utils.errors import ConfigError, ConkdError
from conkd_scale.utils.procs import free_port

T = TypeVar("T")

LAUNCHERS = ("env", "mpi", "slurm", "single")
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str  # "nccl" or "gloo"
    device: torch.device
    launcher: str  # one of LAUNCHERS

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``"gpu[01-03,07],login1"``) into host names.

    >>> expand_nodelist("gpu[01-02,07],cpu1")
    ['gpu01', 'gpu02', 'gpu07', 'cpu1']
    """
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)[0]


def detect_launcher(env: dict[str, str] | os._Environ[str]) -> str:
    """Which launcher started this process (see the module docstring for the order)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if any(v in env for v in _MPI_VARS):
        return "mpi"
    if "SLURM_PROCID" in env and ("SLURM_STEPID" in env or "SLURM_STEP_ID" in env):
        return "slurm"
    return "single"


def slurm_env(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The torch.distributed variables for a plain ``srun`` step, from the ``SLURM_*`` ones."""
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": world,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0] or "1",
        "MASTER_ADDR": env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 40000),
    }


def check_master_addr(env: dict[str, str] | os._Environ[str], launcher: str) -> None:
    """Fail with what to do when ``MASTER_ADDR`` does not resolve on this host.

    Without this check every rank but the master would retry its rendezvous until the
    rendezvous timeout and then fail with a generic store error.
    """
    addr = env.get("MASTER_ADDR", "")
    try:
        socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
        return
    except (OSError, UnicodeError) as e:
        reason = e
    origin = ""
    if launcher == "slurm":
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "?"
        origin = f" (the job's nodes: {nodes})"
    raise ConfigError(
        f"the rendezvous host MASTER_ADDR={addr!r}{origin} cannot be resolved on host "
        f"{socket.gethostname()}: {reason}. Make the node names resolvable on every node "
        "(DNS or /etc/hosts), or export MASTER_ADDR=<an address of the first node> before "
        "launching (sbatch, srun, torchrun)"
    )


def _set_cpu_threads(local_world_size: int) -> None:
    """Share the node's cores between its ranks unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(1, local_world_size)))


DEFAULT_TIMEOUT_MINUTES = 10.0
DEFAULT_RANK0_TIMEOUT_MINUTES = 120.0


def init_distributed(
    backend: str | None = None,
    *,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
    rank0_timeout_minutes: float = DEFAULT_RANK0_TIMEOUT_MINUTES,
) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed for whatever launcher started us.

    Idempotent: a second call returns the same info (the first call's timeouts hold).
    ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` without. ``timeout_minutes``
    bounds every collective (and the rendezvous): a rank that waits longer for a hung or
    dead peer fails with an error (the jobs: ``train.collective_timeout_minutes``); it also
    bounds how long rank 0's heartbeat may be silent during rank-0-only work.
    ``rank0_timeout_minutes`` bounds each piece of rank-0-only work (:func:`run_on_main`;
    0: no limit; the jobs: ``train.rank0_timeout_minutes``).
    """
    import deepspeed

    if not is_initialized():  # a later call (a teacher trained inside a job) keeps them
        set_rank0_wait(silence_s=60 * timeout_minutes, limit_s=60 * rank0_timeout_minutes)
    env = os.environ
    launcher = detect_launcher(env)
    if launcher == "slurm":
        for k, v in slurm_env(env).items():
            env.setdefault(k, v)
    elif launcher == "single":
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    elif launcher == "env":
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
    if launcher in ("slurm", "env"):
        check_master_addr(env, launcher)
    on_gpu = torch.cuda.is_available()
    backend = backend or ("nccl" if on_gpu else "gloo")
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=True,
        # MPI discovery overwrites MASTER_PORT with this (DeepSpeed's default: 29500, which a
        # concurrent job may hold): keep the user's
        distributed_port=int(env.get("MASTER_PORT") or 29500),
        timeout=timedelta(minutes=timeout_minutes),
        verbose=False,
    )
    rank = int(env["RANK"])
    world = int(env["WORLD_SIZE"])
    _unlink_shm_buffers(rank, world)
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", "0") or 0) or _count_local_ranks(world)
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _set_cpu_threads(local_world)
    return DistInfo(rank, world, local_rank, local_world, backend, device, launcher)


def _unlink_shm_buffers(rank: int, world: int) -> None:
    """Remove the names of DeepSpeed's shared-memory allreduce buffers right after start-up.

    DeepSpeed's CPU communication op creates one buffer per rank in /dev/shm and maps every
    peer's buffer before ``init_distributed`` returns; once every rank is past it (a
    barrier), the names are no longer needed, and unlinking them now means that no exit,
    SIGKILL included, can leave one behind (the memory goes with the last rank)."""
    import torch.distributed as dist

    if world > 1:
        dist.barrier()
    release_shm_buffer(rank)


def _count_local_ranks(world: int) -> int:
    """Ranks on this host, for the CPU thread split."""
    return 1 if world == 1 else rank_hosts().count(socket.gethostname())


def rank_hosts() -> list[str]:
    """Every rank's host name, by rank (one all_gather; this host alone without a group)."""
    import torch.distributed as dist

    if not is_initialized() or dist.get_world_size() == 1:
        return [socket.gethostname()]
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return [str(n) for n in names]


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only, as one write (ranks sharing a stdout never interleave)."""
    if is_main():
        sep = kwargs.pop("sep", " ")
        end = kwargs.pop("end", "\n")
        f = kwargs.pop("file", sys.stdout)
        f.write(sep.join(str(a) for a in args) + end)
        f.flush()


def barrier() -> None:
    import torch.distributed as dist

    if is_initialized():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    import torch.distributed as dist

    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64 on the CPU)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


_RUN_ON_MAIN_CALLS = itertools.count()
# how long the other ranks wait for rank-0-only work (init_distributed sets them)
_RANK0_WAIT = {
    "silence_s": 60 * DEFAULT_TIMEOUT_MINUTES,
    "limit_s": 60 * DEFAULT_RANK0_TIMEOUT_MINUTES,
}
_ON_MAIN_DEPTH = [0]  # > 0 while rank 0 runs run_on_main work (a nested call runs inline)


class PeerLostError(ConkdError):
    """Rank 0 hung, stopped or died while the other ranks waited for its rank-0-only work
    (exit code 1, as for a peer lost in a collective)."""

    exit_code = 1


def set_rank0_wait(*, silence_s: float, limit_s: float) -> None:
    """How the other ranks wait for rank-0-only work (:func:`run_on_main`): they give up
    when rank 0's heartbeat has been silent for ``silence_s`` seconds (it is stopped, frozen
    or unreachable), or when the work has run for ``limit_s`` seconds (it is hung while
    alive; 0: no limit)."""
    _RANK0_WAIT.update(silence_s=float(silence_s), limit_s=float(limit_s))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min"


def wait_for_key(store: Any, key: str, phase: str, poll_s: float = 0.2) -> None:
    """Poll the rendezvous store until rank 0 has published ``key`` (the outcome of its
    work ``phase``), outside any collective, so the collective timeout does not apply.

    Gives up with :class:`PeerLostError` (after dumping this rank's threads) when rank 0's
    heartbeat (``key + "/beat"``, bumped by a thread of rank 0 while it works) has not moved
    for ``silence_s``, also because the store stopped answering (it lives in rank 0's
    process under the DeepSpeed launcher and ``srun``, and a frozen process answers no
    call); when the work has taken longer than ``limit_s``; or when the store fails (rank 0
    has died). The store is polled from a daemon thread, so a call that never returns
    cannot hold this rank."""
    import threading

    silence_s, limit_s = _RANK0_WAIT["silence_s"], _RANK0_WAIT["limit_s"]
    start = time.monotonic()
    state: dict[str, Any] = {"done": False, "error": None, "changed": start}

    def poll() -> None:
        seen = None
        while True:
            try:
                if store.check([key]):
                    state["done"] = True
                    return
                beat = store.add(key + "/beat", 0)
            except RuntimeError as e:  # torch's DistStoreError / DistNetworkError
                state["error"] = e
                return
            if beat != seen:
                seen, state["changed"] = beat, time.monotonic()
            time.sleep(poll_s)

    poller = threading.Thread(target=poll, name="conkd-rank0-wait", daemon=True)
    poller.start()
    while True:
        poller.join(timeout=poll_s)
        if state["done"]:
            return
        if state["error"] is not None:
            e = state["error"]
            _give_up(
                f"the rendezvous store failed ({type(e).__name__}: {str(e)[:200]}): rank 0 "
                "has died or cannot be reached",
                phase,
                e,
            )
        now = time.monotonic()
        if now - state["changed"] > silence_s:
            _give_up(
                f"rank 0 sent no heartbeat for {now - state['changed']:.0f} s "
                f"(train.collective_timeout_minutes: {_minutes(silence_s)}): it is stopped, "
                "frozen or cannot be reached",
                phase,
            )
        if limit_s > 0 and now - start > limit_s:
            _give_up(
                f"it has run for longer than train.rank0_timeout_minutes "
                f"({_minutes(limit_s)}): rank 0 is hung, or the work needs a larger "
                "train.rank0_timeout_minutes (0: no limit); rank 0 dumps its own threads "
                "at the limit",
                phase,
            )


def _give_up(why: str, phase: str, cause: BaseException | None = None) -> None:
    """Say why this rank stops waiting for rank 0, dump its threads, raise PeerLostError."""
    import faulthandler

    rank = get_rank()
    sys.stderr.write(
        f"[rank {rank}] stopped waiting for rank 0 ({phase}): {why}. "
        "Where this rank's threads are:\n"
    )
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    raise PeerLostError(f"[rank {rank}] rank 0 did not finish {phase}: {why}") from cause


def run_on_main(fn: Any, /, *args: Any, phase: str | None = None, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its error.

    The other ranks wait by polling the rendezvous store (:func:`wait_for_key`), not in a
    collective, so rank-0-only work (training R, writing a checkpoint's manifest, an export)
    may outlast the collective timeout; it is still bounded (:func:`set_rank0_wait`): a
    thread of rank 0 publishes a heartbeat while ``fn`` runs, and rank 0 dumps its threads
    if ``fn`` outlasts the limit. ``phase`` names the work in those errors (default: the
    function's name). The outcome is passed on, so a failure on rank 0 is re-raised on
    every rank with rank 0's message. Called again inside ``fn``, it just runs (rank 0).
    """
    import pickle

    import torch.distributed as dist

    if not is_initialized() or dist.get_world_size() == 1 or _ON_MAIN_DEPTH[0]:
        return fn(*args, **kwargs)
    phase = phase or getattr(fn, "__qualname__", repr(fn))
    key = f"conkd/run_on_main/{next(_RUN_ON_MAIN_CALLS)}"
    store = dist.distributed_c10d._get_default_store()
    if not is_main():
        wait_for_key(store, key, phase)
        ok, value = pickle.loads(store.get(key))
        if not ok:
            raise value
        return value
    with _rank0_watch(store, key + "/beat"):
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:  # KeyboardInterrupt too: the others must not wait
            try:
                blob = pickle.dumps((False, e))
            except Exception:
                blob = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")))
            store.set(key, blob)
            raise
        store.set(key, pickle.dumps((True, value)))
    return value


@contextlib.contextmanager
def _rank0_watch(store: Any, beat_key: str) -> Iterator[None]:
    """While rank 0 works alone: a heartbeat thread bumps ``beat_key`` in the store, and
    faulthandler dumps every thread of rank 0 once the work outlasts the limit."""
    import faulthandler
    import threading

    silence_s, limit_s = _RANK0_WAIT["silence_s"], _RANK0_WAIT["limit_s"]
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(min(5.0, silence_s / 4)):
            try:
                store.add(beat_key, 1)
            except RuntimeError:
                return

    thread = threading.Thread(target=beat, name="conkd-rank0-heartbeat", daemon=True)
    thread.start()
    if limit_s > 0:
        faulthandler.dump_traceback_later(limit_s, file=sys.stderr)
    _ON_MAIN_DEPTH[0] += 1
    try:
        yield
    finally:
        _ON_MAIN_DEPTH[0] -= 1
        if limit_s > 0:
            faulthandler.cancel_dump_traceback_later()
        stop.set()
        thread.join(timeout=5.0)


def teardown(*, barrier: bool = False) -> None:
    """Destroy the process group(s) (safe to call twice or without one).

    ``barrier=True`` (after a successful run): every rank first meets in a barrier, so that
    no rank tears its connections down while a peer still uses them (gloo can abort at exit
    otherwise). Never after an error: the other ranks may sit in another collective, and a
    barrier would hang; the launchers (deepspeed, torchrun, srun) stop the remaining ranks
    when one exits with an error.
    """
    import torch.distributed as dist

    if not is_initialized():
        return
    if barrier:
        dist.barrier()
    release_shm_buffer(dist.get_rank())
    dist.destroy_process_group()


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory allreduce buffer.

    With all ranks on one machine, DeepSpeed's CPU communication op creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MB)
    and never removes it, so every job would leave its ranks' buffers in RAM-backed /dev/shm
    until the machine's memory fills. The peers mapped it while DeepSpeed started, so
    removing the name now frees the memory once every rank has exited.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    with contextlib.suppress(OSError):
        path.unlink()
