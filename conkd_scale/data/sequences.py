"""Whole conversations as training sequences (FINDINGS.md: each token is read once).

Layout of one sequence (no BOS; DialoGPT-style turn separation by EOS)::

    [SEEKER] text </s> [RECOMMENDER] [REC] text with <item_1> </s> [SEEKER] ...

Loss (``labels != -100``) falls on every recommender turn's mode token, text and EOS; the
role token is the prompt and carries none, as do seeker turns and padding. ``rec_turn`` maps
each loss position to its recommender turn (an index into ``turns``), so the recommendation
teacher needs one item distribution per recommender turn, not per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from conkd_scale.data.schema import RECOMMENDER, Conversation, TurnSample, turn_samples
from conkd_scale.data.tokenizer import MODE_GEN, MODE_REC, ROLE_TOKENS

IGNORE = -100


@dataclass
class EncodedSequence:
    conv_id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    rec_turn: list[int]  # index into ``turns`` at loss positions, -1 elsewhere
    turns: list[TurnSample]  # the recommender turns whose tokens carry loss here

    def __len__(self) -> int:
        return len(self.input_ids)


def _turn_ids(tok: Any, role: str, text: str, items: bool, use_mode: bool) -> tuple[list[int], int]:
    """Token ids of one turn and the number of prompt (no-loss) tokens at its start."""
    role_id = tok.convert_tokens_to_ids(ROLE_TOKENS[role])
    body = [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    if role == RECOMMENDER and use_mode:
        body = [tok.convert_tokens_to_ids(MODE_REC if items else MODE_GEN), *body]
    return [role_id, *body], 1


def encode_conversation(
    conv: Conversation,
    tok: Any,
    *,
    max_length: int = 512,
    use_mode_tokens: bool = True,
    context_budget: int | None = None,
) -> list[EncodedSequence]:
    """Encode one conversation into one or more sequences of at most ``max_length`` tokens.

    A conversation longer than ``max_length`` is cut at turn boundaries; each later window
    starts with up to ``context_budget`` (default ``max_length // 4``) tokens of the turns just
    before it, as context without loss. A single turn longer than a window is truncated.
    """
    if context_budget is None:
        context_budget = max_length // 4
    samples = {s.turn_index: s for s in turn_samples(conv, (RECOMMENDER,), skip_first=False)}
    encoded = []
    for t, turn in enumerate(conv.turns):
        ids, n_prompt = _turn_ids(tok, turn.role, turn.text, bool(turn.items), use_mode_tokens)
        encoded.append((t, ids[:max_length], n_prompt))
    out: list[EncodedSequence] = []
    start = 0
    while start < len(encoded):
        seq = EncodedSequence(conv.conv_id, [], [], [], [])
        # context from the turns before this window (no loss)
        ctx: list[int] = []
        k = start - 1
        while k >= 0 and len(ctx) + len(encoded[k][1]) <= context_budget:
            ctx = encoded[k][1] + ctx
            k -= 1
        seq.input_ids += ctx
        seq.labels += [IGNORE] * len(ctx)
        seq.rec_turn += [-1] * len(ctx)
        end = start
        while end < len(encoded):
            t, ids, n_prompt = encoded[end]
            if len(seq.input_ids) + len(ids) > max_length and end > start:
                break
            ids = ids[: max_length - len(seq.input_ids)]
            seq.input_ids += ids
            if t in samples:
                seq.labels += [IGNORE] * n_prompt + ids[n_prompt:]
                seq.rec_turn += [-1] * n_prompt + [len(seq.turns)] * (len(ids) - n_prompt)
                seq.turns.append(samples[t])
            else:
                seq.labels += [IGNORE] * len(ids)
                seq.rec_turn += [-1] * len(ids)
            end += 1
        out.append(seq)
        start = end
    return out


def encode_split(
    convs: Sequence[Conversation],
    tok: Any,
    *,
    max_length: int,
    use_mode_tokens: bool = True,
    context_budget: int | None = None,
) -> list[EncodedSequence]:
    """Every conversation's sequences (:func:`encode_conversation`), without the windows that
    carry no loss token."""
    out = []
    for c in convs:
        for s in encode_conversation(
            c,
            tok,
            max_length=max_length,
            use_mode_tokens=use_mode_tokens,
            context_budget=context_budget,
        ):
            if any(lab != IGNORE for lab in s.labels[1:]):
                out.append(s)
    return out


def collate(batch: Sequence[EncodedSequence], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch. ``rec_turn`` becomes an index into the flat list ``turns``."""
    T = max(len(s) for s in batch)
    B = len(batch)
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    labels_BT = torch.full((B, T), IGNORE, dtype=torch.long)
    rec_turn_BT = torch.full((B, T), -1, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
    turns: list[TurnSample] = []
    for b, s in enumerate(batch):
        n = len(s)
        input_ids_BT[b, :n] = torch.tensor(s.input_ids)
        labels_BT[b, :n] = torch.tensor(s.labels)
        rt = torch.tensor(s.rec_turn)
        rec_turn_BT[b, :n] = torch.where(rt >= 0, rt + len(turns), rt)
        attention_mask_BT[b, :n] = 1
        turns.extend(s.turns)
    return {
        "input_ids": input_ids_BT,
        "attention_mask": attention_mask_BT,
        "labels": labels_BT,
        "rec_turn": rec_turn_BT,
        "turns": turns,
    }
