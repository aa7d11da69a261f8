"""Seed statistics and paired-bootstrap intervals of the results table (METHOD.md
"Reporting").

Every interval is recomputed from the per-turn values in each run's ``generations.jsonl``
(written by ``launch/evaluate.py``): a metric is a ratio ``f(Σ num / Σ den)`` of per-turn
numerators and denominators, so a resample of turns (or of conversations) gives the metric
exactly as the evaluation defines it:

- ``F1@1``, ``ReR@1``: per recommendation turn, that turn's score (den 1);
- ``R-agree@1``: per recommendation turn whose reply has an item, 1 if its first item is R's
  top-1 (den 1);
- ``PPL``: per turn, its NLL and its scored tokens; ``f = exp``.

**Paired bootstrap [decision]**: ``resamples`` draws (default 1000, ``numpy`` generator
seeded with ``seed``) of the units (``unit=turn``: test turns, METHOD.md; ``conversation``:
whole conversations, their turns together), the same draw for both systems and every seed;
per draw, each system's metric is the mean over its seeds; the interval is the 2.5/97.5
percentile of the difference A − B.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from conkd_scale.eval.metrics_lm import in_response_scores

BOOTSTRAP_METRICS = ("F1@1", "ReR@1", "R-agree@1", "PPL")
Key = tuple[str, int]  # (conv_id, turn_index)


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd (n − 1) over seeds; ``None`` if any seed is undefined; sd
    ``None`` for one seed."""
    if not values or any(v is None for v in values):
        return None, None
    vals = [float(v) for v in values if v is not None]
    sd = statistics.stdev(vals) if len(vals) > 1 else None
    return statistics.fmean(vals), sd


def turn_terms(record: Mapping[str, Any], metric: str) -> tuple[float, float]:
    """``(num, den)`` of one turn for ``metric`` (den 0: the turn does not count)."""
    if metric == "PPL":
        return float(record["nll"]), float(record["ppl_tokens"])
    if not record["is_recommendation"]:
        return 0.0, 0.0
    items, gold = record["items"], record["gold_items"]
    if metric == "F1@1":
        return in_response_scores(items, gold, 1)[2], 1.0
    if metric == "ReR@1":
        return in_response_scores(items, gold, 1)[0], 1.0
    if metric == "R-agree@1":
        if not items or record.get("r_top1") is None:
            return 0.0, 0.0
        return float(items[0] == record["r_top1"]), 1.0
    raise ValueError(f"no per-turn terms for {metric!r} (one of {BOOTSTRAP_METRICS})")


def _value(metric: str, num: Any, den: Any) -> Any:
    import numpy as np

    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.exp(r) if metric == "PPL" else r


def paired_bootstrap(
    a_runs: Sequence[Sequence[Mapping[str, Any]]],
    b_runs: Sequence[Sequence[Mapping[str, Any]]],
    metric: str,
    *,
    unit: str = "turn",
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Difference A − B of ``metric`` (each the mean over its runs = seeds; a run is one
    evaluation's generations) with its paired-bootstrap 95% interval over the turns all runs
    share."""
    import numpy as np

    def index(run: Sequence[Mapping[str, Any]]) -> dict[Key, Mapping[str, Any]]:
        return {(str(r["conv_id"]), int(r["turn_index"])): r for r in run}

    runs = [index(r) for r in [*a_runs, *b_runs]]
    keys = sorted(set.intersection(*(set(r) for r in runs)))
    if not keys:
        raise ValueError("the runs share no evaluated turn")
    if unit == "turn":
        group = np.arange(len(keys))
    elif unit == "conversation":
        convs = {c: n for n, c in enumerate(dict.fromkeys(k[0] for k in keys))}
        group = np.array([convs[k[0]] for k in keys])
    else:
        raise ValueError(f"unit: {unit!r} is not turn/conversation")
    n_units = int(group.max()) + 1
    terms = np.array([[turn_terms(r[k], metric) for k in keys] for r in runs])  # [R, T, 2]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_units, size=(resamples, n_units))
    counts = np.zeros((resamples, n_units))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    w = np.vstack([np.ones(n_units), counts])[:, group]  # [1 + B, T]; row 0: the data itself
    num, den = w @ terms[:, :, 0].T, w @ terms[:, :, 1].T  # [1 + B, R]
    vals = _value(metric, num, den)
    n_a = len(a_runs)
    diff = vals[:, :n_a].mean(1) - vals[:, n_a:].mean(1)  # [1 + B]
    boot = diff[1:][np.isfinite(diff[1:])]
    lo, hi = np.percentile(boot, [2.5, 97.5]).tolist() if len(boot) else (math.nan, math.nan)
    point = float(diff[0])
    return {
        "metric": metric,
        "diff": point if math.isfinite(point) else None,
        "ci95": [lo, hi] if len(boot) else None,
        "excludes_0": bool(len(boot) and (lo > 0 or hi < 0)),
        "a_runs": n_a,
        "b_runs": len(b_runs),
        "turns": len(keys),
        "units": n_units,
        "unit": unit,
        "resamples": resamples,
        "undefined_resamples": int(resamples - len(boot)),
        "seed": seed,
    }
