"""Train and evaluate the rows of METHOD.md's results table on one dataset.

Every student row is a ``deepspeed launch/distill.py`` job (``nproc`` ranks) per seed and
every evaluation a ``launch/evaluate.py`` run (arguments: :mod:`conkd_scale.jobs`); the
teachers are trained once (seed ``seed``), by the first distillation job, and reused. A run
whose outputs exist is not run again, so an interrupted table resumes where it stopped.

Reporting (METHOD.md "Reporting"): the trained rows 4-6 (and 5b, η = auto) run with every
seed of ``seeds`` (≥ 3 by default) and show mean ± sd; ablation rows run with the first seed
only (marked). ``η = auto`` (row 5b) is shown beside η = ``eta`` only where the chosen η
differs. ConKD (hard, soft, 5b) minus the multi-task row gets a paired-bootstrap 95%
interval on F1@1, ReR@1, R-agree@1 and PPL (:mod:`conkd_scale.results.stats`).

Outputs in ``results_dir``: ``results.json`` (per row: mean, sd, each seed's metrics and
counts, and every decision: η, decoding, item decoding, PPL's mode token, sizes, steps,
seeds; the intervals), ``results.md`` (the table and how it was made) and ``samples.md``
(20 fixed, seeded test contexts: gold reply, every system's reply, R's top-3).
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
from typing import Any, Literal

from conkd_scale.data.synthetic import ensure_synthetic
from conkd_scale.jobs import (
    ROW,
    ROWS,
    JobOptions,
    Row,
    cache_args,
    deepspeed_command,
    distill_args,
    evaluate_args,
    parse_size,
    project_path,
    python_command,
    student_trained,
    teacher_commands,
    teachers_ready,
)
from conkd_scale.results.stats import BOOTSTRAP_METRICS, mean_sd, paired_bootstrap
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import atomic_open, write_json
from conkd_scale.utils.procs import run_logged

COLUMNS = (
    "R@1",
    "R@10",
    "R@50",
    "R@10/new",
    "R@50/new",
    "ReR@1[class]",
    "F1@1[class]",
    "R-agree@1[class]",
    "rec_turn_item_rate[class]",
    "ReR@1[token]",
    "F1@1[token]",
    "R-agree@1[token]",
    "rec_turn_item_rate[token]",
    "discrepancy",
    "PPL",
    "Dist-2",
    "BLEU-2",
)
TEACHERS_FROM = ROW["hard"]  # the student job that trains the teachers of the teacher rows
SEEDED = ("onehot", "hard", "soft", "hard_auto")  # rows 4-6 (and 5b): every seed
BASELINE = "onehot"  # the intervals compare ConKD with the multi-task student
CONKD = ("hard", "soft", "hard_auto")
N_SAMPLES = 20


@dataclass
class ResultsConfig(JobOptions):
    """``launch/results_table.py`` options (``key=value`` overrides too); relative paths are
    taken from the project root."""

    work_dir: str | None = None  # runs and teachers; None: runs/results/<dataset>
    student: str | None = None  # the students' size: a preset (tiny ... large) or a local
    # pretrained directory as pretrained:DIR (or a path); None: launch/distill.py's default
    results_dir: str | None = None  # results.md/json; None: results/<dataset>
    ablations: bool = False  # also the ablation rows (7a-7f)
    only: list[str] = field(default_factory=list)  # run just these row keys
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # students of rows 4-6, 5b
    # (ablations: the first); the teachers use ``seed``
    eta_auto: bool = True  # row 5b: the hard gate with η = auto beside η = ``eta``
    bootstrap_unit: Literal["turn", "conversation"] = "turn"  # [decision] resampled units
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    samples_seed: int = 0  # which 20 test contexts samples.md shows

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student is not None:
            parse_size(self.student, "student")  # checks a pretrained directory now
        for k in self.only:
            if k not in ROW:
                raise ConfigError(f"only: unknown row {k!r} (rows: {sorted(ROW)})")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed (METHOD.md: >= 3 per trained row)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: repeated seed in {self.seeds}")
        if self.bootstrap_unit not in ("turn", "conversation"):
            raise ConfigError(f"bootstrap_unit: {self.bootstrap_unit!r} is not turn/conversation")
        if self.bootstrap_resamples < 1:
            raise ConfigError(f"bootstrap_resamples: expected >= 1, got {self.bootstrap_resamples}")

    @property
    def work(self) -> Path:
        return project_path(self.work_dir or f"runs/results/{self.dataset}")

    @property
    def results(self) -> Path:
        return project_path(self.results_dir or f"results/{self.dataset}")

    def rows(self) -> list[Row]:
        rows = [r for r in ROWS if self.ablations or not r.ablation]
        if not self.eta_auto or self.eta == "auto":
            rows = [r for r in rows if r.key != "hard_auto"]
        return [r for r in rows if not self.only or r.key in self.only]

    def row_seeds(self, row: Row) -> list[int | None]:
        """The seeds a row is run with (``None``: a teacher row, trained once)."""
        if row.distill is None:
            return [None]
        return list(self.seeds) if row.key in SEEDED else [self.seeds[0]]


class ResultsTable:
    """Runs the rows (skipping finished runs) and writes the table."""

    def __init__(self, cfg: ResultsConfig) -> None:
        self.cfg = cfg
        self.walls: dict[str, float] = {}

    def _all_walls(self, keys: set[str]) -> dict[str, float]:
        """This table's rows and the teacher caches they read: their walls now, or from the
        invocation that ran them."""
        walls = _merge_walls(self.cfg.results / "results.json", self.walls)
        return {k: v for k, v in walls.items() if k.split("/")[0] in keys | {"cache"}}

    def _run(self, wall_key: str, cmd: Sequence[str], log: str) -> None:
        self.walls[wall_key] = run_logged(cmd, self.cfg.work / "logs" / log)

    def _teacher_dirs(self, row: Row) -> tuple[Path, Path]:
        t = self.cfg.work / "teachers"
        return t / row.rec, t / row.dialog

    @staticmethod
    def _name(row: Row, seed: int | None) -> str:
        return row.key if seed is None else f"{row.key}/seed{seed}"

    def _distill_args(self, row: Row, seed: int | None = None) -> list[str]:
        rec_dir, dialog_dir = self._teacher_dirs(row)
        seed = self.cfg.seeds[0] if seed is None else seed
        out = self.cfg.work / self._name(row, seed)
        student = parse_size(self.cfg.student, "student").overrides if self.cfg.student else []
        cache = self.cfg.work / "teachers" / "cache" / f"{row.rec}-{row.dialog}"
        return distill_args(
            self.cfg,
            row,
            out=out,
            rec_dir=rec_dir,
            dialog_dir=dialog_dir,
            seed=seed,
            extra=student,
            cache_dir=cache,
        )

    def _distill(self, row: Row, seed: int | None = None) -> Path:
        seed = self.cfg.seeds[0] if seed is None else seed
        name = self._name(row, seed)
        out = self.cfg.work / name
        if not student_trained(out):
            args = self._distill_args(row, seed)
            cargs = cache_args(args)  # once per (R, D): the first student that reads it
            if cargs is not None:
                pair = f"{row.rec}-{row.dialog}"
                cmd = deepspeed_command(self.cfg.nproc, "launch/cache_teachers.py", cargs)
                self._run(f"cache/{pair}", cmd, f"cache_{pair}.log")
            cmd = deepspeed_command(self.cfg.nproc, "launch/distill.py", args)
            self._run(f"{name}/train", cmd, f"{name.replace('/', '.')}.log")
        return out / "hf"

    def _ensure_teachers(self) -> None:
        """R and D of the teacher rows: trained by the first student job, or on their own
        (same settings) when that student was trained before them."""
        if teachers_ready(*self._teacher_dirs(TEACHERS_FROM)):
            return
        self._distill(TEACHERS_FROM)
        for name, cmd in teacher_commands(self.cfg.nproc, self._distill_args(TEACHERS_FROM)):
            self._run(f"{name}/train", cmd, f"teacher_{name}.log")  # rows rec and dialog

    def eval_dir(self, row: Row, seed: int | None) -> Path:
        return self.cfg.work / "eval" / self._name(row, seed)

    def _evaluate(self, row: Row, model: Path | None, seed: int | None = None) -> dict[str, Any]:
        out = self.eval_dir(row, seed)
        if not (out / "metrics.json").is_file():
            rec_dir, _ = self._teacher_dirs(row)
            args = evaluate_args(self.cfg, row, out=out, model=model, rec_dir=rec_dir)
            cmd = python_command("launch/evaluate.py", args)
            name = self._name(row, seed)
            self._run(f"{name}/eval", cmd, f"{name.replace('/', '.')}.eval.log")
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))

    def _model(self, row: Row, seed: int | None = None) -> Path | None:
        """The model a row evaluates (trained first when missing); None for R and repeat."""
        if row.distill is not None:
            return self._distill(row, seed)
        if row.system == "repeat":
            return None  # no teacher: the training split's counts and the context
        self._ensure_teachers()
        return self._teacher_dirs(row)[1] / "hf" if row.system != "rec" else None

    def _decisions(self, row: Row, seed: int | None, metrics: dict[str, Any]) -> dict[str, Any]:
        """What a run used: its evaluation's meta (decoding, item decoding, PPL's mode
        token, ...) and, for a student, its size, steps, loss and η (with the calibration of
        η = auto on the validation split)."""
        meta = dict(metrics.get("meta", {}))
        out: dict[str, Any] = {
            k: meta.get(k)
            for k in ("split", "decoding", "item_decoding", "item_decodings", "ppl_include_mode")
            if k in meta
        }
        out["seed"] = seed
        if row.distill is None:
            return out
        run = self.cfg.work / self._name(row, seed)
        cfg = _read_json(run / "config.json")
        info = _read_json(run / "run_info.json")
        loss = cfg.get("loss", {})
        train = cfg.get("train", {})
        student = cfg.get("student", {})
        if student.get("pretrained"):
            out["student_pretrained"] = student["pretrained"]
        out.update(
            student_preset=None if student.get("pretrained") else student.get("preset"),
            student_params=info.get("student_params"),
            max_steps=train.get("max_steps"),
            epochs=train.get("epochs"),
            total_steps=info.get("total_steps"),
            gate=loss.get("gate", {}).get("mode"),
            w_kd=loss.get("w_kd"),
            eta=info.get("eta"),
            eta_config=self.cfg.eta if "loss.gate.eta=auto" not in row.distill else "auto",
        )
        if info.get("gate_calibration"):
            out["gate_calibration"] = info["gate_calibration"]
        return out

    def _same_eta(self, row: Row, decisions: dict[str, Any]) -> bool:
        """Row 5b chose the same η as row 5 uses: the two rows are one."""
        if row.key != "hard_auto" or self.cfg.eta == "auto":
            return False
        eta = decisions.get("eta")
        return eta is not None and abs(float(eta) - float(self.cfg.eta)) < 1e-9

    def _row_result(self, row: Row) -> dict[str, Any]:
        seeds = self.cfg.row_seeds(row)
        per_seed: dict[str, dict[str, Any]] = {}
        counts: dict[str, Any] = {}
        decisions: dict[str, Any] = {}
        for seed in seeds:
            model = self._model(row, seed)
            if row.key == "hard_auto" and not decisions:  # η known once the first run trained
                first = self._decisions(row, seed, {})
                if self._same_eta(row, first):
                    return {
                        "label": row.label,
                        "same_as": "hard",
                        "decisions": {"seeds": [seed], **first},
                        "metrics": {},
                    }
            metrics = self._evaluate(row, model, seed)
            tag = "-" if seed is None else str(seed)
            per_seed[tag] = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
            counts[tag] = metrics.get("counts", {})
            decisions[tag] = self._decisions(row, seed, metrics)
        keys = list(dict.fromkeys(k for m in per_seed.values() for k in m))
        mean: dict[str, Any] = {}
        sd: dict[str, Any] = {}
        for k in keys:
            mean[k], sd[k] = mean_sd([m.get(k) for m in per_seed.values()])
        first = next(iter(decisions.values()))
        return {
            "label": row.label,
            "system": row.system,
            "ablation": row.ablation,
            "seeds": [s for s in seeds if s is not None],
            "single_seed": row.distill is not None and len(seeds) == 1,
            "metrics": mean,
            "sd": sd if len(seeds) > 1 else {},
            "per_seed": per_seed if row.distill is not None else {},
            "counts": counts,
            "decisions": {
                **{k: v for k, v in first.items() if k != "seed"},
                "per_seed": decisions if len(seeds) > 1 else {},
            },
        }

    def _generations(self, row: Row, seed: int | None) -> list[dict[str, Any]]:
        path = self.eval_dir(row, seed) / "generations.jsonl"
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]

    def intervals(self, results: dict[str, Any]) -> dict[str, Any]:
        """ConKD rows minus the multi-task row: paired-bootstrap 95% intervals."""
        cfg = self.cfg
        if BASELINE not in results:
            return {}
        base = ROW[BASELINE]
        base_runs = [self._generations(base, s) for s in results[BASELINE]["seeds"]]
        out: dict[str, Any] = {}
        for key in CONKD:
            if key not in results or results[key].get("same_as"):
                continue
            runs = [self._generations(ROW[key], s) for s in results[key]["seeds"]]
            out[f"{key}-{BASELINE}"] = {
                m: paired_bootstrap(
                    runs,
                    base_runs,
                    m,
                    unit=cfg.bootstrap_unit,
                    resamples=cfg.bootstrap_resamples,
                    seed=cfg.bootstrap_seed,
                )
                for m in BOOTSTRAP_METRICS
            }
        return out

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
            results[row.key] = self._row_result(row)
        report = {
            "dataset": cfg.dataset,
            "data_dir": cfg.data_given,
            "seed": cfg.seed,
            "seeds": list(cfg.seeds),
            "eta": cfg.eta,
            "max_turns": cfg.max_turns,
            "date": _dt.date.today().isoformat(),
            "machine": _machine(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "options": {
                "distill": list(cfg.distill),
                "rec": list(cfg.rec),
                "dialog": list(cfg.dialog),
                "evaluate": list(cfg.evaluate),
                "ablations": cfg.ablations,
            },
            "bootstrap": {
                "unit": cfg.bootstrap_unit,
                "resamples": cfg.bootstrap_resamples,
                "seed": cfg.bootstrap_seed,
            },
            "wall_s": round(time.perf_counter() - t0, 1),
            "run_walls_s": self._all_walls({r.key for r in rows}),
            "rows": results,
            "intervals": self.intervals(results),
        }
        write_json(cfg.results / "results.json", report)
        with atomic_open(cfg.results / "results.md", "w", encoding="utf-8") as f:
            f.write(render_markdown(report))
        with atomic_open(cfg.results / "samples.md", "w", encoding="utf-8") as f:
            f.write(self.samples(results))
        return report

    def samples(self, results: dict[str, Any]) -> str:
        """``samples.md``: :data:`N_SAMPLES` test recommendation turns drawn with
        ``samples_seed`` (the same ones whatever the models wrote), each with its context, the
        gold reply, R's top-3 and every system's reply (the first seed's run), items as
        titles."""
        import random

        from conkd_scale.data.corpus import load_dataset
        from conkd_scale.eval.generation import display_text

        cfg = self.cfg
        catalog = load_dataset(cfg.dataset, cfg.data, kg="none", splits=("test",)).catalog
        replies: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
        top3: dict[tuple[str, int], list[str]] = {}
        base: list[dict[str, Any]] = []
        for key, res in results.items():
            if res.get("same_as"):
                continue
            row = ROW[key]
            seeds = cfg.row_seeds(row)
            gens = self._generations(row, seeds[0])
            base = base or gens
            index = {(str(g["conv_id"]), int(g["turn_index"])): g for g in gens}
            if row.system == "rec":
                top3 = {k: g["r_top_items"][:3] for k, g in index.items()}
            elif "generated" in next(iter(index.values()), {}):
                replies[key] = index
        turns = [(str(g["conv_id"]), int(g["turn_index"])) for g in base if g["is_recommendation"]]
        picked = set(random.Random(cfg.samples_seed).sample(turns, min(N_SAMPLES, len(turns))))
        lines = [
            f"# Samples: {cfg.dataset}",
            "",
            f"{len(picked)} test recommendation turns drawn with seed {cfg.samples_seed} "
            f"(`random.Random({cfg.samples_seed}).sample` over the evaluated recommendation "
            "turns in corpus order), shown in corpus order. Items are shown as titles. Each "
            "system's reply is its greedy reply under the evaluation's item decoding "
            f"(seeded rows: seed {cfg.seeds[0]}); R's top-3 is R's ranking for the context.",
            "",
        ]
        by_key = {(str(g["conv_id"]), int(g["turn_index"])): g for g in base}
        for n, k in enumerate([t for t in turns if t in picked], 1):
            g = by_key[k]
            lines += [f"## {n}. conversation {k[0]}, turn {k[1]}", ""]
            for role, text in g["context"][-4:]:
                lines.append(f"> **{role}**: {display_text(text, catalog)}  ")
            lines += ["", f"- **gold**: {g['gold_rendered']}"]
            if k in top3:
                lines.append("- **R's top-3**: " + "; ".join(catalog.title(i) for i in top3[k]))
            for key, index in replies.items():
                r = index.get(k)
                text = r["rendered"] if r is not None else "(not evaluated)"
                lines.append(f"- **{results[key]['label']}**: {text or '(empty)'}")
            lines.append("")
        return "\n".join(lines)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _merge_walls(old_report: Path, walls: dict[str, float]) -> dict[str, float]:
    """Run wall times of earlier invocations (rows reused now) joined with this one's."""
    old = json.loads(old_report.read_text(encoding="utf-8")) if old_report.is_file() else {}
    return {**old.get("run_walls_s", {}), **walls}


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def _fmt(v: Any, sd: Any = None) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        text = f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        if isinstance(sd, float):
            text += f" ± {sd:.3f}" if abs(v) < 100 else f" ± {sd:.1f}"
        return text
    return str(v)


def _row_note(row: dict[str, Any]) -> str:
    d = row.get("decisions", {})
    notes = []
    if row.get("seeds"):
        n = len(row["seeds"])
        notes.append(f"{n} seeds" if n > 1 else "1 seed")
    if d.get("eta") is not None:
        notes.append(f"η = {d['eta']:.3g}" if isinstance(d["eta"], float) else f"η = {d['eta']}")
    if d.get("student_preset"):
        notes.append(str(d["student_preset"]))
    elif d.get("student_pretrained"):
        notes.append(Path(str(d["student_pretrained"])).name)
    return ", ".join(notes)


def render_markdown(report: dict[str, Any]) -> str:
    """The table (rows × METHOD.md metrics, mean ± sd over seeds) with how it was made, every
    decision, and the paired intervals."""
    seeds = report.get("seeds", [report.get("seed")])
    lines = [
        f"# Results: {report['dataset']}",
        "",
        f"Command: `{report['command']}` — {report['date']}, {report['machine']}, "
        f"student seeds {seeds} (teachers: seed {report['seed']}), "
        f"wall {report['wall_s']:.0f} s (this invocation; "
        f"{sum(report.get('run_walls_s', {}).values()) / 60:.1f} min summed over every "
        "training and evaluation run, earlier invocations included).",
        "",
        "| system | runs | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in report["rows"].values():
        if row.get("same_as"):
            continue
        m, sd = row["metrics"], row.get("sd", {})
        label = row["label"] + (" †" if row.get("single_seed") else "")
        cells = " | ".join(_fmt(m.get(c), sd.get(c)) for c in COLUMNS)
        lines.append(f"| {label} | {_row_note(row)} | {cells} |")
    first = next((r for r in report["rows"].values() if r.get("decisions", {}).get("split")), {})
    d = first.get("decisions", {})
    lines += [
        "",
        "Metrics as defined in METHOD.md, on the "
        f"{d.get('split', 'test')} split"
        + (f" (first {report['max_turns']} recommender turns)" if report.get("max_turns") else "")
        + ". `–`: does not apply to the system (discrepancy: the pipeline only). "
        "R@k for language models: teacher-forced, at gold item positions. Mean ± sd (sample "
        "sd) over the seeds in `runs`; † one seed (ablation). `[class]`/`[token]`: "
        "in-response metrics under item decoding class / token "
        f"(decoding {d.get('decoding', 'greedy')}). PPL scores the gold mode token: "
        f"{d.get('ppl_include_mode', True)}. η: the hard gate's threshold "
        f"(configured {report.get('eta', '0.5')}; 5b: chosen on the validation split).",
    ]
    same = [r for r in report["rows"].values() if r.get("same_as")]
    for r in same:
        lines.append(
            f"{r['label']}: η = auto chose η = {r['decisions'].get('eta')}, the same as row "
            f"5, so the row is not repeated."
        )
    counts = first.get("counts", {})
    if counts:
        c = next(iter(counts.values()))
        lines.append(
            f"Evaluated: {c.get('turns')} recommender turns, "
            f"{c.get('recommendation_turns')} recommendation turns."
        )
    intervals = report.get("intervals", {})
    if intervals:
        b = report.get("bootstrap", {})
        lines += [
            "",
            "## ConKD minus the multi-task student (paired bootstrap)",
            "",
            f"95% intervals: {b.get('resamples')} resamples of test {b.get('unit')}s "
            f"(seed {b.get('seed')}), the same draw for both rows and every seed; each row's "
            "value is the mean over its seeds. PPL: lower is better.",
            "",
            "| comparison | " + " | ".join(BOOTSTRAP_METRICS) + " |",
            "|---|" + "---|" * len(BOOTSTRAP_METRICS),
        ]
        for name, per in intervals.items():
            cells = []
            for metric in BOOTSTRAP_METRICS:
                iv = per.get(metric, {})
                if iv.get("diff") is None or iv.get("ci95") is None:
                    cells.append("–")
                    continue
                lo, hi = iv["ci95"]
                star = " *" if iv["excludes_0"] else ""
                cells.append(f"{iv['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "`*`: the interval excludes 0."]
    lines.append("")
    return "\n".join(lines)
