"""bench/table_budget.py: a results table's wall by kind of job, refused when runs were reused."""

from __future__ import annotations

import pytest

from bench.table_budget import breakdown


def _report(walls: dict[str, float], wall: float) -> dict:
    return {
        "wall_s": wall,
        "run_walls_s": walls,
        "rows": {"repeat": {"seeds": []}, "hard": {"seeds": [0, 1]}},
    }


def test_wall_split_by_kind_of_job():
    walls = {
        "cache/rec-dialog": 600.0,
        "repeat/eval": 10.0,
        "hard/seed0/train": 300.0,
        "hard/seed0/eval": 100.0,
        "hard/seed1/train": 310.0,
        "hard/seed1/eval": 90.0,
    }
    parts = breakdown(_report(walls, 1450.0))
    assert parts == {
        "cache job (D and R trained first when missing)": 600.0,
        "student training": 610.0,
        "evaluation": 200.0,
        "the table's own work": 40.0,
    }
    assert sum(parts.values()) == 1450.0


def test_reused_runs_are_refused():
    walls = {"repeat/eval": 10.0, "hard/seed0/train": 300.0, "hard/seed0/eval": 100.0}
    with pytest.raises(SystemExit, match=r"hard/seed1/train.*empty work_dir"):
        breakdown(_report(walls, 500.0))  # seed 1 was trained by an earlier invocation
    full = {**walls, "hard/seed1/train": 300.0, "hard/seed1/eval": 100.0}
    with pytest.raises(SystemExit, match="invocation 400 s"):
        breakdown(_report(full, 400.0))  # walls merged from an earlier invocation
