import pytest

from conkd_scale.data.schema import Conversation, Turn
from conkd_scale.data.sequences import IGNORE, collate, encode_conversation
from conkd_scale.data.tokenizer import (
    item_token_ids,
    load_pretrained_tokenizer,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    tokenizer_item_ids,
    train_sentencepiece_tokenizer,
)
from conkd_scale.utils.errors import ConfigError

TEXTS = [
    "hi there , what kind of movies do you like ?",
    "I love horror movies , like <item_7> .",
    "you might like <item_9> then , it is scary .",
    "thanks , have a good night !",
] * 20
ITEMS = ["7", "9", "12"]


@pytest.fixture(scope="module")
def tok():
    return train_sentencepiece_tokenizer(TEXTS, ITEMS, vocab_size=60)


def test_items_and_modes_are_single_tokens(tok, tmp_path):
    toks = tok.convert_ids_to_tokens(tok.encode("[REC] you might like <item_9> then"))
    assert "[REC]" in toks and "<item_9>" in toks
    # the item token absorbs the space before it: no lone "▁" piece precedes it
    assert toks[toks.index("<item_9>") - 1] != "▁"
    ids = item_token_ids(tok, ITEMS)
    assert len(set(ids)) == 3 and tokenizer_item_ids(tok) == ITEMS
    save_tokenizer(tok, tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back.encode("[GEN] hi <item_12>") == tok.encode("[GEN] hi <item_12>")
    assert special_ids(back) == special_ids(tok)
    assert "<item_12>" in back.decode(back.encode("like <item_12> !"))


def test_item_alignment_errors(tok):
    with pytest.raises(ConfigError, match="no token '<item_99>'"):
        item_token_ids(tok, ["7", "99"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer("/nonexistent/tok")


def test_pretrained_tokenizer_path(tmp_path):
    """A locally built GPT-2-style byte-level BPE stands in for DialoGPT's tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"])
    base = GPT2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    base.save_pretrained(tmp_path / "gpt2tok")
    tok = load_pretrained_tokenizer(str(tmp_path / "gpt2tok"), ITEMS)
    assert tok.pad_token == "<|endoftext|>"
    assert tokenizer_item_ids(tok) == ITEMS
    toks = tok.convert_ids_to_tokens(tok.encode("like <item_7> ok"))
    assert "<item_7>" in toks and toks[toks.index("<item_7>") - 1] != "Ġ"
    assert special_ids(tok)["rec"] >= 300


def _conv():
    return Conversation(
        "c",
        (
            Turn("seeker", "hi there , what kind of movies do you like ?"),
            Turn("recommender", "you might like <item_9> then , it is scary .", ("9",)),
            Turn("seeker", "thanks"),
            Turn("recommender", "have a good night !"),
        ),
    )


def test_sequences_labels_and_turn_index(tok):
    (seq,) = encode_conversation(_conv(), tok, max_length=512)
    sp = special_ids(tok)
    ids, labels = seq.input_ids, seq.labels
    assert ids[0] == sp["seeker"] and labels[0] == IGNORE
    rec_pos = [i for i, t in enumerate(ids) if t == sp["recommender"]]
    assert len(rec_pos) == 2
    # role token: no loss; mode token right after it: loss; [REC] for the item turn
    for p, mode in zip(rec_pos, ("rec", "gen")):
        assert labels[p] == IGNORE and ids[p + 1] == sp[mode] and labels[p + 1] == sp[mode]
    assert [t.turn_index for t in seq.turns] == [1, 3]
    loss_pos = [i for i, y in enumerate(labels) if y != IGNORE]
    assert all(seq.rec_turn[i] in (0, 1) for i in loss_pos)
    assert all(seq.rec_turn[i] == -1 for i in range(len(ids)) if labels[i] == IGNORE)
    assert ids[loss_pos[-1]] == tok.eos_token_id  # the final EOS is a target
    assert item_token_ids(tok, ["9"])[0] in [labels[i] for i in loss_pos]
    (nomode,) = encode_conversation(_conv(), tok, use_mode_tokens=False)
    assert sp["rec"] not in nomode.input_ids and len(nomode) == len(seq) - 2


def test_long_conversations_are_windowed(tok):
    conv = Conversation("c", _conv().turns * 6)
    seqs = encode_conversation(conv, tok, max_length=48)
    assert len(seqs) > 1 and all(len(s) <= 48 for s in seqs)
    n_turns = sum(len(s.turns) for s in seqs)
    assert n_turns == 12  # every recommender turn carries loss exactly once
    assert any(s.labels[0] == IGNORE and s.rec_turn[0] == -1 for s in seqs[1:])
    batch = collate(seqs[:2], tok.pad_token_id)
    B, T = batch["input_ids"].shape
    assert B == 2 and T == max(len(s) for s in seqs[:2])
    rt = batch["rec_turn"]
    assert rt[1][rt[1] >= 0].min() == len(seqs[0].turns)
    assert len(batch["turns"]) == len(seqs[0].turns) + len(seqs[1].turns)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
