"""Error types that tell the user where the problem is and what to do."""

from __future__ import annotations

from pathlib import Path


class ConkdError(Exception):
    """Base class for user-facing errors of this project."""


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
