"""Ranking metrics over an item score matrix: Recall@k, MRR@k, NDCG@k.

Inputs are a score (or probability, or logit) matrix ``scores_BI`` ``[B, I]`` -- higher is
better -- and one list of gold item indices per row. Any model works: the recommendation
teacher's ``q_R``, or a language model's distribution at an item position restricted to the
item tokens.

Two protocols:

- ``per_turn=False`` (default; the KBRD/CRSLab protocol): every gold item of a row is one
  evaluation sample, ranked against **all** items (other gold items of the same row compete
  with it). The mean is over gold items.
- ``per_turn=True``: one evaluation sample per row with a set of gold items ``G``:
  ``Recall@k = |top_k ∩ G| / |G|``, ``MRR@k = 1 / rank of the first gold item`` (0 if it is
  below k), ``NDCG@k = DCG@k / IDCG@k`` with binary gains and
  ``IDCG@k = sum_{r=1}^{min(|G|, k)} 1 / log2(r + 1)``. The mean is over rows.

Ties are **pessimistic**: an item whose score equals a gold item's score is ranked above it,
so the rank of a single gold item ``g`` is ``#{i : s_i >= s_g}`` (itself included). In the
per-turn protocol tied gold items take the last places of their tie block, after the tied
non-gold items. Constant or degenerate scores therefore never earn credit (a constant score
row gets rank ``I`` for every gold item), and masked items (``-inf``) tie at the bottom.
Scores must not be NaN.

Rows with an empty gold list are skipped: they contribute nothing to any mean, and
``ranking_metrics`` reports how many were evaluated (``n``) and skipped (``skipped``). When
nothing is evaluated the metric is ``nan``. Duplicate gold indices within a row count once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "RankingAccumulator",
    "gold_ranks",
    "mask_items",
    "mrr_at_k",
    "ndcg_at_k",
    "ranking_metrics",
    "recall_at_k",
]

GoldLists = Sequence[Sequence[int]]


def _check(scores_BI: torch.Tensor, gold: GoldLists) -> list[list[int]]:
    if scores_BI.dim() != 2:
        raise ValueError(f"scores must be [B, I], got shape {tuple(scores_BI.shape)}")
    if not scores_BI.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores_BI.dtype}")
    B, num_items = scores_BI.shape
    if len(gold) != B:
        raise ValueError(f"got {len(gold)} gold lists for {B} score rows")
    if torch.isnan(scores_BI).any():
        row = int(torch.isnan(scores_BI).any(dim=1).nonzero()[0])
        raise ValueError(f"scores contain NaN (first in row {row})")
    out: list[list[int]] = []
    for b, g in enumerate(gold):
        g = list(dict.fromkeys(int(i) for i in g))
        bad = [i for i in g if not 0 <= i < num_items]
        if bad:
            raise ValueError(f"row {b}: gold index {bad[0]} is out of range [0, {num_items})")
        out.append(g)
    return out


def gold_ranks(scores_BI: torch.Tensor, gold: GoldLists) -> tuple[torch.Tensor, torch.Tensor]:
    """Pessimistic 1-based rank of every gold item against all items (per-item protocol).

    Returns ``(row_N, rank_N)``: the row of each evaluated gold item and its rank, for the
    ``N`` gold items of all rows (rows with no gold item contribute none).
    """
    gold = _check(scores_BI, gold)
    rows = [b for b, g in enumerate(gold) for _ in g]
    cols = [i for g in gold for i in g]
    row_N = torch.tensor(rows, dtype=torch.long)
    if not rows:
        return row_N, torch.zeros(0, dtype=torch.long)
    col_N = torch.tensor(cols, dtype=torch.long)
    gold_score_N = scores_BI[row_N, col_N]  # [N]
    rank_N = (scores_BI[row_N] >= gold_score_N[:, None]).sum(dim=1)  # [N], itself included
    return row_N, rank_N


def _turn_positions(scores_BI: torch.Tensor, gold: list[list[int]]) -> list[torch.Tensor]:
    """Per row, the pessimistic 1-based positions of its gold items (ascending)."""
    out = []
    for b, g in enumerate(gold):
        if not g:
            out.append(torch.zeros(0, dtype=torch.long))
            continue
        s_I = scores_BI[b]  # [I]
        g_G = torch.tensor(g, dtype=torch.long)
        gs_G = torch.sort(s_I[g_G], descending=True).values  # [G]
        is_gold_I = torch.zeros_like(s_I, dtype=torch.bool)
        is_gold_I[g_G] = True
        non_gold = s_I[~is_gold_I]  # [I - G]
        ahead_G = (non_gold[None, :] >= gs_G[:, None]).sum(dim=1)  # [G]
        out.append(ahead_G + torch.arange(1, len(g) + 1))
    return out


def _per_sample_values(
    scores_BI: torch.Tensor, gold: GoldLists, ks: Iterable[int], per_turn: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """Per evaluation sample, ``R@k``, ``MRR@k``, ``NDCG@k`` for each k; and rows skipped."""
    ks = sorted(set(ks))
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {ks}")
    checked = _check(scores_BI, gold)
    skipped = sum(not g for g in checked)
    vals: dict[str, torch.Tensor] = {}
    if not per_turn:
        _, rank_N = gold_ranks(scores_BI, checked)
        r = rank_N.double()
        for k in ks:
            hit = rank_N <= k
            vals[f"R@{k}"] = hit.double()
            vals[f"MRR@{k}"] = torch.where(hit, 1.0 / r, 0.0)
            vals[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 1.0), 0.0)
        return vals, skipped
    positions = [p for p in _turn_positions(scores_BI, checked) if len(p)]
    for k in ks:
        rec, mrr, ndcg = [], [], []
        for p in positions:
            top = p[p <= k].double()
            rec.append(len(top) / len(p))
            mrr.append(1.0 / float(p[0]) if p[0] <= k else 0.0)
            idcg = sum(1.0 / math.log2(r + 1) for r in range(1, min(len(p), k) + 1))
            ndcg.append(float((1.0 / torch.log2(top + 1.0)).sum()) / idcg)
        vals[f"R@{k}"] = torch.tensor(rec, dtype=torch.float64)
        vals[f"MRR@{k}"] = torch.tensor(mrr, dtype=torch.float64)
        vals[f"NDCG@{k}"] = torch.tensor(ndcg, dtype=torch.float64)
    return vals, skipped


def mask_items(scores_BI: torch.Tensor, items: Sequence[Iterable[int]]) -> torch.Tensor:
    """Scores with each row's ``items`` removed from the candidates (``-inf``; a new tensor):
    the candidate set of the ``/new`` protocol, where the context's items are left out."""
    out_BI = scores_BI.clone()
    for b, row in enumerate(items):
        cols = list(row)
        if cols:
            out_BI[b, cols] = float("-inf")
    return out_BI


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if len(x) else float("nan")


def recall_at_k(
    scores_BI: torch.Tensor, gold: GoldLists, k: int, *, per_turn: bool = False
) -> float:
    """Mean Recall@k (hit rate in the per-item protocol); ``nan`` if no row has gold."""
    return _mean(_per_sample_values(scores_BI, gold, [k], per_turn)[0][f"R@{k}"])


def mrr_at_k(scores_BI: torch.Tensor, gold: GoldLists, k: int, *, per_turn: bool = False) -> float:
    """Mean reciprocal rank, 0 for a gold item ranked below k; ``nan`` if no row has gold."""
    return _mean(_per_sample_values(scores_BI, gold, [k], per_turn)[0][f"MRR@{k}"])


def ndcg_at_k(scores_BI: torch.Tensor, gold: GoldLists, k: int, *, per_turn: bool = False) -> float:
    """Mean NDCG@k with binary gains; ``nan`` if no row has gold."""
    return _mean(_per_sample_values(scores_BI, gold, [k], per_turn)[0][f"NDCG@{k}"])


class RankingAccumulator:
    """Accumulate per-sample metric values over batches; ``result()`` gives the means.

    >>> acc = RankingAccumulator(ks=(1, 10))
    >>> acc.add(torch.tensor([[0.1, 0.9, 0.0]]), [[1]])
    >>> acc.result()["R@1"]
    1.0
    """

    def __init__(self, ks: Sequence[int] = (1, 10, 50), *, per_turn: bool = False) -> None:
        self.ks = tuple(sorted(set(ks)))
        self.per_turn = per_turn
        self._vals: dict[str, list[torch.Tensor]] = {}
        self.skipped = 0

    def add(self, scores_BI: torch.Tensor, gold: GoldLists) -> None:
        """Add one batch: scores ``[B, I]`` and ``B`` gold index lists."""
        vals, skipped = _per_sample_values(scores_BI.detach(), gold, self.ks, self.per_turn)
        self.skipped += skipped
        for name, v in vals.items():
            self._vals.setdefault(name, []).append(v)

    @property
    def n(self) -> int:
        """Evaluation samples so far (gold items, or rows with gold when ``per_turn``)."""
        first = f"R@{self.ks[0]}"
        return sum(len(v) for v in self._vals.get(first, []))

    def result(self) -> dict[str, float]:
        """``R@k``, ``MRR@k``, ``NDCG@k`` for every k, plus ``n`` and ``skipped`` counts."""
        out: dict[str, float] = {}
        for k in self.ks:
            for m in ("R", "MRR", "NDCG"):
                name = f"{m}@{k}"
                parts = self._vals.get(name, [])
                out[name] = _mean(torch.cat(parts)) if parts else float("nan")
        out["n"] = self.n
        out["skipped"] = self.skipped
        return out


def ranking_metrics(
    scores_BI: torch.Tensor,
    gold: GoldLists,
    ks: Sequence[int] = (1, 10, 50),
    *,
    per_turn: bool = False,
) -> dict[str, float]:
    """All metrics at once: ``{"R@k", "MRR@k", "NDCG@k" for each k, "n", "skipped"}``."""
    acc = RankingAccumulator(ks, per_turn=per_turn)
    acc.add(scores_BI, gold)
    return acc.result()
