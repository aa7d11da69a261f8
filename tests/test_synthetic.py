"""The synthetic dataset: real ReDial layout, determinism, quirks, and the planted KG signal."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conkd_scale.data.synthetic import MARKER_FILE, write_synthetic
from conkd_scale.utils.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")
MENTION = re.compile(r"@(\d+)")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def _load_pickle(path: Path) -> Any:
    return _PlainUnpickler(io.BytesIO(path.read_bytes())).load()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _conversations(d: Path, split: str) -> list[dict[str, Any]]:
    with open(d / f"{split}_data.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("synth") / "data"
    return d, write_synthetic(d, seed=0)


def test_layout_and_summary(synth: tuple[Path, dict[str, Any]]) -> None:
    d, summary = synth
    expected = {
        "train_data.jsonl",
        "valid_data.jsonl",
        "test_data.jsonl",
        "movies_with_mentions.csv",
        MARKER_FILE,
        "kg/dbpedia/entity2id.json",
        "kg/dbpedia/item_ids.json",
        "kg/dbpedia/relation2id.json",
        "kg/dbpedia/dbpedia_subkg.json",
        "kg/kbrd/id2entity.pkl",
        "kg/kbrd/entity2entityId.pkl",
        "kg/kbrd/movie_ids.pkl",
        "kg/kbrd/subkg.pkl",
    }
    files = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
    assert files == expected
    assert sum((d / f).stat().st_size for f in files) < 1.5e6
    assert summary["conversations"] == {"train": 480, "valid": 60, "test": 60}
    for s in SPLITS:
        assert len(_conversations(d, s)) == summary["conversations"][s]
    meta = json.loads((d / MARKER_FILE).read_text())
    assert meta["seed"] == 0 and meta["conversations"] == 600 and meta["items"] == 120
    assert meta["summary"] == summary


def test_redial_schema_and_quirks(synth: tuple[Path, dict[str, Any]]) -> None:
    d, _ = synth
    with open(d / "movies_with_mentions.csv", encoding="utf-8", newline="") as f:
        raw = f.read()
    assert raw.startswith("movieId,movieName,nbMentions\r\n")
    rows = list(csv.reader(io.StringIO(raw)))[1:]
    movies = {r[0]: r[1] for r in rows}
    assert len(movies) == 120 and all(re.fullmatch(r"\d{6}", m) for m in movies)
    assert all(re.fullmatch(r"[A-Z][\w ]+ \(\d{4}\)", t) for t in movies.values())
    counts = sorted(int(r[2]) for r in rows)
    assert counts[-1] > 4 * counts[len(counts) // 2]  # skewed popularity

    quirks: Counter[str] = Counter()
    conv_ids: list[str] = []
    for s in SPLITS:
        for c in _conversations(d, s):
            conv_ids.append(c["conversationId"])
            assert isinstance(c["conversationId"], str)
            seeker, rec = c["initiatorWorkerId"], c["respondentWorkerId"]
            assert isinstance(seeker, int) and isinstance(rec, int) and seeker != rec
            msgs = c["messages"]
            assert 6 <= len(msgs) <= 12
            assert msgs[0]["senderWorkerId"] == seeker
            mentioned: list[str] = []
            for m in msgs:
                assert m["senderWorkerId"] in (seeker, rec) and m["text"].strip()
                if "messageId" in m:
                    assert isinstance(m["messageId"], int) and isinstance(m["timeOffset"], int)
                else:
                    assert set(m) == {"text", "senderWorkerId"}
                    quirks["bare_messages"] += 1
                mentioned += MENTION.findall(m["text"])
            same = any(
                a["senderWorkerId"] == b["senderWorkerId"] for a, b in itertools.pairwise(msgs)
            )
            quirks["consecutive"] += same
            assert set(mentioned) == set(c["movieMentions"])
            assert all(c["movieMentions"][m] == movies[m] for m in mentioned)
            for key in ("initiatorQuestions", "respondentQuestions"):
                q = c[key]
                if q == []:
                    quirks[f"{key}=[]"] += 1
                    continue
                assert set(q) == set(mentioned)
                for a in q.values():
                    assert a["suggested"] in (0, 1) and a["seen"] in (0, 1, 2)
                    assert a["liked"] in (0, 1, 2)
            if any(MENTION.search(m["text"]) for m in msgs if m["senderWorkerId"] == rec):
                quirks["with_recommendation"] += 1
    assert len(set(conv_ids)) == len(conv_ids) == 600
    assert quirks["bare_messages"] > 0 and quirks["initiatorQuestions=[]"] > 0
    assert quirks["consecutive"] > 50 and quirks["with_recommendation"] > 550


def test_knowledge_graph_files(synth: tuple[Path, dict[str, Any]]) -> None:
    d, summary = synth
    kg = d / "kg" / "dbpedia"
    e2id = json.loads((kg / "entity2id.json").read_text())
    r2id = json.loads((kg / "relation2id.json").read_text())
    subkg = json.loads((kg / "dbpedia_subkg.json").read_text())
    item_ids = json.loads((kg / "item_ids.json").read_text())
    id2entity = _load_pickle(d / "kg" / "kbrd" / "id2entity.pkl")

    assert all(re.fullmatch(r"<http://dbpedia\.org/resource/\S+>", u) for u in e2id)
    assert sorted(e2id.values()) == list(range(len(e2id))) == list(range(summary["entities"]))
    for rel in ("genre", "starring", "director"):
        assert f"<http://dbpedia.org/ontology/{rel}>" in r2id
    assert "self_loop" in r2id
    assert type(id2entity) is dict and len(id2entity) == 120
    assert all(type(k) is int for k in id2entity)
    assert all(v is None or type(v) is str for v in id2entity.values())
    n_none = sum(v is None for v in id2entity.values())
    assert 0.02 <= n_none / 120 <= 0.08
    linked = sorted(e2id[u] for u in id2entity.values() if u is not None)
    assert sorted(item_ids) == linked and summary["items_in_kg"] == len(linked)
    assert set(subkg) == {str(i) for i in e2id.values()}
    edges = 0
    for h, es in subkg.items():
        assert [r2id["self_loop"], int(h)] in es
        for r, t in es:
            assert 0 <= r < len(r2id) and 0 <= t < len(e2id)
            edges += r != r2id["self_loop"]
    assert edges == summary["edges"]
    # The KBRD pickles hold the same graph with plain containers only.
    assert _load_pickle(d / "kg" / "kbrd" / "entity2entityId.pkl") == e2id
    assert _load_pickle(d / "kg" / "kbrd" / "movie_ids.pkl") == item_ids
    kbrd_subkg = _load_pickle(d / "kg" / "kbrd" / "subkg.pkl")
    assert {str(h): [list(e) for e in es] for h, es in kbrd_subkg.items()} == subkg


def test_deterministic_bytes(tmp_path: Path, synth: tuple[Path, dict[str, Any]]) -> None:
    d, summary = synth
    again = write_synthetic(tmp_path / "again", seed=0)
    assert again == summary
    assert _tree_hashes(tmp_path / "again") == _tree_hashes(d)
    write_synthetic(tmp_path / "other", seed=1, conversations=40, items=30)
    other = _tree_hashes(tmp_path / "other")
    assert other["train_data.jsonl"] != _tree_hashes(d)["train_data.jsonl"]


def test_rewrite_and_refusals(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    write_synthetic(out, seed=3, conversations=20, items=25)
    (out / "stale.txt").write_text("x")
    s = write_synthetic(out, seed=3, conversations=30, items=25)  # replaces the old one whole
    assert not (out / "stale.txt").exists()
    assert sum(s["conversations"].values()) == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        write_synthetic(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="conversations"):
        write_synthetic(tmp_path / "x", conversations=5)
    with pytest.raises(ConfigError, match="items"):
        write_synthetic(tmp_path / "x", items=3)


def test_kg_neighbour_recommender_beats_popularity(synth: tuple[Path, dict[str, Any]]) -> None:
    """Score items by attributes shared (in the written KG) with the items in the context."""
    d, _ = synth
    kg = d / "kg" / "dbpedia"
    e2id = json.loads((kg / "entity2id.json").read_text())
    self_loop = json.loads((kg / "relation2id.json").read_text())["self_loop"]
    subkg = json.loads((kg / "dbpedia_subkg.json").read_text())
    id2entity = _load_pickle(d / "kg" / "kbrd" / "id2entity.pkl")
    attrs: dict[str, set[tuple[int, int]]] = {}
    for mid, uri in sorted(id2entity.items()):
        es = subkg[str(e2id[uri])] if uri is not None else []
        attrs[str(mid)] = {(r, t) for r, t in es if r != self_loop}

    popularity: Counter[str] = Counter()
    for c in _conversations(d, "train"):
        popularity.update(list(c["movieMentions"]))
    by_pop = sorted(attrs, key=lambda m: (-popularity[m], int(m)))

    hits = {"kg": 0, "pop": 0}
    n = 0
    for c in _conversations(d, "test"):
        context: list[str] = []
        for m in c["messages"]:
            ids = list(dict.fromkeys(MENTION.findall(m["text"])))
            if m["senderWorkerId"] == c["respondentWorkerId"] and ids:
                score = {
                    i: sum(len(attrs[i] & attrs[x]) for x in context)
                    for i in attrs
                    if i not in context
                }
                top_kg = sorted(score, key=lambda i: (-score[i], -popularity[i], int(i)))[:10]
                top_pop = [i for i in by_pop if i not in context][:10]
                for gold in ids:
                    n += 1
                    hits["kg"] += gold in top_kg
                    hits["pop"] += gold in top_pop
            context += [i for i in ids if i not in context]
    r_kg, r_pop = hits["kg"] / n, hits["pop"] / n
    assert n > 80
    assert r_pop > 2 * 10 / len(attrs)  # popularity is well above chance ...
    assert r_kg > r_pop + 0.2  # ... and the KG-aware ranking is clearly better
