"""Run a scaling study's students: locally one after another, or as a SLURM job array.

Each run distils one (size, variant, seed) student and evaluates it; one more job evaluates
D for its gate trace (layout of ``OUT``: conkd_scale/scaling/config.py; arguments:
conkd_scale/jobs.py). A study started again skips finished runs, and a distillation whose
``hf/`` exists is not trained again (an interrupted one resumes from its newest checkpoint)
unless its recorded settings differ from the study's (:mod:`~conkd_scale.scaling.reuse`:
then the study stops before running anything).

SLURM: the unfinished runs go into ``logs/manifest.jsonl`` and ``slurm/sweep.sh`` runs line
``$SLURM_ARRAY_TASK_ID``. Runs that would train a missing teacher are submitted first, one
after another; the rest follow as one array that depends on them. Jobs whose dependency
failed are cancelled, so waiting for the queue always ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conkd_scale.jobs import (
    cache_args,
    deepspeed_command,
    distill_args,
    evaluate_args,
    python_command,
    student_trained,
    teachers_ready,
)
from conkd_scale.scaling.config import TEACHER_EVAL, TEACHER_ROW, StudyConfig, StudyRun
from conkd_scale.scaling.manifest import write_manifest
from conkd_scale.scaling.report import write_report
from conkd_scale.scaling.reuse import check_reusable
from conkd_scale.utils.io import write_json
from conkd_scale.utils.procs import ROOT, run_logged

TRACE = ("gate_trace=true", "generation.progress=false")  # evaluate.py: every study evaluation
NEVER_SATISFIED = "DependencyNeverSatisfied"  # squeue's reason for a job whose dependency failed


@dataclass(frozen=True)
class Job:
    """One unit of work: a student (distil + evaluate) or D's evaluation alone."""

    name: str
    distill: list[str] | None  # launch/distill.py arguments (None: nothing to train)
    evaluate: list[str]  # launch/evaluate.py arguments
    teachers: tuple[Path, Path]  # (R dir, D dir) the job reads
    trains_teachers: bool  # a teacher it needs is missing (it trains it)
    cache: list[str] | None = None  # launch/cache_teachers.py arguments: its teacher cache
    # is not built yet (the job builds it first; it also trains missing teachers)


class Study:
    """A scaling study's runs; :meth:`run` executes the unfinished ones."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.walls: dict[str, float] = {}

    # ------------------------------------------------------------------ jobs
    def _distill_args(self, run: StudyRun) -> list[str]:
        cfg = self.cfg
        rec_dir, dialog_dir = cfg.teacher_dirs(run.row)
        student = list(run.student) or [f"student.preset={run.size}"]
        extra = [*student, "train.progress=false"]
        return distill_args(
            cfg,
            run.row,
            out=cfg.run_dir(run),
            rec_dir=rec_dir,
            dialog_dir=dialog_dir,
            extra=extra,
            seed=run.seed,
            cache_dir=cfg.teachers / "cache" / f"{run.row.rec}-{run.row.dialog}",
        )

    def _student_job(self, run: StudyRun) -> Job:
        cfg = self.cfg
        teachers = cfg.teacher_dirs(run.row)
        out = cfg.run_dir(run)
        trained = student_trained(out)
        dargs = self._distill_args(run)
        eval_out = cfg.eval_dir(run.name)
        eargs = evaluate_args(
            cfg, run.row, out=eval_out, model=out / "hf", rec_dir=teachers[0], extra=TRACE
        )
        trains = not trained and not teachers_ready(*teachers)
        cache = None if trained else cache_args(dargs)
        return Job(run.name, None if trained else dargs, eargs, teachers, trains, cache)

    def jobs(self) -> list[Job]:
        """Every job of the study, in order: students (smallest first), then D's trace."""
        cfg = self.cfg
        jobs = [self._student_job(run) for run in cfg.runs()]
        rec_dir, dialog_dir = cfg.teacher_dirs(TEACHER_ROW)
        eval_out = cfg.eval_dir(TEACHER_EVAL)
        eargs = evaluate_args(
            cfg, TEACHER_ROW, out=eval_out, model=dialog_dir / "hf", rec_dir=rec_dir, extra=TRACE
        )
        jobs.append(Job(TEACHER_EVAL, None, eargs, (rec_dir, dialog_dir), False))
        return jobs

    def check_reuse(self) -> None:
        """Refuse to reuse a trained student whose settings differ from this study's."""
        for run in self.cfg.runs():
            if student_trained(self.cfg.run_dir(run)):
                check_reusable(run.name, self.cfg.run_dir(run), self._distill_args(run))

    def pending(self) -> list[Job]:
        return [j for j in self.jobs() if not self.cfg.finished(j.name)]

    # ------------------------------------------------------------------ local
    def run_local(self) -> None:
        """Each unfinished job in turn: ``deepspeed`` distillation, then evaluation."""
        from tqdm.auto import tqdm

        logs = self.cfg.logs
        bar = tqdm(self.jobs(), desc="scaling study", unit="run")
        for job in bar:
            bar.set_postfix_str(job.name)
            if self.cfg.finished(job.name):
                tqdm.write(f"{job.name}: finished before, skipped")
                continue
            if job.distill is not None:
                cargs = cache_args(job.distill)  # an earlier job may have built it
                if cargs is not None:
                    cmd = deepspeed_command(self.cfg.nproc, "launch/cache_teachers.py", cargs)
                    log = logs / f"{job.name}.cache.log"
                    self.walls[f"{job.name}/cache"] = run_logged(cmd, log)
                cmd = deepspeed_command(self.cfg.nproc, "launch/distill.py", job.distill)
                self.walls[f"{job.name}/train"] = run_logged(cmd, logs / f"{job.name}.log")
            cmd = python_command("launch/evaluate.py", job.evaluate)
            self.walls[f"{job.name}/eval"] = run_logged(cmd, logs / f"{job.name}.eval.log")
            tqdm.write(f"{job.name}: done")

    # ------------------------------------------------------------------ slurm
    def submit_slurm(self) -> list[str]:
        """Submit the unfinished jobs (those that train teachers or build a teacher cache
        first, chained, one per (R, D) pair); job ids."""
        jobs = self.pending()
        if not jobs:
            return []
        seeds: list[int] = []
        covered: set[tuple[Path, Path]] = set()
        for n, j in enumerate(jobs):
            if (j.trains_teachers or j.cache) and j.teachers not in covered:
                seeds.append(n)
                covered.add(j.teachers)
        manifest = write_manifest(  # only the first job of a pair builds its cache
            self.cfg.logs / "manifest.jsonl",
            [
                (j.name, j.distill, j.evaluate, j.cache if n in seeds else None)
                for n, j in enumerate(jobs)
            ],
        )
        rest = [n for n in range(len(jobs)) if n not in seeds]
        env = {
            **os.environ,
            "CONKD_SWEEP_MANIFEST": str(manifest),
            "CONKD_PYTHON": os.environ.get("CONKD_PYTHON", sys.executable),
        }
        ids: list[str] = []
        for group in [[n] for n in seeds] + ([rest] if rest else []):
            # a job whose dependency failed is cancelled instead of pending forever
            dep = [f"--dependency=afterok:{ids[-1]}", "--kill-on-invalid-dep=yes"] if ids else []
            ids.append(self._sbatch(group, dep, env))
        print(f"submitted {len(jobs)} job(s) as SLURM job(s) {', '.join(ids)}", flush=True)
        return ids

    def _sbatch(self, indices: list[int], dep: list[str], env: dict[str, str]) -> str:
        cmd = [
            "sbatch",
            "--parsable",
            "--job-name=conkd-study",
            f"--array={','.join(map(str, indices))}",
            f"--output={self.cfg.logs}/%x-%A_%a.out",
            *dep,
            *self.cfg.sbatch,
            "slurm/sweep.sh",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def wait_slurm(self, ids: list[str]) -> None:
        """Poll the queue until none of ``ids`` (array tasks included) is left in it. Jobs
        that wait on a failed dependency are cancelled (``--kill-on-invalid-dep`` does the
        same unless an ``sbatch=`` option turned it off)."""
        from tqdm.auto import tqdm

        with tqdm(total=len(self.jobs()), desc="scaling study (SLURM)", unit="run") as bar:
            while True:
                queued = _queue(ids)
                bar.update(sum(self.cfg.finished(j.name) for j in self.jobs()) - bar.n)
                if not queued:
                    return
                stuck = sorted({job for job, _, reason in queued if reason == NEVER_SATISFIED})
                if stuck:
                    names = ", ".join(stuck)
                    tqdm.write(f"cancelling SLURM job(s) {names}: a job they depend on failed")
                    subprocess.run(["scancel", *stuck], capture_output=True, timeout=60)
                time.sleep(self.cfg.poll_s)

    # ------------------------------------------------------------------ entry
    def run(self) -> dict[str, Any] | None:
        """Run what is missing, then analyse; ``None`` when only submitted (SLURM)."""
        self.check_reuse()
        t0 = time.perf_counter()
        try:
            if self.cfg.launcher == "local":
                self.run_local()
            else:
                ids = self.submit_slurm()
                if self.cfg.submit_only and ids:
                    print(f"run the same command again after jobs {ids} end to analyse")
                    return None
                if ids:
                    self.wait_slurm(ids)
        finally:  # the runs' wall times survive a failed or interrupted invocation
            info = {
                "wall_s_this_invocation": round(time.perf_counter() - t0, 1),
                "run_walls_s": self.walls,
            }
            path = self.cfg.logs / "study.json"
            write_json(path, _merge_walls(path, info))
        missing = [j.name for j in self.jobs() if not self.cfg.finished(j.name)]
        if missing:
            raise RuntimeError(f"runs not finished: {missing}; their logs are in {self.cfg.logs}")
        return write_report(self.cfg)


def _queue(ids: list[str]) -> list[tuple[str, str, str]]:
    """``(array job id, state, reason)`` of each of ``ids``' entries still in the queue."""
    proc = subprocess.run(
        ["squeue", "-h", "-j", ",".join(ids), "-o", "%A %T %r"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:  # squeue fails for ids that left the queue long ago
        return []
    queued = []
    for line in proc.stdout.splitlines():
        job, state, reason = [*line.split(None, 2), "", ""][:3]
        if job:
            queued.append((job, state, reason.strip()))
    return queued


def _merge_walls(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """study.json keeps every run's wall time across invocations (a resumed study)."""
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    walls = {**old.get("run_walls_s", {}), **info["run_walls_s"]}
    total = old.get("wall_s_total", 0.0) + info["wall_s_this_invocation"]
    return {**info, "run_walls_s": walls, "wall_s_total": round(total, 1)}
