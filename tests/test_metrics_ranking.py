"""Ranking metrics on hand-computed cases: protocols, pessimistic ties, empty gold sets."""

from __future__ import annotations

import math

import pytest
import torch

from conkd_scale.metrics import (
    RankingAccumulator,
    gold_ranks,
    mrr_at_k,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
)

S = torch.tensor([[0.1, 0.5, 0.3, 0.9]])  # order: item 3, 1, 2, 0


def test_single_gold_hand_computed() -> None:
    # item 2 has score 0.3: items 3 (0.9) and 1 (0.5) are above it -> rank 3
    assert gold_ranks(S, [[2]])[1].tolist() == [3]
    assert recall_at_k(S, [[2]], 1) == 0.0
    assert recall_at_k(S, [[2]], 2) == 0.0
    assert recall_at_k(S, [[2]], 3) == 1.0
    assert mrr_at_k(S, [[2]], 10) == pytest.approx(1 / 3)
    assert mrr_at_k(S, [[2]], 2) == 0.0  # below the cut-off
    assert ndcg_at_k(S, [[2]], 10) == pytest.approx(1 / math.log2(4))
    assert ndcg_at_k(S, [[3]], 1) == 1.0


def test_ties_are_pessimistic() -> None:
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert gold_ranks(tied, [[0]])[1].tolist() == [3]  # both tied items go first
    assert recall_at_k(tied, [[0]], 2) == 0.0
    assert recall_at_k(tied, [[0]], 3) == 1.0
    assert mrr_at_k(tied, [[1]], 10) == pytest.approx(1 / 3)
    const = torch.zeros(2, 50)  # constant scores never earn credit
    assert gold_ranks(const, [[7], [0]])[1].tolist() == [50, 50]
    assert recall_at_k(const, [[7], [0]], 49) == 0.0
    masked = torch.tensor([[0.5, float("-inf"), float("-inf"), 0.1]])
    assert gold_ranks(masked, [[1]])[1].tolist() == [4]  # masked items tie at the bottom


def test_per_item_protocol_counts_each_gold_item() -> None:
    scores = torch.cat([S, S])
    gold = [[1, 3], [0]]  # ranks: 2, 1 | 4  -> three evaluation samples
    assert sorted(gold_ranks(scores, gold)[1].tolist()) == [1, 2, 4]
    assert recall_at_k(scores, gold, 1) == pytest.approx(1 / 3)
    assert recall_at_k(scores, gold, 2) == pytest.approx(2 / 3)
    assert mrr_at_k(scores, gold, 10) == pytest.approx((1 / 2 + 1 + 1 / 4) / 3)
    want = (1 / math.log2(3) + 1 + 1 / math.log2(5)) / 3
    assert ndcg_at_k(scores, gold, 10) == pytest.approx(want)
    # the other gold item of the same turn competes: item 1 is behind gold item 3
    assert gold_ranks(S, [[1, 3]])[1].tolist() == [2, 1]


def test_per_turn_protocol() -> None:
    # gold {1, 3} take positions 1 and 2
    assert recall_at_k(S, [[1, 3]], 1, per_turn=True) == 0.5
    assert mrr_at_k(S, [[1, 3]], 10, per_turn=True) == 1.0
    assert ndcg_at_k(S, [[1, 3]], 1, per_turn=True) == 1.0
    assert ndcg_at_k(S, [[1, 3]], 2, per_turn=True) == pytest.approx(1.0)
    # gold {0, 2}: positions 3 and 4
    assert recall_at_k(S, [[0, 2]], 3, per_turn=True) == 0.5
    assert recall_at_k(S, [[0, 2]], 4, per_turn=True) == 1.0
    assert mrr_at_k(S, [[0, 2]], 10, per_turn=True) == pytest.approx(1 / 3)
    want = (1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(S, [[0, 2]], 10, per_turn=True) == pytest.approx(want)
    # mean over turns, not over gold items
    scores = torch.cat([S, S])
    assert recall_at_k(scores, [[1, 3], [0]], 1, per_turn=True) == pytest.approx(0.25)


def test_per_turn_ties_put_gold_last_in_its_block() -> None:
    tied = torch.ones(1, 4)
    # two non-gold items tie with the gold ones and go first: positions 3 and 4
    assert recall_at_k(tied, [[0, 1]], 2, per_turn=True) == 0.0
    assert recall_at_k(tied, [[0, 1]], 3, per_turn=True) == 0.5
    assert mrr_at_k(tied, [[0, 1]], 10, per_turn=True) == pytest.approx(1 / 3)


def test_empty_gold_rows_are_skipped() -> None:
    scores = torch.cat([S, S, S])
    m = ranking_metrics(scores, [[3], [], [2]], ks=(1,))
    assert m["R@1"] == 0.5 and m["n"] == 2 and m["skipped"] == 1
    m = ranking_metrics(scores, [[3], [], [2]], ks=(1,), per_turn=True)
    assert m["R@1"] == 0.5 and m["n"] == 2 and m["skipped"] == 1
    nothing = ranking_metrics(S, [[]])
    assert math.isnan(nothing["R@10"]) and nothing["n"] == 0 and nothing["skipped"] == 1
    assert math.isnan(recall_at_k(S, [[]], 1))


def test_duplicate_gold_counts_once() -> None:
    assert gold_ranks(S, [[2, 2]])[1].tolist() == [3]


def test_accumulator_matches_one_call_and_probabilities_match_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(37, 101, generator=gen)
    gold = [
        torch.randint(0, 101, (int(n),), generator=gen).tolist()
        for n in torch.randint(0, 4, (37,), generator=gen)
    ]
    for per_turn in (False, True):
        whole = ranking_metrics(scores, gold, per_turn=per_turn)
        acc = RankingAccumulator(per_turn=per_turn)
        for s in range(0, 37, 10):
            acc.add(scores[s : s + 10], gold[s : s + 10])
        assert acc.result() == pytest.approx(whole, nan_ok=True)
        probs = ranking_metrics(torch.softmax(scores.double(), -1), gold, per_turn=per_turn)
        assert probs == pytest.approx(whole)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="out of range"):
        recall_at_k(S, [[4]], 1)
    with pytest.raises(ValueError, match="gold lists"):
        recall_at_k(S, [[1], [2]], 1)
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[0.0, float("nan")]]), [[0]], 1)
    with pytest.raises(ValueError, match=r"\[B, I\]"):
        recall_at_k(torch.zeros(4), [[0]], 1)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(S, [[0]], 0)
    with pytest.raises(ValueError, match="floating"):
        recall_at_k(torch.zeros(1, 3, dtype=torch.long), [[0]], 1)
