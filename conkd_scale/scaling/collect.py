"""The numbers of a scaling study's report, read from its runs (``summary.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conkd_scale.scaling.analysis import (
    conversation_profiles,
    load_trace,
    read_jsonl,
    summarise_trace,
    training_curves,
)
from conkd_scale.scaling.config import TEACHER_EVAL, StudyConfig
from conkd_scale.scaling.verdict import gate_status, group_runs, judge, size_comparison

METRICS = ("F1@1", "ReR@1", "R-agree@1", "R@10", "PPL", "Dist-2")
HIGHER_IS_BETTER = {"F1@1": True, "ReR@1": True, "R-agree@1": True, "R@10": True,
                    "PPL": False, "Dist-2": True}  # fmt: skip
HARD = "hard"  # the verdict compares these two variants
SOFT = "soft"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def collect(cfg: StudyConfig) -> dict[str, Any]:
    """Per run: size, variant, seed, parameters, metrics, η, gate summary and training
    curves; per (size, variant) the mean ± sd over seeds; D's gate and metrics; whether
    the hard gate opened; the hard − soft verdict."""
    infos = {run.name: _read_json(cfg.run_dir(run) / "run_info.json") for run in cfg.runs()}
    eta = _eta(cfg, infos)
    runs = []
    for run in cfg.runs():
        ev = cfg.eval_dir(run.name)
        metrics = json.loads((ev / "metrics.json").read_text(encoding="utf-8"))
        info = infos[run.name]
        rows = read_jsonl(cfg.run_dir(run) / "metrics.jsonl")
        runs.append(
            {
                "name": run.name,
                "size": run.size,
                "variant": run.row.key,
                "seed": run.seed,
                "label": run.row.label,
                "params": info.get("student_params"),
                "eta": info.get("eta"),  # the η it trained with (None: no teacher)
                "metrics": {k: metrics.get(k) for k in METRICS},
                "recommendation_turns": metrics.get("counts", {}).get("recommendation_turns", 0),
                "gate": summarise_trace(load_trace(ev / "gate_trace.jsonl"), eta["value"]),
                "curves": training_curves(rows),
            }
        )
    teacher_trace = load_trace(cfg.eval_dir(TEACHER_EVAL) / "gate_trace.jsonl")
    teacher_metrics = json.loads(
        (cfg.eval_dir(TEACHER_EVAL) / "metrics.json").read_text(encoding="utf-8")
    )
    teacher_gate = summarise_trace(teacher_trace, eta["value"])
    hard_runs = [r for r in runs if r["variant"] == HARD]
    status = gate_status(teacher_gate, hard_runs, eta["value"], eta["calibration"])
    return {
        "dataset": cfg.dataset,
        "data_dir": cfg.data_given,
        "eta": eta["value"],
        "eta_config": cfg.eta,
        "eta_source": eta["source"],
        "eta_runs": eta["runs"],
        "eta_calibration": eta["calibration"],
        "seeds": cfg.student_seeds,
        "seed_sizes": cfg.seeded_sizes,
        "sizes": [s for s in dict.fromkeys(r["size"] for r in runs)],
        "variants": [v.key for v in cfg.variants()],
        "runs": runs,
        "groups": group_runs(runs),
        "teacher": {
            "gate": teacher_gate,
            "metrics": {k: teacher_metrics.get(k) for k in METRICS},
            "example": _example_conversation(teacher_trace, eta["value"]),
        },
        "gate_status": status,
        "bootstrap": {
            "unit": cfg.bootstrap_unit,
            "resamples": cfg.bootstrap_resamples,
            "seed": cfg.bootstrap_seed,
        },
        "verdict": _verdict(cfg, runs, status["closed"]),
    }


def _verdict(cfg: StudyConfig, runs: list[dict[str, Any]], closed: bool) -> dict[str, Any] | None:
    """Hard − soft at every size that ran both (None: the study has not both gates)."""
    if not {HARD, SOFT} <= {r["variant"] for r in runs}:
        return None
    comparisons = []
    for size in dict.fromkeys(r["size"] for r in runs):
        by = {(r["variant"], r["seed"]): r for r in runs if r["size"] == size}
        seeds = [s for v, s in by if v == HARD and (SOFT, s) in by]
        if not seeds:
            continue
        a = {s: by[HARD, s] for s in seeds}
        b = {s: by[SOFT, s] for s in seeds}
        gens = [[read_jsonl(cfg.eval_dir(x[s]["name"]) / "generations.jsonl") for s in seeds]
                for x in (a, b)]  # fmt: skip
        comparisons.append(
            size_comparison(
                size,
                a[seeds[0]]["params"],
                {s: r["metrics"] for s, r in a.items()},
                {s: r["metrics"] for s, r in b.items()},
                *gens,
                unit=cfg.bootstrap_unit,
                resamples=cfg.bootstrap_resamples,
                seed=cfg.bootstrap_seed,
            )
        )
    return judge(comparisons, closed)


def study_info(cfg: StudyConfig) -> dict[str, Any]:
    """``logs/study.json``: the runs' wall times across invocations."""
    return _read_json(cfg.logs / "study.json")


def size_params(summary: dict[str, Any], size: str) -> int | None:
    """The parameter count of the students of one size preset."""
    return next((r["params"] for r in summary["runs"] if r["size"] == size), None)


def _eta(cfg: StudyConfig, infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """η of the students' hard gate: the one the hard-gate runs trained with (their
    ``run_info.json``; with ``eta=auto``, the value chosen on the validation split, whose
    calibration comes along), else the configured number, else the paper's 0.5."""
    used = {name: info["eta"] for name, info in infos.items() if info.get("eta") is not None}
    hard = [run.name for run in cfg.runs() if "loss.gate.mode=hard" in (run.row.distill or ())]
    first = next((n for n in [*hard, *used] if n in used), None)
    if first is not None:
        value, source = float(used[first]), f"run_info.json of {first}"
    elif cfg.eta != "auto":
        value, source = float(cfg.eta), "configured (no run recorded one)"
    else:
        value, source = 0.5, "none recorded (η = auto): 0.5 shown"
    calibration = infos.get(first, {}).get("gate_calibration") if first else None
    return {"value": value, "source": source, "runs": used, "calibration": calibration}


def _example_conversation(traces: list, eta: float) -> dict[str, Any]:
    """The conversation with the most recommender turns (its soft turn gates, in order)."""
    convs = conversation_profiles(traces, "soft", eta)["conversations"]
    if not convs:
        return {}
    cid = max(convs, key=lambda c: (len(convs[c]), c))
    return {"conv_id": cid, "turns": convs[cid]}
