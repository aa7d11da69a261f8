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

METRICS = ("F1@1", "ReR@1", "R@10", "PPL", "Dist-2")
HIGHER_IS_BETTER = {"F1@1": True, "ReR@1": True, "R@10": True, "PPL": False, "Dist-2": True}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def collect(cfg: StudyConfig) -> dict[str, Any]:
    """Per run: size, variant, parameters, metrics, gate summary and training curves; D's
    gate and metrics."""
    eta = _eta(cfg)
    runs = []
    for run in cfg.runs():
        ev = cfg.eval_dir(run.name)
        metrics = json.loads((ev / "metrics.json").read_text(encoding="utf-8"))
        info = _read_json(cfg.run_dir(run) / "run_info.json")
        rows = read_jsonl(cfg.run_dir(run) / "metrics.jsonl")
        runs.append(
            {
                "name": run.name,
                "size": run.size,
                "variant": run.row.key,
                "label": run.row.label,
                "params": info.get("student_params"),
                "metrics": {k: metrics.get(k) for k in METRICS},
                "recommendation_turns": metrics.get("counts", {}).get("recommendation_turns", 0),
                "gate": summarise_trace(load_trace(ev / "gate_trace.jsonl"), eta),
                "curves": training_curves(rows),
            }
        )
    teacher_trace = load_trace(cfg.eval_dir(TEACHER_EVAL) / "gate_trace.jsonl")
    teacher_metrics = json.loads(
        (cfg.eval_dir(TEACHER_EVAL) / "metrics.json").read_text(encoding="utf-8")
    )
    return {
        "dataset": cfg.dataset,
        "data_dir": cfg.data_given,
        "eta": eta,
        "sizes": [s for s in dict.fromkeys(r["size"] for r in runs)],
        "variants": [v.key for v in cfg.variants()],
        "runs": runs,
        "teacher": {
            "gate": summarise_trace(teacher_trace, eta),
            "metrics": {k: teacher_metrics.get(k) for k in METRICS},
            "example": _example_conversation(teacher_trace, eta),
        },
    }


def study_info(cfg: StudyConfig) -> dict[str, Any]:
    """``logs/study.json``: the runs' wall times across invocations."""
    return _read_json(cfg.logs / "study.json")


def size_params(summary: dict[str, Any], size: str) -> int | None:
    """The parameter count of the students of one size preset."""
    return next((r["params"] for r in summary["runs"] if r["size"] == size), None)


def _eta(cfg: StudyConfig) -> float:
    """η of the students' hard gate (from the first run's resolved config; default 0.5)."""
    for run in cfg.runs():
        path = cfg.run_dir(run) / "config.json"
        if path.is_file():
            return float(json.loads(path.read_text(encoding="utf-8"))["loss"]["gate"]["eta"])
    return 0.5


def _example_conversation(traces: list, eta: float) -> dict[str, Any]:
    """The conversation with the most recommender turns (its soft turn gates, in order)."""
    convs = conversation_profiles(traces, "soft", eta)["conversations"]
    if not convs:
        return {}
    cid = max(convs, key=lambda c: (len(convs[c]), c))
    return {"conv_id": cid, "turns": convs[cid]}
