"""The results-table orchestrator's pieces (the whole table runs in `make demo`): the job
arguments of each row (conkd_scale/jobs.py), its options, the teachers it trains, and the
markdown it renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from conkd_scale.config import build_config
from conkd_scale.jobs import ROW, ROWS, distill_args, evaluate_args, teacher_commands
from conkd_scale.results import table
from conkd_scale.results.table import ResultsConfig, ResultsTable, render_markdown
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.procs import ROOT

DIRS = {"rec_dir": Path("w/teachers/rec"), "dialog_dir": Path("w/teachers/dialog")}


def results_config(*overrides: str) -> ResultsConfig:
    return build_config(ResultsConfig, None, list(overrides))


def test_distill_args_of_a_student_row() -> None:
    cfg = results_config(
        "dataset=redial", "data_dir=data", "seed=3", "rec=epochs=2", "distill=student.preset=mini"
    )
    args = distill_args(cfg, ROW["no_kg"], out=Path("w/no_kg"), **DIRS)
    assert args[:2] == ["--deepspeed", "ds_configs/zero3.json"]
    assert f"data_dir={ROOT / 'data'}" in args  # relative: from the project root
    assert 'teachers.rec_overrides=["epochs=2","seed=3","use_kg=false"]' in args
    assert 'teachers.dialog_overrides=["train.seed=3"]' in args
    # the row's own overrides come last, so that they win over the shared ones
    assert args[-2:] == ["student.preset=mini", "loss.gate.mode=hard"]
    with pytest.raises(ValueError, match="teacher row"):
        distill_args(cfg, ROW["dialog"], out=Path("o"), **DIRS)


def test_nested_overrides_with_commas_reach_the_teachers_whole() -> None:
    """A teacher override that holds a comma arrives whole in the distillation job's config
    and in the teacher it trains (comma-joined, ``train.adam_betas=0.9,0.95`` broke in two)."""
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.distill.teachers import dialog_teacher_overrides
    from conkd_scale.launching import parse_launch_args
    from conkd_scale.training.dialog_teacher import DialogTeacherConfig

    # the table reads a JSON list on its own command line too
    cfg = results_config('dialog=["train.adam_betas=0.9,0.95"]', "rec=epochs=2,lr=0.01")
    assert cfg.dialog == ["train.adam_betas=0.9,0.95"]
    args = distill_args(cfg, ROW["hard"], out=Path("w/hard"), **DIRS)
    parsed = parse_launch_args(None, args)  # as launch/distill.py reads them
    child = build_config(DistillConfig, parsed.config, parsed.overrides)
    assert child.teachers.dialog_overrides == ["train.adam_betas=0.9,0.95", "train.seed=0"]
    assert child.teachers.rec_overrides == ["epochs=2", "lr=0.01", "seed=0"]
    teacher = build_config(DialogTeacherConfig, None, dialog_teacher_overrides(child))
    assert teacher.train.adam_betas == (0.9, 0.95) and teacher.train.seed == 0


def test_evaluate_args() -> None:
    cfg = results_config("max_turns=5", "evaluate=x=1")
    pipe = evaluate_args(cfg, ROW["pipeline"], out=Path("e"), model=Path("D/hf"), rec_dir=Path("r"))
    assert pipe[:2] == ["--system", "pipeline"]
    assert ["--rec-teacher", "r"] == pipe[pipe.index("--rec-teacher") :][:2]
    assert ["--max-turns", "5"] == pipe[pipe.index("--max-turns") :][:2]
    no_mode = evaluate_args(
        cfg, ROW["no_mode"], out=Path("e"), model=Path("s/hf"), rec_dir=Path("r"), extra=["y=2"]
    )
    assert "--rec-teacher" not in no_mode
    assert no_mode[-3:] == ["generation.use_mode_tokens=false", "y=2", "x=1"]


def test_results_config() -> None:
    cfg = results_config()
    keys = ["repeat", "pipeline", "dialog", "rec", "onehot", "hard", "soft"]
    assert [r.key for r in cfg.rows()] == keys
    assert len(results_config("ablations=true").rows()) == len(ROWS)
    with pytest.raises(ConfigError, match="unknown row 'bogus'"):
        results_config("only=bogus")
    with pytest.raises(ConfigError, match="data_dir is required"):
        results_config("dataset=redial")
    with pytest.raises(ConfigError, match="nproc"):
        results_config("nproc=0")


def test_paths_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = results_config("dataset=redial", "data_dir=../shared/data/redial", "results_dir=r")
    assert cfg.work == ROOT / "runs" / "results" / "redial"
    assert cfg.results == ROOT / "r"
    assert cfg.data == str(ROOT / "../shared/data/redial")
    assert cfg.data_given == "../shared/data/redial"  # what results.json records
    elsewhere = results_config(f"work_dir={tmp_path / 'w'}")
    assert elsewhere.work == tmp_path / "w" and elsewhere.data == str(ROOT / "runs/data/synthetic")


def _fake_teachers(root: Path, rec: bool, dialog: bool) -> None:
    (root / "rec").mkdir(parents=True)  # a directory alone is not a trained R
    if rec:
        (root / "rec" / "checkpoint").mkdir()
        (root / "rec" / "checkpoint" / "rec_teacher.pt").write_bytes(b"")
    if dialog:
        (root / "dialog" / "hf").mkdir(parents=True)
        (root / "dialog" / "hf" / "config.json").write_text("{}")


@pytest.mark.parametrize("rec", [False, True])
def test_missing_teachers_are_trained_when_the_first_student_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rec: bool
) -> None:
    """The teacher rows need R and D; the student job that trains them finished before
    (its hf/ exists), so each missing teacher is trained on its own, with that job's
    settings. A partial R directory counts as missing."""
    cfg = results_config(f"work_dir={tmp_path}", "rec=epochs=2", "dialog=train.max_steps=5")
    (tmp_path / "hard" / "hf").mkdir(parents=True)
    (tmp_path / "hard" / "hf" / "config.json").write_text("{}")
    _fake_teachers(tmp_path / "teachers", rec=rec, dialog=False)
    ran: list[list[str]] = []
    monkeypatch.setattr(table, "run_logged", lambda cmd, log: ran.append(list(cmd)) or 1.0)
    t = ResultsTable(cfg)
    t._ensure_teachers()
    scripts = [next(a for a in cmd if a.startswith("launch/")) for cmd in ran]
    assert scripts == ([] if rec else ["launch/train_rec_teacher.py"]) + [
        "launch/train_dialog_teacher.py"
    ]
    dialog_cmd = ran[-1]
    assert f"output_dir={tmp_path / 'teachers' / 'dialog'}" in dialog_cmd
    assert dialog_cmd[-2:] == ["train.max_steps=5", "train.seed=0"]  # the job's overrides
    assert set(t.walls) == ({"dialog/train"} if rec else {"rec/train", "dialog/train"})
    if not rec:
        assert ran[0][-2:] == ["epochs=2", "seed=0"]


def test_teacher_commands_are_empty_when_both_teachers_exist(tmp_path: Path) -> None:
    cfg = results_config(f"work_dir={tmp_path}")
    _fake_teachers(tmp_path / "teachers", rec=True, dialog=True)
    args = distill_args(
        cfg,
        ROW["hard"],
        out=tmp_path / "hard",
        rec_dir=tmp_path / "teachers" / "rec",
        dialog_dir=tmp_path / "teachers" / "dialog",
    )
    assert teacher_commands(2, args) == []


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
