"""ReDial loader (original JSONL schema), tolerant of the real release's quirks.

Quirks handled: messages without ``messageId``/``timeOffset``; question maps that are empty
lists instead of dicts; ``@id`` mentions in text that are missing from ``movieMentions`` (the
text is the source of truth); consecutive messages from one sender (joined into one turn);
``@word`` that is not a movie id (left as text). The synthetic corpus uses the same layout.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from conkd_scale.data.jsonl import get_field, iter_jsonl, require_file
from conkd_scale.data.schema import (
    RECOMMENDER,
    SEEKER,
    Conversation,
    Item,
    ItemCatalog,
    Turn,
    item_token,
)
from conkd_scale.utils.errors import DataError

SPLIT_FILES = {"train": "train_data.jsonl", "valid": "valid_data.jsonl", "test": "test_data.jsonl"}
MOVIES_FILE = "movies_with_mentions.csv"
MENTION_RE = re.compile(r"@(\d+)")
_SPACES = re.compile(r"\s+")


def load_movies(data_dir: str | Path) -> ItemCatalog:
    """The item vocabulary from ``movies_with_mentions.csv`` (file order is the item index)."""
    path = require_file(Path(data_dir) / MOVIES_FILE, "movie list (movieId,movieName,nbMentions)")
    items: list[Item] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["movieId", "movieName"]:
            raise DataError(
                path, f"bad header {header!r}", line=1, hint="expected movieId,movieName,nbMentions"
            )
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2 or not row[0].strip().isdigit():
                raise DataError(
                    path, f"bad row {row!r}", line=n, hint="expected an integer movieId and a name"
                )
            mid = row[0].strip()
            if mid in seen:
                raise DataError(path, f"duplicate movieId {mid}", line=n)
            seen.add(mid)
            mentions = int(row[2]) if len(row) > 2 and row[2].strip().isdigit() else 0
            items.append(Item(mid, _SPACES.sub(" ", row[1]).strip(), mentions))
    return ItemCatalog(items)


def _convert_text(text: str, catalog: ItemCatalog) -> tuple[str, tuple[str, ...]]:
    """Replace ``@id`` by item tokens; returns the text and the unique items in order."""
    found: list[str] = []

    def sub(m: re.Match[str]) -> str:
        mid = m.group(1)
        if mid not in catalog:
            return m.group(0)
        found.append(mid)
        return item_token(mid)

    out = MENTION_RE.sub(sub, text)
    return _SPACES.sub(" ", out).strip(), tuple(dict.fromkeys(found))


def parse_conversation(obj: object, catalog: ItemCatalog, path: Path, line: int) -> Conversation:
    """One ReDial JSON object -> a :class:`Conversation` with merged same-sender turns."""
    conv_id = str(get_field(obj, "conversationId", (str, int), path, line))
    seeker = get_field(obj, "initiatorWorkerId", int, path, line)
    recommender = get_field(obj, "respondentWorkerId", int, path, line)
    messages = get_field(obj, "messages", list, path, line)
    mm = obj.get("movieMentions", {})  # type: ignore[union-attr]
    if not isinstance(mm, dict | list):
        raise DataError(
            path, "expected an object (or empty list)", line=line, field="movieMentions"
        )
    roles = {seeker: SEEKER, recommender: RECOMMENDER}
    turns: list[tuple[str, list[str], list[str]]] = []  # (role, texts, items)
    for k, msg in enumerate(messages):
        text = get_field(msg, "text", str, path, line)
        sender = get_field(msg, "senderWorkerId", int, path, line)
        role = roles.get(sender)
        if role is None:
            raise DataError(
                path,
                f"message {k}: sender {sender} is neither the initiator ({seeker}) "
                f"nor the respondent ({recommender})",
                line=line,
                field="senderWorkerId",
            )
        converted, items = _convert_text(text, catalog)
        if not converted:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].append(converted)
            turns[-1][2].extend(items)
        else:
            turns.append((role, [converted], list(items)))
    return Conversation(
        conv_id,
        tuple(Turn(r, " ".join(ts), tuple(dict.fromkeys(its))) for r, ts, its in turns),
        n_messages=len(messages),
    )


def _warn_unknown_and_empty(path: Path, split: str, convs: list[Conversation]) -> None:
    """Warn (stderr, naming the file) about an empty split and about ``@id`` mentions of
    items the movie list does not have (they stay plain text: never an item token)."""
    if not convs:
        print(f"warning: {path}: the {split} split has no conversations", file=sys.stderr)
        return
    unknown = [
        (c.conv_id, m.group(1)) for c in convs for t in c.turns for m in MENTION_RE.finditer(t.text)
    ]
    if unknown:
        ids = sorted({i for _, i in unknown})
        print(
            f"warning: {path}: {len(unknown)} mention(s) of {len(ids)} item id(s) that the "
            f"movie list does not have (e.g. @{ids[0]} in conversation {unknown[0][0]}); they "
            "stay plain text and are never an item token",
            file=sys.stderr,
        )


def load_split(data_dir: str | Path, split: str, catalog: ItemCatalog) -> list[Conversation]:
    """All conversations of one split (``train``, ``valid`` or ``test``)."""
    if split not in SPLIT_FILES:
        raise DataError(
            data_dir, f"unknown split {split!r}", hint=f"use one of {list(SPLIT_FILES)}"
        )
    path = require_file(Path(data_dir) / SPLIT_FILES[split], f"ReDial {split} split")
    convs = [parse_conversation(obj, catalog, path, n) for n, obj in iter_jsonl(path)]
    _warn_unknown_and_empty(path, split, convs)
    ids = [c.conv_id for c in convs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(path, f"duplicate conversationId {dup!r}", field="conversationId")
    return convs
