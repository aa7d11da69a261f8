"""INSPIRED loader for the UniCRS DBpedia format (one JSON list of turns per line).

Items are the movies linked to DBpedia: the item id is the movie's entity id in
``entity2id.json`` (so ``<item_1234>``), and the vocabulary is ``item_ids.json`` plus every
movie link seen in the conversations. Movie names found in a turn's text are replaced by the
item token; a linked movie whose name is not in the text still counts as mentioned. A movie
link that ``entity2id.json`` lacks is an error (files of different releases); an entity link
it lacks is dropped with a warning that counts them, as is an empty split.

Splits **[decision]**: the public UniCRS release has train (801) and valid (99) files only.
``test`` is the whole valid file (the split every INSPIRED number is reported on);
``valid``, the selection split (early stopping, η, sizes), is a fixed, seeded 10% of the
train file's conversations (:data:`SELECTION_SHARE`, :data:`SELECTION_SEED`), and ``train``
is the rest of the train file.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

from conkd_scale.data.jsonl import get_field, iter_jsonl, load_json, require_file
from conkd_scale.data.schema import RECOMMENDER, SEEKER, Conversation, Item, ItemCatalog, Turn
from conkd_scale.data.schema import item_token as _item_token
from conkd_scale.utils.errors import DataError

FILES = {"train": "train_data_dbpedia.jsonl", "valid": "valid_data_dbpedia.jsonl"}
SPLITS = ("train", "valid", "test")
ROLE_MAP = {"SEEKER": SEEKER, "RECOMMENDER": RECOMMENDER}
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_SPACES = re.compile(r"\s+")
SELECTION_SHARE = 0.1  # share of the train file's conversations held out as ``valid``
SELECTION_SEED = 0  # seed of that draw


def _uri_name(uri: str) -> str:
    return uri.strip("<>").rsplit("/", 1)[-1].replace("_", " ")


def _split_source(split: str) -> tuple[str, bool | None]:
    """File key, and whether the split keeps the selection draw (None = all conversations)."""
    if split == "train":
        return "train", False
    if split == "valid":
        return "train", True
    if split == "test":
        return "valid", None
    raise DataError("inspired", f"unknown split {split!r}", hint=f"use one of {list(SPLITS)}")


def selection_draw(n: int) -> set[int]:
    """Indices of the train file's conversations that form the ``valid`` split."""
    k = max(1, round(n * SELECTION_SHARE)) if n > 1 else 0
    return set(random.Random(SELECTION_SEED).sample(range(n), k))


def _raw_conversations(data_dir: Path, key: str) -> list[tuple[int, list]]:
    path = require_file(data_dir / FILES[key], f"INSPIRED {key} file")
    out = []
    for n, obj in iter_jsonl(path):
        if not isinstance(obj, list):
            raise DataError(
                path, f"expected a JSON list of turns, got {type(obj).__name__}", line=n
            )
        out.append((n, obj))
    return out


def load_catalog(data_dir: str | Path, entity2id: dict[str, int]) -> ItemCatalog:
    """Item vocabulary: ``item_ids.json`` plus movie links in the conversations, by entity id."""
    data_dir = Path(data_dir)
    id2uri = {v: k for k, v in entity2id.items()}
    ids_path = data_dir / "item_ids.json"
    titles: dict[int, str] = {}
    for key in FILES:
        path = data_dir / FILES[key]
        for n, turns in _raw_conversations(data_dir, key):
            for turn in turns:
                links = get_field(turn, "movie_link", list, path, n)
                names = turn.get("movie", []) or turn.get("movie_name", [])
                for k, uri in enumerate(links):
                    if uri not in entity2id:
                        raise DataError(
                            path,
                            f"movie link {uri} is not in entity2id.json",
                            line=n,
                            field="movie_link",
                            hint="use the entity2id.json of the same release",
                        )
                    eid = entity2id[uri]
                    if eid not in titles:
                        titles[eid] = names[k] if k < len(names) else _uri_name(uri)
    for eid in load_json(ids_path, "INSPIRED item id list"):
        if eid not in id2uri:
            raise DataError(ids_path, f"entity id {eid} is not in entity2id.json")
        titles.setdefault(eid, _uri_name(id2uri[eid]))
    return ItemCatalog([Item(str(eid), titles[eid]) for eid in sorted(titles)])


def _parse(
    turns: list,
    entity2id: dict[str, int],
    path: Path,
    line: int,
    conv_id: str,
    unknown: list[tuple[str, str]],
) -> Conversation:
    """One conversation; ``(conv_id, uri)`` of each entity link that ``entity2id`` lacks is
    appended to ``unknown`` (the link is dropped)."""
    merged: list[tuple[str, list[str], list[str], list[str]]] = []
    for turn in turns:
        text = get_field(turn, "text", str, path, line)
        role_raw = get_field(turn, "role", str, path, line)
        role = ROLE_MAP.get(role_raw)
        if role is None:
            raise DataError(
                path,
                f"unknown role {role_raw!r}",
                line=line,
                field="role",
                hint="expected SEEKER or RECOMMENDER",
            )
        links = turn.get("movie_link", [])
        names = turn.get("movie_name", [])
        titles = turn.get("movie", [])
        items = []
        for k, uri in enumerate(links):
            if uri not in entity2id:
                raise DataError(
                    path,
                    f"movie link {uri} is not in entity2id.json",
                    line=line,
                    field="movie_link",
                )
            iid = str(entity2id[uri])
            items.append(iid)
            for name in (names[k] if k < len(names) else "", titles[k] if k < len(titles) else ""):
                name = _YEAR.sub("", name).strip()
                if name:
                    new, hit = re.subn(
                        re.escape(name), _item_token(iid), text, count=1, flags=re.IGNORECASE
                    )
                    if hit:
                        text = new
                        break
        ents = []
        for u in turn.get("entity_link", []):
            if u in entity2id:
                ents.append(u)
            else:
                unknown.append((conv_id, u))
        text = _SPACES.sub(" ", text).strip()
        if not text and not items:
            continue
        if merged and merged[-1][0] == role:
            merged[-1][1].append(text)
            merged[-1][2].extend(items)
            merged[-1][3].extend(ents)
        else:
            merged.append((role, [text], items, ents))
    return Conversation(
        conv_id,
        tuple(
            Turn(r, " ".join(ts), tuple(dict.fromkeys(its)), tuple(dict.fromkeys(es)))
            for r, ts, its, es in merged
        ),
        n_messages=len(turns),
    )


def load_split(data_dir: str | Path, split: str, entity2id: dict[str, int]) -> list[Conversation]:
    """Conversations of one split (see the module docstring for the split decision)."""
    data_dir = Path(data_dir)
    key, selected = _split_source(split)
    path = data_dir / FILES[key]
    raw = _raw_conversations(data_dir, key)
    draw = selection_draw(len(raw)) if selected is not None else set()
    out: list[Conversation] = []
    unknown: list[tuple[str, str]] = []
    for k, (n, turns) in enumerate(raw):
        if selected is not None and (k in draw) != selected:
            continue
        out.append(_parse(turns, entity2id, path, n, f"inspired-{key}-{n}", unknown))
    _warn_unknown_and_empty(path, split, out, unknown)
    return out


def _warn_unknown_and_empty(
    path: Path, split: str, convs: list[Conversation], unknown: list[tuple[str, str]]
) -> None:
    """Warn (stderr, naming the file) about an empty split and about entity links that
    ``entity2id.json`` does not have (dropped: they never reach the KG)."""
    if not convs:
        print(f"warning: {path}: the {split} split has no conversations", file=sys.stderr)
        return
    if unknown:
        uris = sorted({u for _, u in unknown})
        print(
            f"warning: {path}: {len(unknown)} link(s) to {len(uris)} entity id(s) that "
            f"entity2id.json does not have in the {split} split (e.g. {unknown[0][1]} in "
            f"conversation {unknown[0][0]}); they are dropped from the turns' entities",
            file=sys.stderr,
        )
