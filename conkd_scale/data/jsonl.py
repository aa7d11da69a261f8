"""Line-numbered JSON(L) reading that turns every problem into a :class:`DataError`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conkd_scale.utils.errors import DataError


def require_file(path: str | Path, what: str, hint: str | None = None) -> Path:
    """Return ``path`` if it is a file, else raise a DataError saying what was expected."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            path,
            f"missing {what}",
            hint=hint or "check --data-dir, or run `python -m conkd_scale.data fetch`",
        )
    return path


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line (1-based line numbers)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    path,
                    f"not valid JSON ({e.msg} at column {e.colno})",
                    line=n,
                    hint="fix or remove this line",
                ) from None


def load_json(path: str | Path, what: str) -> Any:
    """Load one JSON document, naming the file in any error."""
    path = require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg})", line=e.lineno) from None


def get_field(obj: Any, key: str, types: type | tuple[type, ...], path: Path, line: int) -> Any:
    """``obj[key]`` checked for presence and type, else a DataError naming file, line and field."""
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", line=line)
    if key not in obj:
        raise DataError(path, "missing", line=line, field=key)
    val = obj[key]
    if not isinstance(val, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DataError(path, f"expected {want}, got {type(val).__name__}", line=line, field=key)
    return val
