"""Seed statistics and the paired bootstrap of the results table, on hand-made turns."""

from __future__ import annotations

import math

import pytest

from conkd_scale.results.stats import mean_sd, paired_bootstrap, turn_terms


def _turn(conv: str, n: int, items: list[str], gold: list[str], nll: float, r_top: str) -> dict:
    return {
        "conv_id": conv,
        "turn_index": n,
        "is_recommendation": bool(gold),
        "items": items,
        "gold_items": gold,
        "nll": nll,
        "ppl_tokens": 4,
        "r_top1": r_top,
    }


def _run(hit_every: int, nll: float, n: int = 60) -> list[dict]:
    return [
        _turn(f"c{k // 3}", k % 3, ["a" if k % hit_every == 0 else "b"], ["a"], nll, "a")
        for k in range(n)
    ]


def test_mean_sd() -> None:
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([0.5]) == (0.5, None)
    assert mean_sd([1.0, None]) == (None, None)


def test_turn_terms() -> None:
    t = _turn("c", 0, ["x", "a"], ["a", "z"], 2.0, "x")
    assert turn_terms(t, "F1@1") == (0.0, 1.0) and turn_terms(t, "R-agree@1") == (1.0, 1.0)
    assert turn_terms(t, "PPL") == (2.0, 4.0)
    assert turn_terms({**t, "items": []}, "R-agree@1") == (0.0, 0.0)  # no item: not counted
    assert turn_terms({**t, "gold_items": [], "is_recommendation": False}, "F1@1") == (0, 0)


def test_paired_bootstrap_point_interval_and_seed() -> None:
    better = [_run(1, 1.0), _run(1, 1.2)]  # every turn a hit; two seeds
    worse = [_run(3, 2.0)]  # a hit every third turn
    f1 = paired_bootstrap(better, worse, "F1@1", resamples=300, seed=1)
    assert f1["diff"] == pytest.approx(1.0 - 20 / 60)
    lo, hi = f1["ci95"]
    assert lo <= f1["diff"] <= hi and f1["excludes_0"] and f1["turns"] == 60
    assert paired_bootstrap(better, worse, "F1@1", resamples=300, seed=1) == f1  # seeded
    ppl = paired_bootstrap(better, worse, "PPL", resamples=50)
    expect = (math.exp(1.0 / 4) + math.exp(1.2 / 4)) / 2 - math.exp(2.0 / 4)
    assert ppl["diff"] == pytest.approx(expect) and ppl["ci95"][0] == pytest.approx(expect)
    same = paired_bootstrap(worse, worse, "R-agree@1", resamples=100)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and not same["excludes_0"]
    conv = paired_bootstrap(better, worse, "F1@1", unit="conversation", resamples=100)
    assert conv["units"] == 20 and conv["unit"] == "conversation"
    with pytest.raises(ValueError, match="unit"):
        paired_bootstrap(better, worse, "F1@1", unit="word")
