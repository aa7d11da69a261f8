"""The results-table orchestrator's pieces (the whole table runs in `make demo`): the job
arguments of each row, its options, and the markdown it renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from conkd_scale.config import build_config
from conkd_scale.results.table import (
    ROWS,
    ResultsConfig,
    distill_args,
    evaluate_args,
    render_markdown,
)
from conkd_scale.utils.errors import ConfigError

ROW = {r.key: r for r in ROWS}


def test_distill_args_of_a_student_row() -> None:
    args = distill_args(
        ROW["no_kg"],
        dataset="redial",
        data_dir="data",
        out=Path("w/no_kg"),
        rec_dir=Path("w/teachers/rec_nokg"),
        dialog_dir=Path("w/teachers/dialog"),
        seed=3,
        ds_config="ds_configs/zero3.json",
        rec=["epochs=2"],
        distill=["student.preset=mini"],
    )
    assert args[:2] == ["--deepspeed", "ds_configs/zero3.json"]
    assert "teachers.rec_overrides=epochs=2,seed=3,use_kg=false" in args
    assert "teachers.dialog_overrides=train.seed=3" in args
    # the row's own overrides come last, so that they win over the shared ones
    assert args[-2:] == ["student.preset=mini", "loss.gate.mode=hard"]
    with pytest.raises(AssertionError, match="teacher row"):
        distill_args(ROW["dialog"], dataset="redial", data_dir="d", out=Path("o"),
                     rec_dir=Path("r"), dialog_dir=Path("d"), seed=0, ds_config="z")  # fmt: skip


def test_evaluate_args() -> None:
    common = {"dataset": "synthetic", "data_dir": "d", "out": Path("e"), "rec_dir": Path("r")}
    pipe = evaluate_args(ROW["pipeline"], model=Path("D/hf"), max_turns=5, **common)
    assert pipe[:2] == ["--system", "pipeline"]
    assert ["--rec-teacher", "r"] == pipe[pipe.index("--rec-teacher") :][:2]
    assert ["--max-turns", "5"] == pipe[pipe.index("--max-turns") :][:2]
    no_mode = evaluate_args(ROW["no_mode"], model=Path("s/hf"), extra=["x=1"], **common)
    assert "--rec-teacher" not in no_mode and no_mode[-2:] == [
        "generation.use_mode_tokens=false",
        "x=1",
    ]


def test_results_config() -> None:
    cfg = build_config(ResultsConfig, None, [])
    keys = ["repeat", "pipeline", "dialog", "rec", "onehot", "hard", "soft"]
    assert [r.key for r in cfg.rows()] == keys
    assert len(build_config(ResultsConfig, None, ["ablations=true"]).rows()) == len(ROWS)
    with pytest.raises(ConfigError, match="unknown row 'bogus'"):
        build_config(ResultsConfig, None, ["only=bogus"])
    with pytest.raises(ConfigError, match="data_dir is required"):
        build_config(ResultsConfig, None, ["dataset=redial"])


def test_render_markdown() -> None:
    report = {
        "dataset": "synthetic",
        "command": "results_table.py --dataset synthetic",
        "date": "2026-11-25",
        "machine": "x86_64, 2 cores, Linux",
        "seed": 0,
        "wall_s": 12.0,
        "rows": {
            "rec": {"label": "3. R alone", "metrics": {"R@1": 0.25, "PPL": None}},
            "hard": {"label": "5. ConKD, hard gate", "metrics": {"F1@1": 0.5, "PPL": 123.4}},
        },
    }
    md = render_markdown(report)
    assert "| 3. R alone | 0.250 | – |" in md
    assert "123.4 |" in md  # large values with one decimal
    assert "wall 12 s" in md
