"""Evaluation metrics (ranking metrics for item distributions)."""

from conkd_scale.metrics.ranking import (
    RankingAccumulator,
    gold_ranks,
    mrr_at_k,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
)

__all__ = [
    "RankingAccumulator",
    "gold_ranks",
    "mrr_at_k",
    "ndcg_at_k",
    "ranking_metrics",
    "recall_at_k",
]
