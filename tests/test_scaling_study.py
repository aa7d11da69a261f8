"""launch/scaling_study.py end to end on the synthetic corpus (local launcher, DeepSpeed):
two seeds at the smallest size, η = auto; a resumed study that skips finished runs and
re-runs only what is missing, and refuses to reuse them under another η."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FIGURES = (
    "metrics_vs_size.png",
    "lambda_hist.png",
    "gate_pr_vs_size.png",
    "gate_profiles.png",
    "gate_training.png",
)


def _launcher() -> ModuleType:
    path = ROOT / "launch" / "scaling_study.py"
    spec = importlib.util.spec_from_file_location("scaling_study_cli", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def study_args(data: Path, out: Path) -> list[str]:
    return [
        "--sizes",
        "tiny,mini",
        "--gates",
        "hard,soft",
        "--dataset",
        "synthetic",
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "nproc=1",
        "max_turns=30",
        "seeds=0,1",
        "eta=auto",
        "rec=epochs=4",
        "dialog=model.preset=tiny,model.vocab_size=500,train.max_steps=40,train.eval_every=0,"
        "train.lr=5e-3,train.progress=false",
        "distill=max_length=128,max_train_conversations=120,train.micro_batch=4,"
        "train.max_steps=6,train.eval_every=3,train.eval_max_batches=2,train.log_every=1",
        "evaluate=generation.max_new_tokens=12",
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("scaling") / "study"
    assert _launcher().main(study_args(synthetic_dir, out)) == 0
    return out


def test_study_writes_the_report_with_its_figures(study: Path) -> None:
    for name in FIGURES:
        png = study / "figures" / name
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name
    summary = json.loads((study / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == [
        "tiny-hard",
        "tiny-soft",
        "tiny-hard-s1",
        "tiny-soft-s1",
        "mini-hard",
        "mini-soft",
    ]
    info = json.loads((study / "runs" / "tiny-hard-s1" / "run_info.json").read_text())
    config = json.loads((study / "runs" / "tiny-hard-s1" / "config.json").read_text())
    assert config["train"]["seed"] == 1 and config["loss"]["gate"]["eta"] == "auto"
    # η = auto: the value chosen on the validation split, recorded by the runs
    assert summary["eta_config"] == "auto" and summary["eta"] == info["eta"]
    assert 0 <= summary["eta"] <= 1 and summary["eta_calibration"]["split"] == "valid"
    groups = {g["name"]: g for g in summary["groups"]}
    assert groups["tiny-hard"]["seeds"] == [0, 1] and groups["mini-hard"]["seeds"] == [0]
    assert groups["tiny-hard"]["metrics_sd"]["PPL"] is not None
    tiny, mini = summary["verdict"]["sizes"]
    assert tiny["seeds"] == [0, 1] and mini["seeds"] == [0]
    ppl = tiny["metrics"]["PPL"]
    assert ppl["sd"] is not None and ppl["ci95"] is not None and ppl["turns"] == 30
    assert ppl["bootstrap_diff"] == pytest.approx(ppl["diff"], rel=1e-3, abs=1e-3)
    assert summary["gate_status"]["train_rate"] is not None
    params = {r["size"]: r["params"] for r in summary["runs"]}
    assert 0 < params["tiny"] < params["mini"]
    for r in summary["runs"]:
        assert r["metrics"]["PPL"] > 1
        g = r["gate"]
        assert g["turns"] == 30 and g["tokens"] > 0
        assert 0 <= g["m_mean"] <= 1 and sum(g["histogram"]["fraction"]) == pytest.approx(1.0)
        # the student's own gate on the validation split, after each evaluation interval
        assert r["curves"]["val"]["step"] == [3, 6]
        assert len(r["curves"]["val"]["val_sgate_m_gold"]) == 2
        # D's gate on the training batches
        assert len(r["curves"]["train"]["gate_mean"]) == 6
    t = summary["teacher"]["gate"]
    assert t["turns"] == 30 and t["n_gold"] > 0
    report = (study / "report.md").read_text()
    assert "D's gate." in report and "Verdict on the paper's pattern" in report
    assert "The seed spread was measured at tiny (seeds 0, 1" in report
    assert "## Hard − soft" in report
    for name in FIGURES:
        assert f"figures/{name}" in report
    # the written reading quotes the measured numbers
    assert f"{t['m_gold']:.3f}" in report


def test_resumed_study_skips_finished_runs(
    study: Path, synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = study / "logs"
    before = {p.name: p.stat().st_mtime_ns for p in logs.glob("*.log")}
    shutil.rmtree(study / "eval" / "mini-soft")  # one evaluation lost: only it runs again
    capsys.readouterr()
    assert _launcher().main(study_args(synthetic_dir, study)) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("finished before, skipped") == 6
    after = {p.name: p.stat().st_mtime_ns for p in logs.glob("*.log")}
    changed = sorted(n for n in after if after[n] != before.get(n))
    assert changed == ["mini-soft.eval.log"]  # no distillation ran again
    assert (study / "eval" / "mini-soft" / "gate_trace.jsonl").is_file()
    walls = json.loads((logs / "study.json").read_text())["run_walls_s"]
    assert "tiny-hard/train" in walls and "mini-soft/eval" in walls  # kept across invocations
    # the paper's η = 0.5 into the same directory: the trained students are not reused
    capsys.readouterr()
    assert _launcher().main([*study_args(synthetic_dir, study), "eta=0.5"]) == 2
    err = capsys.readouterr().err
    assert "loss.gate.eta: 'auto' when trained, 0.5 now" in err
