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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conkd_scale.data.synthetic import DEFAULT_DIR as DEFAULT_SYNTHETIC_DIR
from conkd_scale.data.synthetic import ensure_synthetic
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import atomic_open, write_json
from conkd_scale.utils.procs import free_port, run_logged


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
    Row("repeat", "0. Repeat baseline (context items by recency, then popularity)", "repeat"),
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


def distill_args(
    row: Row,
    *,
    dataset: str,
    data_dir: str,
    out: Path,
    rec_dir: Path,
    dialog_dir: Path,
    seed: int,
    ds_config: str,
    rec: Sequence[str] = (),
    dialog: Sequence[str] = (),
    distill: Sequence[str] = (),
) -> list[str]:
    """``launch/distill.py`` arguments of a student row (teachers trained when missing)."""
    assert row.distill is not None, f"{row.key} is a teacher row"
    rec_over = [*rec, f"seed={seed}"]
    if row.rec == "rec_nokg":
        rec_over.append("use_kg=false")
    dialog_over = [*dialog, f"train.seed={seed}"]
    return [
        "--deepspeed",
        ds_config,
        f"dataset={dataset}",
        f"data_dir={data_dir}",
        f"output_dir={out}",
        f"teachers.rec_dir={rec_dir}",
        f"teachers.dialog_dir={dialog_dir}",
        f"train.seed={seed}",
        "teachers.rec_overrides=" + ",".join(rec_over),
        "teachers.dialog_overrides=" + ",".join(dialog_over),
        *distill,
        *row.distill,
    ]


def evaluate_args(
    row: Row,
    *,
    dataset: str,
    data_dir: str,
    out: Path,
    model: Path | None,
    rec_dir: Path,
    max_turns: int = 0,
    extra: Sequence[str] = (),
) -> list[str]:
    """``launch/evaluate.py`` arguments of a row (its system, model and R)."""
    args = ["--system", row.system, "--dataset", dataset, "--data-dir", data_dir]
    args += ["--output-dir", str(out)]
    if model is not None:
        args += ["--model", str(model)]
    if row.system in ("rec", "pipeline"):
        args += ["--rec-teacher", str(rec_dir)]
    if max_turns:
        args += ["--max-turns", str(max_turns)]
    if row.key == "no_mode":
        args.append("generation.use_mode_tokens=false")
    return [*args, *extra]


def deepspeed_command(nproc: int, script: str, args: Sequence[str]) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args`` with this interpreter's
    launcher and a port that is free now."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


class ResultsTable:
    """Runs the rows (skipping finished ones) and writes the table."""

    def __init__(self, cfg: ResultsConfig) -> None:
        self.cfg = cfg
        self.walls: dict[str, float] = {}

    def _all_walls(self, keys: set[str]) -> dict[str, float]:
        """This table's rows: their walls now, or from the invocation that ran them."""
        walls = _merge_walls(self.cfg.results / "results.json", self.walls)
        return {k: v for k, v in walls.items() if k.split("/")[0] in keys}

    def _teacher_dirs(self, row: Row) -> tuple[Path, Path]:
        t = self.cfg.work / "teachers"
        return t / row.rec, t / row.dialog

    def _distill(self, row: Row) -> Path:
        cfg = self.cfg
        out = cfg.work / row.key
        if (out / "hf" / "config.json").is_file():
            return out / "hf"
        rec_dir, dialog_dir = self._teacher_dirs(row)
        args = distill_args(
            row,
            dataset=cfg.dataset,
            data_dir=cfg.data,
            out=out,
            rec_dir=rec_dir,
            dialog_dir=dialog_dir,
            seed=cfg.seed,
            ds_config=cfg.ds_config,
            rec=cfg.rec,
            dialog=cfg.dialog,
            distill=cfg.distill,
        )
        cmd = deepspeed_command(cfg.nproc, "launch/distill.py", args)
        self.walls[f"{row.key}/train"] = run_logged(cmd, cfg.work / "logs" / f"{row.key}.log")
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
            args = evaluate_args(
                row,
                dataset=cfg.dataset,
                data_dir=cfg.data,
                out=out,
                model=model,
                rec_dir=rec_dir,
                max_turns=cfg.max_turns,
                extra=cfg.evaluate,
            )
            cmd = [sys.executable, "launch/evaluate.py", *args]
            log = cfg.work / "logs" / f"{row.key}.eval.log"
            self.walls[f"{row.key}/eval"] = run_logged(cmd, log)
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))

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
            if row.distill is not None:
                model: Path | None = self._distill(row)
            elif row.system == "repeat":
                model = None  # no teacher: the training split's counts and the context
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
            "run_walls_s": self._all_walls({r.key for r in rows}),
            "rows": results,
        }
        cfg.results.mkdir(parents=True, exist_ok=True)
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
