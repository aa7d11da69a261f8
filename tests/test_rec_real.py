"""R's data pipeline on the real ReDial split (skipped when ../shared/data is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conkd_scale.data.corpus import load_dataset
from conkd_scale.rec.graph import ContextIndex, build_rec_graph
from conkd_scale.rec.popularity import Popularity
from conkd_scale.rec.train import encode_turns, evaluate_turns

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def redial():  # type: ignore[no-untyped-def]
    path = SHARED_DATA / "redial"
    if not path.is_dir():
        pytest.skip(f"real ReDial data not found at {path} (../shared/data relative to the repo)")
    return load_dataset("redial", path)


def test_redial_compact_graph(redial) -> None:  # type: ignore[no-untyped-def]
    graph = build_rec_graph(redial, layers=1, min_relation_count=1000)
    assert graph.num_items == 6924 and graph.num_targets == 6924  # no shared nodes
    assert graph.num_relations == 55  # 27 kept + other, reversed, + self-loop
    assert (graph.kg_node[graph.item_node] == -1).sum() == 812  # no DBpedia link
    assert graph.edge_index[0].shape[1] == 72903  # of 381,866: only edges into items
    assert graph.layer_sizes == [29299, 6924]
    assert int(graph.edge_index[0][1].max()) < 6924


def test_redial_popularity_and_samples(redial) -> None:  # type: ignore[no-untyped-def]
    graph = build_rec_graph(redial, use_kg=False)
    index = ContextIndex(graph)
    train = encode_turns(redial.samples("train"), index)
    test = encode_turns(redial.samples("test"), index)
    assert sum(len(g) for g in train.gold) == 7962
    assert (len(test), sum(len(g) for g in test.gold)) == (1776, 2399)
    pop = Popularity.from_samples(redial.samples("train"), graph.item_ids, seed=0)
    m = evaluate_turns(lambda ctx: pop.scores(len(ctx)), test)
    assert m["n"] == 2399 and m["new/n"] == 2188
    assert m["R@10"] == pytest.approx(0.0742, abs=5e-4)
    assert m["R@50"] == pytest.approx(0.1788, abs=5e-4)
    assert torch.all(pop.counts_I >= 0)
