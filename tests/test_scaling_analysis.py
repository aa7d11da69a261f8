"""Gate analysis and the report's reading on hand-made gate traces (no models); the study's
options and its manifest."""

from __future__ import annotations

import json
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
from conkd_scale.scaling.reading import compare, reading
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


def _summary(f1: dict[tuple[str, str], float], n: int) -> dict:
    gate = {
        "m_gold": 0.6,
        "m_other": 0.01,
        "n_gold": 100,
        "n_other": 2000,
        "fires": 0.05,
        "precision": 0.9,
        "recall": 0.8,
        "f1": 0.85,
        "profile": {"mean_rec_turn": 0.9, "mean_chat_turn": 0.1},
    }
    params = {"tiny": 1_000_000, "small": 8_000_000}
    runs = [
        {
            "name": f"{s}-{v}",
            "size": s,
            "variant": v,
            "params": params[s],
            "metrics": {"F1@1": x, "ReR@1": x, "R@10": 0.1, "PPL": 20.0, "Dist-2": 0.3},
            "recommendation_turns": n,
            "gate": {**gate, "f1": 0.5 if s == "tiny" else 0.7},
        }
        for (s, v), x in f1.items()
    ]
    return {
        "eta": 0.5,
        "sizes": ["tiny", "small"],
        "variants": ["hard", "soft"],
        "runs": runs,
        "teacher": {"gate": gate, "metrics": {"PPL": 15.0}},
    }


def test_reading_states_whether_the_papers_pattern_appears() -> None:
    pattern = {
        ("tiny", "hard"): 0.20,
        ("tiny", "soft"): 0.10,
        ("small", "hard"): 0.10,
        ("small", "soft"): 0.20,
    }
    cmp = compare(_summary(pattern, 2000), "hard", "soft", "F1@1")
    assert [c["diff"] for c in cmp] == [pytest.approx(0.1), pytest.approx(-0.1)]
    assert all(c["clear"] for c in cmp)  # SE ≈ 0.011 at n = 2000
    text = "\n".join(reading(_summary(pattern, 2000)))
    assert "appears, and both gaps exceed twice their standard error" in text
    assert "D puts a mean item mass of 0.600" in text
    assert "improves with size" in text  # student gate F1 0.5 -> 0.7
    # the same gaps on 20 turns are within noise
    assert "appears in direction, but not clearly" in "\n".join(reading(_summary(pattern, 20)))
    reverse = {k: 0.3 - v for k, v in pattern.items()}
    text = "\n".join(reading(_summary(reverse, 2000)))
    assert "does not appear: on F1@1, the soft gate leads at the smallest size" in text
    tie = {k: 0.1 for k in pattern}
    text = "\n".join(reading(_summary(tie, 2000)))
    assert "the two gates tie at the smallest size and the two gates tie at the largest" in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sizes=tiny,huge", "unknown preset 'huge'"),
        ("gates=hard,no_kg", "unknown gate 'no_kg'.*ablations"),
        ("ablations=bogus", "unknown run 'bogus'"),
        ("dataset=redial", "data_dir is required"),
        ("nproc=0", "nproc: expected >= 1"),
    ],
)
def test_study_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(StudyConfig, None, [override])


def test_study_runs_smallest_size_first() -> None:
    cfg = build_config(StudyConfig, None, ["sizes=small,tiny", "gates=soft", "ablations=no_kg"])
    assert [r.name for r in cfg.runs()] == ["tiny-soft", "tiny-no_kg", "small-soft", "small-no_kg"]


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
