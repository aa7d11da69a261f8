"""Train and evaluate the rows of METHOD.md's results table on one dataset, one seed.

Every student row is a ``deepspeed launch/distill.py`` job (``nproc`` ranks) and every
evaluation a ``launch/evaluate.py`` run (arguments: :mod:`conkd_scale.jobs`); the teachers are
trained once, by the first distillation job, and reused. A row whose outputs exist is not run
again, so an interrupted table resumes where it stopped. Results: ``<results_dir>/results.md``
and ``results.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conkd_scale.data.synthetic import ensure_synthetic
from conkd_scale.jobs import (
    ROW,
    ROWS,
    JobOptions,
    Row,
    deepspeed_command,
    distill_args,
    evaluate_args,
    project_path,
    python_command,
    student_trained,
    teacher_commands,
    teachers_ready,
)
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import atomic_open, write_json
from conkd_scale.utils.procs import run_logged

COLUMNS = (
    "R@1",
    "R@10",
    "R@50",
    "R@10/new",
    "R@50/new",
    "ReR@1",
    "PrR@1",
    "F1@1",
    "F1@3",
    "rec_turn_item_rate",
    "discrepancy",
    "PPL",
    "Dist-2",
    "Dist-3",
    "BLEU-2",
)
TEACHERS_FROM = ROW["hard"]  # the student job that trains the teachers of the teacher rows


@dataclass
class ResultsConfig(JobOptions):
    """``launch/results_table.py`` options (``key=value`` overrides too); relative paths are
    taken from the project root."""

    work_dir: str | None = None  # runs and teachers; None: runs/results/<dataset>
    results_dir: str | None = None  # results.md/json; None: results/<dataset>
    ablations: bool = False  # also the ablation rows (7a-7f)
    only: list[str] = field(default_factory=list)  # run just these row keys

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in self.only:
            if k not in ROW:
                raise ConfigError(f"only: unknown row {k!r} (rows: {sorted(ROW)})")

    @property
    def work(self) -> Path:
        return project_path(self.work_dir or f"runs/results/{self.dataset}")

    @property
    def results(self) -> Path:
        return project_path(self.results_dir or f"results/{self.dataset}")

    def rows(self) -> list[Row]:
        rows = [r for r in ROWS if self.ablations or not r.ablation]
        return [r for r in rows if not self.only or r.key in self.only]


class ResultsTable:
    """Runs the rows (skipping finished ones) and writes the table."""

    def __init__(self, cfg: ResultsConfig) -> None:
        self.cfg = cfg
        self.walls: dict[str, float] = {}

    def _all_walls(self, keys: set[str]) -> dict[str, float]:
        """This table's rows: their walls now, or from the invocation that ran them."""
        walls = _merge_walls(self.cfg.results / "results.json", self.walls)
        return {k: v for k, v in walls.items() if k.split("/")[0] in keys}

    def _run(self, wall_key: str, cmd: Sequence[str], log: str) -> None:
        self.walls[wall_key] = run_logged(cmd, self.cfg.work / "logs" / log)

    def _teacher_dirs(self, row: Row) -> tuple[Path, Path]:
        t = self.cfg.work / "teachers"
        return t / row.rec, t / row.dialog

    def _distill_args(self, row: Row) -> list[str]:
        rec_dir, dialog_dir = self._teacher_dirs(row)
        out = self.cfg.work / row.key
        return distill_args(self.cfg, row, out=out, rec_dir=rec_dir, dialog_dir=dialog_dir)

    def _distill(self, row: Row) -> Path:
        out = self.cfg.work / row.key
        if not student_trained(out):
            cmd = deepspeed_command(self.cfg.nproc, "launch/distill.py", self._distill_args(row))
            self._run(f"{row.key}/train", cmd, f"{row.key}.log")
        return out / "hf"

    def _ensure_teachers(self) -> None:
        """R and D of the teacher rows: trained by the first student job, or on their own
        (same settings) when that student was trained before them."""
        if teachers_ready(*self._teacher_dirs(TEACHERS_FROM)):
            return
        self._distill(TEACHERS_FROM)
        for name, cmd in teacher_commands(self.cfg.nproc, self._distill_args(TEACHERS_FROM)):
            self._run(f"{name}/train", cmd, f"teacher_{name}.log")  # rows rec and dialog

    def _evaluate(self, row: Row, model: Path | None) -> dict[str, Any]:
        out = self.cfg.work / "eval" / row.key
        if not (out / "metrics.json").is_file():
            rec_dir, _ = self._teacher_dirs(row)
            args = evaluate_args(self.cfg, row, out=out, model=model, rec_dir=rec_dir)
            cmd = python_command("launch/evaluate.py", args)
            self._run(f"{row.key}/eval", cmd, f"{row.key}.eval.log")
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))

    def _model(self, row: Row) -> Path | None:
        """The model a row evaluates (trained first when missing); None for R and repeat."""
        if row.distill is not None:
            return self._distill(row)
        if row.system == "repeat":
            return None  # no teacher: the training split's counts and the context
        self._ensure_teachers()
        return self._teacher_dirs(row)[1] / "hf" if row.system != "rec" else None

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t0 = time.perf_counter()
        rows = cfg.rows()
        if cfg.dataset == "synthetic":  # the repeat row reads the corpus before any job runs
            ensure_synthetic(cfg.data)
        results: dict[str, Any] = {}
        bar = tqdm(rows, desc="results table", unit="row")
        for row in bar:
            bar.set_postfix_str(row.key)
            metrics = self._evaluate(row, self._model(row))
            results[row.key] = {
                "label": row.label,
                "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
            }
        report = {
            "dataset": cfg.dataset,
            "data_dir": cfg.data_given,
            "seed": cfg.seed,
            "date": _dt.date.today().isoformat(),
            "machine": _machine(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "wall_s": round(time.perf_counter() - t0, 1),
            "run_walls_s": self._all_walls({r.key for r in rows}),
            "rows": results,
        }
        write_json(cfg.results / "results.json", report)
        with atomic_open(cfg.results / "results.md", "w", encoding="utf-8") as f:
            f.write(render_markdown(report))
        return report


def _merge_walls(old_report: Path, walls: dict[str, float]) -> dict[str, float]:
    """Run wall times of earlier invocations (rows reused now) joined with this one's."""
    old = json.loads(old_report.read_text(encoding="utf-8")) if old_report.is_file() else {}
    return {**old.get("run_walls_s", {}), **walls}


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def render_markdown(report: dict[str, Any]) -> str:
    """The table (rows × METHOD.md metrics) with how it was made."""
    lines = [
        f"# Results: {report['dataset']}",
        "",
        f"Command: `{report['command']}` — {report['date']}, {report['machine']}, "
        f"seed {report['seed']}, wall {report['wall_s']:.0f} s (this invocation; "
        f"{sum(report.get('run_walls_s', {}).values()) / 60:.1f} min summed over every "
        "training and evaluation run, earlier invocations included).",
        "",
        "| system | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in report["rows"].values():
        m = row["metrics"]
        lines.append(f"| {row['label']} | " + " | ".join(_fmt(m.get(c)) for c in COLUMNS) + " |")
    lines += [
        "",
        "Metrics as defined in METHOD.md (test split). `–`: does not apply to the "
        "system. R@k for language models: teacher-forced, at gold item positions.",
        "",
    ]
    return "\n".join(lines)
