"""Opt-in memory trace of a rank by phase (``train.memory_trace=N``): where a job's memory goes.

Each mark appends one row to ``OUT/memory_trace/rank_R.jsonl`` with the rank's resident
memory now (``rss_mib``: anonymous + file-backed + shared, from ``/proc/self/status``), its
split (``anon_mib``, ``file_mib``, ``shmem_mib``), glibc's allocator's bytes in use, freed
but kept, and mapped (:func:`malloc_stats_mib`), and the resident peak *since the previous
mark* (``peak_mib``): after each mark the kernel's high-water mark is reset (``echo 5 >
/proc/self/clear_refs``), so a row's peak is the peak of the phase that it ends. The first
row (``imports``) peaks over everything before the job's setup. On a GPU each row also has
the CUDA allocator's allocated bytes and peak since the previous mark.

The distillation recipe starts the trace and marks its setup phases; its trainer marks the
micro steps of the first ``N`` optimizer steps (``teacher forward``, ``student forward +
loss``, ``backward``, ``optimizer step``; a teacher trained in the same process first does
not trace its own steps). As the reset also resets what ``getrusage`` reports,
:func:`peak_memory_mib` (the job's ``peak_mem_mb``) keeps the largest phase peak.

``tests/test_memtrace.py`` checks the rows; ``bench/plan_vs_measured.py`` reads them.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time
from pathlib import Path
from typing import Any

from conkd_scale.utils.io import append_jsonl

_KEYS = {
    "VmRSS": "rss_mib",
    "VmHWM": "peak_mib",
    "RssAnon": "anon_mib",
    "RssFile": "file_mib",
    "RssShmem": "shmem_mib",
}


def proc_status_mib() -> dict[str, float]:
    """This process's resident sizes in MiB (``rss_mib`` … ``shmem_mib``; empty off Linux)."""
    out: dict[str, float] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in _KEYS:
            out[_KEYS[name]] = int(rest.split()[0]) / 1024
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_stats_mib() -> dict[str, float]:
    """glibc's allocator over all its arenas (``mallinfo2``; empty elsewhere), in MiB:
    ``malloc_used_mib`` in use in its heaps, ``malloc_free_mib`` freed but kept in them (still
    resident where touched), ``malloc_mmap_mib`` in blocks mapped one by one (returned to the
    system when freed)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return {}
    fn.restype = _MallInfo2
    m = fn()
    return {
        "malloc_used_mib": m.uordblks / 2**20,
        "malloc_free_mib": m.fordblks / 2**20,
        "malloc_mmap_mib": m.hblkhd / 2**20,
    }


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark of this process (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryTrace:
    """The rows of one rank; off (every call a no-op) until :meth:`start`."""

    def __init__(self) -> None:
        self.enabled = False
        self.rank = 0
        self.path: Path | None = None
        self.pending: list[dict[str, Any]] = []  # rows marked before the output is known
        self.max_peak_mib = 0.0  # the largest phase peak (the reset hides earlier ones)
        self.max_cuda_peak_mib = 0.0
        self.t0 = time.perf_counter()

    def start(self) -> None:
        """Start tracing with a first mark, ``imports``: the peak of everything the process
        did before."""
        self.enabled = True
        self.t0 = time.perf_counter()
        self.mark("imports")

    def set_output(self, out_dir: str | Path, rank: int) -> None:
        """Write to ``out_dir/memory_trace/rank_<rank>.jsonl`` from now on (the rows marked
        before are written first)."""
        if not self.enabled:
            return
        self.rank = rank
        self.path = Path(out_dir) / "memory_trace" / f"rank_{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # a rerun into the same directory starts afresh
        pending, self.pending = self.pending, []
        for row in pending:
            self._write({**row, "rank": rank})

    def mark(self, phase: str, **extra: Any) -> None:
        """One row: the phase that ends here, its peak and the resident sizes now."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"rank": self.rank, "phase": phase, **extra}
        sizes = {**proc_status_mib(), **malloc_stats_mib()}
        row.update({k: round(v, 1) for k, v in sizes.items()})
        row["t_s"] = round(time.perf_counter() - self.t0, 3)
        row.update(_cuda_stats())
        self.max_peak_mib = max(self.max_peak_mib, row.get("peak_mib", 0.0))
        self.max_cuda_peak_mib = max(self.max_cuda_peak_mib, row.get("cuda_peak_mib", 0.0))
        row["peak_is_phase"] = _reset_peak()
        if self.path is None:
            self.pending.append(row)
        else:
            self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        assert self.path is not None
        append_jsonl(self.path, row)


def _cuda_stats() -> dict[str, float]:
    torch = sys.modules.get("torch")  # a process without torch has no CUDA memory to trace
    if torch is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    stats = {
        "cuda_alloc_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }
    torch.cuda.reset_peak_memory_stats()
    return stats


TRACE = MemoryTrace()  # this process's trace (one rank per process)


def peak_memory_mib(cuda: bool) -> float:
    """This process's peak in MiB: the CUDA allocator's (``cuda``) or the resident one
    (``getrusage``), or the largest traced phase peak when the trace reset them."""
    if cuda:
        import torch

        return max(torch.cuda.max_memory_allocated() / 2**20, TRACE.max_cuda_peak_mib)
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, TRACE.max_peak_mib)
