"""Give the C heap's free pages back to the system (glibc ``malloc_trim``).

On a CPU rank torch's tensors below glibc's mmap threshold (which grows to 32 MiB as large
blocks are freed) live on the C heap, and glibc keeps the pages of freed ones resident. A
model read from a state dict leaves its whole size there: every rank reads D's full
checkpoint before ZeRO-3 partitions it (``conkd_scale/plan/memory.py``). ``malloc_trim(0)``
returns every whole free page of every arena (``madvise(MADV_DONTNEED)``), so a rank's
resident set falls back to what it uses.
"""

from __future__ import annotations

import ctypes
import sys


def trim_heap() -> bool:
    """Release the C heap's free pages to the system; ``True`` if glibc released any,
    ``False`` where there was nothing to release or no glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return bool(fn(0))
