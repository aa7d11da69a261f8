"""Fault injection: divergence, pre-emption and damaged checkpoints, each asserting the exit
code and what is left on disk (docs/reliability.md lists what each test shows).

Unit-level tests run the real :class:`Trainer` in this process on a one-parameter engine with
DeepSpeed's interface (no process group). The DeepSpeed tests run the distillation job on
2 CPU ranks through the real launcher; teachers are trained once by the first job of the
module and shared.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conkd_scale.data.sequences import IGNORE, EncodedSequence
from conkd_scale.distributed import DistInfo
from conkd_scale.training.config import TrainConfig
from conkd_scale.training.data import sequence_collate
from conkd_scale.training.divergence import nonfinite_params
from conkd_scale.training.trainer import Trainer
from conkd_scale.utils.errors import EXIT_DIVERGED, EXIT_RETRY, DivergenceError
from tests.helpers_ds import (
    ROOT,
    deepspeed_bin,
    free_port,
    read_jsonl,
    run_deepspeed,
    shm_buffers,
)

SCRIPT = "launch/distill.py"


# ----------------------------------------------------------------------------- in-process
class OneParamEngine(torch.nn.Module):
    """The part of a DeepSpeed engine the Trainer uses, for one process: SGD on one weight,
    checkpoints as real files (``model_states.pt`` per tag), DeepSpeed's skip of an update
    whose gradient is not finite (``was_step_applied``, ``get_global_grad_norm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.device = torch.device("cpu")
        self._applied, self._norm = True, 0.0

    def gradient_accumulation_steps(self) -> int:
        return 1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        g = self.w.grad
        self._norm = float(g.abs()) if g is not None else 0.0
        self._applied = math.isfinite(self._norm)
        with torch.no_grad():
            if self._applied and g is not None:
                self.w -= 0.1 * g
        self.w.grad = None

    def was_step_applied(self) -> bool:
        return self._applied

    def get_global_grad_norm(self) -> float:
        return self._norm if self._applied else float("inf")

    def get_lr(self) -> list[float]:
        return [0.1]

    def save_checkpoint(self, root: str, tag: str, **_: Any) -> None:
        Path(root, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.w.detach().clone()}, Path(root, tag, "model_states.pt"))

    def load_checkpoint(self, root: str, tag: str, **_: Any) -> tuple[str, dict]:
        state = torch.load(Path(root, tag, "model_states.pt"), weights_only=True)
        with torch.no_grad():
            self.w.copy_(state["w"])
        return str(Path(root, tag)), {}


DATA = [
    EncodedSequence(str(i), [i + 3] * 4, [IGNORE] + [i + 3] * 3, [-1] * 4, []) for i in range(8)
]
DIST = DistInfo(0, 1, 0, 1, "gloo", torch.device("cpu"), "single")


def make_trainer(
    out: Path, loss_step: Any, total: int = 6, hooks: dict | None = None, **cfg: Any
) -> Trainer:
    base = {"micro_batch": 2, "log_every": 1, "progress": False, "warmup_steps": 1}
    hooks = {"eval_data": None, **(hooks or {})}
    t = Trainer(
        OneParamEngine(),
        train_data=DATA,
        collate_fn=sequence_collate(0),
        cfg=TrainConfig(**{**base, **cfg}),
        dist=DIST,
        out_dir=out,
        total_steps=total,
        loss_step=loss_step,
        **hooks,
    )
    t.resume()
    return t


def counting_loss(bad_calls: set[int]) -> Any:
    """A loss step whose n-th call (1-based) is NaN when n is in ``bad_calls``."""
    calls = [0]

    def loss_step(engine: Any, batch: Any) -> tuple[torch.Tensor, dict]:
        calls[0] += 1
        loss = (engine.w - 1) ** 2
        return (loss * float("nan") if calls[0] in bad_calls else loss), {}

    return loss_step


def rows(out: Path, kind: str | None = None) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if kind is None or r["kind"] == kind]


def ckpt_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints (``step_*`` directories; not ``.corrupt`` ones)."""
    from conkd_scale.training.checkpoint import list_checkpoints

    return [s for s, _ in list_checkpoints(out / "checkpoints")]


def test_nonfinite_step_is_not_counted_and_training_recovers(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, counting_loss({3}), save_every=2, keep_last=5)
    summary = t.train()
    assert summary["step"] == 6  # 7 optimizer steps taken, 6 counted
    assert [r["step"] for r in rows(tmp_path, "train")] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows(tmp_path, "train"))
    (bad,) = rows(tmp_path, "nonfinite")
    assert bad["step"] == 2 and bad["loss_nonfinite"] and bad["update_skipped"]
    assert rows(tmp_path, "train")[-1]["nonfinite_steps"] == 1
    assert math.isfinite(float(t.engine.w.detach())) and ckpt_steps(tmp_path) == [2, 4, 6]


def test_divergence_stops_after_n_in_a_row_and_keeps_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    t = make_trainer(tmp_path, counting_loss(set(range(4, 100))), save_every=1, keep_last=2)
    t.cfg.max_nonfinite_steps = 4
    t.divergence.limit = 4
    with pytest.raises(DivergenceError, match=r"4 optimizer steps in a row") as e:
        t.train()
    assert e.value.exit_code == EXIT_DIVERGED == 3
    assert "step_00000003" in str(e.value) and "is kept" in str(e.value)
    assert ckpt_steps(tmp_path) == [2, 3]  # nothing written after the last good step
    assert [r["consecutive"] for r in rows(tmp_path, "nonfinite")] == [1, 2, 3, 4]
    assert rows(tmp_path)[-1] == {"kind": "diverged", "step": 3, "nonfinite_steps": 4}


def test_nonfinite_validation_loss_is_never_saved_or_exported(tmp_path: Path) -> None:
    def nan_eval(engine: Any, batch: Any) -> dict[str, float]:
        return {"nll": float("nan"), "tokens": 1.0}

    hooks = {"eval_data": DATA[:2], "eval_step": nan_eval}
    t = make_trainer(tmp_path, counting_loss(set()), hooks=hooks)
    with pytest.raises(DivergenceError, match="validation loss nan; not writing a checkpoint"):
        t.train()
    assert ckpt_steps(tmp_path) == []
    with pytest.raises(DivergenceError, match="not writing the export"):
        t.check_finite("the export")


def test_nonfinite_params_names_the_tensor() -> None:
    m = torch.nn.Linear(2, 2)
    assert nonfinite_params(m) == []
    with torch.no_grad():
        m.bias[1] = float("inf")
    assert nonfinite_params(m) == ["bias"]


def test_time_based_save_interval(tmp_path: Path) -> None:
    def slow_loss(engine: Any, batch: Any) -> tuple[torch.Tensor, dict]:
        time.sleep(0.1)
        return (engine.w - 1) ** 2, {}

    make_trainer(tmp_path / "off", slow_loss, keep_last=10).train()
    assert ckpt_steps(tmp_path / "off") == [6]  # save_every=0: only the final checkpoint
    make_trainer(tmp_path / "on", slow_loss, keep_last=10, save_every_minutes=0.25 / 60).train()
    steps = ckpt_steps(tmp_path / "on")
    assert steps[-1] == 6 and 2 <= len(steps) <= 5, steps  # ~every 3rd step of 0.1 s


def flip_byte(path: Path) -> None:
    """Damage a file in place the way bit rot or a torn write does (same size)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoint_appears_complete_with_a_manifest_of_checksums(tmp_path: Path) -> None:
    import hashlib

    from conkd_scale.training.checkpoint import MANIFEST, verify_checkpoint

    make_trainer(tmp_path, counting_loss(set()), save_every=2, keep_last=2).train()
    root = tmp_path / "checkpoints"
    assert ckpt_steps(tmp_path) == [4, 6] and not list(root.glob(".*tmp"))
    assert (root / "latest").read_text() == "step_00000006"
    ckpt = root / "step_00000006"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert set(files) == {"meta.json", "model_states.pt"}
    for name, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert verify_checkpoint(ckpt) is None
    flip_byte(ckpt / "model_states.pt")
    assert "does not match its SHA-256" in verify_checkpoint(ckpt)


def test_resume_skips_a_corrupt_checkpoint_and_says_why(tmp_path: Path, capsys) -> None:
    make_trainer(tmp_path, counting_loss(set()), save_every=2, keep_last=3).train()
    root = tmp_path / "checkpoints"
    flip_byte(root / "step_00000006" / "model_states.pt")
    (root / "step_00000004" / "model_states.pt").unlink()
    t = make_trainer(tmp_path, counting_loss(set()), save_every=2, keep_last=3)
    assert t.step == 2
    err = capsys.readouterr().out
    assert "skipping checkpoint" in err and "step_00000006: model_states.pt does not match" in err
    assert "step_00000004: model_states.pt is missing" in err
    assert sorted(p.name for p in root.glob("step_*")) == [
        "step_00000002",
        "step_00000004.corrupt",
        "step_00000006.corrupt",
    ]
    assert t.train()["step"] == 6 and ckpt_steps(tmp_path) == [2, 4, 6]


def test_no_intact_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from conkd_scale.training.checkpoint import resolve_resume
    from conkd_scale.utils.errors import ConfigError

    make_trainer(tmp_path, counting_loss(set()), save_every=3).train()
    for p in (tmp_path / "checkpoints").glob("step_*/model_states.pt"):
        flip_byte(p)
    with pytest.raises(ConfigError, match=r"no intact checkpoint in .*train.resume=none"):
        make_trainer(tmp_path, counting_loss(set()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no complete checkpoint there .*train.resume=none"):
        resolve_resume(str(tmp_path / "empty"), tmp_path / "checkpoints")
    assert resolve_resume("auto", tmp_path / "empty") is None  # a new run starts from scratch


def test_unloadable_newest_checkpoint_exits_75_and_the_retry_resumes_older(
    tmp_path: Path,
) -> None:
    from conkd_scale.training.checkpoint import MANIFEST

    make_trainer(tmp_path, counting_loss(set()), save_every=2, keep_last=3).train()
    newest = tmp_path / "checkpoints" / "step_00000006"
    (newest / MANIFEST).unlink()  # no manifest (an older version's save): not verifiable
    (newest / "model_states.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(SystemExit) as e:
        try:
            make_trainer(tmp_path, counting_loss(set()))
        except Exception as err:  # what launching.py does with it
            assert "could not load it" in str(err) and "step_00000004" in str(err)
            raise SystemExit(err.exit_code) from err
    assert e.value.code == EXIT_RETRY == 75
    assert (tmp_path / "checkpoints" / "step_00000006.corrupt").is_dir()
    assert make_trainer(tmp_path, counting_loss(set())).step == 4


def test_keep_last_keeps_the_new_checkpoint_and_clears_unfinished_saves(tmp_path: Path) -> None:
    from conkd_scale.training.checkpoint import prune_checkpoints

    make_trainer(tmp_path, counting_loss(set()), save_every=2, keep_last=1).train()
    root = tmp_path / "checkpoints"
    assert ckpt_steps(tmp_path) == [6]  # the one just written survives keep_last=1
    (root / ".step_00000007.tmp").mkdir()  # a save cut short by a crash
    (root / "step_00000005").mkdir()  # an older save that never got its meta.json
    removed = prune_checkpoints(root, keep_last=1)
    assert sorted(p.name for p in removed) == [".step_00000007.tmp", "step_00000005"]
    assert ckpt_steps(tmp_path) == [6] and not (root / ".step_00000007.tmp").exists()
    os.replace(root / "step_00000006", root / "step_00000006.corrupt")
    assert prune_checkpoints(root, keep_last=1) == []  # nothing complete: nothing deleted
    assert (root / "step_00000006.corrupt").is_dir()


def test_a_resave_of_an_existing_step_replaces_it_whole(tmp_path: Path) -> None:
    """Resumed from an older checkpoint on purpose, the run saves step 6 again: the new one
    replaces the old (moved aside first, removed once the new one is in place)."""
    from conkd_scale.training.checkpoint import verify_checkpoint

    make_trainer(tmp_path, counting_loss(set()), save_every=2, keep_last=3).train()
    root = tmp_path / "checkpoints"
    old_meta = json.loads((root / "step_00000006" / "meta.json").read_text())
    t = make_trainer(
        tmp_path,
        counting_loss(set()),
        save_every=2,
        keep_last=3,
        resume=str(root / "step_00000004"),
    )
    assert t.step == 4
    time.sleep(1.1)  # meta.json's time has one-second resolution
    t.train()
    assert ckpt_steps(tmp_path) == [2, 4, 6] and verify_checkpoint(root / "step_00000006") is None
    assert (
        json.loads((root / "step_00000006" / "meta.json").read_text())["time"] != old_meta["time"]
    )
    assert not list(root.glob(".step_*"))


def test_torn_metrics_line_is_dropped_on_resume(tmp_path: Path, capsys) -> None:
    make_trainer(tmp_path, counting_loss(set()), save_every=3, total=3).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # the crash came mid-line
    t = make_trainer(tmp_path, counting_loss(set()), save_every=3)
    assert t.step == 3
    assert "metrics.jsonl:5: not valid JSON (a torn write?); dropped it" in capsys.readouterr().out
    t.train()
    assert [r["step"] for r in rows(tmp_path, "train")] == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 512 KiB tmpfs (needs the right to mount: root or CAP_SYS_ADMIN; else skipped)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_says_so(small_disk: Path) -> None:
    from conkd_scale.utils.errors import EXIT_IO, StorageError

    out = small_disk / "run"
    t = make_trainer(out, counting_loss(set()), save_every=3)
    with pytest.raises(StorageError, match=r"disk is full \(ENOSPC\); free space") as e:

        def fill_disk_after_step_3(engine: Any, batch: Any) -> tuple[torch.Tensor, dict]:
            if t.step == 3 and not (small_disk / "filler").exists():
                with contextlib.suppress(OSError), open(small_disk / "filler", "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            return (engine.w - 1) ** 2, {}

        t.loss_step = fill_disk_after_step_3
        t.train()
    assert e.value.exit_code == EXIT_IO == 74
    assert "checkpoints/step_00000006" in str(e.value)
    assert ckpt_steps(out) == [3]  # the previous checkpoint is intact and still counts
    from conkd_scale.training.checkpoint import verify_checkpoint

    assert verify_checkpoint(out / "checkpoints" / "step_00000003") is None


# ----------------------------------------------------------------------------- resume drift
def test_drift_check_names_each_field_and_allows_schedule_changes(tmp_path: Path) -> None:
    from conkd_scale.training.resume_check import check_resume_drift
    from conkd_scale.utils.errors import ConfigError

    cfg = {"seed_data": 1, "loss": {"gate": {"mode": "hard"}}, "train": TrainConfig().__dict__}
    ds = {"zero_optimization": {"stage": 3}, "train_batch_size": 16}
    t = make_trainer(tmp_path, counting_loss(set()), total=2)
    t.run_config = {"config": cfg, "ds_config": ds}
    t.train()
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    assert check_resume_drift(cfg, ds, 1, tmp_path, "auto") == ckpt
    assert check_resume_drift({}, {}, 1, tmp_path, "none") is None
    later = json.loads(json.dumps(cfg))
    later["train"].update(epochs=9.0, max_steps=50, eval_every=7, save_every=3, log_every=2)
    assert check_resume_drift(later, ds, 1, tmp_path, "auto") == ckpt  # may change
    drift = json.loads(json.dumps(later))
    drift["train"].update(micro_batch=2, seed=4)
    drift["loss"]["gate"]["mode"] = "soft"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ConfigError) as e:
        check_resume_drift(drift, {**ds, "zero_optimization": {"stage": 2}}, 1, tmp_path, "auto")
    msg = str(e.value)
    for line in (
        "train.micro_batch: 8 in the checkpoint, 2 now",
        "train.seed: 0 in the checkpoint, 4 now",
        "loss.gate.mode: 'hard' in the checkpoint, 'soft' now",
        "ds_config.zero_optimization.stage: 3 in the checkpoint, 2 now",
        "train.resume=none",
        "another output_dir",
    ):
        assert line in msg, msg
    assert "max_steps" not in msg and "epochs" not in msg
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_drift_check_on_another_world_size(tmp_path: Path) -> None:
    from conkd_scale.training.resume_check import check_resume_drift
    from conkd_scale.utils.errors import ConfigError

    cfg = {"train": {"micro_batch": 4, "grad_accum": 1, "seed": 0}}
    make_trainer(tmp_path, counting_loss(set()), total=2).train()
    meta = tmp_path / "checkpoints" / "step_00000002" / "meta.json"
    # an older checkpoint: no run_config in meta.json, OUT/config.json is compared instead
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "world_size": 2}))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        check_resume_drift(cfg, {}, 1, tmp_path, "auto")
    msg = str(e.value)
    assert "world size: 2 ranks in the checkpoint, 1 now (global batch 8 then, 4 now)" in msg
    assert "set train.grad_accum=2 to keep its global batch of 8" in msg, msg
    same_batch = {"train": {**cfg["train"], "grad_accum": 2}}
    assert check_resume_drift(same_batch, {}, 1, tmp_path, "auto") is not None


def test_a_changed_world_size_reads_the_rest_of_the_epoch_once() -> None:
    """2 ranks read part of an epoch; 1 rank, then 3 ranks go on from the saved positions:
    over the epoch every sample is read once (but for the sampler's padding)."""
    from conkd_scale.training.data import DataPosition, TrainStream

    data = list(range(23))
    lengths = [(7 * i) % 11 for i in data]

    def stream(rank: int, world: int) -> TrainStream:
        return TrainStream(
            data, list, micro_batch=2, rank=rank, world_size=world, seed=3, lengths=lengths
        )

    read: list[int] = []
    for r in range(2):
        read += [i for b in stream(r, 2).epoch_batches(0)[:2] for i in b]
    pos = DataPosition(0, 2)
    pos = DataPosition(0, 0, stream(0, 1).used(pos, 2))
    assert sorted(pos.done) == sorted(set(read)) and len(read) == 8
    one = stream(0, 1)
    read += [i for b in one.epoch_batches(0, pos.done)[:3] for i in b]
    pos = DataPosition(0, 3, pos.done)
    pos = DataPosition(0, 0, stream(0, 3).used(pos, 1))
    assert len(pos.done) == 14 == len(set(read))
    for r in range(3):
        s = stream(r, 3)
        s.position = pos
        it = iter(s)
        n = len(s.epoch_batches(0, pos.done))
        read += [i for _ in range(n) for i in next(it)]
        assert s.position == DataPosition(0, n, pos.done)
        assert next(it) and s.position.epoch == 1 and s.position.done is None
    assert sorted(set(read)) == data
    assert len(read) - len(data) < 3  # only the 3 ranks' padding repeats a sample


# ----------------------------------------------------------------------------- DeepSpeed jobs
def base_args(root: Path, out: Path) -> list[str]:
    return [
        "--deepspeed",
        "ds_configs/zero3.json",
        f"data_dir={root}/data",
        f"teachers.rec_dir={root}/rec",
        f"teachers.dialog_dir={root}/dialog",
        "teachers.rec_overrides=epochs=2",
        "teachers.dialog_overrides=model.preset=tiny,model.vocab_size=500,train.max_steps=10,"
        "train.eval_every=0",
        "max_length=96",
        "max_train_conversations=60",
        "train.progress=false",
        "train.log_every=1",
        "train.micro_batch=4",
        "student.preset=tiny",
        "train.eval_max_batches=2",
        f"output_dir={out}",
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def diverged(root: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """``train.lr=1e37`` (first job of the module: it also trains the teachers)."""
    out = root / "diverged"
    args = [
        *base_args(root, out),
        "train.max_steps=6",
        "train.save_every=1",
        "train.lr=1e37",
        "train.max_nonfinite_steps=3",
    ]
    proc = run_deepspeed(SCRIPT, args, check=False, timeout=600, log=root / "diverged.log")
    return proc, out


@pytest.mark.slow
def test_diverged_job_exits_3_keeps_last_good_checkpoint_and_exports_nothing(diverged) -> None:
    proc, out = diverged
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_DIVERGED, text[-3000:]
    assert text.count("error: training diverged: 3 optimizer steps in a row") == 2  # both ranks
    assert not (out / "hf").exists()
    # step 1's update made the weights huge: every later step is NaN, skipped, not counted
    assert [r["step"] for r in rows(out, "train")] == [1]
    bad = rows(out, "nonfinite")
    assert [r["consecutive"] for r in bad] == [1, 2, 3]
    assert all(r["loss_nonfinite"] and r["update_skipped"] for r in bad)
    assert ckpt_steps(out) == [1]
    assert f"{out}/checkpoints/step_00000001, is kept" in text


def start_job(out: Path, args: list[str], log: Path) -> subprocess.Popen:
    """The distillation job under the real ``deepspeed`` launcher, in the background."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    port = str(free_port())
    cmd = [deepspeed_bin(), "--num_gpus", "2", "--master_port", port, str(ROOT / SCRIPT), *args]
    f = open(log, "w")  # noqa: SIM115 (closed by the caller through the process's lifetime)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """``{rank: pid}`` of the training ranks below a launcher process."""
    import psutil

    kids = psutil.Process(proc.pid).children(recursive=True)
    return {
        int(k.environ()["RANK"]): k.pid
        for k in kids
        if SCRIPT in " ".join(k.cmdline()) and "deepspeed.launcher" not in " ".join(k.cmdline())
    }


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"job ended early ({proc.returncode})"
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in rows(out, "train")):
            return
        time.sleep(0.2)
    raise AssertionError(f"no train row of step {step} within {timeout} s")


def preempt_args(root: Path, out: Path) -> list[str]:
    return [*base_args(root, out), "train.max_steps=40", "train.save_every=2", "train.keep_last=3"]


@pytest.fixture(scope="module")
def sigterm_rank(root: Path, diverged) -> tuple[int, Path, float]:
    """SIGTERM to rank 1 alone once step 3 is logged: (launcher exit code, out, seconds)."""
    out = root / "sigterm_rank"
    proc = start_job(out, preempt_args(root, out), root / "sigterm_rank.log")
    wait_for_step(proc, out, 3)
    pids = rank_pids(proc)
    assert len(pids) == 2
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGTERM)
    rc = proc.wait(timeout=120)
    return rc, out, time.monotonic() - t0


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_and_exits_75(sigterm_rank) -> None:
    rc, out, _ = sigterm_rank
    assert rc == EXIT_RETRY == 75
    (row,) = rows(out, "preempted")
    k = row["step"]
    assert 3 <= k < 40 and not (out / "hf").exists()
    ckpt = out / "checkpoints" / f"step_{k:08d}"
    assert json.loads((ckpt / "meta.json").read_text())["step"] == k
    assert [r["step"] for r in rows(out, "train")] == list(range(1, k + 1))


@pytest.mark.slow
def test_a_killed_deepspeed_launcher_leaves_no_orphans(root: Path, diverged) -> None:
    """SIGKILL to the ``deepspeed`` command (on one node it has no handler for SIGTERM
    either, so that signal ends it the same way): the ranks notice, save and stop."""
    import psutil

    out = root / "killed_launcher"
    proc = start_job(out, preempt_args(root, out), root / "killed_launcher.log")
    wait_for_step(proc, out, 3)
    ranks = [psutil.Process(p) for p in rank_pids(proc).values()]
    assert len(ranks) == 2
    t0 = time.monotonic()
    proc.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(ranks, timeout=90)
    took = time.monotonic() - t0
    for p in alive:
        p.kill()
    assert not alive, "ranks still running after the launcher was killed"
    (row,) = rows(out, "preempted")  # they saved and stopped as if pre-empted
    assert (out / "checkpoints" / f"step_{row['step']:08d}" / "meta.json").is_file()
    assert took < 2 + 30, took  # the watch's 2 s poll, one step and a save
    print(f"killed launcher: its ranks saved and exited {took:.1f} s after the kill")


@pytest.fixture(scope="module")
def killed_mid_save(root: Path, diverged) -> tuple[int, Path, float]:
    """SIGKILL to rank 1 while a checkpoint after step 2 is being written (its temp
    directory exists): (launcher exit code, out, seconds from the kill until every rank had
    exited)."""
    import psutil

    out = root / "killed_mid_save"
    proc = start_job(out, preempt_args(root, out), root / "killed_mid_save.log")
    wait_for_step(proc, out, 3)
    pids = rank_pids(proc)
    ranks = [psutil.Process(p) for p in pids.values()]
    t_end = time.monotonic() + 120
    while not any(int(p.name[6:14]) > 2 for p in (out / "checkpoints").glob(".step_*.tmp")):
        assert time.monotonic() < t_end and proc.poll() is None, "no save seen in progress"
        time.sleep(0.005)
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    rc = proc.wait(timeout=120)
    _, alive = psutil.wait_procs(ranks, timeout=30)
    took = time.monotonic() - t0
    for p in alive:
        p.kill()
    assert not alive, "ranks left running"
    assert not shm_buffers(proc)  # unlinked at start-up: a SIGKILL leaves none behind
    return rc, out, took


@pytest.mark.slow
def test_a_rank_killed_mid_save_ends_the_job_and_the_resume_redoes_at_most_save_every(
    killed_mid_save,
) -> None:
    """A crash in the middle of a checkpoint write (rank 1 SIGKILLed): the launcher stops
    the other rank and exits non-zero at once; the unfinished save is never resumed from: a
    resume starts from the intact checkpoint before it and redoes at most train.save_every
    (2) steps. (The resume itself is the one every other resume test runs.)"""
    from conkd_scale.training.checkpoint import resolve_resume

    rc, out, took = killed_mid_save
    assert rc not in (0, 75)
    assert took < 1 + 30, took  # the launcher's 1 s poll, then SIGTERM (SIGKILL 30 s later)
    last = max(r["step"] for r in rows(out, "train"))
    ckpt = resolve_resume("auto", out / "checkpoints")  # verifies it against its manifest
    assert ckpt is not None
    k = int(ckpt.name[5:])
    lost = last - k
    assert 0 <= lost <= 2, (last, k)
    unfinished = list((out / "checkpoints").glob(".step_*.tmp"))
    assert unfinished or k == last  # the interrupted save is hidden, or it had finished
    print(
        f"rank killed mid-save: every rank gone {took:.1f} s after the kill (launcher exit "
        f"{rc}); a resume starts at step {k}: {lost} of {last} steps redone"
    )


@pytest.mark.slow
def test_resume_after_sigterm_falls_back_past_a_corrupt_checkpoint(root: Path, sigterm_rank):
    """The pre-empted job of ``sigterm_rank`` with a damaged shard in its newest checkpoint:
    the re-run skips it, resumes from the one before and finishes (exit 0, model exported)."""
    _, out, _ = sigterm_rank
    (k,) = [r["step"] for r in rows(out, "preempted")]
    newest = out / "checkpoints" / f"step_{k:08d}"
    shard = sorted(newest.glob("*optim_states.pt"))[0]
    flip_byte(shard)
    proc = run_deepspeed(SCRIPT, preempt_args(root, out), timeout=300, log=root / "resume.log")
    text = proc.stdout + proc.stderr
    assert f"skipping checkpoint {newest}: {shard.name} does not match its SHA-256" in text
    assert (out / "checkpoints" / f"step_{k:08d}.corrupt").is_dir()
    older = max(s for s in range(2, k, 2))
    assert f"resumed from {out}/checkpoints/step_{older:08d} at step {older}" in text
    assert [r["step"] for r in rows(out, "train")] == list(range(1, 41))
    assert (out / "hf" / "config.json").is_file() and ckpt_steps(out)[-1] == 40


def tree(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``out`` with its size and modification time."""
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in out.rglob("*")
        if p.is_file()
    }


@pytest.mark.slow
def test_refused_resume_names_each_field_and_changes_nothing(root: Path, diverged) -> None:
    """The diverged job's output resumed on 1 rank with another micro batch, seed and gate:
    exit 2 before anything is written, naming each field and both world sizes."""
    _, out = diverged
    before = tree(out)
    args = [
        *base_args(root, out),
        "train.max_steps=6",
        "train.lr=1e37",
        "train.micro_batch=2",
        "train.seed=7",
        "loss.gate.mode=soft",
    ]
    t0 = time.monotonic()
    proc = run_deepspeed(SCRIPT, args, nproc=1, check=False, timeout=300, log=root / "drift.log")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert f"refusing to resume from {out}/checkpoints/step_00000001" in text
    for line in (
        "train.micro_batch: 4 in the checkpoint, 2 now",
        "train.seed: 0 in the checkpoint, 7 now",
        "loss.gate.mode: 'hard' in the checkpoint, 'soft' now",
        "world size: 2 ranks in the checkpoint, 1 now (global batch 8 then, 2 now): set "
        "train.grad_accum=4 to keep its global batch of 8",
        "train.resume=none",
    ):
        assert line in text, text[-3000:]
    assert "Traceback" not in text and time.monotonic() - t0 < 120
    assert tree(out) == before  # config.json, run_info.json, metrics.jsonl, checkpoints


def reshard_args(root: Path, out: Path) -> list[str]:
    return [*base_args(root, out), "train.max_steps=12", "train.save_every=4", "train.keep_last=5"]


@pytest.fixture(scope="module")
def resharded(root: Path, diverged) -> tuple[Path, Path, list[str]]:
    """An uninterrupted 2-rank run of 12 steps; a copy of it cut back to its checkpoint of
    step 4, resumed on 1 rank (``train.grad_accum=2``: the same global batch) to step 8,
    then on 2 ranks to the end."""
    import shutil

    ref, out = root / "uninterrupted", root / "resharded"
    run_deepspeed(SCRIPT, reshard_args(root, ref), log=root / "uninterrupted.log")
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("hf", "step_00000008", "step_00000012"))
    (out / "checkpoints" / "latest").write_text("step_00000004")
    logs = []
    for i, (n, extra) in enumerate(((1, ["train.grad_accum=2", "train.stop_at_step=8"]), (2, []))):
        args = [*reshard_args(root, out), *extra]
        proc = run_deepspeed(SCRIPT, args, nproc=n, log=root / f"reshard{i}.log")
        logs.append(proc.stdout + proc.stderr)
    return ref, out, logs


@pytest.mark.slow
def test_resume_on_another_world_size_2_1_2_continues_the_run(resharded) -> None:
    """2 ranks -> 1 -> 2 through DeepSpeed's universal checkpoint: every step is logged once,
    the epoch goes on with the samples not read yet, and the final validation loss is
    within 2% of the uninterrupted run's."""
    ref, out, logs = resharded
    assert "to a universal checkpoint" in logs[0] and "resharded from 2 to 1 ranks" in logs[0]
    assert "resharded from 1 to 2 ranks" in logs[1]
    for step in (4, 8):
        assert (out / "checkpoints" / f"step_{step:08d}" / "universal" / "zero").is_dir()
    meta = json.loads((out / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["world_size"] == 1
    assert [r["step"] for r in rows(out, "train")] == list(range(1, 13))
    a, b = rows(ref, "eval")[-1]["val_loss"], rows(out, "eval")[-1]["val_loss"]
    assert math.isfinite(b) and abs(a - b) < 0.02 * a, (a, b)
    assert (out / "hf" / "config.json").is_file()


TIMEOUT_S = 12  # train.collective_timeout_minutes=0.2 in the hang test


@pytest.fixture(scope="module")
def hung_rank(root: Path, diverged) -> tuple[int, Path, float, str]:
    """A job with a 12 s collective timeout whose R is trained first on rank 0 alone (longer
    than the timeout); at step 2 rank 1 is stopped (SIGSTOP) and continued 16 s later:
    (launcher exit code, out, seconds from the stop to the launcher's exit, output)."""
    import psutil

    out = root / "hung"
    args = [
        *preempt_args(root, out),
        f"train.collective_timeout_minutes={TIMEOUT_S / 60}",
        f"teachers.rec_dir={root}/rec_slow",
        # every epoch runs (no early stop): about 20 s on rank 0 alone on a 2-core machine
        "teachers.rec_overrides=epochs=150,patience=150",
    ]
    log = root / "hung.log"
    proc = start_job(out, args, log)
    wait_for_step(proc, out, 2, timeout=400)
    # DeepSpeed's /dev/shm buffers are unlinked once every rank has mapped them, so no exit
    # (the one below, or a SIGKILL) can leave them behind
    assert not shm_buffers(proc)
    pids = rank_pids(proc)
    ranks = [psutil.Process(p) for p in pids.values()]
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGSTOP)
    time.sleep(TIMEOUT_S + 4)
    os.kill(pids[1], signal.SIGCONT)
    rc = proc.wait(timeout=120)
    elapsed = time.monotonic() - t0
    _, alive = psutil.wait_procs(ranks, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, "ranks left running"
    return rc, out, elapsed, log.read_text()


@pytest.mark.slow
def test_rank0_only_work_longer_than_the_timeout_does_not_kill_the_job(hung_rank) -> None:
    """Training R on rank 0 took longer than the collective timeout, and the job went on."""
    _, out, _, text = hung_rank
    (secs,) = [
        float(x) for x in re.findall(r"trained the recommendation teacher in ([\d.]+) s", text)
    ]
    assert secs > TIMEOUT_S, text[-3000:]
    assert [r["step"] for r in rows(out, "train")][:2] == [1, 2]


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_within_the_timeout_with_stacks(hung_rank) -> None:
    """Rank 0 gives up after the collective timeout, says why and dumps its threads; rank 1,
    told to stop by the launcher, dumps where it was; the job fails (not 75) within the bound."""
    rc, _, elapsed, text = hung_rank
    assert rc not in (0, 75), text[-3000:]
    assert "a collective waited longer than train.collective_timeout_minutes (0.2 min)" in text
    assert "Timed out" in text or "timed out" in text
    # faulthandler dumps: rank 0's own report, rank 1's on the launcher's SIGTERM
    assert text.count("most recent call first") >= 2, text[-4000:]
    assert "received SIGTERM" in text
    assert elapsed < TIMEOUT_S + 4 + 30, elapsed
    print(f"hung rank: the launcher exited {elapsed:.1f} s after the stop (rc {rc})")


# ----------------------------------------------------------------------------- rank-0-only work
RANK0_JOB = """
import os, signal, sys, threading, time
from datetime import timedelta
import torch.distributed as dist
from conkd_scale import distributed as D

rank, store_at, port = int(os.environ["RANK"]), sys.argv[1], int(sys.argv[2])
silence, limit, modes = float(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]
if store_at == "agent":  # the store outside rank 0 (as torchrun's agent hosts it)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
else:  # the store in rank 0's process (the DeepSpeed launcher, srun)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )
dist.barrier()  # both ranks past the rendezvous, as init_distributed ends
D.set_rank0_wait(silence_s=silence, limit_s=limit)

def work(mode):
    if mode == "slow":  # longer than the heartbeat's silence bound, but alive
        time.sleep(2 * silence)
        return 42
    if mode == "hung":  # alive, its heartbeat going, never done
        threading.Event().wait()
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen: no heartbeat, no store

for mode in modes:
    t0 = time.monotonic()
    try:
        out = D.run_on_main(work, mode, phase=f"a {mode} phase")
    except D.PeerLostError as e:
        print(f"error: {e} after {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        D.teardown()  # as the jobs do after an error
        sys.exit(e.exit_code)
    print(f"rank {rank}: {mode} {out}", flush=True)
"""


def start_rank0_job(store_at: str, silence: float, limit: float, *modes: str) -> list:
    """Two gloo ranks (no DeepSpeed) whose rank-0-only work is each of ``modes`` in turn:
    slow, hung or frozen. ``store_at``: the rendezvous store in rank 0 (``rank0``) or in
    the calling process (``agent``; returned last, to be kept alive)."""
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    port = free_port()
    out: list[Any] = []
    if store_at == "agent":
        host = dist.TCPStore(
            "127.0.0.1", port, None, True, timedelta(seconds=60), wait_for_workers=False
        )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for rank in (0, 1):
        cmd = [sys.executable, "-c", RANK0_JOB, store_at, str(port), str(silence), str(limit)]
        out.append(
            subprocess.Popen(
                [*cmd, *modes],
                env={**env, "RANK": str(rank), "WORLD_SIZE": "2"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return [*out, host] if store_at == "agent" else out


def finish_rank0_job(procs: list) -> tuple[int, str, str, float]:
    """Rank 1's exit code and output, rank 0's output (rank 0 is killed once rank 1 has
    ended, as a launcher would) and how long rank 1 waited in its last phase."""
    rank0, rank1 = procs[:2]
    try:
        rc1 = rank1.wait(timeout=120)
    except subprocess.TimeoutExpired:
        rank1.kill()
        rank0.kill()
        pytest.fail(f"rank 1 still waits after 120 s:\n{rank1.communicate()[0][-4000:]}")
    if rank0.poll() is None:
        time.sleep(1.0)  # a hung rank 0 dumps its stacks at the limit: written by now
        rank0.kill()
    rank0.wait(timeout=30)
    out1 = rank1.stdout.read()
    took = [float(x) for x in re.findall(r"after ([\d.]+) s$", out1, re.M)]
    return rc1, out1, rank0.stdout.read(), (took or [math.nan])[-1]


@pytest.mark.slow
def test_rank0_only_work_is_bounded_with_a_clear_error() -> None:
    """Rank-0-only work (``run_on_main``), three 2-rank jobs at once: work longer than the
    heartbeat's silence bound goes on while rank 0 is alive; a hung rank 0 (alive) is given
    up at train.rank0_timeout_minutes; a frozen one (SIGSTOP) at the silence bound
    (train.collective_timeout_minutes), whether the rendezvous store is in its process
    (which then answers no call) or elsewhere (its heartbeat stops). The waiting rank exits
    1 naming the phase and why, with its threads' stacks; a hung rank 0 dumps where it is
    stuck."""
    jobs = {
        "hung": start_rank0_job("rank0", 1.5, 4.0, "slow", "hung"),
        "frozen": start_rank0_job("rank0", 3.0, 0.0, "frozen"),
        "frozen_agent": start_rank0_job("agent", 3.0, 0.0, "frozen"),
    }
    results = {name: finish_rank0_job(procs) for name, procs in jobs.items()}
    for name, (rc1, out1, _, _) in results.items():
        assert rc1 == 1, (name, out1)
        assert "Traceback" not in out1, (name, out1)
        phase = "a hung phase" if name == "hung" else "a frozen phase"
        assert f"stopped waiting for rank 0 ({phase})" in out1, (name, out1)
        assert f"rank 0 did not finish {phase}" in out1, (name, out1)
        assert "most recent call first" in out1 and "wait_for_key" in out1  # its stacks
    rc1, out1, out0, took = results["hung"]
    assert "rank 1: slow 42" in out1 and "rank 0: slow 42" in out0  # 3 s > 1.5 s silence
    assert "longer than train.rank0_timeout_minutes (0.0666667 min)" in out1, out1
    assert 4.0 <= took < 4.0 + 5, took
    assert "Timeout (0:00:04)!" in out0 and "in work" in out0, out0  # rank 0's own stacks
    rc1, out1, _, took = results["frozen"]
    assert "no heartbeat for 3 s (train.collective_timeout_minutes: 0.05 min)" in out1, out1
    assert 3.0 <= took < 3.0 + 5, took
    rc1, out1, _, took = results["frozen_agent"]
    assert "no heartbeat for 3 s (train.collective_timeout_minutes: 0.05 min)" in out1, out1
    assert 3.0 <= took < 3.0 + 5, took
    print("rank 1 gave up after: " + ", ".join(f"{k} {v[3]:.1f} s" for k, v in results.items()))


# ----------------------------------------------------------------------------- smaller gaps
def test_unknown_item_ids_and_an_empty_validation_split_are_named(
    synthetic_dir: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    from conkd_scale.data.corpus import load_dataset

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    first, *rest = (data / "train_data.jsonl").read_text().splitlines()
    conv = json.loads(first)
    conv["messages"][0]["text"] += " and @99999999"
    (data / "train_data.jsonl").write_text("\n".join([json.dumps(conv), *rest]) + "\n")
    (data / "valid_data.jsonl").write_text("")
    load_dataset("synthetic", data, kg="none", splits=("train", "valid"))
    err = capsys.readouterr().err
    assert f"warning: {data}/valid_data.jsonl: the valid split has no conversations" in err
    assert f"warning: {data}/train_data.jsonl: 1 mention(s) of 1 item id(s)" in err
    assert f"(e.g. @99999999 in conversation {conv['conversationId']})" in err


@pytest.mark.parametrize(
    "script",
    ["launch/distill.py", "launch/train_dialog_teacher.py"],
    ids=["distill", "dialog_teacher"],
)
def test_an_empty_training_split_is_a_clear_error_and_writes_nothing(
    script: str, synthetic_dir: Path, tmp_path: Path
) -> None:
    """The real entry script, one process: exit 2 naming the data directory, before the
    output directory is created and before a missing teacher is trained on the split."""
    import shutil
    import sys

    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(synthetic_dir, data)
    (data / "train_data.jsonl").write_text("")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [f"data_dir={data}", f"output_dir={out}"]
    if script == "launch/distill.py":
        args += ["student.preset=tiny", f"teachers.rec_dir={tmp_path}/rec"]
        args += [f"teachers.dialog_dir={tmp_path}/dialog"]
    else:
        args += ["model.preset=tiny"]
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert f"error: {data}: the training split has no conversations" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no output, no teacher


def test_a_training_split_without_recommender_turns_is_a_clear_error(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from conkd_scale.data.corpus import load_dataset
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.training.lm_recipe import LMRecipe
    from conkd_scale.utils.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    convs = [json.loads(x) for x in (data / "train_data.jsonl").read_text().splitlines()]
    for c in convs:  # every message from the seeker
        c["messages"] = [{**m, "senderWorkerId": c["initiatorWorkerId"]} for m in c["messages"]]
    (data / "train_data.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    corpus = load_dataset("synthetic", data, kg="none", splits=("train",))
    recipe = LMRecipe(DistillConfig(data_dir=str(data), output_dir=str(tmp_path / "out")), {})
    with pytest.raises(DataError, match="the training split has no recommender turn") as e:
        recipe._require_training_split(corpus)
    assert e.value.exit_code == 2 and str(data) in str(e.value)


@pytest.mark.parametrize("key", ["student", "model"])
def test_a_model_directory_without_config_json_is_a_clear_error(key: str, tmp_path: Path) -> None:
    """Named by the key the user set (the distillation job's student, D's model)."""
    from conkd_scale.config import build_config
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.training.dialog_teacher import DialogTeacherConfig
    from conkd_scale.utils.errors import ConfigError

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "pytorch_model.bin").write_bytes(b"")
    out = tmp_path / "out"
    cls = DistillConfig if key == "student" else DialogTeacherConfig
    with pytest.raises(ConfigError, match="the directory has no config.json") as e:
        build_config(cls, None, [f"{key}.pretrained={tmp_path}/model", f"output_dir={out}"])
    assert str(e.value).startswith(f"{key}.pretrained={tmp_path}/model: "), str(e.value)
    assert not out.exists()
