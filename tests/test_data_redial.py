import json
from pathlib import Path

import pytest

from conkd_scale.data import corpus_stats, load_dataset
from conkd_scale.data.redial import load_movies, load_split
from conkd_scale.data.schema import RECOMMENDER, SEEKER, turn_samples
from conkd_scale.utils.errors import DataError

MOVIES = "movieId,movieName,nbMentions\n111,Alpha  (1999),3\n222,Beta (2001),1\n333,Gamma,0\n"


def _conv(messages, **extra):
    d = {
        "conversationId": "c1",
        "initiatorWorkerId": 1,
        "respondentWorkerId": 2,
        "messages": messages,
        "movieMentions": {"111": "Alpha (1999)"},
        "initiatorQuestions": {},
        "respondentQuestions": [],
    }
    d.update(extra)
    return d


def _write(tmp_path: Path, convs, split="train") -> Path:
    (tmp_path / "movies_with_mentions.csv").write_text(MOVIES)
    lines = [c if isinstance(c, str) else json.dumps(c) for c in convs]
    (tmp_path / f"{split}_data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_quirks_are_tolerated(tmp_path):
    msgs = [
        {"messageId": 1, "text": "hi, I liked @111", "timeOffset": 0, "senderWorkerId": 1},
        {"text": "and @222 too", "senderWorkerId": 1},  # no messageId/timeOffset; same sender
        {"text": "try @333 or @999 @Far", "senderWorkerId": 2},  # 333 not in movieMentions
        {"text": "thanks", "senderWorkerId": 1},
        {"text": "see @333 and @111 and @333", "senderWorkerId": 2},
    ]
    d = _write(tmp_path, [_conv(msgs)])
    cat = load_movies(d)
    assert cat.ids == ["111", "222", "333"] and cat.title("111") == "Alpha (1999)"
    (conv,) = load_split(d, "train", cat)
    assert conv.n_messages == 5
    assert [t.role for t in conv.turns] == [SEEKER, RECOMMENDER, SEEKER, RECOMMENDER]
    assert conv.turns[0].text == "hi, I liked <item_111> and <item_222> too"
    assert conv.turns[0].items == ("111", "222")
    # @999 is not a known movie and @Far is not an id: both stay text
    assert conv.turns[1].text == "try <item_333> or @999 @Far" and conv.turns[1].items == ("333",)
    assert conv.turns[3].items == ("333", "111")
    samples = turn_samples(conv)
    assert [s.turn_index for s in samples] == [1, 3]
    assert turn_samples(conv, (SEEKER,))[0].context == ()
    s = samples[1]
    assert s.gold_items == ("333", "111")
    assert s.context_items == ("111", "222", "333")
    assert s.context[0] == (SEEKER, conv.turns[0].text) and s.role == RECOMMENDER
    assert s.is_recommendation


def test_malformed_json_names_file_and_line(tmp_path):
    good = _conv([{"text": "hi", "senderWorkerId": 1}])
    d = _write(tmp_path, [good, '{"conversationId": "x", oops'])
    with pytest.raises(DataError) as e:
        load_split(d, "train", load_movies(d))
    assert "train_data.jsonl:2" in str(e.value) and "not valid JSON" in str(e.value)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c.pop("messages"), "field 'messages': missing"),
        (lambda c: c.update(initiatorWorkerId="x"), "field 'initiatorWorkerId': expected int"),
        (lambda c: c["messages"][0].pop("text"), "field 'text': missing"),
        (lambda c: c["messages"][0].update(senderWorkerId=7), "neither the initiator"),
        (lambda c: c.update(movieMentions=3), "field 'movieMentions'"),
    ],
)
def test_missing_or_bad_fields(tmp_path, mutate, needle):
    c = _conv([{"text": "hi", "senderWorkerId": 1}])
    mutate(c)
    d = _write(tmp_path, [_conv([{"text": "ok", "senderWorkerId": 2}]), c])
    with pytest.raises(DataError) as e:
        load_split(d, "train", load_movies(d))
    assert ":2:" in str(e.value) and needle in str(e.value)


def test_missing_files_and_bad_movie_rows(tmp_path):
    with pytest.raises(DataError, match="missing movie list"):
        load_movies(tmp_path)
    (tmp_path / "movies_with_mentions.csv").write_text(MOVIES + "x,Bad,1\n")
    with pytest.raises(DataError, match=r"movies_with_mentions.csv:5: bad row"):
        load_movies(tmp_path)
    (tmp_path / "movies_with_mentions.csv").write_text(MOVIES)
    with pytest.raises(DataError, match="missing ReDial test split"):
        load_split(tmp_path, "test", load_movies(tmp_path))


def test_duplicate_conversation_ids(tmp_path):
    c = _conv([{"text": "hi", "senderWorkerId": 1}])
    d = _write(tmp_path, [c, c])
    with pytest.raises(DataError, match="duplicate conversationId"):
        load_split(d, "train", load_movies(d))


def test_real_redial_stats(redial_dir):
    corpus = load_dataset("redial", redial_dir)
    st = corpus_stats(corpus, "train")
    assert st["conversations"] == 2043
    assert st["items"] == 6924
    assert st["kg_entities"] == 64362 and st["kg_edges"] == 165696 and st["kg_relations"] == 214
    assert st["items_without_kg_node"] == 812
    assert corpus_stats(corpus, "test")["conversations"] == 671
    assert len(corpus.splits["valid"]) == 227
    # the quirks exist in the real data and were absorbed
    turns = [t for c in corpus.splits["train"] for t in c.turns]
    assert st["messages"] > len(turns)  # consecutive same-sender messages were merged
    for c in corpus.splits["train"][:100]:
        assert all(a.role != b.role for a, b in zip(c.turns, c.turns[1:]))
    samples = corpus.samples("test")
    rec = [s for s in samples if s.is_recommendation]
    assert len(rec) == corpus_stats(corpus, "test")["recommendation_turns"]
    assert all("@" not in t for s in rec[:200] for t in s.gold_items)
