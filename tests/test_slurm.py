"""The SLURM job scripts (slurm/*.sh) on a real single-node cluster, 2 CPU ranks (gloo).

    tests/cluster/start_slurm.sh && .venv/bin/python -m pytest -q tests/test_slurm.py

Skipped, with the reason, where ``sbatch`` is not on PATH or no cluster answers (start one
with tests/cluster/start_slurm.sh). Jobs run with ``--gpus-per-node=0 --ntasks-per-node=2
--cpus-per-task=1``: the CPU-node form of the scripts. Jobs are polled with
``scontrol show job`` (no accounting, and ``sbatch --wait`` polls slowly).

- a module fixture trains tiny teachers with slurm/teachers.sh (R, then D on 2 ranks);
- slurm/distill.sh completes: checkpoints, metrics.jsonl, exported student, ranks from SLURM_*;
- pre-emption: SIGUSR1 to the batch shell -> checkpoint -> requeue -> resume -> completion,
  and the logged steps of both runs join with no gap and no repeat;
- a rank killed mid-training (SIGKILL) ends the whole job as FAILED, quickly, with no requeue.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
# the CPU form of the scripts: 2 gloo ranks on one node (the test cluster has no GPUs)
CPU_JOB = [
    "--nodes=1",
    "--gpus-per-node=0",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--time=30",
]


def _cluster_reason() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (a test cluster: tests/cluster/start_slurm.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        if "is UP" not in ping.stdout:
            return (
                f"no SLURM controller answers (scontrol ping: {ping.stdout.strip()!r}); "
                "start one with tests/cluster/start_slurm.sh"
            )
        nodes = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        return f"SLURM not usable: {e}"
    if not any(s.rstrip("*~#").startswith(("idle", "mix", "alloc")) for s in nodes):
        return f"no usable SLURM node (sinfo states: {nodes})"
    return None


_REASON = _cluster_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


# ----------------------------------------------------------------------------- helpers
def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


class Jobs:
    """Submits jobs, remembers them (cancelled at the end of the module if still active)."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.logs: dict[str, Path] = {}

    def submit(
        self, script: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> str:
        log_dir.mkdir(parents=True, exist_ok=True)  # the --output dir must exist
        name = f"conkd-test-{Path(script).stem}"
        cmd = [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--output={log_dir}/%x-%j.out",
            *CPU_JOB,
            script,
            *args,
        ]
        full_env = {**os.environ, "CONKD_PYTHON": sys.executable, **(env or {})}
        proc = subprocess.run(
            cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
        job_id = proc.stdout.strip().split(";")[0]
        self.submitted.append(job_id)
        self.logs[job_id] = log_dir / f"{name}-{job_id}.out"
        return job_id

    def log(self, job_id: str, tail: int = 6000) -> str:
        path = self.logs[job_id]
        text = path.read_text(errors="replace") if path.exists() else f"(no log at {path})"
        lines = [x for x in text.splitlines() if "Warning" not in x and "return func" not in x]
        return "\n".join(lines)[-tail:]

    def wait(self, job_id: str, timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Poll ``scontrol show job`` until a terminal state; cancel the job on timeout."""
        t_end = time.monotonic() + timeout
        while True:
            info = job_info(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            if time.monotonic() > t_end:
                subprocess.run(["scancel", job_id], timeout=30)
                pytest.fail(
                    f"job {job_id} not finished after {timeout:.0f} s (state "
                    f"{info.get('JobState')}):\n{self.log(job_id)}"
                )
            time.sleep(poll)

    def cancel_active(self) -> None:
        for job_id in self.submitted:
            if job_info(job_id).get("JobState") not in TERMINAL:
                subprocess.run(["scancel", job_id], timeout=30)


def wait_for_train_row(jobs: Jobs, job_id: str, metrics: Path, timeout: float) -> None:
    """Until the job has logged a training step (every rank is inside Trainer.train)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            return  # (append_jsonl writes json.dumps lines, one write call each)
        state = job_info(job_id).get("JobState")
        if state in TERMINAL:
            pytest.fail(f"job {job_id} ended ({state}) before training:\n{jobs.log(job_id)}")
        time.sleep(0.25)
    pytest.fail(f"job {job_id}: no training step after {timeout:.0f} s:\n{jobs.log(job_id)}")


def rows(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("kind") == kind]


def assert_completed(jobs: Jobs, job_id: str, info: dict[str, str]) -> None:
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job_id}: {info.get('JobState')} {info.get('ExitCode')}\n{jobs.log(job_id)}"
    )


@pytest.fixture(scope="module")
def jobs():
    j = Jobs()
    yield j
    j.cancel_active()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, synthetic_dir, jobs) -> Path:
    """Tiny R and D trained once by slurm/teachers.sh (R: 1 process; D: 2 ranks)."""
    root = tmp_path_factory.mktemp("slurm")
    job = jobs.submit(
        "slurm/teachers.sh",
        [
            "dataset=synthetic",
            f"data_dir={synthetic_dir}",
            "--rec",
            "epochs=1",
            "progress=false",
            "--dialog",
            "--deepspeed",
            "ds_configs/zero3.json",
            "model.preset=tiny",
            "model.vocab_size=500",
            "train.max_steps=8",
            "train.eval_every=0",
            "train.eval_max_batches=1",
            "train.lr=5e-3",
            "max_length=128",
            "max_train_conversations=60",
            "train.progress=false",
        ],
        root / "logs",
        env={"CONKD_TEACHERS_DIR": str(root / "teachers")},
    )
    assert_completed(jobs, job, jobs.wait(job, timeout=800))
    assert (root / "teachers" / "rec" / "checkpoint" / "rec_teacher.pt").is_file()
    assert (root / "teachers" / "dialog" / "hf" / "config.json").is_file()
    return root


def distill_args(root: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--deepspeed",
        "ds_configs/zero3.json",
        f"data_dir={data}",
        f"teachers.rec_dir={root}/teachers/rec",
        f"teachers.dialog_dir={root}/teachers/dialog",
        "teachers.auto_train=false",
        "max_length=128",
        "max_train_conversations=60",
        "train.progress=false",
        "train.log_every=1",
        "train.micro_batch=4",
        "student.preset=tiny",
        "student.dropout=0",
        "train.eval_every=0",
        "train.eval_max_batches=1",
        f"output_dir={out}",
        *extra,
    ]


# ----------------------------------------------------------------------------- tests
def test_distill_job_completes(teachers, synthetic_dir, jobs):
    out = teachers / "a"
    job = jobs.submit(
        "slurm/distill.sh",
        distill_args(teachers, synthetic_dir, out, "train.max_steps=4", "train.save_every=2"),
        teachers / "logs",
    )
    assert_completed(jobs, job, jobs.wait(job, timeout=600))
    info = json.loads((out / "run_info.json").read_text())
    # ranks from SLURM_PROCID/SLURM_NTASKS (srun --mpi=none), not MPI discovery
    assert info["launcher"] == "slurm" and info["world_size"] == 2, info
    assert [r["step"] for r in rows(out, "train")] == [1, 2, 3, 4]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]
    assert all((out / "checkpoints" / c / "meta.json").is_file() for c in ckpts)
    assert (out / "hf" / "config.json").is_file()
    assert list((out / "hf").glob("*.safetensors")) or list((out / "hf").glob("*.bin"))
    log = jobs.log(job)
    assert "2 rank(s)" in log and "done" in log, log


def test_preemption_saves_requeues_and_resumes(teachers, synthetic_dir, jobs):
    out = teachers / "pre"
    total = 60
    job = jobs.submit(
        "slurm/distill.sh",
        distill_args(
            teachers, synthetic_dir, out, f"train.max_steps={total}", "train.save_every=25"
        ),
        teachers / "logs",
    )
    wait_for_train_row(jobs, job, out / "metrics.jsonl", timeout=600)
    # what `#SBATCH --signal=B:USR1@300` does before the time limit: SIGUSR1 to the batch shell
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = jobs.wait(job, timeout=600)
    assert_completed(jobs, job, info)
    assert info.get("Restarts") == "1", info
    log = jobs.log(job, tail=20000)
    (pre,) = rows(out, "preempted")
    k = pre["step"]
    assert 1 <= k < total, pre
    assert "pre-empted (exit 75): requeueing" in log, log
    assert f"at step {k} " in log and "resumed from" in log, log
    # the two runs' steps join: each step exactly once, no gap, no repeat
    assert [r["step"] for r in rows(out, "train")] == list(range(1, total + 1))
    (final,) = rows(out, "final")
    assert final["step"] == total and final["stopped_early"] is False
    assert (out / "hf" / "config.json").is_file()


def _rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of one rank's Python process of a job (from /proc/*/environ)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        in_step = any(x.startswith(b"SLURM_STEP_ID=") for x in env)  # not the batch shell
        if want <= env and in_step and b"launch/distill.py" in cmd and not cmd.startswith(b"srun"):
            return int(proc.name)
    return None


def test_killed_rank_fails_the_job_quickly(teachers, synthetic_dir, jobs):
    out = teachers / "kill"
    job = jobs.submit(
        "slurm/distill.sh",
        distill_args(teachers, synthetic_dir, out, "train.max_steps=100000"),
        teachers / "logs",
    )
    wait_for_train_row(jobs, job, out / "metrics.jsonl", timeout=600)
    pid = _rank_pid(job, 1)
    assert pid is not None, f"rank 1 of job {job} not found\n{jobs.log(job)}"
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    info = jobs.wait(job, timeout=120, poll=0.5)
    took = time.monotonic() - t0
    assert info["JobState"] == "FAILED", f"{info}\n{jobs.log(job)}"
    assert info.get("Restarts") == "0", info  # a crash is not a pre-emption: no requeue
    assert took < 120
    for _ in range(20):  # the step's processes are gone with the job
        if _rank_pid(job, 0) is None:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"rank 0 of job {job} outlived the job")
    print(f"rank 1 killed -> job {job} FAILED after {took:.1f} s")
