"""One 2-rank distillation (CPU, gloo) whose student is large enough for its model states to
show (the ``medium`` preset, ~25 M parameters), with DeepSpeed's csv monitor on (TensorBoard,
whose writer adds ~130 MiB to a rank's resident peak, is tested in test_distill_e2e's ZeRO-2
run): the monitor gets the job's scalars, and the planner's
prediction agrees with the peak the job measured and with its checkpoint's partitions."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from conkd_scale.plan.measure import checkpoint_state_bytes
from conkd_scale.training.ds_config import apply_monitors
from conkd_scale.training.metrics import monitor_events
from conkd_scale.utils.errors import ConfigError
from tests.helpers_ds import run_deepspeed

HAS_TB = importlib.util.find_spec("tensorboard") is not None
SCALARS = ("loss", "ce", "kd", "kd_dialog", "kd_rec", "gate_mean", "tokens_per_s")


def test_monitor_events_are_the_rows_numbers():
    row = {"kind": "train", "step": 7, "epoch": 0, "loss": 1.5, "kd": float("nan"), "ok": True}
    assert monitor_events(row) == [("Train/loss", 1.5, 7)]
    assert monitor_events({"kind": "eval", "step": 3, "val_ppl": 9}) == [("Eval/val_ppl", 9.0, 3)]
    assert monitor_events({"kind": "final", "step": 3, "val_ppl": 9}) == []


def test_apply_monitors_writes_under_the_run_dir(tmp_path):
    cfg = apply_monitors({}, tmp_path, csv_monitor=True)
    assert cfg["csv_monitor"] == {
        "enabled": True,
        "output_path": str(tmp_path),
        "job_name": "csv_monitor",
    }
    own = {"csv_monitor": {"enabled": True, "output_path": "/elsewhere", "job_name": "x"}}
    assert apply_monitors(own, tmp_path)["csv_monitor"]["output_path"] == "/elsewhere"
    assert "tensorboard" not in apply_monitors({}, tmp_path)


@pytest.mark.skipif(HAS_TB, reason="tensorboard is installed: the missing-package error")
def test_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        apply_monitors({}, tmp_path, tensorboard=True)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_monitors_and_planned_memory(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "--deepspeed",
        "ds_configs/zero3.json",
        f"data_dir={synthetic_dir}",
        f"teachers.rec_dir={tmp_path}/rec",
        f"teachers.dialog_dir={tmp_path}/dialog",
        "teachers.rec_overrides=epochs=1",
        "teachers.dialog_overrides=model.preset=tiny,model.vocab_size=500,train.max_steps=2,"
        "train.eval_every=0",
        "max_length=128",
        "max_train_conversations=40",
        "student.preset=medium",
        "train.micro_batch=2",
        "train.max_steps=3",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_max_batches=1",
        "train.progress=false",
        "train.csv_monitor=true",
        "train.memory_trace=2",
        "export=false",
        f"output_dir={out}",
    ]
    run_deepspeed("launch/distill.py", args, timeout=600, log=tmp_path / "run.log")

    # the monitors: every scalar of the train rows and the validation PPL, by step
    mon = out / "csv_monitor"
    for key in SCALARS:
        rows = _read_csv(mon / f"Train_{key}.csv")
        assert rows[0] == ["step", key] and [int(r[0]) for r in rows[1:]] == [1, 2, 3], key
    assert (mon / "Train_gate_recall.csv").is_file()  # completed by the distill logger
    ppl = _read_csv(mon / "Eval_val_ppl.csv")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (ev,) = [r for r in metrics if r["kind"] == "eval"]
    assert float(ppl[1][1]) == pytest.approx(ev["val_ppl"])

    # the plan against what the job measured
    from conkd_scale.plan.arch import resolve_model
    from conkd_scale.plan.memory import PlanInput, ZeroSettings, estimate
    from conkd_scale.training.ds_config import load_ds_config

    info = json.loads((out / "run_info.json").read_text())
    vocab = info["vocab"]
    student = resolve_model("medium", vocab)
    assert student.params == info["student_params"]
    plan = estimate(
        PlanInput(
            student=student,
            teacher=resolve_model(str(tmp_path / "dialog"), vocab),
            zero=ZeroSettings.from_ds_config(load_ds_config("ds_configs/zero3.json")),
            teacher_zero=ZeroSettings.from_ds_config(
                load_ds_config("ds_configs/zero3_inference.json")
            ),
            gpus_per_node=2,
            device="cpu",
            gpu_mem_gib=8,
            seq_len=128,
            micro_batch=2,
        )
    )
    peak_mib = max(r["peak_mem_mb"] for r in metrics if r["kind"] == "train")
    # 1,337 MiB planned against 1,405-1,441 measured on an idle machine (-5% to -7%; this job
    # also trains its teachers first, which keeps ~100 MiB: bench/results/plan_vs_measured.md)
    # and 1,546 in a CI run (-13.5%: glibc kept more freed heap); the idle comparison is the
    # benchmark's, this bound catches a planner term gone wrong, not the allocator's spread
    error = plan.total / 2**20 / peak_mib - 1
    assert -0.20 <= error <= 0.15, (error, plan.parts, peak_mib)
    # each rank's checkpoint holds half the fp32 master and Adam moments: 12 B/param
    ckpt = checkpoint_state_bytes(sorted((out / "checkpoints").glob("step_*"))[-1])
    assert sorted(ckpt) == [0, 1]
    for c in ckpt.values():
        held = c["master_bytes"] + c["moments_bytes"]
        assert held == pytest.approx(plan.parts["optimizer"], rel=0.02)

    # the memory trace: setup phases, then the micro steps of the first 2 optimizer steps
    for rank in (0, 1):
        rows = [
            json.loads(x)
            for x in (out / "memory_trace" / f"rank_{rank}.jsonl").read_text().splitlines()
        ]
        phases = [r["phase"] for r in rows]
        assert phases[0] == "imports" and {r["rank"] for r in rows} == {rank}
        for p in ("student built", "D built and partitioned", "student engine initialised"):
            assert p in phases, p
        steps = [r for r in rows if "step" in r]
        assert [r["step"] for r in steps] == [0] * 4 + [1] * 4
        assert steps[0]["shape"][0] == 2  # [B, T] of the micro batch
        # the job's peak still covers every phase's (the trace resets the kernel's mark)
        assert max(r["peak_mib"] for r in rows) <= peak_mib + 0.1
