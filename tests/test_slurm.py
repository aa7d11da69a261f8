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
- slurm/sweep.sh: an array task distils the preset its index names;
- launch/scaling_study.py --launcher slurm: a manifest array through slurm/sweep.sh;
- a rank killed mid-training (SIGKILL) ends the whole job as FAILED, quickly, with no requeue.

The trainer's side of pre-emption (conkd_scale/training/preemption.py) is also tested in this
process, without a cluster (always runs).
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
import torch

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
            said = (ping.stdout.strip() or ping.stderr.strip() or "nothing").splitlines()[0]
            return (
                f"no SLURM cluster up (scontrol ping: {said}); "
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
needs_cluster = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def cluster_test(fn):
    for mark in needs_cluster:
        fn = mark(fn)
    return fn


# ----------------------------------------------------------------------------- helpers
def job_info(job_id: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``scontrol show job`` as a dict (``env``: e.g. another cluster's SLURM_CONF)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


class Jobs:
    """Submits jobs, remembers them (cancelled at the end of the module if still active).

    ``opts``: the sbatch options of every job; ``env``: added to the environment of every
    SLURM command and job (e.g. ``SLURM_CONF`` of another cluster).
    """

    def __init__(self, opts: list[str] = CPU_JOB, env: dict[str, str] | None = None) -> None:
        self.submitted: list[str] = []
        self.logs: dict[str, Path] = {}
        self.opts = list(opts)
        self.env = dict(env or {})

    def info(self, job_id: str) -> dict[str, str]:
        return job_info(job_id, self.env)

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], timeout=30, env={**os.environ, **self.env})

    def submit(
        self,
        script: str,
        args: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> str:
        log_dir.mkdir(parents=True, exist_ok=True)  # the --output dir must exist
        name = f"conkd-test-{Path(script).stem}"
        cmd = [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--output={log_dir}/%x-%j.out",
            *self.opts,
            *extra,
            script,
            *args,
        ]
        full_env = {**os.environ, **self.env, "CONKD_PYTHON": sys.executable, **(env or {})}
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
            info = self.info(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            if time.monotonic() > t_end:
                self.scancel(job_id)
                pytest.fail(
                    f"job {job_id} not finished after {timeout:.0f} s (state "
                    f"{info.get('JobState')}):\n{self.log(job_id)}"
                )
            time.sleep(poll)

    def cancel_active(self) -> None:
        for job_id in self.submitted:
            if self.info(job_id).get("JobState") not in TERMINAL:
                self.scancel(job_id)


def wait_for_train_row(
    jobs: Jobs, job_id: str, metrics: Path, timeout: float, after_step: int = 0
) -> None:
    """Until the job has logged a training step > ``after_step`` (so every rank is inside
    Trainer.train, past the point where it installs its pre-emption handler)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if any(s > after_step for s in _train_steps(metrics)):
            return
        state = jobs.info(job_id).get("JobState")
        if state in TERMINAL:
            pytest.fail(f"job {job_id} ended ({state}) before training:\n{jobs.log(job_id)}")
        time.sleep(0.25)
    pytest.fail(f"job {job_id}: no training step after {timeout:.0f} s:\n{jobs.log(job_id)}")


def rows(out: Path, kind: str) -> list[dict]:
    """The ``kind`` rows of OUT/metrics.jsonl (a line still being written is skipped)."""
    path, found = out / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == kind:
            found.append(row)
    return found


def _train_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in rows(metrics.parent, "train")]


def assert_completed(jobs: Jobs, job_id: str, info: dict[str, str]) -> None:
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job_id}: {info.get('JobState')} {info.get('ExitCode')}\n{jobs.log(job_id)}"
    )


@pytest.fixture(scope="module")
def jobs():
    j = Jobs()
    yield j
    j.cancel_active()


def train_teachers(jobs: Jobs, synthetic_dir: Path, root: Path) -> None:
    """Tiny R and D trained by slurm/teachers.sh into ``root/teachers`` (logs in ``root/logs``)."""
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


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, synthetic_dir, jobs) -> Path:
    """Tiny R and D trained once by slurm/teachers.sh (R: 1 process; D: 2 ranks)."""
    root = tmp_path_factory.mktemp("slurm")
    train_teachers(jobs, synthetic_dir, root)
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
@cluster_test
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


@cluster_test
def test_cache_job_then_offline_distillation_after_it(teachers, synthetic_dir, jobs):
    """slurm/cache.sh writes the teacher cache on 2 ranks; slurm/distill.sh, submitted with
    --dependency=afterok on it, distils from that cache without loading D."""
    from conkd_scale.cache.manifest import read_manifest

    cache, out = teachers / "cache_b", teachers / "b"
    common = distill_args(teachers, synthetic_dir, out, f"teachers.cache_dir={cache}")
    cache_job = jobs.submit(
        "slurm/cache.sh",
        ["--deepspeed", "ds_configs/zero3_inference.json", *common[2:]],
        teachers / "logs",
    )
    job = jobs.submit(
        "slurm/distill.sh",
        [*common, "teachers.mode=offline", "train.max_steps=2"],
        teachers / "logs",
        extra=(f"--dependency=afterok:{cache_job}",),
    )
    assert_completed(jobs, cache_job, jobs.wait(cache_job, timeout=600))
    man = read_manifest(cache)
    assert man is not None and man["complete"], man
    assert man["shards"] and all((cache / "shards" / n).is_file() for n in man["shards"])
    assert "2 rank(s)" in jobs.log(cache_job)
    assert_completed(jobs, job, jobs.wait(job, timeout=600))
    info = json.loads((out / "run_info.json").read_text())
    assert info["teacher_mode"] == "offline" and info["world_size"] == 2, info
    assert [r["step"] for r in rows(out, "train")] == [1, 2]
    assert (out / "hf" / "config.json").is_file()


@cluster_test
def test_preemption_saves_requeues_and_resumes(teachers, synthetic_dir, jobs):
    """Two pre-emptions of one job, both routes: (1) SIGUSR1 to the batch shell, as
    ``#SBATCH --signal=B:USR1@300`` sends it, forwarded to every rank; (2) SIGUSR1 to rank 1
    alone (the ranks agree through the all-reduce; the shell requeues on exit code 75)."""
    out = teachers / "pre"
    total = 80
    job = jobs.submit(
        "slurm/distill.sh",
        distill_args(
            teachers, synthetic_dir, out, f"train.max_steps={total}", "train.save_every=30"
        ),
        teachers / "logs",
    )
    metrics = out / "metrics.jsonl"
    wait_for_train_row(jobs, job, metrics, timeout=600)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    # the requeued run: once it trains again, pre-empt it through one rank only
    t_end = time.monotonic() + 600
    while not rows(out, "preempted") or job_info(job).get("Restarts") != "1":
        assert time.monotonic() < t_end, f"no first pre-emption:\n{jobs.log(job)}"
        time.sleep(0.5)
    k1 = rows(out, "preempted")[0]["step"]
    wait_for_train_row(jobs, job, metrics, timeout=600, after_step=k1)
    pid = _rank_pid(job, 1)
    assert pid is not None, f"rank 1 of job {job} not found\n{jobs.log(job)}"
    os.kill(pid, signal.SIGUSR1)

    info = jobs.wait(job, timeout=600)
    assert_completed(jobs, job, info)
    assert info.get("Restarts") == "2", info
    log = jobs.log(job, tail=30000)
    assert log.count("pre-empted (exit 75): requeueing") == 2, log
    ks = [r["step"] for r in rows(out, "preempted")]
    assert len(ks) == 2 and 1 <= ks[0] < ks[1] < total, ks
    for k in ks:
        assert f"resumed from {out}/checkpoints/step_{k:08d} at step {k} " in log, log
    # the three runs' steps join: each step exactly once, no gap, no repeat
    assert _train_steps(metrics) == list(range(1, total + 1))
    (final,) = rows(out, "final")
    assert final["step"] == total and final["stopped_early"] is False
    assert (out / "hf" / "config.json").is_file()


@cluster_test
def test_sweep_array_task_distils_its_preset(teachers, synthetic_dir, jobs):
    """Array index -> preset: index 1 of "none tiny" distils student.preset=tiny."""
    sweep = teachers / "sweep"
    args = distill_args(teachers, synthetic_dir, sweep / "ignored", "train.max_steps=2")
    args = [a for a in args if not a.startswith(("output_dir=", "student.preset="))]
    job = jobs.submit(
        "slurm/sweep.sh",
        args,
        teachers / "logs",
        env={"CONKD_SWEEP_PRESETS": "none tiny", "CONKD_SWEEP_DIR": str(sweep)},
        extra=("--array=1",),
    )
    assert_completed(jobs, job, jobs.wait(job, timeout=600))
    out = sweep / "student_tiny"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["student"]["preset"] == "tiny" and cfg["teachers"]["auto_train"] is False
    assert [r["step"] for r in rows(out, "train")] == [1, 2]
    assert (out / "hf" / "config.json").is_file()
    assert sorted(p.name for p in sweep.iterdir()) == ["student_tiny"]


def study_config(out: Path, teachers_dir: Path, data: Path, *extra: str):
    """A one-size study on the cluster, in the CPU form of the scripts."""
    from conkd_scale.config import build_config
    from conkd_scale.scaling.config import StudyConfig

    return build_config(
        StudyConfig,
        None,
        [
            "sizes=tiny",
            "dataset=synthetic",
            f"data_dir={data}",
            f"output_dir={out}",
            f"teachers_dir={teachers_dir}",
            "launcher=slurm",
            "max_turns=12",
            "poll_s=2",
            "sbatch=" + ",".join(CPU_JOB),
            "distill=max_length=128,max_train_conversations=60,train.micro_batch=4,"
            "train.max_steps=2,train.eval_every=2,train.eval_max_batches=1",
            "evaluate=generation.max_new_tokens=8",
            *extra,
        ],
    )


@cluster_test
def test_scaling_study_on_slurm(teachers, synthetic_dir):
    """launch/scaling_study.py --launcher slurm: the manifest array (a student distilled on
    2 ranks then evaluated, and D's gate trace) runs through slurm/sweep.sh, and the study
    analyses it once the queue is empty. A teacher override holding a comma reaches the
    distillation job whole."""
    from conkd_scale.scaling.sweep import Study

    out = teachers / "study"
    nested = 'dialog=["train.adam_betas=0.9,0.95"]'
    cfg = study_config(out, teachers / "teachers", synthetic_dir, "gates=hard", nested)
    study = Study(cfg)
    assert [j.name for j in study.pending()] == ["tiny-hard", "teacher-dialog"]
    assert not any(j.trains_teachers for j in study.pending())  # teachers exist: one array
    summary = study.run()
    assert summary is not None and [r["name"] for r in summary["runs"]] == ["tiny-hard"]
    logs = sorted((out / "logs").glob("conkd-study-*.out"))
    assert len(logs) == 2, logs  # one log per array task
    text = "\n".join(p.read_text() for p in logs)
    assert "sweep task 0 of" in text and "sweep task 1 of" in text
    cfg_run = json.loads((out / "runs" / "tiny-hard" / "config.json").read_text())
    assert cfg_run["student"]["preset"] == "tiny" and cfg_run["loss"]["gate"]["mode"] == "hard"
    assert cfg_run["teachers"]["dialog_overrides"] == ["train.adam_betas=0.9,0.95", "train.seed=0"]
    assert (out / "report.md").is_file() and (out / "figures" / "lambda_hist.png").is_file()
    assert Study(cfg).pending() == []  # a second invocation would only analyse


@cluster_test
def test_scaling_study_on_slurm_ends_when_a_teacher_job_fails(teachers, synthetic_dir):
    """The first run trains the missing teachers and fails (a bad R setting): the array that
    depends on it is cancelled instead of pending forever, and the study stops with an
    error that names the unfinished runs."""
    from conkd_scale.scaling.sweep import Study

    out = teachers / "study_failed"
    cfg = study_config(out, out / "no_teachers", synthetic_dir, "gates=hard,soft", "rec=epochs=x")
    study = Study(cfg)
    assert [j.trains_teachers for j in study.pending()] == [True, True, False]
    submitted: list[str] = []
    submit = study.submit_slurm

    def recording_submit() -> list[str]:
        submitted.extend(submit())
        return submitted

    study.submit_slurm = recording_submit
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"runs not finished: \['tiny-hard', 'tiny-soft'"):
        study.run()
    took = time.monotonic() - t0
    assert len(submitted) == 2, submitted  # the teacher-training run, then the rest
    seed, rest = (job_info(j) for j in submitted)
    assert seed.get("JobState") == "FAILED", seed
    assert rest.get("JobState") == "CANCELLED", rest
    assert "DependencyNeverSatisfied" in rest.get("Reason", ""), rest
    print(f"teacher job failed -> dependent array cancelled, study ended after {took:.0f} s")


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


@cluster_test
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


@cluster_test
def test_invalid_config_fails_the_job_with_exit_code_2(tmp_path, jobs):
    """A config error ends every rank with 2, but srun --kill-on-bad-exit reports the rank
    it terminated (143) once the first has exited: the job script reports the first rank's
    code. Rank 1 is held back 5 s (a slow start), so that srun always terminates it."""
    slow = tmp_path / "python"
    slow.write_text(
        f'#!/bin/bash\n[[ ${{SLURM_PROCID:-0}} == 1 ]] && sleep 5\nexec {sys.executable} "$@"\n'
    )
    slow.chmod(0o755)
    out = tmp_path / "out"
    job = jobs.submit(
        "slurm/distill.sh",
        ["train.micro_batch=0", f"output_dir={out}"],
        tmp_path / "logs",
        env={"CONKD_PYTHON": str(slow)},
    )
    info = jobs.wait(job, timeout=300, poll=0.5)
    log = jobs.log(job)
    assert info["JobState"] == "FAILED" and info.get("ExitCode") == "2:0", f"{info}\n{log}"
    assert info.get("Restarts") == "0", info
    assert "error: train.micro_batch: expected >= 1, got 0" in log, log
    assert "step exited with 143" in log, log  # what srun said: the fix below applied
    assert "the first rank to fail, rank 0, exited with 2" in log, log
    assert not out.exists() and not list((ROOT / "slurm" / "logs").glob(f".exit-{job}-*"))


# ----------------------------------------------------------------------------- no cluster
class _FakeEngine(torch.nn.Module):
    """The part of a DeepSpeed engine the Trainer uses (one process, no process group)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.device = torch.device("cpu")

    def gradient_accumulation_steps(self) -> int:
        return 1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass

    def get_lr(self) -> list[float]:
        return [1e-3]

    def save_checkpoint(self, root: str, tag: str, **_: object) -> None:
        Path(root, tag).mkdir(parents=True, exist_ok=True)

    def load_checkpoint(self, root: str, tag: str, **_: object) -> tuple[str, dict]:
        return str(Path(root, tag)), {}


def test_preemption_signal_saves_exits_75_and_resumes(tmp_path, monkeypatch):
    """SIGUSR1 during step 3 -> checkpoint at step 3, SystemExit(75); a new Trainer resumes
    at step 4 and the logged steps join (the in-process half of the cluster test above)."""
    from conkd_scale.data.sequences import IGNORE, EncodedSequence
    from conkd_scale.distributed import DistInfo
    from conkd_scale.training import preemption
    from conkd_scale.training.config import TrainConfig
    from conkd_scale.training.data import sequence_collate
    from conkd_scale.training.trainer import Trainer

    monkeypatch.setattr(preemption, "_state", {"flag": False, "signum": None, "installed": ()})
    monkeypatch.delenv(preemption.ENV_SIGNALS, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    data = [
        EncodedSequence(str(i), [i + 3] * 4, [IGNORE] + [i + 3] * 3, [-1] * 4, []) for i in range(8)
    ]
    cfg = TrainConfig(micro_batch=2, log_every=1, progress=False, warmup_steps=1)
    dist = DistInfo(0, 1, 0, 1, "gloo", torch.device("cpu"), "single")
    calls = []

    def loss_step(engine, batch):
        calls.append(1)
        if len(calls) == 3:  # the signal arrives in the middle of step 3
            os.kill(os.getpid(), signal.SIGUSR1)
        return (engine.w - 1) ** 2, {}

    def trainer() -> Trainer:
        t = Trainer(
            _FakeEngine(),
            train_data=data,
            eval_data=None,
            collate_fn=sequence_collate(0),
            cfg=cfg,
            dist=dist,
            out_dir=tmp_path,
            total_steps=6,
            loss_step=loss_step,
        )
        t.resume()
        return t

    try:
        with pytest.raises(SystemExit) as exc:
            trainer().train()
        assert exc.value.code == preemption.EXIT_PREEMPTED == 75
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a peer's exit can't kill it
        assert (tmp_path / "checkpoints" / "step_00000003" / "meta.json").is_file()
        preemption.reset()
        t = trainer()
        assert t.step == 3
        summary = t.train()
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert summary["step"] == 6 and not summary["stopped_early"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    got = [(r["kind"], r["step"]) for r in map(json.loads, lines) if r["kind"] != "final"]
    assert got == [("train", 1), ("train", 2), ("train", 3), ("preempted", 3)] + [
        ("train", s) for s in (4, 5, 6)
    ]


def test_each_rank_records_its_exit_code_and_the_script_picks_the_first_failure(
    tmp_path, monkeypatch
):
    """The two halves of the job scripts' exit code (no cluster): launch_main writes the
    rank's code into CONKD_EXIT_DIR; slurm/common.sh picks the earliest non-zero one."""
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.launching import launch_main

    monkeypatch.setenv("CONKD_EXIT_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.delenv("RANK", raising=False)
    assert launch_main(None, DistillConfig, None, ["train.micro_batch=0"]) == 2
    code, stamp = (tmp_path / "rank1").read_text().split()
    assert code == "2" and abs(float(stamp) - time.time()) < 60
    (tmp_path / "rank0").write_text(f"143 {float(stamp) + 1}\n")  # terminated after rank 1
    (tmp_path / "rank2").write_text(f"0 {float(stamp) - 1}\n")  # a success is no failure
    pick = 'source slurm/common.sh; _conkd_first_failure "$1"'
    run = subprocess.run(
        ["bash", "-c", pick, "_", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert run.stdout.strip() == "2 rank 1", run
    for f in tmp_path.iterdir():
        f.write_text("0 1.0\n")
    run = subprocess.run(
        ["bash", "-c", pick, "_", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert run.stdout == "" and run.returncode == 0, run


def test_preemption_signals_from_env():
    from conkd_scale.training.preemption import signals_from_env

    assert signals_from_env({}) == [signal.SIGTERM, signal.SIGUSR1]
    assert signals_from_env({"CONKD_PREEMPT_SIGNALS": "none"}) == []
    assert signals_from_env({"CONKD_PREEMPT_SIGNALS": "usr2, SIGUSR1"}) == [
        signal.SIGUSR2,
        signal.SIGUSR1,
    ]
    with pytest.raises(ValueError, match="CONKD_PREEMPT_SIGNALS"):
        signals_from_env({"CONKD_PREEMPT_SIGNALS": "NOPE"})


class _FakeSlurm:
    """``subprocess.run`` for sbatch/squeue/scancel: records the commands; squeue answers
    with the given outputs in turn (then an empty queue)."""

    def __init__(self, squeue: list[str]) -> None:
        self.squeue = list(squeue)
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        self.calls.append(list(cmd))
        out = {"sbatch": str(100 + len(self.calls)), "squeue": ""}.get(cmd[0], "")
        if cmd[0] == "squeue" and self.squeue:
            out = self.squeue.pop(0)
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")


def test_study_submits_teacher_runs_first_and_kills_dependents_of_a_failure(
    tmp_path, synthetic_dir, monkeypatch
):
    """No teachers yet: the first run (which trains them) goes alone; the rest follow as one
    array that depends on it and is cancelled if it fails (no cluster needed)."""
    from conkd_scale.scaling import sweep
    from conkd_scale.scaling.manifest import manifest_args

    cfg = study_config(tmp_path / "s", tmp_path / "t", synthetic_dir, "gates=hard,soft")
    fake = _FakeSlurm([])
    monkeypatch.setattr(sweep.subprocess, "run", fake)
    assert sweep.Study(cfg).submit_slurm() == ["101", "102"]
    first, rest = fake.calls
    assert "--array=0" in first and not any(a.startswith("--dependency") for a in first)
    assert "--array=1,2" in rest and "--dependency=afterok:101" in rest
    assert "--kill-on-invalid-dep=yes" in rest
    dargs = manifest_args(tmp_path / "s" / "logs" / "manifest.jsonl", 0, "distill")
    assert 'teachers.dialog_overrides=["train.seed=0"]' in dargs


def test_wait_slurm_cancels_jobs_whose_dependency_failed(tmp_path, synthetic_dir, monkeypatch):
    """A chain 101 -> 102 -> 103 where 101 failed: 102 is cancelled, then 103 (now waiting on
    a cancelled job), and the wait ends when the queue is empty (no cluster needed)."""
    from conkd_scale.scaling import sweep

    cfg = study_config(tmp_path / "s", tmp_path / "t", synthetic_dir, "gates=hard", "poll_s=0")
    fake = _FakeSlurm(
        [
            "102 PENDING DependencyNeverSatisfied\n103 PENDING Dependency",
            "103 PENDING DependencyNeverSatisfied",
        ]
    )
    monkeypatch.setattr(sweep.subprocess, "run", fake)
    sweep.Study(cfg).wait_slurm(["101", "102", "103"])
    assert [c for c in fake.calls if c[0] == "scancel"] == [["scancel", "102"], ["scancel", "103"]]
    assert sum(c[0] == "squeue" for c in fake.calls) == 3
