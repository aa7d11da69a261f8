"""Gate analysis and the report's reading on hand-made gate traces (no models); the study's
options and its manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conkd_scale.config import build_config
from conkd_scale.scaling.analysis import (
    TurnTrace,
    conversation_profiles,
    gold_vs_other,
    histogram,
    load_trace,
    precision_recall,
    size_trend,
    summarise_trace,
    training_curves,
)
from conkd_scale.scaling.config import StudyConfig
from conkd_scale.utils.errors import ConfigError, DataError
from conkd_scale.utils.procs import ROOT


def turn(conv: str, idx: int, rec: bool, m: list[float], gold: list[int]) -> TurnTrace:
    return TurnTrace.from_record(
        {
            "conv_id": conv,
            "turn_index": idx,
            "is_recommendation": rec,
            "item_mass": m,
            "gold_item_pos": gold,
        }
    )


@pytest.fixture
def traces() -> list[TurnTrace]:
    # listed out of order: profiles sort each conversation's turns by turn_index
    return [
        turn("c1", 3, True, [0.9, 0.3], [0]),
        turn("c1", 1, False, [0.1, 0.2], []),
        turn("c2", 1, True, [0.6, 0.7], [1]),
    ]


def test_gold_vs_other(traces: list[TurnTrace]) -> None:
    g = gold_vs_other(traces)
    assert g["n_gold"] == 2 and g["n_other"] == 4
    assert g["m_gold"] == pytest.approx((0.9 + 0.7) / 2)
    assert g["m_other"] == pytest.approx((0.3 + 0.1 + 0.2 + 0.6) / 4)


def test_precision_recall_of_the_hard_gate(traces: list[TurnTrace]) -> None:
    # opens (m > 0.5) on 0.9 (gold), 0.6 (not gold), 0.7 (gold)
    pr = precision_recall(traces, eta=0.5)
    assert pr["precision"] == pytest.approx(2 / 3)
    assert pr["recall"] == pytest.approx(1.0)
    assert pr["f1"] == pytest.approx(0.8)
    assert pr["fires"] == pytest.approx(3 / 6)
    # a gate that never opens: precision undefined, recall 0
    closed = precision_recall(traces, eta=0.95)
    assert closed["precision"] is None and closed["recall"] == 0.0 and closed["f1"] is None


def test_histogram_fractions(traces: list[TurnTrace]) -> None:
    m = np.concatenate([t.m_T for t in traces])
    h = histogram(m, bins=2)
    assert h["edges"] == [0.0, 0.5, 1.0]
    assert h["fraction"] == [0.5, 0.5]
    assert sum(histogram(m)["fraction"]) == pytest.approx(1.0)


def test_conversation_profiles_split_recommendation_and_chit_chat(
    traces: list[TurnTrace],
) -> None:
    soft = conversation_profiles(traces, "soft", max_turns=3)
    # c1: turn 1 chat (max 0.2), turn 3 rec (max 0.9); c2: turn 1 rec (max 0.7)
    assert soft["by_ordinal"]["rec"] == [pytest.approx(0.7), pytest.approx(0.9), None]
    assert soft["by_ordinal"]["chat"] == [pytest.approx(0.2), None, None]
    assert soft["counts"] == {"rec": [1, 1, 0], "chat": [1, 0, 0]}
    assert soft["mean_rec_turn"] == pytest.approx(0.8)
    assert soft["mean_chat_turn"] == pytest.approx(0.2)
    assert soft["conversations"]["c1"] == [(1, "chat", 0.2), (3, "rec", 0.9)]
    hard = conversation_profiles(traces, "hard", eta=0.5)
    assert hard["mean_rec_turn"] == 1.0 and hard["mean_chat_turn"] == 0.0


def test_summary_and_trace_file_round_trip(traces: list[TurnTrace], tmp_path: Path) -> None:
    path = tmp_path / "gate_trace.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(
                {
                    "conv_id": t.conv_id,
                    "turn_index": t.turn_index,
                    "is_recommendation": t.is_recommendation,
                    "item_mass": t.m_T.tolist(),
                    "gold_item_pos": np.flatnonzero(t.gold_T).tolist(),
                }
            )
            for t in traces
        )
        + "\n"
    )
    s = summarise_trace(load_trace(path))
    assert s["tokens"] == 6 and s["turns"] == 3
    assert s["hard_gate_mean"] == pytest.approx(0.5)
    assert s["precision"] == pytest.approx(2 / 3)
    json.dumps(s)  # JSON-ready


def test_a_bad_trace_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gate_trace.jsonl"
    good = {"conv_id": "a", "turn_index": 0, "is_recommendation": False}
    path.write_text(
        json.dumps({**good, "item_mass": [0.1], "gold_item_pos": []})
        + "\n"
        + json.dumps({**good, "item_mass": [0.1]})
        + "\n"
    )
    with pytest.raises(DataError, match=r"gate_trace\.jsonl:2: .*gate_trace=true"):
        load_trace(path)


def test_training_curves() -> None:
    rows = [
        {"kind": "train", "step": 1, "gate_mean": 0.2, "gate_precision": 0.8, "gate_recall": 0.5},
        {"kind": "eval", "step": 2, "val_ppl": 9.0, "val_sgate_recall": 0.1, "note": "x"},
        {"kind": "train", "step": 2, "loss": 1.0},  # one-hot baseline: no gate
        {"kind": "eval", "step": 4, "val_ppl": 7.0, "val_sgate_recall": 0.4},
        {"kind": "final", "step": 4},
    ]
    c = training_curves(rows)
    assert c["val"] == {"step": [2, 4], "val_ppl": [9.0, 7.0], "val_sgate_recall": [0.1, 0.4]}
    assert c["train"] == {
        "step": [1],
        "gate_mean": [0.2],
        "gate_precision": [0.8],
        "gate_recall": [0.5],
    }


def test_size_trend() -> None:
    assert size_trend([1e6, 1e7], [0.1, 0.3]) == pytest.approx(0.2)
    assert size_trend([1e6], [0.1]) is None
    assert size_trend([1e6, 1e7], [0.1, None]) is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sizes=tiny,huge", "unknown preset 'huge'"),
        ("gates=hard,no_kg", "unknown gate 'no_kg'.*ablations"),
        ("ablations=bogus", "unknown run 'bogus'"),
        ("dataset=redial", "data_dir is required"),
        ("nproc=0", "nproc: expected >= 1"),
        ("seeds=", "seeds: give at least one seed"),
        ("seeds=0,1,0", r"seeds: repeated seed in \[0, 1, 0\]"),
        ("seed_sizes=", "seed_sizes: give at least one size"),
        ("seed_sizes=tiny,medium", r"seed_sizes: 'medium' is not one of sizes \['tiny', 'mini'"),
        ("bootstrap_resamples=0", "bootstrap_resamples: expected >= 1"),
    ],
)
def test_study_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(StudyConfig, None, [override])


def test_study_runs_smallest_size_first() -> None:
    cfg = build_config(StudyConfig, None, ["sizes=small,tiny", "gates=soft", "ablations=no_kg"])
    assert [r.name for r in cfg.runs()] == ["tiny-soft", "tiny-no_kg", "small-soft", "small-no_kg"]
    # no seeds given: every student runs the teachers' seed, under the unsuffixed name
    cfg = build_config(StudyConfig, None, ["sizes=small,tiny", "seed=7"])
    assert {r.seed for r in cfg.runs()} == {7} and cfg.student_seeds == [7]


def test_study_runs_every_seed_at_the_seed_sizes_only() -> None:
    from conkd_scale.scaling.sweep import Study

    cfg = build_config(StudyConfig, None, ["sizes=small,tiny,mini", "seeds=3,1,2", "seed=5"])
    assert cfg.seeded_sizes == ["tiny"]  # default: the smallest size
    names = [(r.name, r.seed) for r in cfg.runs()]
    assert names == [
        ("tiny-hard", 3),  # the first seed keeps the name of a study without seeds
        ("tiny-soft", 3),
        ("tiny-hard-s1", 1),
        ("tiny-soft-s1", 1),
        ("tiny-hard-s2", 2),
        ("tiny-soft-s2", 2),
        ("mini-hard", 3),
        ("mini-soft", 3),
        ("small-hard", 3),
        ("small-soft", 3),
    ]
    jobs = {j.name: j for j in Study(cfg).jobs()}
    args = jobs["tiny-soft-s1"].distill
    assert args is not None and "train.seed=1" in args and "student.preset=tiny" in args
    assert 'teachers.rec_overrides=["seed=5"]' in args  # the teachers keep ``seed``
    assert "train.seed=3" in (jobs["small-hard"].distill or [])
    cfg = build_config(StudyConfig, None, ["sizes=tiny,small", "seeds=0,1", "seed_sizes=small"])
    assert [r.name for r in cfg.runs()][-2:] == ["small-hard-s1", "small-soft-s1"]
    assert len(cfg.runs()) == 6


def test_study_finds_the_results_tables_teachers(tmp_path: Path) -> None:
    """teachers_dir=<the table's work_dir>/teachers: R and D are read, not trained."""
    from conkd_scale.jobs import ROW
    from conkd_scale.rec.train import CHECKPOINT_DIR, CHECKPOINT_FILE
    from conkd_scale.results.table import ResultsConfig, ResultsTable
    from conkd_scale.scaling.sweep import Study

    work = tmp_path / "results_work"
    table = ResultsTable(build_config(ResultsConfig, None, [f"work_dir={work}"]))
    rec, dialog = table._teacher_dirs(ROW["hard"])
    (rec / CHECKPOINT_DIR).mkdir(parents=True)
    (rec / CHECKPOINT_DIR / CHECKPOINT_FILE).write_bytes(b"")
    (dialog / "hf").mkdir(parents=True)
    (dialog / "hf" / "config.json").write_text("{}")
    cfg = build_config(
        StudyConfig, None, [f"teachers_dir={work / 'teachers'}", f"output_dir={tmp_path / 's'}"]
    )
    assert cfg.teacher_dirs(ROW["hard"]) == (rec, dialog)
    jobs = Study(cfg).jobs()
    assert not any(j.trains_teachers for j in jobs)
    assert f"teachers.dialog_dir={dialog}" in (jobs[0].distill or [])
    assert jobs[-1].evaluate[jobs[-1].evaluate.index("--model") + 1] == str(dialog / "hf")


def test_a_trained_student_with_other_settings_is_not_reused(tmp_path: Path) -> None:
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.scaling.reuse import distill_config
    from conkd_scale.scaling.sweep import Study

    base = [f"output_dir={tmp_path}", "sizes=tiny", "gates=hard"]
    old = Study(build_config(StudyConfig, None, [*base, "eta=0.5"]))
    run = old.cfg.runs()[0]
    out = old.cfg.run_dir(run)
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "config.json").write_text("{}")
    (out / "config.json").write_text(json.dumps(distill_config(old._distill_args(run))))
    old.check_reuse()  # the same settings: reused
    # cadence and logging may differ
    Study(build_config(StudyConfig, None, [*base, "distill=train.eval_every=7"])).check_reuse()
    new = Study(build_config(StudyConfig, None, [*base, "eta=auto", "distill=train.epochs=3"]))
    with pytest.raises(ConfigError) as e:
        new.check_reuse()
    msg = str(e.value)
    assert "student tiny-hard" in msg and "another output_dir" in msg
    assert "loss.gate.eta: 0.5 when trained, 'auto' now" in msg
    default = DistillConfig().train.epochs
    assert f"train.epochs: {default!r} when trained, 3.0 now" in msg


def test_study_paths_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = build_config(StudyConfig, None, ["teachers_dir=t", "report_dir=results/x"])
    assert cfg.out == ROOT / "runs" / "scaling" / "synthetic"
    assert cfg.teachers == ROOT / "t" and cfg.report == ROOT / "results" / "x"
    assert cfg.data == str(ROOT / "runs" / "data" / "synthetic")
    run = cfg.runs()[0]
    assert cfg.run_dir(run) == ROOT / "runs" / "scaling" / "synthetic" / "runs" / "tiny-hard"
    given = build_config(StudyConfig, None, [f"output_dir={tmp_path / 'o'}"])
    assert given.out == tmp_path / "o" and given.teachers == tmp_path / "o" / "teachers"


def test_manifest_cli_prints_one_argument_per_line_and_names_a_bad_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What slurm/sweep.sh reads: line i's distill/evaluate arguments, one per line."""
    from conkd_scale.scaling.manifest import main

    path = tmp_path / "manifest.jsonl"
    rows = [
        {"name": "tiny-hard", "distill": ["--deepspeed", "z.json", "a=b c"], "evaluate": ["x"]},
        {"name": "teacher-dialog", "distill": None, "evaluate": ["--system", "dialog"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(path), "0", "distill"]) == 0
    assert capsys.readouterr().out.splitlines() == ["--deepspeed", "z.json", "a=b c"]
    assert main([str(path), "1", "distill"]) == 0  # D's trace: nothing to train
    assert capsys.readouterr().out == ""
    assert main([str(path), "2", "evaluate"]) == 2
    assert f"{path}: no line 2 (it has 2 jobs)" in capsys.readouterr().err
    assert main([str(path), "0", "train"]) == 2  # not a part of a job: the usage


# ---------------------------------------------------------------- seeds and the verdict
N_TURNS = 40  # recommendation turns of the hand-made test split


def _generations(hits: int) -> list[dict]:
    """Per-turn records as launch/evaluate.py writes them: the first ``hits`` turns name the
    gold item (F1@1 = ReR@1 = R-agree@1 = hits / N), every turn has NLL 2 on 1 token."""
    return [
        {
            "conv_id": f"c{n}",
            "turn_index": 1,
            "is_recommendation": True,
            "gold_items": ["g"],
            "items": ["g"] if n < hits else ["x"],
            "r_top1": "g",
            "nll": 2.0,
            "ppl_tokens": 1,
        }
        for n in range(N_TURNS)
    ]


def _trace(masses: list[float]) -> str:
    return "".join(
        json.dumps({"conv_id": f"c{n}", "turn_index": 1, "is_recommendation": True,
                    "item_mass": [m, 0.01], "gold_item_pos": [0]}) + "\n"
        for n, m in enumerate(masses)
    )  # fmt: skip


def _write_run(ev: Path, run_dir: Path | None, hits: int, info: dict, gate: float) -> None:
    ev.mkdir(parents=True)
    rate = hits / N_TURNS
    metrics = {"F1@1": rate, "ReR@1": rate, "R-agree@1": rate, "R@10": 0.1,
               "PPL": float(np.exp(2.0)), "Dist-2": 0.3,
               "counts": {"recommendation_turns": N_TURNS}}  # fmt: skip
    (ev / "metrics.json").write_text(json.dumps(metrics))
    (ev / "gate_trace.jsonl").write_text(_trace([0.2, 0.1, 0.05]))
    (ev / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in _generations(hits)))
    if run_dir is not None:
        run_dir.mkdir(parents=True)
        (run_dir / "run_info.json").write_text(json.dumps(info))
        rows = [{"kind": "train", "step": s, "gate_mean": gate} for s in (1, 2)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


CALIBRATION = {
    "split": "valid",
    "eta": 0.23,
    "at_eta": {"eta": 0.23, "precision": 0.57, "recall": 0.51, "f1": 0.54},
    "at_0.5": {"eta": 0.5, "precision": 0.76, "recall": 0.21, "f1": 0.33},
}


def _fake_study(tmp_path: Path, hits: dict[tuple[str, str, int], int], extra: list[str]):
    """A study directory with every run's outputs written by hand (no model): η = auto
    chose 0.23 on the validation split; D's item mass stays below it (a closed gate)."""
    cfg = build_config(
        StudyConfig,
        None,
        [f"output_dir={tmp_path}", "sizes=tiny,small", "eta=auto", "bootstrap_resamples=300",
         *extra],
    )  # fmt: skip
    params = {"tiny": 1_000_000, "small": 8_000_000}
    for run in cfg.runs():
        info = {"student_params": params[run.size], "eta": 0.23, "gate_calibration": CALIBRATION}
        gate = 0.0 if run.row.key == "hard" else 0.1
        _write_run(cfg.eval_dir(run.name), cfg.run_dir(run),
                   hits[run.size, run.row.key, run.seed], info, gate)  # fmt: skip
    _write_run(cfg.eval_dir("teacher-dialog"), None, 2, {}, 0.0)
    return cfg


PATTERN_HITS = {  # tiny: hard ahead at every seed; small (one seed): soft ahead
    ("tiny", "hard", 0): 20,
    ("tiny", "hard", 1): 21,
    ("tiny", "hard", 2): 19,
    ("tiny", "soft", 0): 10,
    ("tiny", "soft", 1): 10,
    ("tiny", "soft", 2): 10,
    ("small", "hard", 0): 10,
    ("small", "soft", 0): 20,
}


def test_report_with_seeds_gives_the_verdict_with_its_uncertainty(tmp_path: Path) -> None:
    from conkd_scale.scaling.report import write_report

    cfg = _fake_study(tmp_path, PATTERN_HITS, ["seeds=0,1,2"])
    summary = write_report(cfg)
    assert summary["eta"] == 0.23 and summary["eta_config"] == "auto"
    assert summary["eta_calibration"]["at_eta"]["precision"] == 0.57
    assert summary["seeds"] == [0, 1, 2] and summary["seed_sizes"] == ["tiny"]
    tiny_hard = next(g for g in summary["groups"] if g["name"] == "tiny-hard")
    assert tiny_hard["seeds"] == [0, 1, 2]
    assert tiny_hard["metrics"]["F1@1"] == pytest.approx(0.5)  # (20 + 21 + 19) / 3 / 40
    assert tiny_hard["metrics_sd"]["F1@1"] == pytest.approx(0.025)
    small_hard = next(g for g in summary["groups"] if g["name"] == "small-hard")
    assert small_hard["seeds"] == [0] and small_hard["metrics_sd"] == {}
    # the gate: D's mass (≤ 0.2) never exceeds η = 0.23, and the hard runs logged λ = 0
    st = summary["gate_status"]
    assert st["closed"] and st["train_rate"] == 0.0 and st["test"]["fires"] == 0.0
    v = summary["verdict"]
    tiny, small = v["sizes"]
    f1 = tiny["metrics"]["F1@1"]
    assert tiny["seeds"] == [0, 1, 2]
    assert f1["per_seed"] == {0: pytest.approx(0.25), 1: pytest.approx(0.275),
                              2: pytest.approx(0.225)}  # fmt: skip
    assert f1["diff"] == pytest.approx(0.25) and f1["sd"] == pytest.approx(0.025)
    assert f1["bootstrap_diff"] == pytest.approx(0.25) and f1["turns"] == N_TURNS
    assert f1["ci95"][0] > 0 and f1["clear"]
    s1 = small["metrics"]["F1@1"]
    assert s1["diff"] == pytest.approx(-0.25) and s1["sd"] is None
    assert s1["seed_sd_borrowed"] and s1["seed_sd_ref"] == pytest.approx(0.025)
    assert s1["ci95"][1] < 0 and s1["clear"]
    assert small["metrics"]["PPL"]["diff"] == 0.0 and not small["metrics"]["PPL"]["clear"]
    assert v["pattern"] == "appears" and v["closed_gate"]
    report = (tmp_path / "report.md").read_text()
    assert "it appears: both gaps are clear" in report
    assert "tiny +0.250 ± 0.025 (3 seeds) [95% CI +0." in report
    assert "small -0.250 (1 seed) [95% CI -0." in report
    assert "Closed gate: hard row = dialogue-only KD" in report
    assert "says nothing about the hard gate itself" in report
    assert "The seed spread was measured at tiny (seeds 0, 1, 2" in report
    assert "small ran seed 0 only (single-seed rows)" in report
    assert "η = 0.230 (η = auto: the F1-best hard-gate threshold on the validation split" in report
    assert "precision 0.570 and recall 0.510" in report
    assert "| tiny | 1.00 M | hard | 0,1,2 | 0.500 ± 0.025 |" in report
    assert json.loads((tmp_path / "summary.json").read_text())["eta"] == 0.23


def test_verdict_when_the_gap_is_within_seed_noise_or_reversed(tmp_path: Path) -> None:
    from conkd_scale.scaling.collect import collect
    from conkd_scale.scaling.reading import reading

    noisy = {**PATTERN_HITS, ("tiny", "hard", 1): 30, ("tiny", "hard", 2): 11}  # sd 0.24
    v = collect(_fake_study(tmp_path / "a", noisy, ["seeds=0,1,2"]))["verdict"]
    tiny, small = (c["metrics"]["F1@1"] for c in v["sizes"])
    assert tiny["sd"] == pytest.approx(0.2386, abs=1e-3) and not tiny["clear"]
    assert small["seed_noise"] == pytest.approx(2 * tiny["sd"]) and not small["clear"]
    assert v["pattern"] == "direction"
    reverse = {k: 30 - h for k, h in PATTERN_HITS.items()}
    summary = collect(_fake_study(tmp_path / "b", reverse, ["seeds=0,1,2"]))
    assert summary["verdict"]["pattern"] == "absent"
    text = "\n".join(reading(summary))
    assert "it does not appear" in text
    assert re.search(
        r"the soft gate leads by 0\.\d{4} at the smallest size and the hard gate leads by "
        r"0\.\d{4} at the largest",
        text,
    ), text


def test_single_seed_study_says_no_seed_spread_and_an_open_gate_is_not_closed(
    tmp_path: Path,
) -> None:
    from conkd_scale.scaling.collect import collect
    from conkd_scale.scaling.reading import reading
    from conkd_scale.scaling.verdict import gate_status

    summary = collect(_fake_study(tmp_path, PATTERN_HITS, []))
    assert summary["seeds"] == [0]
    tiny = summary["verdict"]["sizes"][0]["metrics"]["F1@1"]
    assert tiny["sd"] is None and tiny["seed_noise"] is None  # only the interval decides
    assert tiny["clear"] and summary["verdict"]["pattern"] == "appears"
    text = "\n".join(reading(summary))
    assert "no seed spread was measured" in text
    gate = {"fires": 0.0, "precision": None, "recall": 0.0, "f1": None}
    opened = [{"curves": {"train": {"gate_mean": [0.0, 0.02]}}}]
    st = gate_status(gate, opened, 0.23, None)
    assert not st["closed"] and st["train_rate"] == pytest.approx(0.01)
    assert gate_status(gate, [], 0.5, None)["closed"]  # no training log: the test split
