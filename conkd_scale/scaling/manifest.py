"""Print one job's arguments from a study manifest, one per line (for slurm/sweep.sh).

python -m conkd_scale.scaling.manifest MANIFEST INDEX distill|evaluate
"""

from __future__ import annotations

import sys
from pathlib import Path

from conkd_scale.scaling.sweep import manifest_args


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[2] not in ("distill", "evaluate"):
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
