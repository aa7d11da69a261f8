"""The repeat baseline, R@k/new (METHOD.md "Deduplicated protocol") and R's copy component,
on hand-made conversations."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from conkd_scale.config import build_config
from conkd_scale.data.schema import RECOMMENDER, SEEKER, Conversation, Turn, turn_samples
from conkd_scale.eval.run import rec_ranking
from conkd_scale.rec.graph import ContextIndex, RecentLists
from conkd_scale.rec.model import RecTeacherModel, pad_recent, pad_words
from conkd_scale.rec.popularity import Popularity
from conkd_scale.rec.repeat import RepeatBaseline
from conkd_scale.rec.train import RecTeacherConfig
from conkd_scale.rec.words import hash_words, mention_windows, tokenize
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


def _graph() -> SimpleNamespace:
    """What RecTeacherModel reads of a RecGraph: 5 items, no KG."""
    return SimpleNamespace(
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


def test_context_index_reads_who_named_each_item_and_how_often():
    graph = SimpleNamespace(
        item_ids=ITEMS,
        item_node=torch.arange(5),
        entity_keys=[],
        entity_node=torch.zeros(0, dtype=torch.long),
    )
    last = turn_samples(_conv())[-1]
    r = ContextIndex(graph).recent(last)
    # d, a: 1 turn ago (the seeker's); c: the recommender's, 2 ago; b: the seeker's, 3 ago
    assert [ITEMS[i] for i in r.items] == ["d", "a", "c", "b"]
    assert r.ago == [1, 1, 2, 3]
    assert r.seeker == [True, True, False, True]
    assert r.count == [1, 2, 1, 1]  # a is named in turns 0 and 2
    assert ContextIndex(graph).words(last) == ([], [])  # no word_buckets: no words
    ctx, tail = ContextIndex(graph, word_buckets=100).words(last)
    assert tail == hash_words(["seen", "again", "and"], 100)
    assert len(ctx) == len(tokenize("I liked and then try seen again, and"))


def test_words_drop_item_placeholders_and_hash_stably():
    assert tokenize("I LIKED <item_123> and <item_x y>, didn't you? a") == [
        "liked",
        "and",
        "didn't",
        "you",
    ]
    # CRC-32, not Python's salted hash(): the same ids in every process
    assert hash_words(["movie", "horror"], 16384) == [12912, 16218]
    assert all(1 <= h <= 7 for h in hash_words(tokenize("the quick brown fox"), 7))


def test_mention_windows_are_the_words_around_each_items_last_mention():
    text = "I didn't like <item_1> at all but loved <item_2>, seen <item_1>?"
    # window slots count placeholders too: the last <item_1> sees only "seen"
    assert mention_windows(text, 2) == {"1": ["seen"], "2": ["but", "loved", "seen"]}
    # ids keep their case (they must match the catalog's), words are lower-cased
    assert mention_windows("Seen <item_Ab7> OK", 1) == {"Ab7": ["seen", "ok"]}
    graph = SimpleNamespace(
        item_ids=ITEMS,
        item_node=torch.arange(5),
        entity_keys=[],
        entity_node=torch.zeros(0, dtype=torch.long),
    )
    last = turn_samples(_conv())[-1]  # context turn 2: "seen <item_a> again, and <item_d>?"
    r = ContextIndex(graph, word_buckets=100, mention_window=1).recent(last)
    assert r.words[:2] == [hash_words(["and"], 100), hash_words(["seen", "again"], 100)]
    assert all(w == [] for w in ContextIndex(graph, word_buckets=100).recent(last).words)


def test_copy_roles_and_words_steer_the_copy_component():
    torch.manual_seed(0)
    model = RecTeacherModel(
        _graph(),
        dim=4,
        use_kg=False,
        copy="recency",
        recency_buckets=2,
        copy_roles=True,
        copy_words=True,
        word_buckets=10,
    )
    ctx_BC, mask_BC = torch.tensor([[3, 0]]), torch.tensor([[True, True]])
    # item 3 named last by the recommender, item 0 before by the seeker
    recent = pad_recent([RecentLists([3, 0], [1, 2], [False, True], [1, 1], [[], []])])
    quiet, cue = pad_words([[]], [[]]), pad_words([[7]], [[7]])  # word 7: "repeat"
    with torch.no_grad():
        model.copy_role.copy_(torch.tensor([0.0, 4.0]))  # the seeker's items first
        model.copy_gate_words.weight[7] = 6.0
    logp = model(ctx_BC, mask_BC, recent, quiet)[0]
    assert (logp[0] - logp[3]).item() == pytest.approx(
        4.0, abs=1e-4
    )  # w_role outweighs recency (0)
    assert logp.exp()[[0, 3]].sum().item() == pytest.approx(0.5, abs=1e-5)  # g = σ(0)
    logp_cue = model(ctx_BC, mask_BC, recent, cue)[0]
    assert logp_cue.exp()[[0, 3]].sum().item() == pytest.approx(
        torch.sigmoid(torch.tensor(6.0)).item()
    )
    with pytest.raises(ValueError, match="pass words=WordBags"):
        model(ctx_BC, mask_BC, recent)
    item_model = RecTeacherModel(
        _graph(), dim=4, use_kg=False, copy="recency", copy_item_words=True, word_buckets=10
    )
    with torch.no_grad():
        item_model.copy_item_words.weight[5] = 3.0  # word 5 next to an item: "loved"
    said = pad_recent([RecentLists([3, 0], [1, 2], [False, True], [1, 1], [[], [5, 6]])])
    logp = item_model(ctx_BC, mask_BC, said, quiet)[0]
    assert (logp[0] - logp[3]).item() == pytest.approx(
        1.5, abs=1e-4
    )  # mean over its 2 words (6: weight 0)


def test_copy_component_puts_mass_on_recent_context_items():
    graph = _graph()
    torch.manual_seed(0)
    model = RecTeacherModel(graph, dim=4, use_kg=False, copy="recency", recency_buckets=2)
    with torch.no_grad():
        model.copy_gate.bias.fill_(5.0)  # g ≈ 1: nearly all mass on the context items
        model.copy_rank.copy_(torch.tensor([2.0, 0.0]))  # the most recent item first
    ctx_BC, mask_BC = torch.tensor([[3, 0]]), torch.tensor([[True, True]])
    recent = pad_recent([RecentLists([3, 0], [1, 1], [True, False], [1, 1], [[], []])])
    logp_I = model(ctx_BC, mask_BC, recent)[0]
    assert torch.logsumexp(logp_I, 0).item() == pytest.approx(0.0, abs=1e-5)  # a distribution
    assert logp_I.argsort(descending=True)[:2].tolist() == [3, 0]
    assert logp_I.exp()[[3, 0]].sum() > 0.99
    empty = model(
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.bool),
        pad_recent([RecentLists([], [], [], [], [])]),
    )[0]  # no context item: g = 0, the generator alone
    assert torch.logsumexp(empty, 0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("copy=pointer", "copy: unknown copy component 'pointer'"),
        ("recency_buckets=0", "recency_buckets: must be in [1, 64]"),
        ("recency_buckets=65", "recency_buckets: must be in [1, 64]"),
        ("copy_lr=0", "copy_lr: must be a positive number"),
        ("words=bag", "words: 'bag' is not one of"),
        ("word_buckets=0", "word_buckets: must be in [1, 2**24]"),
        ("select=MRR@10", "select: 'MRR@10' is not one of"),
        ("mention_window=0", "mention_window: must be in [1, 64]"),
    ],
)
def test_bad_copy_settings_are_config_errors(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_config(RecTeacherConfig, None, override.split())
