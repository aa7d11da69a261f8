"""Run a scaling study's students: locally one after another, or as a SLURM job array.

Layout of ``OUT`` (``StudyConfig.output_dir``)::

    teachers/{rec,dialog,...}      R and D (trained by the first student that needs them)
    runs/<size>-<variant>/         each student's distillation (config, metrics.jsonl, hf/)
    eval/<size>-<variant>/         its evaluation: metrics.json, generations.jsonl,
                                   gate_trace.jsonl (the student's own item mass per token)
    eval/teacher-dialog/           D's evaluation and gate trace (the gate λ the students saw)
    logs/                          one log per job; manifest.jsonl (SLURM); study.json
    report.md, summary.json,       the analysis (conkd_scale/scaling/report.py); in
    figures/*.png                  report_dir instead when it is set

A run is finished when its ``eval/<name>/metrics.json`` and ``gate_trace.jsonl`` exist; a
study started again skips finished runs, and a distillation whose ``hf/`` exists is not
trained again (an interrupted one resumes from its newest checkpoint).

SLURM: the unfinished runs go into ``logs/manifest.jsonl`` (one line per job: its
``launch/distill.py`` and ``launch/evaluate.py`` arguments), and ``slurm/sweep.sh`` runs line
``$SLURM_ARRAY_TASK_ID``. Runs that would train a missing teacher are submitted first, one
after another; the rest follow as one array that depends on them.
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

from conkd_scale.results.table import Row, deepspeed_command, distill_args, evaluate_args
from conkd_scale.scaling.config import TEACHER_ROW, StudyConfig, StudyRun
from conkd_scale.utils.io import write_json, write_jsonl
from conkd_scale.utils.procs import ROOT, run_logged

TEACHER_EVAL = "teacher-dialog"


@dataclass(frozen=True)
class Job:
    """One unit of work: a student (distil + evaluate) or D's evaluation alone."""

    name: str
    distill: list[str] | None  # launch/distill.py arguments (None: nothing to train)
    evaluate: list[str]  # launch/evaluate.py arguments
    teachers: tuple[Path, Path]  # (R dir, D dir) the job reads
    trains_teachers: bool  # a teacher it needs is missing (it trains it)


class Study:
    """A scaling study's runs; :meth:`run` executes the unfinished ones."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.walls: dict[str, float] = {}

    # ------------------------------------------------------------------ paths
    def run_dir(self, run: StudyRun) -> Path:
        return self.out / "runs" / run.name

    def eval_dir(self, name: str) -> Path:
        return self.out / "eval" / name

    def teacher_dirs(self, row: Row) -> tuple[Path, Path]:
        return self.cfg.teachers / row.rec, self.cfg.teachers / row.dialog

    def finished(self, name: str) -> bool:
        d = self.eval_dir(name)
        return (d / "metrics.json").is_file() and (d / "gate_trace.jsonl").is_file()

    # ------------------------------------------------------------------ jobs
    def jobs(self) -> list[Job]:
        """Every job of the study, in order: students (smallest first), then D's trace."""
        cfg = self.cfg
        jobs = []
        for run in cfg.runs():
            rec_dir, dialog_dir = self.teacher_dirs(run.row)
            out = self.run_dir(run)
            dargs = distill_args(
                run.row,
                dataset=cfg.dataset,
                data_dir=cfg.data,
                out=out,
                rec_dir=rec_dir,
                dialog_dir=dialog_dir,
                seed=cfg.seed,
                ds_config=cfg.ds_config,
                rec=cfg.rec,
                dialog=[f"model.preset={_dialog_preset()}", *cfg.dialog],
                distill=[*cfg.distill, f"student.preset={run.size}", "train.progress=false"],
            )
            eargs = evaluate_args(
                run.row,
                dataset=cfg.dataset,
                data_dir=cfg.data,
                out=self.eval_dir(run.name),
                model=out / "hf",
                rec_dir=rec_dir,
                max_turns=cfg.max_turns,
                extra=["gate_trace=true", "generation.progress=false", *cfg.evaluate],
            )
            trained = (out / "hf" / "config.json").is_file()
            jobs.append(
                Job(
                    run.name,
                    None if trained else dargs,
                    eargs,
                    (rec_dir, dialog_dir),
                    not trained and not _teachers_ready(rec_dir, dialog_dir),
                )
            )
        rec_dir, dialog_dir = self.teacher_dirs(TEACHER_ROW)
        eargs = evaluate_args(
            TEACHER_ROW,
            dataset=cfg.dataset,
            data_dir=cfg.data,
            out=self.eval_dir(TEACHER_EVAL),
            model=dialog_dir / "hf",
            rec_dir=rec_dir,
            max_turns=cfg.max_turns,
            extra=["gate_trace=true", "generation.progress=false", *cfg.evaluate],
        )
        jobs.append(Job(TEACHER_EVAL, None, eargs, (rec_dir, dialog_dir), False))
        return jobs

    def pending(self) -> list[Job]:
        return [j for j in self.jobs() if not self.finished(j.name)]

    # ------------------------------------------------------------------ local
    def run_local(self) -> None:
        """Each unfinished job in turn: ``deepspeed`` distillation, then evaluation."""
        from tqdm.auto import tqdm

        jobs = self.jobs()
        logs = self.out / "logs"
        bar = tqdm(jobs, desc="scaling study", unit="run")
        for job in bar:
            bar.set_postfix_str(job.name)
            if self.finished(job.name):
                tqdm.write(f"{job.name}: finished before, skipped")
                continue
            if job.distill is not None:
                cmd = deepspeed_command(self.cfg.nproc, "launch/distill.py", job.distill)
                self.walls[f"{job.name}/train"] = run_logged(cmd, logs / f"{job.name}.log")
            cmd = [sys.executable, "launch/evaluate.py", *job.evaluate]
            self.walls[f"{job.name}/eval"] = run_logged(cmd, logs / f"{job.name}.eval.log")
            tqdm.write(f"{job.name}: done")

    # ------------------------------------------------------------------ slurm
    def write_manifest(self, jobs: list[Job]) -> Path:
        path = self.out / "logs" / "manifest.jsonl"
        write_jsonl(
            path, [{"name": j.name, "distill": j.distill, "evaluate": j.evaluate} for j in jobs]
        )
        return path

    def submit_slurm(self) -> list[str]:
        """Submit the unfinished jobs (teacher-training ones first, chained); job ids."""
        jobs = self.pending()
        if not jobs:
            return []
        manifest = self.write_manifest(jobs)
        seeds: list[int] = []
        covered: set[tuple[Path, Path]] = set()
        for n, j in enumerate(jobs):
            if j.trains_teachers and j.teachers not in covered:
                seeds.append(n)
                covered.add(j.teachers)
        rest = [n for n in range(len(jobs)) if n not in seeds]
        env = {
            **os.environ,
            "CONKD_SWEEP_MANIFEST": str(manifest.resolve()),
            "CONKD_PYTHON": os.environ.get("CONKD_PYTHON", sys.executable),
        }
        ids: list[str] = []
        for group in [[n] for n in seeds] + ([rest] if rest else []):
            dep = [f"--dependency=afterok:{ids[-1]}"] if ids else []
            ids.append(self._sbatch(group, dep, env))
        print(f"submitted {len(jobs)} job(s) as SLURM job(s) {', '.join(ids)}", flush=True)
        return ids

    def _sbatch(self, indices: list[int], dep: list[str], env: dict[str, str]) -> str:
        logs = (self.out / "logs").resolve()
        cmd = [
            "sbatch",
            "--parsable",
            "--job-name=conkd-study",
            f"--array={','.join(map(str, indices))}",
            f"--output={logs}/%x-%A_%a.out",
            *dep,
            *self.cfg.sbatch,
            "slurm/sweep.sh",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def wait_slurm(self, ids: list[str]) -> None:
        """Poll the queue until none of ``ids`` (array tasks included) is left in it."""
        from tqdm.auto import tqdm

        total = len(self.jobs())
        with tqdm(total=total, desc="scaling study (SLURM)", unit="run") as bar:
            while True:
                proc = subprocess.run(
                    ["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                done = sum(self.finished(j.name) for j in self.jobs())
                bar.update(done - bar.n)
                # squeue fails for ids that left the queue long ago: treat as empty
                if proc.returncode != 0 or not proc.stdout.strip():
                    return
                time.sleep(self.cfg.poll_s)

    # ------------------------------------------------------------------ entry
    def run(self) -> dict[str, Any] | None:
        """Run what is missing, then analyse; ``None`` when only submitted (SLURM)."""
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
            write_json(self.out / "logs" / "study.json", _merge_walls(self.out, info))
        missing = [j.name for j in self.jobs() if not self.finished(j.name)]
        if missing:
            raise RuntimeError(
                f"runs not finished: {missing}; their logs are in {self.out / 'logs'}"
            )
        from conkd_scale.scaling.report import write_report

        return write_report(self)


def _dialog_preset() -> str:
    """D's size when auto-trained: the distillation default (``teachers.dialog_preset``)."""
    from conkd_scale.distill.config import TeacherConfig

    return TeacherConfig().dialog_preset


def _teachers_ready(rec_dir: Path, dialog_dir: Path) -> bool:
    """Both teachers trained (the checks launch/distill.py makes before auto-training)."""
    from conkd_scale.distill.teachers import dialog_trained, rec_trained

    return rec_trained(rec_dir) and dialog_trained(dialog_dir)


def _merge_walls(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """study.json keeps every run's wall time across invocations (a resumed study)."""
    path = out / "logs" / "study.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    walls = {**old.get("run_walls_s", {}), **info["run_walls_s"]}
    total = old.get("wall_s_total", 0.0) + info["wall_s_this_invocation"]
    return {**info, "run_walls_s": walls, "wall_s_total": round(total, 1)}


def manifest_args(path: Path, index: int, part: str) -> list[str]:
    """The ``distill`` or ``evaluate`` arguments of manifest line ``index`` (sweep.sh)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not 0 <= index < len(lines):
        raise IndexError(f"{path}: no line {index} (it has {len(lines)} jobs)")
    entry = json.loads(lines[index])
    return list(entry.get(part) or [])
