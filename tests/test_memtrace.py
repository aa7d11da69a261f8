"""The opt-in memory trace (``train.memory_trace``, ``conkd_scale/training/memtrace.py``):
rows per phase with the phase's own resident peak, and the job's peak kept across resets.
The traced distillation job itself is ``tests/test_scale_e2e.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conkd_scale.training import memtrace
from conkd_scale.training.config import TrainConfig
from conkd_scale.utils.errors import ConfigError

LINUX = Path("/proc/self/status").is_file()
MIB = 2**20


def _touch(n_mib: int) -> bytearray:
    buf = bytearray(n_mib * MIB)
    buf[::4096] = b"\1" * len(buf[::4096])  # every page resident
    return buf


def test_off_until_started(tmp_path):
    t = memtrace.MemoryTrace()
    t.mark("anything")
    t.set_output(tmp_path, 0)
    assert not t.pending and not (tmp_path / "memory_trace").exists()


@pytest.mark.skipif(not LINUX, reason="reads /proc/self (Linux)")
def test_rows_and_phase_peaks(tmp_path):
    t = memtrace.MemoryTrace()
    t.start()
    buf = _touch(96)
    del buf  # freed (a block this large is unmapped): the phase's peak outlives it
    t.mark("spike", step=0)
    t.set_output(tmp_path / "out", rank=1)  # the rows marked so far are written first
    t.mark("quiet")
    rows = [
        json.loads(x) for x in (tmp_path / "out/memory_trace/rank_1.jsonl").read_text().split("\n")
        if x
    ]  # fmt: skip
    assert [r["phase"] for r in rows] == ["imports", "spike", "quiet"]
    assert all(r["rank"] == 1 for r in rows) and rows[1]["step"] == 0
    spike, quiet = rows[1], rows[2]
    for k in ("rss_mib", "anon_mib", "file_mib", "shmem_mib", "peak_mib", "t_s"):
        assert k in spike, k
    assert spike["peak_mib"] >= spike["rss_mib"] + 80  # the 96 MiB while they were live
    if spike["peak_is_phase"]:  # the high-water mark was reset after "spike"
        assert quiet["peak_mib"] < spike["peak_mib"] - 80
    assert t.max_peak_mib >= spike["peak_mib"]


@pytest.mark.skipif(not LINUX, reason="reads /proc/self (Linux)")
def test_job_peak_survives_the_reset(monkeypatch):
    t = memtrace.MemoryTrace()
    monkeypatch.setattr(memtrace, "TRACE", t)
    t.start()
    buf = _touch(128)
    del buf
    t.mark("spike")  # resets the kernel's mark, which getrusage reports
    t.mark("after")
    assert memtrace.peak_memory_mib(cuda=False) >= t.max_peak_mib >= 128


def test_malloc_stats_on_glibc():
    stats = memtrace.malloc_stats_mib()
    if not stats:
        pytest.skip("no glibc mallinfo2 here")
    assert set(stats) == {"malloc_used_mib", "malloc_free_mib", "malloc_mmap_mib"}
    assert all(v >= 0 for v in stats.values())


def test_negative_trace_steps_are_refused():
    with pytest.raises(ConfigError, match="train.memory_trace"):
        TrainConfig(memory_trace=-1)
