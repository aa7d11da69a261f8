"""Popularity baseline: rank items by how often they are gold in the training split.

Counts are taken over the gold items of the training recommendation turns (one count per
gold item of a turn, the same samples R trains on). Items with equal counts are put in a
fixed random order drawn from ``seed``: a ranker must output some order, and the ranking
metrics rank ties pessimistically (which would put every tied item last). The random order
makes the tie-breaking neutral in expectation; it never uses the catalog order (the ReDial
movie list is not in a neutral order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from conkd_scale.data.schema import TurnSample


class Popularity:
    """``scores(B) -> [B, I]``: the same popularity ranking for every context."""

    def __init__(self, counts_I: torch.Tensor, *, seed: int = 0) -> None:
        if counts_I.dim() != 1:
            raise ValueError(f"counts must be [I], got shape {tuple(counts_I.shape)}")
        self.counts_I = counts_I.to(torch.float64)  # [I]
        gen = torch.Generator().manual_seed(seed)
        n = len(counts_I)
        tie_I = torch.randperm(n, generator=gen).to(torch.float64) / max(n, 1)  # [I] in [0, 1)
        self.score_I = self.counts_I + tie_I  # [I]: counts order, ties broken at random

    @classmethod
    def from_samples(
        cls, samples: Iterable[TurnSample], item_ids: Sequence[str], *, seed: int = 0
    ) -> Popularity:
        """Count gold items of the recommendation turns in ``samples`` (unknown ids ignored)."""
        index = {i: n for n, i in enumerate(item_ids)}
        counts_I = torch.zeros(len(item_ids), dtype=torch.float64)
        for s in samples:
            for g in s.gold_items:
                if g in index:
                    counts_I[index[g]] += 1
        return cls(counts_I, seed=seed)

    def scores(self, batch: int) -> torch.Tensor:
        """``[B, I]`` float64 scores (a broadcast view: do not modify in place)."""
        return self.score_I.expand(batch, -1)
