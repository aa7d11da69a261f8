import json
import os
import pickle
from collections import defaultdict

import pytest
import torch

from conkd_scale.data import load_dataset
from conkd_scale.data.kg import KnowledgeGraph, load_dbpedia_kg, load_kbrd_kg, safe_load_pickle
from conkd_scale.utils.errors import DataError


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "subkg.pkl"
    path.write_bytes(pickle.dumps({1: _Evil(str(marker))}))
    with pytest.raises(DataError) as e:
        safe_load_pickle(path)
    assert "subkg.pkl" in str(e.value) and "refusing to unpickle" in str(e.value)
    assert "system" in str(e.value)
    assert not marker.exists()


def test_plain_pickles_load(tmp_path):
    path = tmp_path / "ok.pkl"
    obj = defaultdict(list, {1: [(2, 3)], 4: [(5, 6)]})
    path.write_bytes(pickle.dumps(obj))
    assert safe_load_pickle(path) == obj
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps(obj)[:10])
    with pytest.raises(DataError, match="cannot unpickle"):
        safe_load_pickle(tmp_path / "trunc.pkl")


def _kbrd(tmp_path, subkg):
    (tmp_path / "entity2entityId.pkl").write_bytes(pickle.dumps({"a": 0, "b": 1, "c": 2}))
    (tmp_path / "id2entity.pkl").write_bytes(pickle.dumps({10: "a", 11: None}))
    (tmp_path / "subkg.pkl").write_bytes(pickle.dumps(defaultdict(list, subkg)))
    return tmp_path


def test_kbrd_graph_and_unknown_ids(tmp_path):
    kg, id2e = load_kbrd_kg(_kbrd(tmp_path, {0: [(0, 1), (5, 0)], 1: [(0, 2)]}))
    assert kg.num_entities == 3 and kg.num_relations == 6 and id2e[11] is None
    assert kg.triples.tolist() == [[0, 0, 1], [0, 5, 0], [1, 0, 2]]
    _kbrd(tmp_path, {0: [(0, 7)]})
    with pytest.raises(DataError, match=r"subkg.pkl: field '0': unknown entity id 7"):
        load_kbrd_kg(tmp_path)


def test_build_graph_reverse_selfloops_rare():
    kg = KnowledgeGraph(
        ["e0", "e1", "e2"],
        ["r0", "r1", "r2"],
        torch.tensor([[0, 0, 1], [1, 0, 2], [2, 1, 0], [1, 2, 1]]),
    )
    g = kg.build_graph(min_relation_count=2, rare="merge")
    # the source self-loop (1, r2, 1) is dropped; r1 (1 edge) merges into "other"
    assert g.relation_names == ["r0", "other", "r0^-1", "other^-1", "self_loop"]
    assert g.edge_index.shape == (2, 3 * 2 + 3)
    fwd = {(h, t, r) for h, t, r in zip(*g.edge_index.tolist(), g.edge_type.tolist())}
    assert {(0, 1, 0), (1, 2, 0), (2, 0, 1), (1, 0, 2), (2, 1, 2), (0, 2, 3)} <= fwd
    assert {(i, i, 4) for i in range(3)} <= fwd
    d = kg.build_graph(min_relation_count=2, rare="drop", add_self_loops=False)
    assert d.relation_names == ["r0", "r0^-1"] and d.edge_index.shape == (2, 4)
    data = g.to_pyg()
    assert data.num_nodes == 3 and data.edge_type.shape[0] == data.edge_index.shape[1]


def test_dbpedia_unknown_relation(tmp_path):
    (tmp_path / "entity2id.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "relation2id.json").write_text(json.dumps({"r": 0}))
    (tmp_path / "dbpedia_subkg.json").write_text(json.dumps({"0": [[3, 1]]}))
    with pytest.raises(DataError, match=r"dbpedia_subkg.json: field '0': unknown relation id 3"):
        load_dbpedia_kg(tmp_path)
    (tmp_path / "dbpedia_subkg.json").write_text('{"0": [[0, 1]]')
    with pytest.raises(DataError, match="dbpedia_subkg.json:1: not valid JSON"):
        load_dbpedia_kg(tmp_path)


def test_real_kbrd_graph(redial_dir):
    c = load_dataset("redial", redial_dir)
    g = c.kg.build_graph(min_relation_count=1000)
    # FINDINGS.md: 27 frequent relations + "other", with reverses, plus our self-loop type
    assert g.num_relations == 55
    linked = [e for e in c.item_entity if e is not None]
    assert len(linked) == 6924 - 812 and len(set(linked)) == len(linked)
    d = load_dataset("redial", redial_dir, kg="dbpedia", splits=["test"])
    assert d.kg.num_entities == 31161 and d.items_without_kg_node > 812
