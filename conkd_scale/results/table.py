"""Train and evaluate the rows of METHOD.md's results table on one dataset, one seed.

Every student row is a ``deepspeed launch/distill.py`` job (``nproc`` ranks) and every
evaluation a ``launch/evaluate.py`` run; the teachers are trained once (by the first
distillation job) and reused. A row whose outputs exist is not run again, so an interrupted
table resumes where it stopped. Results: ``<results_dir>/results.md`` and ``results.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conkd_scale.data.synthetic import DEFAULT_DIR as DEFAULT_SYNTHETIC_DIR
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import atomic_open, write_json

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Row:
    """One system of the table: how its model is obtained and how it is evaluated."""

    key: str
    label: str
    system: str  # evaluate.py --system
    distill: tuple[str, ...] | None = None  # distill.py overrides (None: a teacher row)
    rec: str = "rec"  # which R (teachers/<rec>)
    dialog: str = "dialog"  # which D (teachers/<dialog>)
    ablation: bool = False


ROWS: tuple[Row, ...] = (
    Row("pipeline", "1. Pipeline (D writes, R fills item slots)", "pipeline"),
    Row("dialog", "2. Dialogue teacher D alone", "dialog"),
    Row("rec", "3. Recommendation teacher R alone", "rec"),
    Row("onehot", "4. Multi-task student, w_kd = 0", "student", ("loss.w_kd=0",)),
    Row("hard", "5. ConKD, hard gate", "student", ("loss.gate.mode=hard",)),
    Row("soft", "6. ConKD, soft gate", "student", ("loss.gate.mode=soft",)),
    Row(
        "static", "7a. static gate (c = 0.5)", "student", ("loss.gate.mode=static",), ablation=True
    ),
    Row("oracle", "7b. oracle gate", "student", ("loss.gate.mode=oracle",), ablation=True),
    Row(
        "dialog_only", "7c. dialogue-only KD", "student", ("loss.gate.mode=dialog",), ablation=True
    ),
    Row(
        "rec_only", "7d. recommendation-only KD", "student", ("loss.gate.mode=rec",), ablation=True
    ),
    Row(
        "no_kg",
        "7e. hard gate, R without the KG",
        "student",
        ("loss.gate.mode=hard",),
        rec="rec_nokg",
        ablation=True,
    ),
    Row(
        "no_mode",
        "7f. hard gate, no mode tokens",
        "student",
        ("loss.gate.mode=hard", "use_mode_tokens=false"),
        dialog="dialog_nomode",
        ablation=True,
    ),
)

COLUMNS = (
    "R@1",
    "R@10",
    "R@50",
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


@dataclass
class ResultsConfig:
    """``launch/results_table.py`` options (``key=value`` overrides too)."""

    dataset: str = "synthetic"
    data_dir: str | None = None  # None: runs/data/synthetic (generated) for synthetic
    work_dir: str | None = None  # runs and teachers; None: runs/results/<dataset>
    results_dir: str | None = None  # results.md/json; None: results/<dataset>
    ablations: bool = False  # also the ablation rows (7a-7f)
    nproc: int = 2  # ranks per distillation job
    ds_config: str = "ds_configs/zero3.json"
    max_turns: int = 0  # evaluation: first N recommender turns of the test split (0: all)
    seed: int = 0
    distill: list[str] = field(default_factory=list)  # overrides for every student
    rec: list[str] = field(default_factory=list)  # R's training overrides
    dialog: list[str] = field(default_factory=list)  # D's training overrides
    evaluate: list[str] = field(default_factory=list)  # evaluate.py overrides
    only: list[str] = field(default_factory=list)  # run just these row keys

    def __post_init__(self) -> None:
        if self.dataset not in ("redial", "inspired", "synthetic"):
            raise ConfigError(f"dataset: {self.dataset!r} is not redial/inspired/synthetic")
        if self.dataset != "synthetic" and self.data_dir is None:
            raise ConfigError(f"data_dir is required for dataset={self.dataset!r}")
        known = {r.key for r in ROWS}
        for k in self.only:
            if k not in known:
                raise ConfigError(f"only: unknown row {k!r} (rows: {sorted(known)})")
        if self.nproc < 1:
            raise ConfigError(f"nproc: expected >= 1, got {self.nproc}")

    @property
    def work(self) -> Path:
        return Path(self.work_dir or f"runs/results/{self.dataset}")

    @property
    def results(self) -> Path:
        return Path(self.results_dir or f"results/{self.dataset}")

    @property
    def data(self) -> str:
        return self.data_dir or DEFAULT_SYNTHETIC_DIR

    def rows(self) -> list[Row]:
        rows = [r for r in ROWS if self.ablations or not r.ablation]
        return [r for r in rows if not self.only or r.key in self.only]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the project root, output to ``log``; raise with its tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}); log {log}:\n{tail}")
    return wall


class ResultsTable:
    """Runs the rows (skipping finished ones) and writes the table."""

    def __init__(self, cfg: ResultsConfig) -> None:
        self.cfg = cfg
        self.walls: dict[str, float] = {}

    def _teacher_dirs(self, row: Row) -> tuple[Path, Path]:
        t = self.cfg.work / "teachers"
        return t / row.rec, t / row.dialog

    def _distill(self, row: Row) -> Path:
        cfg = self.cfg
        out = cfg.work / row.key
        if (out / "hf" / "config.json").is_file():
            return out / "hf"
        rec_dir, dialog_dir = self._teacher_dirs(row)
        rec_over = [*cfg.rec, f"seed={cfg.seed}"]
        if row.rec == "rec_nokg":
            rec_over.append("use_kg=false")
        dialog_over = [*cfg.dialog, f"train.seed={cfg.seed}"]
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(cfg.nproc),
            "--master_port",
            str(_free_port()),
            "launch/distill.py",
            "--deepspeed",
            cfg.ds_config,
            f"dataset={cfg.dataset}",
            f"data_dir={cfg.data}",
            f"output_dir={out}",
            f"teachers.rec_dir={rec_dir}",
            f"teachers.dialog_dir={dialog_dir}",
            f"train.seed={cfg.seed}",
            "teachers.rec_overrides=" + ",".join(rec_over),
            "teachers.dialog_overrides=" + ",".join(dialog_over),
            *cfg.distill,
            *(row.distill or ()),
        ]
        self.walls[f"{row.key}/train"] = _run(cmd, cfg.work / "logs" / f"{row.key}.log")
        return out / "hf"

    def _ensure_teachers(self) -> None:
        """Teachers come from the first student job; teacher rows need them first."""
        rec_dir, dialog_dir = self._teacher_dirs(ROWS[0])
        if not (dialog_dir / "hf" / "config.json").is_file() or not rec_dir.is_dir():
            self._distill(next(r for r in ROWS if r.key == "hard"))

    def _evaluate(self, row: Row, model: Path | None) -> dict[str, Any]:
        cfg = self.cfg
        out = cfg.work / "eval" / row.key
        if not (out / "metrics.json").is_file():
            rec_dir, _ = self._teacher_dirs(row)
            cmd = [
                sys.executable,
                "launch/evaluate.py",
                "--system",
                row.system,
                "--dataset",
                cfg.dataset,
                "--data-dir",
                cfg.data,
                "--output-dir",
                str(out),
            ]
            if model is not None:
                cmd += ["--model", str(model)]
            if row.system in ("rec", "pipeline"):
                cmd += ["--rec-teacher", str(rec_dir)]
            if cfg.max_turns:
                cmd += ["--max-turns", str(cfg.max_turns)]
            if row.key == "no_mode":
                cmd.append("generation.use_mode_tokens=false")
            cmd += cfg.evaluate
            self.walls[f"{row.key}/eval"] = _run(cmd, cfg.work / "logs" / f"{row.key}.eval.log")
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t0 = time.perf_counter()
        rows = cfg.rows()
        results: dict[str, Any] = {}
        bar = tqdm(rows, desc="results table", unit="row")
        for row in bar:
            bar.set_postfix_str(row.key)
            if row.distill is not None:
                model: Path | None = self._distill(row)
            else:
                self._ensure_teachers()
                model = self._teacher_dirs(row)[1] / "hf" if row.system != "rec" else None
            metrics = self._evaluate(row, model)
            results[row.key] = {
                "label": row.label,
                "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
            }
        report = {
            "dataset": cfg.dataset,
            "data_dir": cfg.data,
            "seed": cfg.seed,
            "date": _dt.date.today().isoformat(),
            "machine": _machine(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "wall_s": round(time.perf_counter() - t0, 1),
            "run_walls_s": self.walls,
            "rows": results,
        }
        cfg.results.mkdir(parents=True, exist_ok=True)
        write_json(cfg.results / "results.json", report)
        with atomic_open(cfg.results / "results.md", "w", encoding="utf-8") as f:
            f.write(render_markdown(report))
        return report


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
        f"seed {report['seed']}, wall {report['wall_s']:.0f} s (this invocation).",
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
