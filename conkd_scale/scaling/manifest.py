"""A SLURM study's manifest (``OUT/logs/manifest.jsonl``): one job per line, its
``launch/cache_teachers.py`` (only where it builds the teacher cache), ``launch/distill.py``
and ``launch/evaluate.py`` arguments. Printed for slurm/sweep.sh:

    python -m conkd_scale.scaling.manifest MANIFEST INDEX cache|distill|evaluate

prints line INDEX's arguments of that part, one per line (nothing: no such part).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from conkd_scale.utils.io import write_jsonl

PARTS = ("cache", "distill", "evaluate")
Entry = tuple[str, list[str] | None, list[str], list[str] | None]


def write_manifest(path: Path, jobs: Sequence[Entry]) -> Path:
    """Write ``(name, distill args or None, evaluate args, cache args or None)`` per job,
    in array order."""
    write_jsonl(path, [{"name": n, "distill": d, "evaluate": e, "cache": c} for n, d, e, c in jobs])
    return path


def manifest_args(path: Path, index: int, part: str) -> list[str]:
    """The ``cache``, ``distill`` or ``evaluate`` arguments of manifest line ``index``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not 0 <= index < len(lines):
        raise IndexError(f"{path}: no line {index} (it has {len(lines)} jobs)")
    entry = json.loads(lines[index])
    return list(entry.get(part) or [])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[2] not in PARTS:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        for a in manifest_args(Path(args[0]), int(args[1]), args[2]):
            if "\n" in a:
                raise ValueError(f"argument {a!r} holds a newline")
            print(a)
    except (OSError, ValueError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
