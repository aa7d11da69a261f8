"""The repeat baseline, R@k/new (METHOD.md "Deduplicated protocol") and R's copy component,
on hand-made conversations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conkd_scale.config import build_config
from conkd_scale.data.schema import RECOMMENDER, SEEKER, Conversation, Turn, turn_samples
from conkd_scale.eval.run import rec_ranking
from conkd_scale.rec.model import pad_recent
from conkd_scale.rec.popularity import Popularity
from conkd_scale.rec.repeat import RepeatBaseline
from conkd_scale.rec.train import RecTeacherConfig
from conkd_scale.utils.errors import ConfigError

ITEMS = ["a", "b", "c", "d", "e"]
# popularity order: e > d > c > b > a (counts 5, 4, 3, 2, 1)
POP = Popularity(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))


def _conv() -> Conversation:
    return Conversation(
        "c1",
        (
            Turn(SEEKER, "I liked <item_a> and <item_b>", ("a", "b")),
            Turn(RECOMMENDER, "then try <item_c>", ("c",)),
            Turn(SEEKER, "seen <item_a> again, and <item_d>?", ("a", "d")),
            Turn(RECOMMENDER, "<item_d> is good, so is <item_e>", ("d", "e")),
        ),
    )


def test_recent_items_by_last_mention():
    turns = turn_samples(_conv())
    last = turns[-1]
    # turn 2 (1 turn ago) names a, d (d later); turn 1 (2 ago) c; turn 0 (3 ago) a, b
    assert last.recent_items() == [("d", 1), ("a", 1), ("c", 2), ("b", 3)]
    assert turns[0].recent_items() == [("b", 1), ("a", 1)]


def test_repeat_baseline_ranks_context_by_recency_then_popularity():
    last = turn_samples(_conv())[-1]
    s = RepeatBaseline(POP, ITEMS).scores([last])[0]
    order = [ITEMS[i] for i in s.argsort(descending=True)]
    assert order == ["d", "a", "c", "b", "e"]  # context by recency, then e by popularity
    first = turn_samples(_conv())[0]  # context a, b (b named last)
    order = [
        ITEMS[i] for i in RepeatBaseline(POP, ITEMS).scores([first])[0].argsort(descending=True)
    ]
    assert order == ["b", "a", "e", "d", "c"]


def test_rec_ranking_new_removes_context_from_gold_and_candidates():
    last = turn_samples(_conv())[-1]  # gold d (a repeat), e (new)
    r_all, r_new = rec_ranking(RepeatBaseline(POP, ITEMS), [last], ITEMS, batch_size=8)
    # all gold: d is 1st, e is 5th (behind the 4 context items)
    assert (r_all["n"], r_all["R@1"], r_all["R@10"]) == (2, 0.5, 1.0)
    assert r_all["MRR@10"] == pytest.approx((1 + 1 / 5) / 2)
    # /new: only e, ranked among the items not in the context (e alone): first
    assert (r_new["n"], r_new["R@1"]) == (1, 1.0)


def test_copy_component_puts_mass_on_recent_context_items():
    from conkd_scale.rec.model import RecTeacherModel

    graph = SimpleNamespace(  # what RecTeacherModel reads of a RecGraph, without a KG
        num_layers=0,
        num_nodes=5,
        num_targets=5,
        num_items=5,
        num_relations=1,
        item_node=torch.arange(5),
        layer_sizes=[5],
        edge_index=[],
        edge_type=[],
    )
    torch.manual_seed(0)
    model = RecTeacherModel(graph, dim=4, use_kg=False, copy="recency", recency_buckets=2)
    with torch.no_grad():
        model.copy_gate.bias.fill_(5.0)  # g ≈ 1: nearly all mass on the context items
        model.copy_rank.copy_(torch.tensor([2.0, 0.0]))  # the most recent item first
    ctx_BC, mask_BC = torch.tensor([[3, 0]]), torch.tensor([[True, True]])
    recent = pad_recent([[3, 0]], [[1, 1]])
    logp_I = model(ctx_BC, mask_BC, recent)[0]
    assert torch.logsumexp(logp_I, 0).item() == pytest.approx(0.0, abs=1e-5)  # a distribution
    assert logp_I.argsort(descending=True)[:2].tolist() == [3, 0]
    assert logp_I.exp()[[3, 0]].sum() > 0.99
    empty = model(
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.bool),
        pad_recent([[]], [[]]),
    )[0]  # no context item: g = 0, the generator alone
    assert torch.logsumexp(empty, 0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("copy=pointer", "copy: unknown copy component 'pointer'"),
        ("recency_buckets=0", "recency_buckets: must be in [1, 64]"),
        ("recency_buckets=65", "recency_buckets: must be in [1, 64]"),
        ("copy_lr=0", "copy_lr: must be a positive number"),
    ],
)
def test_bad_copy_settings_are_config_errors(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        build_config(RecTeacherConfig, None, [override])
