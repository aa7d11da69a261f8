"""Options of ``launch/scaling_study.py`` and the runs a study consists of."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conkd_scale.data.synthetic import DEFAULT_DIR as DEFAULT_SYNTHETIC_DIR
from conkd_scale.models.presets import PRESETS
from conkd_scale.results.table import ROWS, Row
from conkd_scale.utils.errors import ConfigError

GATES = ("hard", "soft", "static", "oracle")  # --gates: the gate modes of the student loss
# --ablations: any student row of the results table (METHOD.md item 7, and w_kd = 0)
STUDENT_ROWS = {r.key: r for r in ROWS if r.distill is not None}
TEACHER_ROW = next(r for r in ROWS if r.key == "dialog")  # D alone: the teacher's gate trace


@dataclass
class StudyConfig:
    """``launch/scaling_study.py`` options (``key=value`` overrides too)."""

    dataset: Literal["redial", "inspired", "synthetic"] = "synthetic"
    data_dir: str | None = None  # None: runs/data/synthetic (generated) for synthetic
    output_dir: str | None = None  # None: runs/scaling/<dataset>
    report_dir: str | None = None  # report.md, summary.json, figures/; None: output_dir
    sizes: list[str] = field(default_factory=lambda: ["tiny", "mini", "small"])  # presets
    gates: list[str] = field(default_factory=lambda: ["hard", "soft"])
    ablations: list[str] = field(default_factory=list)  # e.g. static,oracle,no_kg,onehot
    launcher: Literal["local", "slurm"] = "local"
    nproc: int = 2  # local: ranks per distillation job
    ds_config: str = "ds_configs/zero3.json"
    teachers_dir: str | None = None  # None: <output_dir>/teachers (trained by the first run)
    seed: int = 0
    max_turns: int = 0  # evaluation: first N recommender turns of the test split (0: all)
    distill: list[str] = field(default_factory=list)  # overrides for every student
    rec: list[str] = field(default_factory=list)  # R's training overrides
    dialog: list[str] = field(default_factory=list)  # D's training overrides
    evaluate: list[str] = field(default_factory=list)  # evaluate.py overrides
    sbatch: list[str] = field(default_factory=list)  # slurm: extra sbatch options
    submit_only: bool = False  # slurm: submit and return (run again later to analyse)
    poll_s: float = 30.0  # slurm: how often to look at the queue

    def __post_init__(self) -> None:
        if self.dataset != "synthetic" and self.data_dir is None:
            raise ConfigError(f"data_dir is required for dataset={self.dataset!r}")
        if not self.sizes:
            raise ConfigError("sizes: give at least one student preset (e.g. tiny,mini,small)")
        for s in self.sizes:
            if s not in PRESETS:
                raise ConfigError(f"sizes: unknown preset {s!r} (presets: {list(PRESETS)})")
        for g in self.gates:
            if g not in GATES:
                raise ConfigError(
                    f"gates: unknown gate {g!r} (gates: {list(GATES)}; other variants "
                    f"go in ablations: {sorted(STUDENT_ROWS)})"
                )
        for a in self.ablations:
            if a not in STUDENT_ROWS:
                raise ConfigError(f"ablations: unknown run {a!r} (one of {sorted(STUDENT_ROWS)})")
        if not self.gates and not self.ablations:
            raise ConfigError("gates and ablations are both empty: nothing to run")
        if len(set(self.sizes)) != len(self.sizes):
            raise ConfigError(f"sizes: repeated preset in {self.sizes}")
        if self.nproc < 1:
            raise ConfigError(f"nproc: expected >= 1, got {self.nproc}")

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/scaling/{self.dataset}")

    @property
    def report(self) -> Path:
        return Path(self.report_dir) if self.report_dir else self.out

    @property
    def data(self) -> str:
        return self.data_dir or DEFAULT_SYNTHETIC_DIR

    @property
    def teachers(self) -> Path:
        return Path(self.teachers_dir) if self.teachers_dir else self.out / "teachers"

    def variants(self) -> list[Row]:
        """The student rows of the sweep, gates first, without repeats."""
        keys = list(dict.fromkeys([*self.gates, *self.ablations]))
        return [STUDENT_ROWS[k] for k in keys]

    def runs(self) -> list[StudyRun]:
        """Every (size, variant) of the study, smallest size first."""
        order = {name: n for n, name in enumerate(PRESETS)}
        sizes = sorted(self.sizes, key=order.__getitem__)
        return [StudyRun(size, row) for size in sizes for row in self.variants()]


@dataclass(frozen=True)
class StudyRun:
    """One student of the study: a size preset and a results-table row (the variant)."""

    size: str
    row: Row

    @property
    def name(self) -> str:
        return f"{self.size}-{self.row.key}"
