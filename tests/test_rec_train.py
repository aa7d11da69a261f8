"""Training R end to end on a small synthetic corpus: outputs, quality, determinism, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conkd_scale.config import build_config
from conkd_scale.data.synthetic import write_synthetic
from conkd_scale.rec.api import RecTeacher
from conkd_scale.rec.train import RecTeacherConfig, train_rec_teacher
from conkd_scale.utils.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import train_rec_teacher as launcher  # noqa: E402

TINY = [
    "min_relation_count=0",
    "dim=32",
    "num_bases=4",
    "lr=0.01",
    "epochs=6",
    "patience=2",
    "progress=false",
]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rec_train") / "data"
    write_synthetic(d, seed=0)  # 600 conversations, 120 items
    return d


def _cfg(data: Path, out: Path, *extra: str) -> RecTeacherConfig:
    ov = [f"data_dir={data}", f"output_dir={out}", "dataset=synthetic", *TINY, *extra]
    return build_config(RecTeacherConfig, None, ov)


@pytest.fixture(scope="module")
def run(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("rec_out")
    return out, train_rec_teacher(_cfg(synth_dir, out))


def test_beats_popularity_on_synthetic(run: tuple[Path, dict[str, Any]]) -> None:
    _, m = run
    assert m["R@10"] > m["popularity/R@10"] + 0.15, m  # ~0.55 vs 0.25
    assert m["R@50"] > m["popularity/R@50"], m
    assert m["new/R@10"] > m["popularity/new/R@10"], m


def test_outputs(run: tuple[Path, dict[str, Any]]) -> None:
    out, m = run
    keys = [
        "R@1",
        "R@10",
        "R@50",
        "MRR@10",
        "NDCG@10",
        "new/R@10",
        "new/R@50",
        "turn/R@10",
        "new_unmasked/R@10",
        "popularity/R@1",
        "popularity/R@10",
        "popularity/R@50",
        "popularity/MRR@10",
        "popularity/NDCG@10",
        "popularity/new/R@10",
        "popularity/new/R@50",
        "train_seconds",
        "best_epoch",
    ]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == m
    for k in keys:
        assert k in m, k
    assert m["n"] > 0 and m["skipped"] == 0 and m["model"] == "rgcn"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert {"train_loss", "valid/R@1", "valid/R@10", "valid/R@50", "seconds"} <= set(rows[0])
    best = max(rows, key=lambda r: r["valid/R@10"])
    assert best["epoch"] == m["best_epoch"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dim"] == 32 and cfg["derived"]["train_samples"] > 0
    ck = out / "checkpoint"
    meta = json.loads((ck / "rec_teacher.json").read_text())
    assert meta["epoch"] == m["best_epoch"] and meta["graph_params"]["min_relation_count"] == 0
    teacher = RecTeacher.load(out)
    assert json.loads((ck / "item_ids.json").read_text()) == teacher.item_ids
    assert not list(out.glob(".*"))  # no temp files left behind


def test_checkpoint_is_the_best_epoch(run: tuple[Path, dict[str, Any]], synth_dir: Path) -> None:
    out, m = run
    from conkd_scale.data.corpus import load_dataset
    from conkd_scale.metrics import ranking_metrics

    teacher = RecTeacher.load(out)
    corpus = load_dataset("synthetic", synth_dir)
    turns = [t for t in corpus.samples("test") if t.gold_items]
    gold = [[teacher.item_ids.index(g) for g in t.gold_items] for t in turns]
    again = ranking_metrics(teacher.scores(turns), gold)
    assert again["R@10"] == pytest.approx(m["R@10"]) and again["n"] == m["n"]


def test_deterministic_for_a_seed(synth_dir: Path, tmp_path: Path) -> None:
    a = train_rec_teacher(_cfg(synth_dir, tmp_path / "a", "epochs=2"))
    b = train_rec_teacher(_cfg(synth_dir, tmp_path / "b", "epochs=2"))
    train_rec_teacher(_cfg(synth_dir, tmp_path / "c", "epochs=2", "seed=1"))
    drop = {"train_seconds", "train_cpu_seconds"}
    assert {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop
    }
    la = [json.loads(x)["train_loss"] for x in (tmp_path / "a/metrics.jsonl").open()]
    lb = [json.loads(x)["train_loss"] for x in (tmp_path / "b/metrics.jsonl").open()]
    lc = [json.loads(x)["train_loss"] for x in (tmp_path / "c/metrics.jsonl").open()]
    assert la == lb and la != lc
    qa = RecTeacher.load(tmp_path / "a").model.item_bias
    assert torch.equal(qa, RecTeacher.load(tmp_path / "b").model.item_bias)


def test_no_kg_ablation_runs(synth_dir: Path, tmp_path: Path) -> None:
    m = train_rec_teacher(_cfg(synth_dir, tmp_path, "use_kg=false", "epochs=2"))
    assert m["model"] == "no_kg" and m["R@50"] > 0
    assert len(RecTeacher.load(tmp_path).model.convs) == 0


def test_launcher(synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = launcher.main(
        [
            "--dataset",
            "synthetic",
            "--data-dir",
            str(synth_dir),
            "--output-dir",
            str(tmp_path),
            "--kg",
            "none",
            "--no-kg",
            *TINY,
            "epochs=1",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) >= {"R@10", "popularity/R@10", "new/R@10", "train_seconds"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["kg"] == "none" and cfg["use_kg"] is False
    assert cfg["derived"]["context_entities"] == 0  # no KG: items only


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "synthetic", "--output-dir", "x"], "data_dir is required"),
        (["--dataset", "synthetic", "--data-dir", "d"], "output_dir is required"),
        (["--data-dir", "d", "--output-dir", "o", "--kg", "none"], "add --no-kg"),
        (["--data-dir", "d", "--output-dir", "o", "dim=0"], "dim: must be >= 1"),
        (["--data-dir", "d", "--output-dir", "o", "bogus=1"], "unknown config key 'bogus'"),
        (["--data-dir", "/nonexistent/rec", "--output-dir", "o"], "does not exist"),
    ],
)
def test_launcher_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("o", str(tmp_path / "o")) if a == "o" else a for a in argv]
    assert launcher.main(argv) == 2
    assert message in capsys.readouterr().err


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="tau_R"):
        build_config(RecTeacherConfig, None, ["tau_R=0"])
    with pytest.raises(ConfigError, match="dropout"):
        build_config(RecTeacherConfig, None, ["dropout=1.5"])
    with pytest.raises(ConfigError, match="kg"):
        build_config(RecTeacherConfig, None, ["kg=wikidata"])
    assert build_config(RecTeacherConfig, None, ["kg=none", "use_kg=false"]).kg == "none"


def test_config_files_load() -> None:
    files = sorted((ROOT / "configs").glob("rec_teacher_*.json"))
    assert files, "configs/rec_teacher_*.json"
    for f in files:
        cfg = build_config(RecTeacherConfig, f)
        assert isinstance(cfg, RecTeacherConfig)


def test_missing_data_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        train_rec_teacher(_cfg(tmp_path / "none", tmp_path / "out"))


def test_evaluate_turns_variants_hand_computed() -> None:
    from conkd_scale.rec.train import EncodedTurns, evaluate_turns

    enc = EncodedTurns(ctx=[[0], []], ctx_items=[[1], []], gold=[[1, 2], []])
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.0, 0.0, 0.0, 0.0]])
    m = evaluate_turns(lambda ctx: scores[: len(ctx)], enc, ks=(1, 2, 3))
    assert m["R@1"] == 0.5 and m["n"] == 2  # gold 1 is first (a repeat), gold 2 third
    # only gold 2 is new; ranked among all items it is third
    assert (m["new_unmasked/R@2"], m["new_unmasked/R@3"], m["new/n"]) == (0.0, 1.0, 1)
    assert m["new/R@1"] == 0.0 and m["new/R@2"] == 1.0  # seen item 1 removed: gold 2 second
    assert m["turn/R@1"] == 0.5 and m["turn/n"] == 1
    seen = evaluate_turns(lambda ctx: scores[: len(ctx)], enc, ks=(3,), exclude_seen=True)
    assert seen["R@3"] == 0.5  # the repeat can no longer be recommended


def test_only_a_finished_run_counts_as_a_trained_teacher(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A run interrupted after its first best epoch leaves a checkpoint marked incomplete:
    the distillation job retrains R rather than distil from a half-trained one."""
    import shutil

    from conkd_scale.distill.teachers import rec_trained

    out, _ = run
    assert rec_trained(out) and rec_trained(out / "checkpoint")
    meta = json.loads((out / "checkpoint" / "rec_teacher.json").read_text())
    assert meta["complete"] is True
    cut = tmp_path / "interrupted"
    shutil.copytree(out, cut)
    (cut / "checkpoint" / "rec_teacher.json").write_text(json.dumps({**meta, "complete": False}))
    assert not rec_trained(cut)
    (cut / "checkpoint" / "rec_teacher.json").unlink()  # a bare checkpoint: taken as given
    assert rec_trained(cut)
