"""Seeds, the gate's state and the hard − soft verdict of a scaling study (pure functions of
the per-run numbers that :mod:`~conkd_scale.scaling.collect` reads; tested on hand-made ones).

- :func:`group_runs`: per (size, variant), the metrics and gate statistics as mean ± sd over
  the seeds that ran (sd: sample sd, only with several seeds);
- :func:`gate_status`: did D's hard gate open at the η the students used (on the training
  batches, on the test split, and on the validation split where η = auto chose it);
- :func:`size_comparison`: hard − soft at one size, per metric: the paired per-seed
  differences (mean ± sd) and a paired bootstrap over test turns
  (:func:`conkd_scale.results.stats.paired_bootstrap`, as the results table);
- :func:`judge`: whether each gap is clear and whether the paper's pattern appears.

**[decision] A gap is clear** when its 95% paired-bootstrap interval excludes 0 *and* it
exceeds twice the seed noise of a mean over ``n`` seeds, ``2 sd / √n``, with ``sd`` the
sd of the paired per-seed differences at that size, or, at a size that ran one seed, the
largest such sd measured at a seeded size (no seeded size: the interval alone decides).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from conkd_scale.results.stats import BOOTSTRAP_METRICS, mean_sd, paired_bootstrap

VERDICT_METRICS = BOOTSTRAP_METRICS  # F1@1, ReR@1, R-agree@1, PPL
PRIMARY = "F1@1"  # the metric the pattern is judged on
GATE_SCALARS = ("m_mean", "hard_gate_mean", "m_gold", "m_other", "fires", "precision",
                "recall", "f1")  # fmt: skip
PROFILE_SCALARS = ("mean_rec_turn", "mean_chat_turn")


def _mean_sd_dict(
    dicts: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    mean: dict[str, Any] = {}
    sd: dict[str, Any] = {}
    for k in keys:
        mean[k], sd[k] = mean_sd([d.get(k) for d in dicts])
    return mean, sd


def group_runs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (size, variant), in the runs' order: its seeds, and metrics and gate
    statistics as mean (``metrics``, ``gate``) and sd over seeds (``metrics_sd``,
    ``gate_sd``; empty with one seed). ``name``, ``params`` and ``recommendation_turns``
    are the first seed's."""
    keys = list(dict.fromkeys((r["size"], r["variant"]) for r in runs))
    out = []
    for size, variant in keys:
        rs = [r for r in runs if (r["size"], r["variant"]) == (size, variant)]
        metrics, metrics_sd = _mean_sd_dict([r["metrics"] for r in rs], list(rs[0]["metrics"]))
        gate, gate_sd = _mean_sd_dict([r["gate"] for r in rs], GATE_SCALARS)
        profile, _ = _mean_sd_dict([r["gate"]["profile"] for r in rs], PROFILE_SCALARS)
        several = len(rs) > 1
        out.append(
            {
                "name": rs[0]["name"],
                "size": size,
                "variant": variant,
                "params": rs[0]["params"],
                "seeds": [r["seed"] for r in rs],
                "recommendation_turns": rs[0]["recommendation_turns"],
                "metrics": metrics,
                "metrics_sd": metrics_sd if several else {},
                "gate": {**gate, "profile": profile},
                "gate_sd": gate_sd if several else {},
            }
        )
    return out


def _train_rate(curves: Mapping[str, Any]) -> float | None:
    """Mean of D's logged gate on a run's training batches (None: nothing logged)."""
    vals = [v for v in curves.get("train", {}).get("gate_mean", []) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def gate_status(
    teacher_gate: Mapping[str, Any],
    hard_runs: Sequence[Mapping[str, Any]],
    eta: float,
    calibration: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Did the hard gate open? D's hard gate 1[m > η] on the test split (rate, precision,
    recall, F1 against the gold item tokens), its mean on the hard students' training
    batches (``train_rate``: the λ those students were trained with), and on the
    validation split at η and at 0.5 (``valid``, from η = auto's calibration). ``closed``:
    it never opened on the training batches (or, with no training log, on the test split);
    then a hard-gate student is a dialogue-only KD student."""
    rates = [r for r in (_train_rate(run["curves"]) for run in hard_runs) if r is not None]
    train_rate = float(np.mean(rates)) if rates else None
    test = {k: teacher_gate.get(k) for k in ("fires", "precision", "recall", "f1")}
    closed = train_rate == 0.0 if train_rate is not None else test["fires"] == 0
    valid = None
    if calibration:
        valid = {k: calibration.get(k) for k in ("at_eta", "at_0.5", "m_gold_mean", "m_other_mean")}
    return {"eta": eta, "test": test, "train_rate": train_rate, "valid": valid, "closed": closed}


def size_comparison(
    size: str,
    params: int | None,
    a: Mapping[int, Mapping[str, Any]],
    b: Mapping[int, Mapping[str, Any]],
    a_gens: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    b_gens: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    *,
    unit: str = "turn",
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """A − B (hard − soft) at one size, per :data:`VERDICT_METRICS`. ``a``/``b``: each
    seed's metrics; ``a_gens``/``b_gens``: each seed's ``generations.jsonl`` records (in
    the order of the seeds both ran), for the paired bootstrap over test turns (None: no
    interval). Per metric: ``diff`` (mean of the paired per-seed differences), ``sd``
    (their sd; None with one seed), ``per_seed``, and ``ci95``/``excludes_0``/``turns``."""
    seeds = [s for s in a if s in b]
    out: dict[str, Any] = {"size": size, "params": params, "seeds": seeds, "metrics": {}}
    for m in VERDICT_METRICS:
        diffs = {s: _sub(a[s].get(m), b[s].get(m)) for s in seeds}
        mean, sd = mean_sd(list(diffs.values()))
        entry: dict[str, Any] = {"diff": mean, "sd": sd, "per_seed": diffs, "ci95": None,
                                 "excludes_0": None, "turns": None}  # fmt: skip
        if a_gens and b_gens:
            try:
                boot = paired_bootstrap(
                    a_gens, b_gens, m, unit=unit, resamples=resamples, seed=seed
                )
            except (KeyError, ValueError) as e:  # e.g. generations without per-turn fields
                entry["bootstrap_error"] = f"{type(e).__name__}: {e}"
            else:
                entry.update(
                    ci95=boot["ci95"],
                    excludes_0=boot["excludes_0"] if boot["ci95"] else None,
                    turns=boot["turns"],
                    bootstrap_diff=boot["diff"],
                )
        out["metrics"][m] = entry
    return out


def _sub(x: Any, y: Any) -> float | None:
    return None if x is None or y is None else float(x) - float(y)


def judge(comparisons: Sequence[dict[str, Any]], closed_gate: bool) -> dict[str, Any]:
    """Mark each size's gaps clear or not (module docstring) and judge the paper's pattern
    on :data:`PRIMARY`: ``appears`` (hard − soft > 0 at the smallest size and < 0 at the
    largest, both clear), ``direction`` (the signs only), ``absent``, or ``undecided``
    (fewer than two sizes, or an undefined gap). Mutates and returns the comparisons
    inside the verdict."""
    seeded = {
        m: [c["metrics"][m]["sd"] for c in comparisons if c["metrics"][m]["sd"] is not None]
        for m in VERDICT_METRICS
    }
    for c in comparisons:
        n = max(len(c["seeds"]), 1)
        for m, e in c["metrics"].items():
            own = e["sd"] is not None
            ref = e["sd"] if own else (max(seeded[m]) if seeded[m] else None)
            e["seed_sd_ref"] = ref
            e["seed_sd_borrowed"] = ref is not None and not own
            e["seed_noise"] = 2 * ref / math.sqrt(n) if ref is not None else None
            beyond = e["seed_noise"] is None or (
                e["diff"] is not None and abs(e["diff"]) > e["seed_noise"]
            )
            e["clear"] = bool(e["diff"] is not None and e["excludes_0"] and beyond)
    pattern = "undecided"
    if len(comparisons) >= 2:
        small, large = (comparisons[i]["metrics"][PRIMARY] for i in (0, -1))
        if small["diff"] is not None and large["diff"] is not None:
            if small["diff"] > 0 and large["diff"] < 0:
                pattern = "appears" if small["clear"] and large["clear"] else "direction"
            else:
                pattern = "absent"
    seed_sizes = [c["size"] for c in comparisons if len(c["seeds"]) > 1]
    return {
        "metric": PRIMARY,
        "pattern": pattern,
        "closed_gate": closed_gate,
        "seed_sizes": seed_sizes,
        "sizes": list(comparisons),
    }
