"""The words of a conversation as R reads them: lower-cased tokens hashed into buckets.

R's word context (``words="context"``) and its copy gate's last-turn words
(``copy_words=true``) look words up by a stable hash (CRC-32) into ``buckets`` embedding rows,
so no vocabulary has to be built, stored or kept in sync with the data: the checkpoint's
config (``word_buckets``) is all a reload needs. Item placeholders (``<item_…>``) are dropped
(R reads the items themselves), and so are single letters.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

_ITEM = re.compile(r"<item_[^>]*>")
_WORD = re.compile(r"[a-z][a-z']+")
_TOKEN = re.compile(r"<item_([^>]*)>|([A-Za-z][A-Za-z']+)")  # an item id (case kept) or a word


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (item placeholders removed)."""
    return _WORD.findall(_ITEM.sub(" ", text.lower()))


def hash_words(words: Iterable[str], buckets: int) -> list[int]:
    """Bucket ids in ``1..buckets`` (0 is padding), one per word, in order."""
    return [zlib.crc32(w.encode()) % buckets + 1 for w in words]


def mention_windows(text: str, window: int) -> dict[str, list[str]]:
    """For each item id named in ``text``: the ``window`` words before and after its last
    mention (other item placeholders skipped), e.g. what the speaker says about it."""
    tokens = [(item, word.lower()) for item, word in _TOKEN.findall(text)]  # one is ""
    out: dict[str, list[str]] = {}
    for n, (item, _) in enumerate(tokens):
        if item:
            around = tokens[max(0, n - window) : n] + tokens[n + 1 : n + 1 + window]
            out[item] = [w for i, w in around if not i]
    return out
