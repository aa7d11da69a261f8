"""Metrics of generated replies on hand-computed cases (pure Python, no model)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conkd_scale.data.schema import Item, ItemCatalog
from conkd_scale.eval.catalog_io import ITEMS_FILE, load_item_catalog, save_item_catalog
from conkd_scale.eval.generation import display_text, replace_items
from conkd_scale.eval.metrics_lm import (
    InResponseAccumulator,
    corpus_bleu,
    discrepancy_rate,
    distinct_n,
    first_k_distinct,
    generation_metrics,
    in_response_scores,
    json_safe,
    lm_tokens,
    merge_ranking_results,
    perplexity,
    r_agree,
)
from conkd_scale.metrics.ranking import RankingAccumulator
from conkd_scale.utils.errors import DataError


def test_lm_tokens_separates_item_tokens() -> None:
    assert lm_tokens("like <item_7>, or<item_8>!") == [
        "like",
        "<item_7>",
        ",",
        "or",
        "<item_8>",
        "!",
    ]
    assert lm_tokens("  a\tb\n") == ["a", "b"]
    assert lm_tokens("") == []


def test_distinct_n_corpus_level() -> None:
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 3 distinct of 5 (none across replies)
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    # trigrams: (a b a) (b a b) | (a b c) -> 3 of 3
    assert distinct_n(["a b a b", "a b c"], 3) == 1.0
    # an item token is one word: "see <item_1> , <item_1>" -> 3 bigrams, all distinct
    assert distinct_n(["see <item_1>, <item_1>"], 2) == 1.0
    assert distinct_n(["<item_1><item_1><item_1>"], 2) == pytest.approx(1 / 2)
    assert math.isnan(distinct_n(["a", ""], 2))


def test_corpus_bleu_hand_computed() -> None:
    hyp, ref = ["a b c d"], ["a b c e"]
    assert corpus_bleu(hyp, ref, 1) == pytest.approx(3 / 4)
    assert corpus_bleu(hyp, ref, 2) == pytest.approx(math.sqrt(3 / 4 * 2 / 3))
    assert corpus_bleu(hyp, ref, 3) == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert corpus_bleu(hyp, ref, 4) == 0.0  # no matching 4-gram, no smoothing
    # corpus level: counts pooled over replies; brevity penalty exp(1 - 6/4)
    both = corpus_bleu(["a b c d", ""], ["a b c e", "x y"], 1)
    assert both == pytest.approx(3 / 4 * math.exp(1 - 6 / 4))
    # item tokens are single tokens on both sides, whatever the spacing
    assert corpus_bleu(["like <item_5> ."], ["like <item_5>."], 3) == pytest.approx(1.0)
    assert corpus_bleu(["like <item_6> ."], ["like <item_5>."], 1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [], 1)


def test_generation_metrics_keys() -> None:
    out = generation_metrics(["a b c", "a b d"], ["a b c", "x"])
    assert sorted(out) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "Dist-2", "Dist-3", "Dist-4"]
    assert out["Dist-2"] == pytest.approx(3 / 4)


def test_first_k_distinct() -> None:
    assert first_k_distinct(["a", "b", "a", "c"], 2) == ["a", "b"]
    assert first_k_distinct(["a", "a", "a"], 3) == ["a"]


def test_in_response_scores_hand_computed() -> None:
    gen, gold = ["a", "b", "a", "c"], ["b", "c"]
    assert in_response_scores(gen, gold, 1) == (0.0, 0.0, 0.0)  # g_1 = [a]
    rer, prr, f1 = in_response_scores(gen, gold, 3)  # g_3 = [a, b, c]: 2 hits
    assert (rer, prr, f1) == pytest.approx((1.0, 2 / 3, 0.8))
    rer, prr, f1 = in_response_scores(gen, gold, 5)  # still 3 distinct items; PrR over k=5
    assert (rer, prr, f1) == pytest.approx((1.0, 2 / 5, 2 * 0.4 / 1.4))
    assert in_response_scores([], ["x"], 1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        in_response_scores(["a"], [], 1)


def test_in_response_accumulator_and_new_variant() -> None:
    acc = InResponseAccumulator()
    acc.add(["x"], ["x", "y"], context_items=["x"])  # all: ReR .5 PrR 1; new gold [y]: 0
    acc.add([], ["z"])  # nothing generated
    acc.add(["q"], [])  # not a recommendation turn: ignored
    r = acc.result()
    assert acc.turns == 2 and acc.turns_new == 2
    assert r["ReR@1"] == pytest.approx(0.25)
    assert r["PrR@1"] == pytest.approx(0.5)
    assert r["F1@1"] == pytest.approx((2 * 0.5 * 1 / 1.5) / 2)
    assert r["PrR@3"] == pytest.approx((1 / 3) / 2)
    assert r["ReR@1/new"] == 0.0 and r["F1@5/new"] == 0.0
    assert r["rec_turn_item_rate"] == 0.5
    # a turn whose gold items are all in the context counts for "all" but not for "/new"
    acc2 = InResponseAccumulator()
    acc2.add(["x"], ["x"], context_items=["x"])
    r2 = acc2.result()
    assert r2["ReR@1"] == 1.0 and math.isnan(r2["ReR@1/new"]) and acc2.turns_new == 0
    # merging shards equals accumulating everything in one
    one, a, b = InResponseAccumulator(), InResponseAccumulator(), InResponseAccumulator()
    turns = [(["x", "y"], ["y"], []), (["z"], ["z", "w"], ["w"]), ([], ["v"], [])]
    for n, t in enumerate(turns):
        one.add(*t)
        (a if n % 2 else b).add(*t)
    a.merge(b)
    assert a.result() == pytest.approx(one.result())
    assert math.isnan(InResponseAccumulator().result()["F1@1"])


def test_discrepancy_and_perplexity() -> None:
    assert discrepancy_rate([("a", "a"), ("b", "c"), (None, "a")]) == (0.5, 2)
    rate, n = discrepancy_rate([(None, "a")])
    assert math.isnan(rate) and n == 0
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    assert math.isnan(perplexity(0.0, 0))


def test_merge_ranking_results_equals_single_pass() -> None:
    g = torch.Generator().manual_seed(0)
    scores_BI = torch.randn(9, 20, generator=g)
    gold = [[int(i) for i in torch.randint(0, 20, (1 + b % 3,), generator=g)] for b in range(9)]
    gold[4] = []  # a skipped row
    single = RankingAccumulator((1, 10, 50))
    single.add(scores_BI, gold)
    parts = []
    for rows in (range(0, 4), range(4, 9)):
        acc = RankingAccumulator((1, 10, 50))
        acc.add(scores_BI[list(rows)], [gold[r] for r in rows])
        parts.append(acc.result())
    empty = RankingAccumulator((1, 10, 50)).result()  # a rank with nothing to rank
    merged = merge_ranking_results([*parts, empty])
    assert merged == pytest.approx(single.result())


def test_json_safe() -> None:
    assert json_safe(float("nan")) is None and json_safe(None) is None
    assert json_safe(float("inf")) is None and json_safe(0.5) == 0.5


def test_replace_items_pipeline_rule() -> None:
    # each distinct D item -> next unused R item; a repeated D item keeps its replacement
    assert replace_items("see <item_a> or <item_b>, <item_a>!", ["x", "y", "z"]) == (
        "see <item_x> or <item_y>, <item_x>!",
        ["x", "y"],
    )
    assert replace_items("no items", ["x"]) == ("no items", [])
    # R runs out: D's own item stays
    assert replace_items("<item_a> <item_b>", ["x"]) == ("<item_x> <item_b>", ["x", "b"])


def test_item_catalog_round_trip(tmp_path) -> None:
    cat = ItemCatalog([Item("1", "Alien (1979)"), Item("22", "Heat (1995)")])
    path = save_item_catalog(tmp_path, cat)
    assert path.name == ITEMS_FILE
    assert json.loads(path.read_text()) == [
        {"item_id": "1", "title": "Alien (1979)"},
        {"item_id": "22", "title": "Heat (1995)"},
    ]
    back = load_item_catalog(tmp_path)
    assert back.ids == ["1", "22"] and back.render("try <item_22>") == "try Heat (1995)"
    assert load_item_catalog(path).ids == ["1", "22"]
    with pytest.raises(DataError, match="not found"):
        load_item_catalog(tmp_path / "nope")
    (tmp_path / "bad.json").write_text('[{"item_id": 1}]')
    with pytest.raises(DataError, match="entry 0"):
        load_item_catalog(tmp_path / "bad.json")


def test_display_text_for_people() -> None:
    cat = ItemCatalog([Item("1", "Alien (1979)"), Item("2", "Heat")])
    assert display_text("Have you seen<item_1>?", cat) == "Have you seen Alien (1979)?"
    assert display_text("like <item_1> , or <item_2>and more", cat) == (
        "like Alien (1979), or Heat and more"
    )
    assert display_text("unknown <item_9> .", cat) == "unknown <item_9>."


def test_r_agree() -> None:
    """Over turns with a written item: the share whose first item is R's top item."""
    assert r_agree([("a", "a"), ("b", "c"), (None, "a"), ("d", "d")]) == (2 / 3, 2, 3)
    rate, hits, n = r_agree([(None, "a")])
    assert math.isnan(rate) and (hits, n) == (0, 0)
