import json

import pytest

from conkd_scale.data import corpus_stats, load_dataset
from conkd_scale.data.schema import RECOMMENDER
from conkd_scale.utils.errors import DataError


def _kg(tmp_path, extra_entities=()):
    ents = [
        "<http://dbpedia.org/resource/Knives_Out>",
        "<http://dbpedia.org/resource/Action_film>",
        "<http://dbpedia.org/resource/Joker_(2019_film)>",
        *extra_entities,
    ]
    (tmp_path / "entity2id.json").write_text(json.dumps({e: i for i, e in enumerate(ents)}))
    (tmp_path / "item_ids.json").write_text("[0, 2]")
    (tmp_path / "relation2id.json").write_text(json.dumps({"<genre>": 0, "self_loop": 1}))
    (tmp_path / "dbpedia_subkg.json").write_text(json.dumps({"0": [[0, 1], [1, 0]]}))


def _turn(role, text, movies=(), links=(), ents=()):
    return {
        "text": text,
        "role": role,
        "movie": [m + " (2019)" for m in movies],
        "movie_name": list(movies),
        "movie_link": list(links),
        "entity_link": list(ents),
        "entity_name": [],
    }


def test_inspired_items_and_entities(tmp_path):
    _kg(tmp_path)
    conv = [
        _turn("SEEKER", "I like action movies", ents=["<http://dbpedia.org/resource/Action_film>"]),
        _turn(
            "RECOMMENDER",
            "Have you seen knives out?",
            ["Knives Out"],
            ["<http://dbpedia.org/resource/Knives_Out>"],
        ),
        _turn("RECOMMENDER", "It is great."),
    ]
    for name in ("train_data_dbpedia.jsonl", "valid_data_dbpedia.jsonl"):
        (tmp_path / name).write_text(json.dumps(conv) + "\n" + json.dumps(conv) + "\n")
    c = load_dataset("inspired", tmp_path)
    assert c.catalog.ids == ["0", "2"] and c.catalog.title("0") == "Knives Out (2019)"
    assert c.catalog.title("2") == "Joker (2019 film)"
    (conv0,) = c.splits["train"]
    assert len(conv0.turns) == 2 and conv0.turns[1].role == RECOMMENDER
    assert conv0.turns[1].text == "Have you seen <item_0>? It is great."
    assert len(c.splits["valid"]) == 1 and len(c.splits["test"]) == 2  # test: the valid file
    (s,) = c.samples("train")[:1]
    assert s.gold_items == ("0",) and s.context_entities == (
        "<http://dbpedia.org/resource/Action_film>",
    )
    assert c.entity_ids(s.context_entities) == [1]
    assert c.item_entity == [0, 2]


def test_inspired_unknown_movie_link(tmp_path):
    _kg(tmp_path)
    bad = [_turn("RECOMMENDER", "see X", ["X"], ["<http://dbpedia.org/resource/X>"])]
    (tmp_path / "train_data_dbpedia.jsonl").write_text(json.dumps(bad) + "\n")
    (tmp_path / "valid_data_dbpedia.jsonl").write_text("")
    with pytest.raises(DataError, match=r"train_data_dbpedia.jsonl:1: field 'movie_link'"):
        load_dataset("inspired", tmp_path)


def test_inspired_unknown_entity_links_and_an_empty_split_are_named(tmp_path, capsys):
    _kg(tmp_path)
    stray = "<http://dbpedia.org/resource/Not_In_The_KG>"
    conv = [
        _turn(
            "SEEKER",
            "I like action movies",
            ents=[stray, "<http://dbpedia.org/resource/Action_film>"],
        ),
        _turn("RECOMMENDER", "Try this", ents=[stray]),
    ]
    (tmp_path / "train_data_dbpedia.jsonl").write_text(json.dumps(conv) + "\n")
    (tmp_path / "valid_data_dbpedia.jsonl").write_text("")
    c = load_dataset("inspired", tmp_path, splits=("train", "test"))
    (conv0,) = c.splits["train"]
    assert [t.entities for t in conv0.turns] == [("<http://dbpedia.org/resource/Action_film>",), ()]
    err = capsys.readouterr().err
    train, valid = tmp_path / "train_data_dbpedia.jsonl", tmp_path / "valid_data_dbpedia.jsonl"
    assert (
        f"warning: {train}: 2 link(s) to 1 entity id(s) that entity2id.json does not have in "
        f"the train split (e.g. {stray} in conversation inspired-train-1)"
    ) in err
    assert f"warning: {valid}: the test split has no conversations" in err


def test_inspired_not_a_list(tmp_path):
    _kg(tmp_path)
    (tmp_path / "train_data_dbpedia.jsonl").write_text("[]\n{}\n")
    (tmp_path / "valid_data_dbpedia.jsonl").write_text("")
    with pytest.raises(DataError, match=r"train_data_dbpedia.jsonl:2: expected a JSON list"):
        load_dataset("inspired", tmp_path)


def test_real_inspired_stats(inspired_dir):
    c = load_dataset("inspired", inspired_dir)
    st = corpus_stats(c, "train")
    assert st["conversations"] == 721  # the train file's 801 minus the 10% selection draw
    assert st["kg_entities"] == 17320 and st["items_without_kg_node"] == 0
    assert len(c.splits["valid"]) == 80 and len(c.splits["test"]) == 99
    train_ids = {conv.conv_id for conv in c.splits["train"]}
    assert not train_ids & {conv.conv_id for conv in c.splits["valid"]}
    assert st["recommendation_turns"] > 1000
