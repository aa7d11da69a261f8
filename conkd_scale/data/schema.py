"""The project's in-memory data model, shared by every dataset loader.

A dataset is a set of :class:`Conversation` splits plus an :class:`ItemCatalog` (the item
vocabulary ``I``; its order is the item index used by the recommendation teacher and the
order in which item tokens are added to a tokenizer) and optionally a knowledge graph.
Item mentions inside turn text are already replaced by item tokens (``<item_ID>``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

SEEKER = "seeker"
RECOMMENDER = "recommender"
ROLES = (SEEKER, RECOMMENDER)

ITEM_TOKEN_FMT = "<item_{}>"
ITEM_TOKEN_RE = re.compile(r"<item_([^<>\s]+)>")


def item_token(item_id: str) -> str:
    """The single vocabulary token for an item: ``item_token("111776") == "<item_111776>"``."""
    return ITEM_TOKEN_FMT.format(item_id)


_GLUED_ITEM_RE = re.compile(r"(?<=\S)(<item_[^<>\s]+>)")


def space_items(text: str) -> str:
    """Put back the space that an item token absorbs when tokenised (``"see<item_1>"``)."""
    return _GLUED_ITEM_RE.sub(r" \1", text)


def items_in_text(text: str) -> list[str]:
    """Item ids of the item tokens in ``text``, in order of appearance (with repeats)."""
    return ITEM_TOKEN_RE.findall(text)


@dataclass(frozen=True)
class Turn:
    """One turn: consecutive messages of one speaker, joined with a space."""

    role: str  # SEEKER or RECOMMENDER
    text: str  # item mentions as item tokens
    items: tuple[str, ...] = ()  # item ids mentioned in this turn, first-mention order, unique
    entities: tuple[str, ...] = ()  # non-item KG entity keys mentioned (e.g. DBpedia URIs)

    @property
    def is_recommendation(self) -> bool:
        """A recommender turn that mentions at least one item (METHOD.md)."""
        return self.role == RECOMMENDER and bool(self.items)


@dataclass(frozen=True)
class Conversation:
    conv_id: str
    turns: tuple[Turn, ...]
    n_messages: int = 0  # raw messages before same-sender merging


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    mentions: int = 0


@dataclass
class ItemCatalog:
    """The item vocabulary ``I`` in a fixed order: ``index(item_id)`` is the item index."""

    items: list[Item]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {it.item_id: i for i, it in enumerate(self.items)}
        if len(self._index) != len(self.items):
            raise ValueError("ItemCatalog: duplicate item ids")

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def index(self, item_id: str) -> int:
        return self._index[item_id]

    def get(self, item_id: str) -> Item | None:
        i = self._index.get(item_id)
        return None if i is None else self.items[i]

    @property
    def ids(self) -> list[str]:
        return [it.item_id for it in self.items]

    def title(self, item_id: str) -> str:
        it = self.get(item_id)
        return it.title if it is not None else item_token(item_id)

    def render(self, text: str) -> str:
        """Replace item tokens by their titles, for people to read."""
        return ITEM_TOKEN_RE.sub(lambda m: self.title(m.group(1)), space_items(text))


@dataclass(frozen=True)
class TurnSample:
    """A per-turn sample: the context so far and the next turn as the response."""

    conv_id: str
    turn_index: int  # index of the response turn in the conversation
    context: tuple[tuple[str, str], ...]  # (role, text) of every previous turn
    response: str
    role: str  # role of the responding speaker
    gold_items: tuple[str, ...]  # items mentioned in the response
    context_items: tuple[str, ...]  # items mentioned in the context, first-mention order
    context_entities: tuple[str, ...]  # non-item entities mentioned in the context
    context_turn_items: tuple[tuple[str, ...], ...] = ()  # items of each context turn

    @property
    def is_recommendation(self) -> bool:
        return self.role == RECOMMENDER and bool(self.gold_items)

    def recent_items(self) -> list[tuple[str, int]]:
        """Distinct context items, most recently mentioned first, each with how many turns
        ago it was last mentioned (1: the turn just before the response). Within one turn a
        later item counts as more recent. Built without ``context_turn_items``: first-mention
        order reversed, every item at 1 turn ago."""
        if not self.context_turn_items:
            return [(i, 1) for i in reversed(self.context_items)]
        out: dict[str, int] = {}
        for ago, items in enumerate(reversed(self.context_turn_items), start=1):
            for i in reversed(items):
                out.setdefault(i, ago)
        return list(out.items())


def _unique(xs: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(xs))


def turn_samples(
    conv: Conversation, roles: Sequence[str] = (RECOMMENDER,), *, skip_first: bool = False
) -> list[TurnSample]:
    """One sample per turn of the given roles (``skip_first`` drops a turn with no context)."""
    out: list[TurnSample] = []
    for t, turn in enumerate(conv.turns):
        if turn.role not in roles or (skip_first and t == 0):
            continue
        prev = conv.turns[:t]
        out.append(
            TurnSample(
                conv_id=conv.conv_id,
                turn_index=t,
                context=tuple((p.role, p.text) for p in prev),
                response=turn.text,
                role=turn.role,
                gold_items=turn.items,
                context_items=_unique(i for p in prev for i in p.items),
                context_entities=_unique(e for p in prev for e in p.entities),
                context_turn_items=tuple(p.items for p in prev),
            )
        )
    return out
