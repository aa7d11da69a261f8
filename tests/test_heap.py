"""``trim_heap``: freed tensors' heap pages go back to the system (a fresh process, glibc)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conkd_scale.utils.heap import trim_heap

ROOT = Path(__file__).resolve().parents[1]

# Frees 256 MiB of 4 MiB tensors that sit below a live one (so glibc cannot shrink the heap
# from its top) after a 16 MiB block has raised glibc's mmap threshold: the pages stay
# resident until trim_heap().
SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from conkd_scale.training.memtrace import proc_status_mib
from conkd_scale.utils.heap import trim_heap
big = torch.ones(4 * 2**20)  # 16 MiB, mapped; freeing it raises the mmap threshold
del big
blocks = [torch.ones(2**20) for _ in range(64)]  # 64 x 4 MiB on the heap, touched
pin = torch.ones(2**20)
before = proc_status_mib()["anon_mib"]
del blocks
kept = proc_status_mib()["anon_mib"]
released = trim_heap()
after = proc_status_mib()["anon_mib"]
print(json.dumps({"before": before, "kept": kept, "after": after, "released": released}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux")
def test_trim_heap_returns_freed_tensor_pages():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["before"] - m["kept"] < 64, m  # glibc kept the freed pages resident
    assert m["released"] is True
    assert m["kept"] - m["after"] > 200, m  # and trim_heap gave (almost) all 256 MiB back


def test_trim_heap_is_safe_to_call_again():
    trim_heap()
    assert trim_heap() in (True, False)
