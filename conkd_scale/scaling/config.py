"""Options of ``launch/scaling_study.py``, the runs a study consists of, and where they live.

Layout of ``OUT`` (``StudyConfig.output_dir``)::

    teachers/{rec,dialog,...}      R and D (trained by the first student that needs them);
                                   teachers_dir=DIR reads them from DIR instead (the results
                                   table's <work_dir>/teachers has this same layout)
    runs/<size>-<variant>[-s<seed>]/  each student's distillation (config, metrics.jsonl,
                                   run_info.json with the η it used, hf/); no suffix: the
                                   first of ``seeds``
    eval/<size>-<variant>[-s<seed>]/  its evaluation: metrics.json, generations.jsonl,
                                   gate_trace.jsonl (the student's own item mass per token)
    eval/teacher-dialog/           D's evaluation and gate trace (the gate λ the students saw)
    logs/                          one log per job; manifest.jsonl (SLURM); study.json
    report.md, summary.json,       the analysis (conkd_scale/scaling/report.py); in
    figures/*.png                  report_dir instead when it is set

A run is finished when its ``eval/<name>/metrics.json`` and ``gate_trace.jsonl`` exist.

Seeds: every student of a size in ``seed_sizes`` (default: the smallest size) runs with each
of ``seeds`` (default: ``[seed]``); the other sizes run the first seed only. ``seed`` is the
teachers' seed (when the study trains them).
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
    seeds: list[int] | None = None  # students' seeds; None: [seed]
    seed_sizes: list[str] | None = None  # sizes that run every seed; None: the smallest size
    bootstrap_unit: Literal["turn", "conversation"] = "turn"  # hard − soft intervals: units
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0

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
        if self.seeds is not None and not self.seeds:
            raise ConfigError("seeds: give at least one seed (or leave it unset: [seed])")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: repeated seed in {self.seeds}")
        if self.seed_sizes is not None:
            if not self.seed_sizes:
                raise ConfigError(
                    "seed_sizes: give at least one size (or leave it unset: the smallest)"
                )
            for s in self.seed_sizes:
                if s not in self.sizes and s not in labels:
                    raise ConfigError(f"seed_sizes: {s!r} is not one of sizes {self.sizes}")
        if self.bootstrap_unit not in ("turn", "conversation"):
            raise ConfigError(f"bootstrap_unit: {self.bootstrap_unit!r} is not turn/conversation")
        if self.bootstrap_resamples < 1:
            raise ConfigError(f"bootstrap_resamples: expected >= 1, got {self.bootstrap_resamples}")

    def student_sizes(self) -> list[StudentSize]:
        """The sizes, smallest first: presets in size order, then pretrained directories
        in the order given (list them smallest first)."""
        order = {name: n for n, name in enumerate(PRESETS)}
        parsed = [parse_size(s) for s in self.sizes]
        presets = sorted((s for s in parsed if s.pretrained is None), key=lambda s: order[s.label])
        return presets + [s for s in parsed if s.pretrained is not None]

    @property
    def student_seeds(self) -> list[int]:
        """The students' seeds (the first: every size; the others: ``seed_sizes``)."""
        return list(self.seeds) if self.seeds is not None else [self.seed]

    @property
    def seeded_sizes(self) -> list[str]:
        """The labels of the sizes whose students run every seed, smallest first."""
        sizes = self.student_sizes()
        if self.seed_sizes is None:
            return [sizes[0].label]
        given = {parse_size(s).label for s in self.seed_sizes}
        return [s.label for s in sizes if s.label in given]

    def sorted_sizes(self) -> list[str]:
        """The sizes' labels, smallest first (:meth:`student_sizes`)."""
        return [s.label for s in self.student_sizes()]

    def size_seeds(self, size: str) -> list[int]:
        """The seeds the students of ``size`` (a label) run with."""
        seeds = self.student_seeds
        return seeds if size in self.seeded_sizes else seeds[:1]

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
        """Every (size, seed, variant) of the study: smallest size first, then by seed."""
        first = self.student_seeds[0]
        return [
            StudyRun(s.label, row, seed, seed == first, tuple(s.overrides))
            for s in self.student_sizes()
            for seed in self.size_seeds(s.label)
            for row in self.variants()
        ]


@dataclass(frozen=True)
class StudyRun:
    """One student of the study: a size (preset or pretrained directory), a results-table
    row (the variant) and the student's seed (``first``: the first of the study's seeds, whose
    runs keep the name ``<size>-<variant>`` of a study without seeds, so that they are
    reused)."""

    size: str  # the size's label (preset name, or the pretrained directory's name)
    row: Row
    seed: int = 0
    first: bool = True
    student: tuple[str, ...] = ()  # distill.py overrides selecting it (default: the preset)

    @property
    def name(self) -> str:
        base = f"{self.size}-{self.row.key}"
        return base if self.first else f"{base}-s{self.seed}"
