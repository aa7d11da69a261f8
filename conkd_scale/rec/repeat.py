"""Repeat baseline (METHOD.md, "Deduplicated protocol"): the items already mentioned in the
context, most recent first, then every other item by training popularity.

A recommender that does not beat it on ``R@k`` has learned nothing beyond copying the
conversation; on ``R@k/new`` (context items removed from gold and candidates) it *is* the
popularity baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conkd_scale.data.schema import TurnSample
from conkd_scale.rec.popularity import Popularity


class RepeatBaseline:
    """``scores(turns, item_ids) -> [S, I]``: context items by recency above popularity."""

    def __init__(self, popularity: Popularity, item_ids: Sequence[str]) -> None:
        if len(popularity.score_I) != len(item_ids):
            raise ValueError(
                f"popularity has {len(popularity.score_I)} items, item_ids {len(item_ids)}"
            )
        self.popularity = popularity
        self.item_ids = list(item_ids)
        self._index = {i: n for n, i in enumerate(self.item_ids)}
        # every popularity score is < top; a context item at recency r gets top * (2 + n - r)
        self._top = float(popularity.score_I.max()) + 1.0 if len(item_ids) else 1.0

    @classmethod
    def from_samples(
        cls, train: Sequence[TurnSample], item_ids: Sequence[str], *, seed: int = 0
    ) -> RepeatBaseline:
        """Popularity counted over the gold items of the training recommendation turns."""
        return cls(Popularity.from_samples(train, item_ids, seed=seed), item_ids)

    def scores(
        self, turns: Sequence[TurnSample], item_ids: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``[S, I]`` float64 scores over ``item_ids`` (default: the baseline's own order)."""
        recent = [[self._index[i] for i, _ in t.recent_items() if i in self._index] for t in turns]
        scores_SI = self.scores_from_recent(recent)  # [S, I]
        if item_ids is not None and list(item_ids) != self.item_ids:
            cols = torch.tensor([self._index[i] for i in item_ids], dtype=torch.long)
            scores_SI = scores_SI[:, cols]
        return scores_SI

    def scores_from_recent(self, recent: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[S, I]`` float64 scores from each context's item indices, most recent first."""
        scores_SI = self.popularity.scores(len(recent)).clone()  # [S, I]
        for s, items in enumerate(recent):
            for r, i in enumerate(items):  # r = 0: the most recent mention
                scores_SI[s, i] = self._top * (2 + len(items) - r)
        return scores_SI

    def item_distribution(
        self, turns: Sequence[TurnSample], item_ids: Sequence[str]
    ) -> torch.Tensor:
        """A distribution in the baseline's order (softmax of ranks / I, no zeros): ``[S, I]``."""
        ranks_SI = self.scores(turns, item_ids).argsort(dim=1).argsort(dim=1).double()
        return torch.softmax(ranks_SI / max(ranks_SI.shape[1], 1), dim=1)
