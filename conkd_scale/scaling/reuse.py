"""May a trained student be reused? Its recorded settings (``runs/<name>/config.json``)
against the ``launch/distill.py`` arguments the study would run it with now.

A study skips a student whose ``hf/`` exists. That is only right when the student was
trained as the study now asks: a changed ``eta``, seed, epoch count, size or teacher would
otherwise be reported under the new settings. Fields that do not change the trained model
(:data:`MAY_DIFFER`, the same settings a resumed run may change but for the schedule's length:
where outputs go, cadence, memory levers, how a missing teacher would be trained) are not
compared.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conkd_scale.training.resume_check import NEUTRAL, flatten
from conkd_scale.utils.errors import ConfigError

MAY_DIFFER = NEUTRAL  # what a reused run may differ in (a key covers its sub-keys)
PATHS = ("data_dir", "teachers.rec_dir", "teachers.dialog_dir")  # compared once resolved


def distill_config(args: Sequence[str]) -> dict[str, Any]:
    """The run config ``launch/distill.py args`` would train with (as ``config.json`` holds
    it: before ``eta=auto`` is resolved)."""
    from conkd_scale.config import build_config, config_to_dict
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.launching import parse_launch_args

    parsed = parse_launch_args(None, list(args))
    return config_to_dict(build_config(DistillConfig, parsed.config, parsed.overrides))


def reuse_drift(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, recorded, now)`` for every field outside :data:`MAY_DIFFER` that differs."""
    a, b = (_resolved(flatten(json.loads(json.dumps(c)))) for c in (saved, now))
    covered = lambda k: any(k == p or k.startswith(p + ".") for p in MAY_DIFFER)  # noqa: E731
    return [
        (k, a.get(k, "<absent>"), b.get(k, "<absent>"))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not covered(k)
    ]


def _resolved(flat: dict[str, Any]) -> dict[str, Any]:
    """:data:`PATHS` as absolute, normalised paths (``x/../data`` is ``data``)."""
    return {k: str(Path(v).resolve()) if k in PATHS and v else v for k, v in flat.items()}


def check_reusable(name: str, run_dir: Path, args: Sequence[str]) -> None:
    """Raise :class:`ConfigError` when the trained student in ``run_dir`` was trained with
    other settings than ``args`` ask for (a run without ``config.json`` is not checked)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    drift = reuse_drift(json.loads(path.read_text(encoding="utf-8")), distill_config(args))
    if drift:
        lines = "\n".join(f"  {k}: {old!r} when trained, {new!r} now" for k, old, new in drift)
        raise ConfigError(
            f"student {name} in {run_dir} was trained with other settings than this study "
            f"asks for:\n{lines}\nUse another output_dir (and report_dir) for these settings, "
            f"or delete {run_dir} and its evaluation to train it again. Nothing was run."
        )
