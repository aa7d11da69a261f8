"""Tokenizers with one token per item and the ``[REC]``/``[GEN]`` mode tokens.

Two kinds, both saved and loaded as a Hugging Face tokenizer directory:
- ``sentencepiece``: a SentencePiece unigram model trained on the corpus (item tokens removed
  from the training text), wrapped as a fast Hugging Face tokenizer, for from-scratch models;
- ``pretrained``: an existing Hugging Face tokenizer (e.g. DialoGPT's GPT-2 BPE) from a local
  directory or the hub.
Both are then extended with the item tokens (ordinary added tokens, so decoding keeps them;
each absorbs the space before it, see :func:`add_crs_tokens` and ``schema.space_items``),
the mode tokens and the speaker-role tokens (special tokens), and a pad token if missing.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from conkd_scale.data.schema import ITEM_TOKEN_RE, RECOMMENDER, SEEKER, item_token
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import atomic_dir

MODE_REC = "[REC]"
MODE_GEN = "[GEN]"
MODE_TOKENS = (MODE_REC, MODE_GEN)
ROLE_TOKENS = {SEEKER: "[SEEKER]", RECOMMENDER: "[RECOMMENDER]"}
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def _spm_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        character_coverage=1.0,
        hard_vocab_limit=False,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tk = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    return tk


def train_sentencepiece_tokenizer(
    texts: Iterable[str], item_ids: Sequence[str], *, vocab_size: int = 4000
) -> Any:
    """Train a SentencePiece unigram tokenizer on ``texts`` and add item/mode/role tokens."""
    from transformers import PreTrainedTokenizerFast

    plain = (ITEM_TOKEN_RE.sub(" ", t) for t in texts)
    tk = _spm_tokenizer((t for t in plain if t.strip()), vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )
    return add_crs_tokens(tok, item_ids)


def load_pretrained_tokenizer(
    name_or_path: str, item_ids: Sequence[str], *, trust_remote_code: bool = False
) -> Any:
    """A Hugging Face tokenizer (local dir or hub name) extended with the CRS tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return add_crs_tokens(tok, item_ids)


def add_crs_tokens(tok: Any, item_ids: Sequence[str]) -> Any:
    """Add item tokens (catalog order), mode and role tokens, and a pad token if missing."""
    from tokenizers import AddedToken

    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": tok.eos_token})
    specials = [*MODE_TOKENS, *ROLE_TOKENS.values()]
    tok.add_special_tokens(
        {"additional_special_tokens": specials}, replace_extra_special_tokens=False
    )
    vocab = tok.get_vocab()
    new = [item_token(i) for i in item_ids if item_token(i) not in vocab]
    # lstrip: an item token absorbs the space before it, so "seen <item_1>" is "seen" then
    # the item, not "seen", "▁", item: the next-token distribution at an item slot then puts
    # its item mass on the item itself (which is what the ConKD gate reads).
    tok.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=True) for t in new])
    return tok


def save_tokenizer(tok: Any, out_dir: str | Path) -> None:
    """Save as a Hugging Face tokenizer directory (atomically)."""
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer directory written by :func:`save_tokenizer` (no project code needed)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer directory {path} does not exist")
    return AutoTokenizer.from_pretrained(path)


def item_token_ids(tok: Any, item_ids: Sequence[str]) -> list[int]:
    """Token id of each item, in the given (catalog) order; errors name the first missing item."""
    vocab = tok.get_vocab()
    out = []
    for i in item_ids:
        t = item_token(i)
        if t not in vocab:
            raise ConfigError(
                f"tokenizer has no token {t!r} for item {i!r}: the tokenizer was built for "
                "another item vocabulary; rebuild it from this dataset"
            )
        out.append(vocab[t])
    return out


def tokenizer_item_ids(tok: Any) -> list[str]:
    """Item ids that the tokenizer has tokens for, in token-id order."""
    pairs = []
    for t, i in tok.get_vocab().items():
        m = re.fullmatch(ITEM_TOKEN_RE, t)
        if m:
            pairs.append((i, m.group(1)))
    return [item for _, item in sorted(pairs)]


def special_ids(tok: Any) -> dict[str, int]:
    """Ids of the mode and role tokens, by name."""
    ids = tok.convert_tokens_to_ids([*MODE_TOKENS, *ROLE_TOKENS.values()])
    names = ["rec", "gen", SEEKER, RECOMMENDER]
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ConfigError("tokenizer lacks the [REC]/[GEN]/[SEEKER]/[RECOMMENDER] tokens")
    return dict(zip(names, ids, strict=True))
