"""Options of ``launch/scaling_study.py``, the runs a study consists of, and where they live.

Layout of ``OUT`` (``StudyConfig.output_dir``)::

    teachers/{rec,dialog,...}      R and D (trained by the first student that needs them)
    runs/<size>-<variant>/         each student's distillation (config, metrics.jsonl, hf/)
    eval/<size>-<variant>/         its evaluation: metrics.json, generations.jsonl,
                                   gate_trace.jsonl (the student's own item mass per token)
    eval/teacher-dialog/           D's evaluation and gate trace (the gate λ the students saw)
    logs/                          one log per job; manifest.jsonl (SLURM); study.json
    report.md, summary.json,       the analysis (conkd_scale/scaling/report.py); in
    figures/*.png                  report_dir instead when it is set

A run is finished when its ``eval/<name>/metrics.json`` and ``gate_trace.jsonl`` exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conkd_scale.jobs import ROW, ROWS, JobOptions, Row, StudentSize, parse_size, project_path
from conkd_scale.models.presets import PRESETS
from conkd_scale.utils.errors import ConfigError

GATES = ("hard", "soft", "static", "oracle")  # --gates: the gate modes of the student loss
# --ablations: any student row of the results table (METHOD.md item 7, and w_kd = 0)
STUDENT_ROWS = {r.key: r for r in ROWS if r.distill is not None}
TEACHER_ROW = ROW["dialog"]  # D alone: the teacher's gate trace
TEACHER_EVAL = "teacher-dialog"  # the name of D's evaluation


@dataclass
class StudyConfig(JobOptions):
    """``launch/scaling_study.py`` options (``key=value`` overrides too); relative paths are
    taken from the project root."""

    output_dir: str | None = None  # None: runs/scaling/<dataset>
    report_dir: str | None = None  # report.md, summary.json, figures/; None: output_dir
    sizes: list[str] = field(default_factory=lambda: ["tiny", "mini", "small"])  # student
    # sizes: presets, or local pretrained directories as pretrained:DIR (or a path)
    gates: list[str] = field(default_factory=lambda: ["hard", "soft"])
    ablations: list[str] = field(default_factory=list)  # e.g. static,oracle,no_kg,onehot
    launcher: Literal["local", "slurm"] = "local"
    teachers_dir: str | None = None  # None: <output_dir>/teachers (trained by the first run)
    sbatch: list[str] = field(default_factory=list)  # slurm: extra sbatch options
    submit_only: bool = False  # slurm: submit and return (run again later to analyse)
    poll_s: float = 30.0  # slurm: how often to look at the queue

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sizes:
            raise ConfigError(
                "sizes: give at least one student size: presets (e.g. tiny,mini,small) or "
                "pretrained:DIR"
            )
        labels = [s.label for s in self.student_sizes()]  # checks each size
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
        if len(set(labels)) != len(labels):
            raise ConfigError(
                f"sizes: two sizes share a run name in {self.sizes} (names {labels}): give each "
                "once; a pretrained size is named after its directory (rename one to tell apart)"
            )

    def student_sizes(self) -> list[StudentSize]:
        """The sizes, smallest first: presets in size order, then pretrained directories
        in the order given (list them smallest first)."""
        order = {name: n for n, name in enumerate(PRESETS)}
        parsed = [parse_size(s) for s in self.sizes]
        presets = sorted((s for s in parsed if s.pretrained is None), key=lambda s: order[s.label])
        return presets + [s for s in parsed if s.pretrained is not None]

    # ------------------------------------------------------------------ paths
    @property
    def out(self) -> Path:
        return project_path(self.output_dir or f"runs/scaling/{self.dataset}")

    @property
    def report(self) -> Path:
        return project_path(self.report_dir) if self.report_dir else self.out

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def teachers(self) -> Path:
        return project_path(self.teachers_dir) if self.teachers_dir else self.out / "teachers"

    def teacher_dirs(self, row: Row) -> tuple[Path, Path]:
        """(R dir, D dir) of a row."""
        return self.teachers / row.rec, self.teachers / row.dialog

    def run_dir(self, run: StudyRun) -> Path:
        return self.out / "runs" / run.name

    def eval_dir(self, name: str) -> Path:
        return self.out / "eval" / name

    def finished(self, name: str) -> bool:
        """The evaluation ``name`` (a run's, or :data:`TEACHER_EVAL`) has its outputs."""
        d = self.eval_dir(name)
        return (d / "metrics.json").is_file() and (d / "gate_trace.jsonl").is_file()

    # ------------------------------------------------------------------ runs
    def variants(self) -> list[Row]:
        """The student rows of the sweep, gates first, without repeats."""
        keys = list(dict.fromkeys([*self.gates, *self.ablations]))
        return [STUDENT_ROWS[k] for k in keys]

    def runs(self) -> list[StudyRun]:
        """Every (size, variant) of the study, smallest size first."""
        sizes = self.student_sizes()
        return [
            StudyRun(s.label, row, tuple(s.overrides)) for s in sizes for row in self.variants()
        ]


@dataclass(frozen=True)
class StudyRun:
    """One student of the study: a size (preset or pretrained directory) and a results-table
    row (the variant)."""

    size: str  # the size's label (preset name, or the pretrained directory's name)
    row: Row
    student: tuple[str, ...] = ()  # distill.py overrides selecting it (default: the preset)

    @property
    def name(self) -> str:
        return f"{self.size}-{self.row.key}"
