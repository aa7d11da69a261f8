"""Metric loggers: a small interface, a JSONL back-end (rank 0 only) and a null one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

from conkd_scale.utils.io import append_jsonl, write_jsonl


class MetricLogger(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """One JSON object per line in ``path``; each line written in one call. A NaN/inf value
    (a diverged loss) is logged as ``null``, the project's one policy (``utils/io.py``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def log(self, row: dict[str, Any]) -> None:
        append_jsonl(self.path, row)  # a non-finite value is written as null (utils/io.py)

    def truncate_after(self, step: int) -> None:
        """On resume from ``step``: drop rows logged after it, earlier "final" rows, and lines
        that are not valid JSON (a write torn by a crash), with a warning."""
        if not self.path.exists():
            return
        rows = []
        for i, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line torn by a crash in the middle of its write
                print(f"warning: {self.path}:{i}: not valid JSON (a torn write?); dropped it")
        write_jsonl(
            self.path,
            [r for r in rows if int(r.get("step", 0)) <= step and r.get("kind") != "final"],
        )

    def close(self) -> None:
        pass


MONITOR_PREFIX = {"train": "Train", "eval": "Eval"}
MONITOR_SKIP = ("kind", "step", "epoch")


def monitor_events(row: dict[str, Any]) -> list[tuple[str, float, int]]:
    """A train/eval row as DeepSpeed monitor events ``(name, value, step)``: every finite
    number of the row, named ``Train/<key>`` or ``Eval/<key>`` (other kinds: none)."""
    prefix = MONITOR_PREFIX.get(str(row.get("kind")))
    if prefix is None:
        return []
    step = int(row.get("step", 0))
    return [
        (f"{prefix}/{k}", float(v), step)
        for k, v in row.items()
        if k not in MONITOR_SKIP
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    ]


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (optionally only one ``kind``: train / eval / final)."""
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]
