"""The results-table orchestrator's pieces (the whole table runs in `make demo`): the job
arguments of each row (conkd_scale/jobs.py), its options, the teachers it trains, and the
markdown it renders."""

from __future__ import annotations

import re
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
    # R-agree@1 of a student needs its R (no_mode: the main R)
    assert ["--rec-teacher", "r"] == no_mode[no_mode.index("--rec-teacher") :][:2]
    repeat = evaluate_args(cfg, ROW["repeat"], out=Path("e"), model=None, rec_dir=Path("r"))
    assert "--rec-teacher" not in repeat
    assert no_mode[-3:] == ["generation.use_mode_tokens=false", "y=2", "x=1"]


def test_results_config() -> None:
    cfg = results_config()
    keys = ["repeat", "pipeline", "dialog", "rec", "onehot", "hard", "hard_auto", "soft"]
    assert [r.key for r in cfg.rows()] == keys
    assert len(results_config("ablations=true").rows()) == len(ROWS)
    assert "hard_auto" not in [r.key for r in results_config("eta_auto=false").rows()]
    assert "hard_auto" not in [r.key for r in results_config("eta=auto").rows()]
    # rows 4-6 (and 5b) with every seed, ablations with the first, teachers once
    cfg = results_config("seeds=4,5,6", "ablations=true")
    assert cfg.row_seeds(ROW["soft"]) == [4, 5, 6] and cfg.row_seeds(ROW["hard_auto"]) == [4, 5, 6]
    assert cfg.row_seeds(ROW["oracle"]) == [4] and cfg.row_seeds(ROW["dialog"]) == [None]
    assert results_config().seeds == [0, 1, 2]
    with pytest.raises(ConfigError, match="data_dir is required"):
        results_config("dataset=redial")
    with pytest.raises(ConfigError, match="nproc"):
        results_config("nproc=0")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("only=hard,bogus", "unknown row 'bogus'"),
        ("seeds=[]", "seeds: give at least one seed"),
        ("seeds=1,1", "repeated seed"),
        ("eta=1.5", "eta: '1.5' must be a number in [0, 1] or auto"),
        ("eta=-0.1", "must be a number in [0, 1] or auto"),
        ("eta=often", "must be a number in [0, 1] or auto"),
        ("bootstrap_unit=sentence", "bootstrap_unit"),
        ("bootstrap_resamples=0", "bootstrap_resamples"),
    ],
)
def test_bad_results_configs_fail_before_any_job(
    override: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clear error from the config itself, before the table starts any job."""
    ran: list[object] = []
    monkeypatch.setattr(table, "run_logged", lambda cmd, log: ran.append(cmd) or 1.0)
    from conkd_scale.jobs import run_cli

    with pytest.raises(ConfigError, match=re.escape(needle)):
        results_config(override)
    assert run_cli(ResultsConfig, None, [override], lambda c: ResultsTable(c).run()) is None
    assert ran == []


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("sizes=tiny,huge", "unknown preset 'huge'"),
        ("gates=hard,fuzzy", "unknown gate 'fuzzy'"),
        ("sizes=[]", "sizes: give at least one"),
        ("eta=2", "eta: '2' must be a number in [0, 1] or auto"),
        ("ablations=bogus", "unknown run 'bogus'"),
    ],
)
def test_bad_study_configs(override: str, needle: str) -> None:
    from conkd_scale.scaling.config import StudyConfig

    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_config(StudyConfig, None, [override])


def test_shipped_results_and_study_configs_hold_their_command() -> None:
    """Each long run is a config file whose first line is the command that runs it."""
    from conkd_scale.scaling.config import StudyConfig

    files = sorted((ROOT / "configs").glob("results_*.yaml")) + sorted(
        (ROOT / "configs").glob("scaling_*.yaml")
    )
    assert {p.name for p in files} >= {
        "results_synthetic.yaml",
        "results_redial.yaml",
        "results_inspired.yaml",
        "scaling_redial.yaml",
    }
    for path in files:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        rel = path.relative_to(ROOT).as_posix()
        script = "results_table.py" if path.name.startswith("results_") else "scaling_study.py"
        assert first.startswith(f"# python launch/{script} --config {rel}"), (path, first)
        cls = ResultsConfig if script == "results_table.py" else StudyConfig
        cfg = build_config(cls, path)
        assert len(getattr(cfg, "seeds", [0, 1, 2])) >= 3


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
    (tmp_path / "hard" / "seed0" / "hf").mkdir(parents=True)
    (tmp_path / "hard" / "seed0" / "hf" / "config.json").write_text("{}")
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


def test_reported_walls_keep_the_teacher_cache_and_earlier_invocations(tmp_path: Path) -> None:
    """The table's wall times include the cache job its students read (a wall time of the
    whole table, offline against online, needs it), runs of earlier invocations reused now,
    and not the runs of rows this invocation does not report."""
    import json

    cfg = results_config(f"work_dir={tmp_path / 'w'}", f"results_dir={tmp_path / 'res'}")
    (tmp_path / "res").mkdir()
    old = {"hard/seed0/train": 60.0, "static/seed0/train": 9.0, "cache/rec-dialog": 20.0}
    (tmp_path / "res" / "results.json").write_text(json.dumps({"run_walls_s": old}))
    t = ResultsTable(cfg)
    t.walls = {"hard/seed1/train": 50.0}
    assert t._all_walls({"hard", "soft"}) == {
        "hard/seed0/train": 60.0,
        "hard/seed1/train": 50.0,
        "cache/rec-dialog": 20.0,
    }


def test_render_markdown() -> None:
    report = {
        "dataset": "synthetic",
        "command": "results_table.py --dataset synthetic",
        "date": "2026-11-25",
        "machine": "x86_64, 2 cores, Linux",
        "seed": 0,
        "seeds": [0, 1, 2],
        "wall_s": 12.0,
        "rows": {
            "rec": {"label": "3. R alone", "metrics": {"R@1": 0.25, "PPL": None}},
            "hard": {
                "label": "5. ConKD, hard gate",
                "seeds": [0, 1, 2],
                "metrics": {"F1@1[class]": 0.5, "PPL": 123.4},
                "sd": {"F1@1[class]": 0.01, "PPL": 2.0},
                "decisions": {"eta": 0.5, "student_preset": "tiny"},
            },
            "oracle": {
                "label": "7b. oracle gate",
                "seeds": [0],
                "single_seed": True,
                "metrics": {"R@1": 0.1},
                "decisions": {"eta": 0.5},
            },
        },
    }
    md = render_markdown(report)
    assert "| 3. R alone |  | 0.250 | – |" in md
    assert "| 5. ConKD, hard gate | 3 seeds, η = 0.5, tiny |" in md
    assert "0.500 ± 0.010" in md and "123.4 ± 2.0 |" in md  # large values: one decimal
    assert "| 7b. oracle gate † | 1 seed, η = 0.5 | 0.100 |" in md
    assert "wall 12 s" in md and "student seeds [0, 1, 2]" in md


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.tiny_lm import ensure_tiny_setup

    return ensure_tiny_setup(tmp_path_factory.getbasetemp() / "eval_tiny", rec=True)


def test_table_on_the_synthetic_corpus_with_tiny_models(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole table job with the training jobs replaced by tiny LMs (the evaluations are
    real, in process): every seed of rows 4-6 and 5b, mean ± sd, the decisions, the paired
    intervals, and samples.md."""
    import importlib.util
    import json
    import shutil

    from conkd_scale.data.corpus import load_dataset
    from tests.tiny_lm import write_tiny_lm

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "launch/evaluate.py")
    assert spec is not None and spec.loader is not None
    evaluate_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_cli)
    corpus = load_dataset("synthetic", tiny["data"], kg="none")
    lms = [tiny["lm"]] + [
        write_tiny_lm(corpus, tmp_path / f"lm{s}", seed=s, train_steps=15) for s in (1, 2)
    ]
    cfg = results_config(
        f"data_dir={tiny['data']}",
        f"work_dir={tmp_path / 'w'}",
        f"results_dir={tmp_path / 'res'}",
        "max_turns=16",
        "bootstrap_resamples=200",
        'evaluate=["generation.max_new_tokens=8","generation.progress=false"]',
    )
    t = ResultsTable(cfg)
    teachers = tmp_path / "w" / "teachers"
    shutil.copytree(tiny["rec"], teachers / "rec")
    (teachers / "dialog").mkdir(parents=True)
    (teachers / "dialog" / "hf").symlink_to(tiny["lm"])

    def fake_distill(row, seed=None):
        out = cfg.work / t._name(row, seed)
        out.mkdir(parents=True, exist_ok=True)
        eta = 0.3 if row.key == "hard_auto" else 0.5
        (out / "run_info.json").write_text(json.dumps({"eta": eta, "total_steps": 7}))
        (out / "config.json").write_text(json.dumps({"student": {"preset": "tiny"}}))
        return lms[(seed + len(row.key)) % 3]

    def fake_run(cmd, log):
        assert "launch/evaluate.py" in cmd, cmd
        assert evaluate_cli.main(list(cmd[2:])) == 0
        return 0.5

    monkeypatch.setattr(t, "_distill", fake_distill)
    monkeypatch.setattr(t, "_ensure_teachers", lambda: None)
    monkeypatch.setattr(table, "run_logged", fake_run)
    report = t.run()

    rows = report["rows"]
    assert list(rows) == [
        "repeat",
        "pipeline",
        "dialog",
        "rec",
        "onehot",
        "hard",
        "hard_auto",
        "soft",
    ]
    for key in ("onehot", "hard", "hard_auto", "soft"):
        r = rows[key]
        assert r["seeds"] == [0, 1, 2] and sorted(r["per_seed"]) == ["0", "1", "2"]
        f1 = [r["per_seed"][s]["F1@1"] for s in ("0", "1", "2")]
        assert r["metrics"]["F1@1"] == pytest.approx(sum(f1) / 3)
        assert r["sd"]["PPL"] is not None and r["counts"]["0"]["turns"] == 16
        d = r["decisions"]
        assert d["item_decoding"] == "class" and d["ppl_include_mode"] is True
        assert d["student_preset"] == "tiny" and d["eta"] == (0.3 if key == "hard_auto" else 0.5)
    assert (
        "discrepancy" in rows["pipeline"]["metrics"]
        and "discrepancy" not in rows["hard"]["metrics"]
    )
    # the students were given R: R-agree@1 where a run wrote items (null where none did)
    agree = [
        m["R-agree@1"] for k in ("onehot", "hard", "soft") for m in rows[k]["per_seed"].values()
    ]
    assert any(a is not None for a in agree)
    assert rows["repeat"]["metrics"]["R@10"] is not None  # row 0 still works
    iv = report["intervals"]
    assert sorted(iv) == ["hard-onehot", "hard_auto-onehot", "soft-onehot"]
    for metric in ("F1@1", "ReR@1", "R-agree@1", "PPL"):
        one = iv["soft-onehot"][metric]
        assert one["a_runs"] == one["b_runs"] == 3 and one["resamples"] == 200
        assert one["unit"] == "turn" and one["seed"] == 0
    soft, base = rows["soft"]["metrics"]["PPL"], rows["onehot"]["metrics"]["PPL"]
    # the interval's point estimate is the difference of the reported (seed-mean) numbers
    assert iv["soft-onehot"]["PPL"]["diff"] == pytest.approx(soft - base, rel=1e-4)
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    assert saved["rows"]["hard"]["counts"]["1"]["recommendation_turns"] > 0
    md = (tmp_path / "res" / "results.md").read_text()
    assert "3 seeds, η = 0.3, tiny" in md and "soft-onehot" in md and " ± " in md
    samples = (tmp_path / "res" / "samples.md").read_text()
    n_turns = sum(1 for x in samples.splitlines() if x.startswith("## "))
    recs = sum(g.is_recommendation for g in corpus.samples("test")[:16])
    assert n_turns == min(20, recs) and "**gold**" in samples and "R's top-3" in samples
    assert "<item_" not in samples.split("## ", 1)[1]  # items shown as titles
    assert samples.count("6. ConKD, soft gate") == n_turns
    # the same file again: fixed, seeded choice (nothing is re-run: outputs are reused)
    assert ResultsTable(cfg).samples(report["rows"]) == samples
