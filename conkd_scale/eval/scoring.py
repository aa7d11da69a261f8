"""Teacher-forced scores of a causal LM on gold recommender replies: ``PPL`` and the
module-level ranking metrics (``R@k``, ``MRR@k``, ``NDCG@k``).

Each turn is scored on its own: the context (cut at turn boundaries to
``max_context_tokens`` and to the model's position limit, as for generation), then the gold
reply in the training layout ``[RECOMMENDER] [REC|GEN] text </s>``.

- NLL: every reply token, the mode token and EOS included (METHOD.md: a model fed the gold
  ``[REC]``/``[GEN]`` without paying for it gets a free bit of the answer;
  ``include_mode=False`` leaves the mode token out, for comparison only);
  ``PPL = exp(sum NLL / tokens)`` over all turns. Each turn's own NLL sum and token count
  are kept too (``turn_nll``/``turn_tokens``), for paired bootstrap intervals.
- Ranking: for each distinct gold item of a recommendation turn, at the first position of its
  item token in the reply, the LM's next-token logits restricted to the item tokens (catalog
  order) and renormalised (``log_softmax`` over items) rank the items; the gold item is the
  one at that position. Computed with :class:`conkd_scale.metrics.ranking.RankingAccumulator`
  (per-item protocol, pessimistic ties), once with all gold items and once (``/new``) with
  only those not mentioned in the context, ranked among the items not in the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from conkd_scale.data.schema import RECOMMENDER, TurnSample
from conkd_scale.data.sequences import _turn_ids
from conkd_scale.data.tokenizer import item_token_ids
from conkd_scale.eval.generation import LMGenerator, _progress
from conkd_scale.metrics.ranking import RankingAccumulator, mask_items

RANK_KS = (1, 10, 50)


@dataclass
class ScoredTurns:
    """Sums over the scored turns of one shard (merge shards with :meth:`merge`)."""

    nll_sum: float = 0.0
    n_tokens: int = 0
    ranking: list[dict[str, float]] = field(default_factory=list)  # per shard, all gold
    ranking_new: list[dict[str, float]] = field(default_factory=list)  # per shard, /new
    items_not_found: int = 0  # gold items whose token is not in the (truncated) reply
    turn_nll: list[float] = field(default_factory=list)  # per turn (order of the turns)
    turn_tokens: list[int] = field(default_factory=list)
    # with ``gate_trace``: per turn, the LM's item mass m_t at each NLL position and the
    # indices of the positions whose gold token is an item (the gate's targets)
    item_mass: list[list[float]] = field(default_factory=list)
    gold_item_pos: list[list[int]] = field(default_factory=list)

    def merge(self, other: ScoredTurns) -> None:
        self.nll_sum += other.nll_sum
        self.n_tokens += other.n_tokens
        self.ranking += other.ranking
        self.ranking_new += other.ranking_new
        self.items_not_found += other.items_not_found
        self.turn_nll += other.turn_nll
        self.turn_tokens += other.turn_tokens
        self.item_mass += other.item_mass
        self.gold_item_pos += other.gold_item_pos


@dataclass
class _Row:
    ids: list[int]
    start: int  # index of the first reply token after the role token
    nll_from: int  # first position that carries NLL
    items: list[tuple[int, int, bool]]  # (position, catalog index, new) per gold item
    seen: list[int]  # catalog indices of the context's items (not candidates under /new)


class TeacherForcedScorer:
    """Teacher-forced NLL and item ranks of one LM (shares the generator's prompt rules)."""

    def __init__(
        self,
        generator: LMGenerator,
        catalog_ids: Sequence[str],
        *,
        include_mode: bool = True,
        batch_size: int = 8,
    ) -> None:
        self.gen = generator
        self.catalog_ids = list(catalog_ids)
        tok_ids = item_token_ids(generator.tok, self.catalog_ids)
        self.item_tok_I = torch.tensor(tok_ids, dtype=torch.long)  # [I]
        self._tok_of = dict(zip(self.catalog_ids, tok_ids, strict=True))
        self._index_of = {i: n for n, i in enumerate(self.catalog_ids)}
        self.include_mode = include_mode
        self.batch_size = batch_size

    def row(self, turn: TurnSample) -> _Row:
        """Token ids of context + gold reply, and where NLL and item ranks are read."""
        s = self.gen.settings
        reply, _ = _turn_ids(
            self.gen.tok, RECOMMENDER, turn.response, bool(turn.gold_items), s.use_mode_tokens
        )  # [role, (mode), text..., eos]
        limit = self.gen.max_positions or (s.max_context_tokens + len(reply))
        reply = reply[:limit]
        budget = min(s.max_context_tokens - 1, limit - len(reply))
        ids = self.gen.context_ids(turn.context, budget) + reply
        start = len(ids) - len(reply) + 1
        nll_from = start + (1 if s.use_mode_tokens and not self.include_mode else 0)
        seen = set(turn.context_items)
        items = []
        for g in dict.fromkeys(turn.gold_items):
            t = self._tok_of.get(g)
            pos = next((p for p in range(start, len(ids)) if ids[p] == t), None)
            items.append((-1 if pos is None else pos, self._index_of.get(g, -1), g not in seen))
        seen_idx = [self._index_of[i] for i in turn.context_items if i in self._index_of]
        return _Row(ids, start, nll_from, items, seen_idx)

    @torch.no_grad()
    def score(self, turns: Sequence[TurnSample], gate_trace: bool = False) -> ScoredTurns:
        """Sums over ``turns``; with ``gate_trace`` also each turn's item-mass trace
        (``item_mass``/``gold_item_pos``, in the order of ``turns``): the gate λ_t this LM
        would compute as ConKD's dialogue teacher (METHOD.md "The gate")."""
        out = ScoredTurns()
        acc, acc_new = RankingAccumulator(RANK_KS), RankingAccumulator(RANK_KS)
        model, device = self.gen.model, self.gen.device
        item_tok_I = self.item_tok_I.to(device)
        rows = [self.row(t) for t in turns]
        pad = self.gen.pad_id
        with _progress(len(rows), "score", self.gen.settings.progress) as bar:
            for s in range(0, len(rows), self.batch_size):
                batch = rows[s : s + self.batch_size]
                T = max(len(r.ids) for r in batch)
                input_ids_BT = torch.full((len(batch), T), pad, dtype=torch.long)
                attention_mask_BT = torch.zeros((len(batch), T), dtype=torch.long)
                for b, r in enumerate(batch):
                    input_ids_BT[b, : len(r.ids)] = torch.tensor(r.ids)
                    attention_mask_BT[b, : len(r.ids)] = 1
                logits_BTV = model(
                    input_ids=input_ids_BT.to(device), attention_mask=attention_mask_BT.to(device)
                ).logits  # [B, T, V]
                for b, r in enumerate(batch):
                    L = len(r.ids)
                    target_R = torch.tensor(r.ids[r.nll_from : L], device=device)  # [R]
                    logp_RV = logits_BTV[b, r.nll_from - 1 : L - 1].float().log_softmax(-1)
                    nll = -float(logp_RV.gather(1, target_R[:, None]).sum())
                    out.nll_sum += nll
                    out.n_tokens += len(target_R)
                    out.turn_nll.append(nll)
                    out.turn_tokens.append(len(target_R))
                    if gate_trace:
                        m_R = logp_RV[:, item_tok_I].logsumexp(-1).exp()  # [R] item mass
                        gold_R = torch.isin(target_R, item_tok_I)  # [R]
                        out.item_mass.append([round(float(x), 5) for x in m_R])
                        out.gold_item_pos.append(gold_R.nonzero().flatten().tolist())
                    found = [(p, g, new) for p, g, new in r.items if p >= 0 and g >= 0]
                    out.items_not_found += len(r.items) - len(found)
                    if not found:
                        continue
                    pos_N = torch.tensor([p - 1 for p, _, _ in found], device=device)
                    item_logits_NI = logits_BTV[b, pos_N][:, item_tok_I].float()  # [N, I]
                    scores_NI = item_logits_NI.log_softmax(-1).cpu()  # renormalised over I
                    acc.add(scores_NI, [[g] for _, g, _ in found])
                    acc_new.add(
                        mask_items(scores_NI, [r.seen] * len(found)),
                        [[g] if new else [] for _, g, new in found],
                    )
                del logits_BTV
                bar.update(len(batch))
        out.ranking.append(acc.result())
        out.ranking_new.append(acc_new.result())
        return out
