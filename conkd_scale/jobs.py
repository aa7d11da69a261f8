"""The child jobs of the orchestrators (``launch/results_table.py``, ``launch/scaling_study.py``).

- :data:`ROWS`: the systems of METHOD.md's results table, how each model is obtained (a
  distillation, or a teacher) and evaluated; the scaling study's variants are its student rows;
- :class:`JobOptions`: the options both orchestrators pass on to their children;
- each child's arguments: ``launch/distill.py`` for a student (it trains missing teachers
  first), ``launch/evaluate.py`` for an evaluation, and the teachers' own launchers for a
  teacher that is missing when no student job is left to train it;
- the teacher cache (``teachers_mode=offline``, the default): one per (R, D) pair, built by
  ``launch/cache_teachers.py`` (which trains missing teachers) before the first student
  that reads it, and reused by every student, seed and epoch (:func:`cache_args`).

Children run in the project root, and the orchestrators read every relative path from there
too (they pass directories on as absolute paths): no output depends on the directory a command
was started from. Override lists inside an override (``teachers.rec_overrides``) are passed as
JSON lists, so an item holding a comma (``train.adam_betas=0.9,0.95``) arrives whole.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from conkd_scale.config import build_config
from conkd_scale.data.synthetic import DEFAULT_DIR as DEFAULT_SYNTHETIC_DIR
from conkd_scale.utils.errors import ConfigError, ConkdError
from conkd_scale.utils.procs import ROOT, free_port

C = TypeVar("C")
R = TypeVar("R")


# ---------------------------------------------------------------------------- systems
@dataclass(frozen=True)
class Row:
    """One system of the table: how its model is obtained and how it is evaluated."""

    key: str
    label: str
    system: str  # evaluate.py --system
    distill: tuple[str, ...] | None = None  # distill.py overrides (None: no student to train)
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
    # η = auto (chosen on the validation split) beside the paper's η; the table drops it
    # when the chosen η equals the hard row's
    Row(
        "hard_auto",
        "5b. ConKD, hard gate, η = auto (validation)",
        "student",
        ("loss.gate.mode=hard", "loss.gate.eta=auto"),
    ),
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
ROW = {r.key: r for r in ROWS}


# ---------------------------------------------------------------------------- options
def project_path(path: str | Path) -> Path:
    """``path`` made absolute; a relative path is taken from the project root."""
    return ROOT / Path(path).expanduser()


@dataclass(frozen=True)
class StudentSize:
    """A student size: a preset (``tiny`` ... ``large``, from scratch) or a local pretrained
    model directory (``pretrained:DIR``, or a path such as ``/models/DialoGPT-small`` or
    ``./ckpt``; relative paths are taken from the project root)."""

    spec: str  # as given
    label: str  # in run names and reports: the preset, or the directory's name
    pretrained: str | None = None  # the directory, absolute

    @property
    def overrides(self) -> list[str]:
        """``launch/distill.py`` overrides that select this student."""
        if self.pretrained is not None:
            return [f"student.pretrained={self.pretrained}"]
        return [f"student.preset={self.label}"]


def parse_size(spec: str, key: str = "sizes") -> StudentSize:
    """A :class:`StudentSize` from ``spec``; a pretrained directory is checked now (config,
    weights, tokenizer, supported family), naming ``key`` in the error."""
    from conkd_scale.models.families import check_pretrained_dir, looks_like_path
    from conkd_scale.models.presets import PRESETS

    if spec in PRESETS:
        return StudentSize(spec, spec)
    if spec.startswith("pretrained:") or looks_like_path(spec) or "/" in spec:
        path = spec.removeprefix("pretrained:")
        if not path:
            raise ConfigError(f"{key}: {spec!r} names no directory (pretrained:DIR)")
        d = project_path(path)
        check_pretrained_dir(d, f"{key}: {spec!r}, directory")
        label = re.sub(r"[^A-Za-z0-9._+-]+", "_", d.name) or "pretrained"
        return StudentSize(spec, label, str(d))
    raise ConfigError(
        f"{key}: unknown preset {spec!r} (presets: {', '.join(PRESETS)}; or a local "
        "pretrained model directory as pretrained:DIR, or a path such as ./DIR)"
    )


@dataclass
class JobOptions:
    """What every child job of an orchestrator shares (``key=value`` overrides too)."""

    dataset: Literal["redial", "inspired", "synthetic"] = "synthetic"
    data_dir: str | None = None  # None: runs/data/synthetic (generated) for synthetic
    nproc: int = 2  # ranks of a local distillation job
    ds_config: str = "ds_configs/zero3.json"
    seed: int = 0
    max_turns: int = 0  # evaluation: first N recommender turns of the test split (0: all)
    distill: list[str] = field(default_factory=list)  # launch/distill.py overrides, every student
    rec: list[str] = field(default_factory=list)  # R's training overrides
    dialog: list[str] = field(default_factory=list)  # D's training overrides
    evaluate: list[str] = field(default_factory=list)  # launch/evaluate.py overrides
    eta: str = "0.5"  # [decision] η of every hard-gate student (a number in [0, 1], or auto:
    # chosen on the validation split); the paper's 0.5 by default
    teachers_mode: Literal["online", "offline"] = "offline"  # offline: the teachers run once
    # per (R, D) pair into a teacher cache that every student reads; online: D runs in
    # every student's job (also when a student's distill overrides say teachers.mode=online)

    def __post_init__(self) -> None:
        check_eta(self.eta)
        if self.dataset != "synthetic" and self.data_dir is None:
            raise ConfigError(f"data_dir is required for dataset={self.dataset!r}")
        if self.nproc < 1:
            raise ConfigError(f"nproc: expected >= 1, got {self.nproc}")
        check_pretrained_overrides(self.distill, "student.pretrained", "distill")
        check_pretrained_overrides(self.dialog, "model.pretrained", "dialog")

    @property
    def data_given(self) -> str:
        """The data directory as given (reports record it so)."""
        return self.data_dir or DEFAULT_SYNTHETIC_DIR

    @property
    def data(self) -> str:
        """The data directory, absolute."""
        return str(project_path(self.data_given))


def check_pretrained_overrides(overrides: Sequence[str], name: str, key: str) -> None:
    """A local directory given as ``name=DIR`` in the ``key`` overrides is a supported
    pretrained model directory (checked before any child job starts)."""
    from conkd_scale.models.families import check_pretrained_dir, looks_like_path

    for ov in overrides:
        k, _, value = ov.partition("=")
        value = value.strip()
        if k.strip() == name and value and (looks_like_path(value) or Path(value).is_dir()):
            check_pretrained_dir(project_path(value), f"{key}: {name}")


def check_eta(eta: object, key: str = "eta") -> None:
    """``eta`` is ``auto`` or a number in [0, 1] (as a string or a number)."""
    if eta == "auto":
        return
    try:
        value = float(str(eta))
    except ValueError:
        value = math.nan
    if isinstance(eta, bool) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: {eta!r} must be a number in [0, 1] or auto")


# ---------------------------------------------------------------------------- arguments
def json_list(items: Sequence[str]) -> str:
    """A list value for a ``key=value`` override that keeps items with commas whole."""
    return json.dumps(list(items), separators=(",", ":"), ensure_ascii=False)


def distill_args(
    opts: JobOptions,
    row: Row,
    *,
    out: Path,
    rec_dir: Path,
    dialog_dir: Path,
    extra: Sequence[str] = (),
    seed: int | None = None,
    cache_dir: Path | None = None,
) -> list[str]:
    """``launch/distill.py`` arguments of a student row. Missing teachers are trained by the
    job with ``opts.rec`` / ``opts.dialog`` and ``opts.seed``; the student with ``seed``
    (default ``opts.seed``) and ``opts.eta``; with ``cache_dir``, the teachers are read from
    that cache under ``opts.teachers_mode=offline``; then come ``opts.distill``, ``extra``,
    and last the row's own overrides, which win."""
    if row.distill is None:
        raise ValueError(f"{row.key} is a teacher row: it has no student to distil")
    rec = [*opts.rec, f"seed={opts.seed}", *(["use_kg=false"] if row.rec == "rec_nokg" else [])]
    dialog = [*opts.dialog, f"train.seed={opts.seed}"]
    return [
        "--deepspeed",
        opts.ds_config,
        f"dataset={opts.dataset}",
        f"data_dir={opts.data}",
        f"output_dir={out}",
        f"teachers.rec_dir={rec_dir}",
        f"teachers.dialog_dir={dialog_dir}",
        f"train.seed={opts.seed if seed is None else seed}",
        f"loss.gate.eta={opts.eta}",
        f"teachers.rec_overrides={json_list(rec)}",
        f"teachers.dialog_overrides={json_list(dialog)}",
        *(
            [f"teachers.mode={opts.teachers_mode}", f"teachers.cache_dir={cache_dir}"]
            if cache_dir is not None
            else []
        ),
        *opts.distill,
        *extra,
        *row.distill,
    ]


def evaluate_args(
    opts: JobOptions,
    row: Row,
    *,
    out: Path,
    model: Path | None,
    rec_dir: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """``launch/evaluate.py`` arguments of a row (its system, model and R); ``extra`` then
    ``opts.evaluate`` come last."""
    args = ["--system", row.system, "--dataset", opts.dataset, "--data-dir", opts.data]
    args += ["--output-dir", str(out)]
    if model is not None:
        args += ["--model", str(model)]
    if row.system != "repeat":  # rec, pipeline; student and dialog for R-agree@1
        args += ["--rec-teacher", str(rec_dir)]
    if opts.max_turns:
        args += ["--max-turns", str(opts.max_turns)]
    if row.key == "no_mode":
        args.append("generation.use_mode_tokens=false")
    return [*args, *extra, *opts.evaluate]


def deepspeed_command(nproc: int, script: str, args: Sequence[str]) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args`` with this interpreter's
    launcher and a port that is free now."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


def python_command(script: str, args: Sequence[str]) -> list[str]:
    """``script args`` run by this interpreter."""
    return [sys.executable, script, *args]


# ---------------------------------------------------------------------------- teachers
def student_trained(out: Path) -> bool:
    """A distillation run in ``out`` has exported its student (``out/hf``)."""
    return (out / "hf" / "config.json").is_file()


def teachers_ready(rec_dir: Path, dialog_dir: Path) -> bool:
    """Both teachers trained (the checks launch/distill.py makes before auto-training)."""
    from conkd_scale.distill.teachers import dialog_trained, rec_trained

    return rec_trained(rec_dir) and dialog_trained(dialog_dir)


def teacher_commands(nproc: int, distill: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(teacher, command)`` for each teacher that a ``launch/distill.py`` job with arguments
    ``distill`` would train first, with the settings it would use: R by
    ``launch/train_rec_teacher.py``, D by ``launch/train_dialog_teacher.py`` on ``nproc``
    ranks. Empty when both are trained."""
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.distill.teachers import (
        dialog_teacher_overrides,
        dialog_trained,
        rec_teacher_overrides,
        rec_trained,
    )
    from conkd_scale.launching import parse_launch_args

    parsed = parse_launch_args(None, list(distill))
    cfg = build_config(DistillConfig, parsed.config, parsed.overrides)
    commands = []
    if cfg.uses_teachers and not rec_trained(cfg.rec_dir):
        rec = rec_teacher_overrides(cfg)
        if cfg.teachers.rec_config:
            rec = ["--config", cfg.teachers.rec_config, *rec]
        commands.append(("rec", python_command("launch/train_rec_teacher.py", rec)))
    if not dialog_trained(cfg.dialog_dir):
        dialog = [
            "--deepspeed",
            cfg.teachers.dialog_train_ds_config,
            *dialog_teacher_overrides(cfg),
        ]
        script = "launch/train_dialog_teacher.py"
        commands.append(("dialog", deepspeed_command(nproc, script, dialog)))
    return commands


def cache_complete(cache_dir: Path) -> bool:
    """``cache_dir`` holds a finished teacher cache (whatever it was made for)."""
    path = cache_dir / "manifest.json"
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def cache_args(distill: Sequence[str]) -> list[str] | None:
    """``launch/cache_teachers.py`` arguments that build the teacher cache a
    ``launch/distill.py`` job with arguments ``distill`` reads (its own config: the same data,
    layout and teachers, trained first when missing; ``--deepspeed``: D's inference config);
    None when it runs online or its cache is complete."""
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.launching import parse_launch_args

    parsed = parse_launch_args(None, list(distill))
    cfg = build_config(DistillConfig, parsed.config, parsed.overrides)
    if not cfg.offline or cache_complete(project_path(cfg.cache_dir)):
        return None
    config = ["--config", parsed.config] if parsed.config else []
    return ["--deepspeed", cfg.teachers.inference_ds_config, *config, *parsed.overrides]


# ---------------------------------------------------------------------------- command line
def cli_parser(doc: str | None, config_cls: type) -> argparse.ArgumentParser:
    """An orchestrator's parser: ``--config FILE`` and ``key=value`` overrides (add flags)."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help=f"JSON/YAML file of {config_cls.__name__} fields")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def cli_overrides(args: argparse.Namespace, flags: Sequence[str]) -> list[str]:
    """The ``key=value`` overrides, then one for each of ``flags`` that was given (they win)."""
    given = [(k, getattr(args, k)) for k in flags]
    return [*args.overrides, *(f"{k}={v}" for k, v in given if v is not None)]


def run_cli(
    config_cls: type[C], config_file: str | None, overrides: Sequence[str], run: Callable[[C], R]
) -> tuple[C, R] | None:
    """Build the config and run it; a bad config or a failed child job is printed as an error
    and gives ``None``."""
    try:
        cfg = build_config(config_cls, config_file, overrides)
        return cfg, run(cfg)
    except (ConkdError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return None
