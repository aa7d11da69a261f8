"""Metrics of generated replies and language-model likelihoods (METHOD.md "Metrics").

Every function here is pure Python over strings and item-id lists, so it is tested on
hand-computed cases and can be recomputed from a ``generations.jsonl`` file. Module-level
ranking metrics (``R@k``, ``MRR@k``, ``NDCG@k``) live in :mod:`conkd_scale.metrics.ranking`;
:func:`merge_ranking_results` combines per-rank results of it.

Decisions (also written into every ``metrics.json`` under ``definitions``):

- **Word tokens** (``Dist-n``, ``BLEU-n``): item tokens (``<item_ID>``) are separated from
  the text around them, then the text is split on whitespace; each item token is one token.
  No lower-casing, no punctuation splitting (the model's own detokenisation is kept).
- **In-response**: ``g_k`` = the first ``k`` *distinct* item tokens of the generated reply,
  in order. Per recommendation turn ``ReR@k = |g_k ∩ G| / |G|``, ``PrR@k = |g_k ∩ G| / k``
  (``k`` even when fewer than ``k`` items were generated), ``F1@k`` = their harmonic mean
  (0 when both are 0); each is averaged over recommendation turns (F1 is the mean of the
  per-turn F1, not the F1 of the means). ``/new``: the same with ``G`` minus the items
  already mentioned in the context, over the turns where that set is not empty.
- **BLEU-n**: sacrebleu *corpus* BLEU over all generated replies, one gold reference each,
  ``max_ngram_order=n`` (equal weights ``1/n``), brevity penalty, no smoothing, on the word
  tokens above (``tokenize="none"``), divided by 100 (so in ``[0, 1]``).
- **Dist-n**: distinct n-grams / all n-grams over all generated replies (corpus level); an
  n-gram never crosses a reply boundary.
- Undefined values (nothing to average) are ``nan`` here and ``null`` in ``metrics.json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conkd_scale.data.schema import ITEM_TOKEN_RE
from conkd_scale.utils.io import finite_or_none

IN_RESPONSE_KS = (1, 3, 5)
DIST_NS = (2, 3, 4)
BLEU_NS = (1, 2, 3, 4)
NEW = "/new"  # key suffix of the variant whose gold items exclude the context's items

DEFINITIONS: dict[str, str] = {
    "recommendation_turn": "a recommender turn whose gold text mentions at least one item",
    "gold_items": "the distinct items mentioned in the gold recommender turn (all of them)",
    "/new": "suffix: the same metric with gold items already mentioned in the context "
    "removed, over the turns where at least one gold item remains; for R@k, MRR@k and NDCG@k "
    "the context's items are also removed from the candidates (the deduplicated protocol)",
    "R@k,MRR@k,NDCG@k": "module level, per gold item (KBRD protocol, pessimistic ties): rank "
    "of each distinct gold item of each recommendation turn in the system's item "
    "distribution over the whole catalog. R: q_R (ranked by R's raw scores s, the same order "
    "without fp32 ties). LM: teacher-forced distribution at the first position of that item "
    "token in the gold reply, restricted to item tokens and renormalised",
    "ReR@k": "mean over recommendation turns of |g_k ∩ gold| / |gold|, g_k = first k "
    "distinct item tokens of the generated reply",
    "PrR@k": "mean over recommendation turns of |g_k ∩ gold| / k (k even if fewer items "
    "were generated)",
    "F1@k": "mean over recommendation turns of the harmonic mean of that turn's ReR@k and "
    "PrR@k (0 when both are 0)",
    "rec_turn_item_rate": "share of recommendation turns whose generated reply has an item",
    "discrepancy": "pipeline only: over recommender turns whose reply from D has an item "
    "token, the share where D's first item differs from R's top item (the two-module "
    "disagreement). Not defined (absent) for a single model: its greedy item compared with "
    "its own argmax is 0 by construction",
    "R-agree@1": "over recommendation turns whose generated reply has an item, the share "
    "whose first written item is R's top-1 item for that context (R = the row's "
    "recommendation teacher; null without one). For the pipeline 1 by construction "
    "(pipeline_exclude_context=false)",
    "item_decoding": "class: greedy/beam decoding sees the item tokens as one class (its "
    "probability the item mass m_t) standing for its argmax item; token: plain per-token "
    "argmax. Unsuffixed in-response metrics use meta.item_decoding; KEY[class] and "
    "KEY[token] are the same metric under each item decoding",
    "PPL": "exp(total NLL / number of tokens) of the gold replies of all recommender turns, "
    "teacher-forced; tokens = the mode token ([REC]/[GEN], when the model uses them; "
    "excluded only with ppl_include_mode=false, recorded in meta), the reply text tokens "
    "and the final EOS; context truncated as for generation",
    "Dist-n": "corpus level: distinct n-grams / all n-grams over all generated replies; "
    "words = whitespace split after separating item tokens; each item token is one word",
    "BLEU-n": "sacrebleu corpus BLEU (max_ngram_order=n, equal weights, brevity penalty, "
    "no smoothing, tokenize=none) of generated vs gold replies on the same words as "
    "Dist-n, divided by 100",
    "null": "undefined: no sample to average over",
}


def lm_tokens(text: str) -> list[str]:
    """Words of a reply: item tokens separated from their neighbours, then whitespace split.

    >>> lm_tokens("like <item_7>, or<item_8>!")
    ['like', '<item_7>', ',', 'or', '<item_8>', '!']
    """
    return ITEM_TOKEN_RE.sub(lambda m: f" {m.group(0)} ", text).split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Corpus-level Dist-n: distinct / all n-grams over all texts (``nan`` if none)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for t in texts:
        grams = ngrams(lm_tokens(t), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else float("nan")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], n: int) -> float:
    """sacrebleu corpus BLEU-n in ``[0, 1]`` on :func:`lm_tokens` words (see module doc)."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return float("nan")
    hyp = [" ".join(lm_tokens(h)) for h in hypotheses]
    ref = [" ".join(lm_tokens(r)) for r in references]
    bleu = BLEU(max_ngram_order=n, tokenize="none", smooth_method="none")
    return bleu.corpus_score(hyp, [ref]).score / 100.0


def first_k_distinct(items: Iterable[str], k: int) -> list[str]:
    """The first ``k`` distinct items, in order of appearance."""
    return list(dict.fromkeys(items))[:k]


def in_response_scores(
    generated_items: Sequence[str], gold_items: Iterable[str], k: int
) -> tuple[float, float, float]:
    """``(ReR@k, PrR@k, F1@k)`` of one turn; ``gold_items`` must not be empty."""
    gold = set(gold_items)
    if not gold:
        raise ValueError("in_response_scores needs at least one gold item")
    hits = len(set(first_k_distinct(generated_items, k)) & gold)
    rer, prr = hits / len(gold), hits / k
    f1 = 2 * rer * prr / (rer + prr) if rer + prr > 0 else 0.0
    return rer, prr, f1


@dataclass
class InResponseAccumulator:
    """Sums of the in-response metrics over recommendation turns (mergeable across ranks)."""

    ks: tuple[int, ...] = IN_RESPONSE_KS
    sums: dict[str, float] = field(default_factory=dict)
    turns: int = 0  # recommendation turns
    turns_new: int = 0  # recommendation turns with at least one gold item not in the context
    turns_with_item: int = 0  # recommendation turns whose reply has an item

    def add(
        self,
        generated_items: Sequence[str],
        gold_items: Sequence[str],
        context_items: Iterable[str] = (),
    ) -> None:
        """One recommender turn; turns without gold items are not recommendation turns."""
        if not gold_items:
            return
        self.turns += 1
        self.turns_with_item += bool(generated_items)
        seen = set(context_items)
        new = [g for g in gold_items if g not in seen]
        self.turns_new += bool(new)
        for k in self.ks:
            variants = [("", gold_items)] + ([(NEW, new)] if new else [])
            for suffix, gold in variants:
                for name, v in zip(
                    ("ReR", "PrR", "F1"), in_response_scores(generated_items, gold, k)
                ):
                    key = f"{name}@{k}{suffix}"
                    self.sums[key] = self.sums.get(key, 0.0) + v

    def merge(self, other: InResponseAccumulator) -> None:
        for key, v in other.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + v
        self.turns += other.turns
        self.turns_new += other.turns_new
        self.turns_with_item += other.turns_with_item

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for suffix, n in (("", self.turns), (NEW, self.turns_new)):
            for k in self.ks:
                for name in ("ReR", "PrR", "F1"):
                    key = f"{name}@{k}{suffix}"
                    out[key] = self.sums.get(key, 0.0) / n if n else float("nan")
        rate = self.turns_with_item / self.turns if self.turns else float("nan")
        out["rec_turn_item_rate"] = rate
        return out


def discrepancy_rate(pairs: Iterable[tuple[str | None, str | None]]) -> tuple[float, int]:
    """Share of ``(D's first item, R's top item)`` pairs that differ, over pairs where D wrote
    an item (first is not None); and the number of such pairs."""
    n = diff = 0
    for d_item, r_item in pairs:
        if d_item is None:
            continue
        n += 1
        diff += d_item != r_item
    return (diff / n if n else float("nan")), n


def r_agree(pairs: Iterable[tuple[str | None, str | None]]) -> tuple[float, int, int]:
    """``R-agree@1`` over ``(first written item, R's top item)`` pairs of recommendation
    turns: the share of pairs with a written item (first is not None) whose item is R's top
    item; and (hits, turns with an item). ``nan`` when no turn has an item."""
    n = hits = 0
    for item, r_top in pairs:
        if item is None:
            continue
        n += 1
        hits += item == r_top
    return (hits / n if n else float("nan")), hits, n


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)`` (``nan`` without tokens)."""
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``Dist-2/3/4`` of the hypotheses and ``BLEU-1..4`` against the references."""
    out = {f"Dist-{n}": distinct_n(hypotheses, n) for n in DIST_NS}
    out.update({f"BLEU-{n}": corpus_bleu(hypotheses, references, n) for n in BLEU_NS})
    return out


def merge_ranking_results(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine ``RankingAccumulator.result()`` dicts of disjoint shards: each mean weighted by
    its shard's ``n``; ``n`` and ``skipped`` summed. Exact (up to rounding)."""
    if not results:
        return {}
    keys = [k for k in results[0] if k not in ("n", "skipped")]
    total = sum(int(r["n"]) for r in results)
    out: dict[str, float] = {
        k: (
            sum(r[k] * int(r["n"]) for r in results if int(r["n"])) / total
            if total
            else float("nan")
        )
        for k in keys
    }
    out["n"] = total
    out["skipped"] = sum(int(r["skipped"]) for r in results)
    return out


def json_safe(value: Any) -> Any:
    """The project's one NaN/inf policy (:func:`conkd_scale.utils.io.finite_or_none`): a
    non-finite float becomes ``None`` (JSON ``null``); other values pass unchanged."""
    return finite_or_none(value)


_WS = re.compile(r"\s+")


def normalise_space(text: str) -> str:
    """Collapse runs of whitespace (for display)."""
    return _WS.sub(" ", text).strip()
