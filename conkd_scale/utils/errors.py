"""Error types that tell the user where the problem is and what to do, and the exit codes
of the jobs (``launching.py``): each error class carries the code its job exits with.

====  ==========================================================================  ========
code  meaning                                                                     requeue
====  ==========================================================================  ========
0     finished (model exported where the job exports one)                         no
1     unexpected crash (a traceback; a bug or a lost peer rank), or rank 0 hung   no
      or lost during rank-0-only work (``distributed.PeerLostError``)
2     bad configuration or input data (:class:`ConfigError`, :class:`DataError`)  no
3     training diverged (:class:`DivergenceError`): last good checkpoint kept     no
74    I/O failure such as a full disk (:class:`StorageError`)                     no
75    try again: pre-empted after saving a checkpoint, or the newest checkpoint  yes
      could not be loaded and an older intact one remains (:class:`RetryError`)
====  ==========================================================================  ========
"""

from __future__ import annotations

import errno
from pathlib import Path

EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_IO = 74  # sysexits.h EX_IOERR
EXIT_RETRY = 75  # sysexits.h EX_TEMPFAIL; slurm/common.sh requeues on it


class ConkdError(Exception):
    """Base class for user-facing errors of this project (exit code :data:`EXIT_CONFIG`)."""

    exit_code = EXIT_CONFIG


class DivergenceError(ConkdError):
    """Non-finite loss, gradient norm, weights or validation loss: the run stopped."""

    exit_code = EXIT_DIVERGED


class StorageError(ConkdError):
    """A write failed for a reason outside the program (a full disk, a read-only mount)."""

    exit_code = EXIT_IO


class RetryError(ConkdError):
    """A failure that a new attempt of the same job is expected to get past."""

    exit_code = EXIT_RETRY


def storage_error(e: OSError, what: str) -> StorageError:
    """A :class:`StorageError` for ``e`` that says what was being written and what to do."""
    if e.errno == errno.ENOSPC:
        problem = "the disk is full (ENOSPC)"
        hint = "free space there or point output_dir at a larger disk, then re-run to resume"
    elif e.errno == errno.EDQUOT:
        problem = "the disk quota is exceeded (EDQUOT)"
        hint = "free space within the quota, then re-run to resume"
    else:
        problem = f"{e.strerror or e}"
        hint = "check the file system, then re-run to resume"
    return StorageError(f"writing {what} failed: {problem}; {hint}")


class DataError(ConkdError, ValueError):
    """Bad input data: names the file, the line (1-based) or field, and what to do.

    >>> str(DataError("x.jsonl", "not valid JSON", line=3, hint="fix or delete the line"))
    'x.jsonl:3: not valid JSON (fix or delete the line)'
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        self.hint = hint
        where = self.path if line is None else f"{self.path}:{line}"
        msg = f"{where}: "
        if field is not None:
            msg += f"field {field!r}: "
        msg += problem
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ConfigError(ConkdError, ValueError):
    """Bad configuration value: names the field and the accepted values."""
