"""Evaluate one system of the results table on a split; write ``metrics.json`` and
``generations.jsonl``.

    python launch/evaluate.py --system student --model runs/distill/hf \
        --dataset redial --data-dir ../shared/data/redial --output-dir runs/eval/student

Systems (METHOD.md "Systems in the results table") and the metrics each gets:

- ``student`` / ``dialog`` (an exported HF causal LM): teacher-forced ``R@1/10/50``,
  ``MRR@10``, ``NDCG@10`` and ``PPL``; generated replies give ``ReR/PrR/F1@1,3,5``,
  ``rec_turn_item_rate``, ``Dist-2/3/4``, ``BLEU-1..4``.
- ``rec`` (R alone): ``R@1/10/50``, ``MRR@10``, ``NDCG@10`` of ``q_R``.
- ``repeat`` (the repeat baseline, METHOD.md "Deduplicated protocol"): the same module
  metrics of "context items by recency, then training popularity" (no model needed).
- ``pipeline`` (D writes, R chooses the items): R's module metrics, D's ``PPL``, the
  in-response and generation metrics of the replaced replies, and ``discrepancy`` (D's
  first item vs R's top item; defined for the pipeline only: a single model's greedy item
  against its own argmax is 0 by construction).

``R-agree@1`` (every LM system given ``--rec-teacher``): over recommendation turns with a
written item, the share whose first item is R's top-1 item. The in-response metrics
(``ReR/PrR/F1@k``, ``rec_turn_item_rate``, ``R-agree@1``, ``discrepancy``) are computed under
the configured ``generation.item_decoding`` (unsuffixed keys) and, with
``both_item_decodings=true`` (default; greedy/beam only), under each item decoding as
``KEY[class]`` / ``KEY[token]``. ``PPL`` counts the gold mode token (``ppl_include_mode``,
default true). ``meta`` records every decision (decoding, item decoding, PPL's mode token,
generation settings); ``counts`` the denominators behind each number; ``generations.jsonl``
each turn's values (items per item decoding, R's top item, NLL and tokens), from which any
metric and a paired bootstrap can be recomputed.

Every metric with gold items is also reported with the ``/new`` suffix: gold items already
mentioned in the context removed, and for the module-level ranking metrics the context's
items removed from the candidates too (``R@k/new``). ``metrics.json`` holds the metric
values at the top level (``null`` when undefined), ``definitions`` (what each name means
here), ``counts`` and ``meta``. With ``gate_trace=true``, LM systems also write
``gate_trace.jsonl``: per turn, the LM's item mass at each scored reply token and which of
those tokens are gold items (read by the scaling study's gate analysis). Evaluated turns:
every recommender turn of the split (the first ``max_turns`` when set), in corpus order.

Under a launcher with ``WORLD_SIZE > 1`` (torchrun, the DeepSpeed launcher, srun) the turns
are sharded round-robin across ranks; rank 0 gathers every shard (``gather_object``),
computes the metrics and writes the files.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from conkd_scale.config import config_to_dict
from conkd_scale.data.corpus import load_dataset
from conkd_scale.data.schema import ItemCatalog, TurnSample
from conkd_scale.eval.generation import (
    GenerationSettings,
    ItemScorer,
    LMGenerator,
    Mode,
    Pipeline,
    build_generator,
    display_text,
    rec_item_scores,
    resolve_device,
    top_indices,
)
from conkd_scale.eval.metrics_lm import (
    DEFINITIONS,
    NEW,
    InResponseAccumulator,
    discrepancy_rate,
    generation_metrics,
    json_safe,
    merge_ranking_results,
    perplexity,
    r_agree,
)
from conkd_scale.eval.scoring import RANK_KS, ScoredTurns, TeacherForcedScorer
from conkd_scale.metrics.ranking import RankingAccumulator, mask_items
from conkd_scale.rec.repeat import RepeatBaseline
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import write_json, write_jsonl

SYSTEMS = ("student", "dialog", "rec", "pipeline", "repeat")
RANKERS = ("rec", "pipeline", "repeat")  # systems whose module-level ranking is an ItemScorer
LM_SYSTEMS = ("student", "dialog", "pipeline")
RANK_KEYS = ("R@1", "R@10", "R@50", "MRR@10", "NDCG@10")
COMMON_DEFINITIONS = ("recommendation_turn", "gold_items", "/new", "R@k,MRR@k,NDCG@k", "null")
LM_DEFINITIONS = (
    "ReR@k",
    "PrR@k",
    "F1@k",
    "rec_turn_item_rate",
    "R-agree@1",
    "item_decoding",
    "PPL",
    "Dist-n",
    "BLEU-n",
)
ITEM_DECODINGS = ("class", "token")


@dataclass
class EvalConfig:
    """Run config of ``launch/evaluate.py`` (``key=value`` overrides; nested: ``generation.*``)."""

    system: Literal["student", "dialog", "rec", "pipeline", "repeat"] = "student"
    model: str | None = None  # exported HF dir: the LM (student/dialog) or D (pipeline)
    rec_teacher: str | None = None  # R's training output dir or its checkpoint/ (rec/pipeline
    # need it; student/dialog use it for R-agree@1, null without it)
    dataset: Literal["redial", "inspired", "synthetic"] = "synthetic"
    data_dir: str | None = None
    kg: Literal["kbrd", "dbpedia", "none"] = "none"  # turns need no KG (R carries its own)
    split: Literal["train", "valid", "test"] = "test"
    output_dir: str = "runs/eval"
    max_turns: int = 0  # 0: every recommender turn of the split; N: the first N
    mode: Literal["auto", "rec", "gen"] = "auto"  # auto: the model writes the mode token
    ppl_include_mode: bool = True  # [decision] PPL counts the gold mode token (METHOD.md)
    both_item_decodings: bool = True  # in-response metrics under class and token decoding
    pipeline_exclude_context: bool = False  # R skips items already mentioned in the context
    device: str = "auto"  # auto: cuda (this rank's GPU) if available, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # LM weights
    score_batch_size: int = 8  # teacher-forced batch (logits are [B, T, V])
    rec_batch_size: int = 256
    gate_trace: bool = False  # LM systems: also write gate_trace.jsonl (item mass per token)
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if self.max_turns < 0:
            raise ConfigError(f"max_turns: expected >= 0, got {self.max_turns}")
        if self.score_batch_size < 1 or self.rec_batch_size < 1:
            raise ConfigError("score_batch_size and rec_batch_size must be >= 1")

    def check(self) -> None:
        """The paths this system needs (called before any work)."""
        if self.data_dir is None:
            raise ConfigError("data_dir is required (--data-dir)")
        if self.system in LM_SYSTEMS and self.model is None:
            raise ConfigError(f"system={self.system} needs --model (an exported HF directory)")
        if self.system in ("rec", "pipeline") and self.rec_teacher is None:
            raise ConfigError(f"system={self.system} needs --rec-teacher")


@dataclass
class ShardResult:
    """What one rank computed on its turns (picklable, gathered on rank 0)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    scored: ScoredTurns | None = None  # LM teacher-forced sums
    rec_ranking: list[dict[str, float]] = field(default_factory=list)  # R, all gold
    rec_ranking_new: list[dict[str, float]] = field(default_factory=list)  # R, /new
    seconds: float = 0.0


# ---------------------------------------------------------------------- building blocks


def load_rec_teacher(path: str | Path, device: str | torch.device = "cpu") -> ItemScorer:
    from conkd_scale.rec.api import RecTeacher

    return RecTeacher.load(path, map_location=device)


def rec_ranking(
    rec: ItemScorer, turns: Sequence[TurnSample], catalog_ids: Sequence[str], batch_size: int
) -> tuple[dict[str, float], dict[str, float]]:
    """A ranker's module metrics on the recommendation turns: all gold items, and ``/new``
    (gold items not in the context, ranked among the items not in the context)."""
    index = {i: n for n, i in enumerate(catalog_ids)}
    acc, acc_new = RankingAccumulator(RANK_KS), RankingAccumulator(RANK_KS)
    rec_turns = [t for t in turns if t.is_recommendation]
    for s in range(0, len(rec_turns), batch_size):
        chunk = rec_turns[s : s + batch_size]
        scores_SI = rec_item_scores(rec, chunk, catalog_ids)  # [S, I]
        gold = [[index[g] for g in dict.fromkeys(t.gold_items) if g in index] for t in chunk]
        seen = [{index[i] for i in t.context_items if i in index} for t in chunk]
        new = [[g for g in row if g not in ctx] for row, ctx in zip(gold, seen, strict=True)]
        acc.add(scores_SI, gold)
        acc_new.add(mask_items(scores_SI, seen), new)
    return acc.result(), acc_new.result()


def _base_record(t: TurnSample, catalog: ItemCatalog) -> dict[str, Any]:
    return {
        "conv_id": t.conv_id,
        "turn_index": t.turn_index,
        "context": [list(c) for c in t.context],
        "gold": t.response,
        "gold_rendered": display_text(t.response, catalog),
        "gold_items": list(dict.fromkeys(t.gold_items)),
        "context_items": list(t.context_items),
        "is_recommendation": t.is_recommendation,
    }


def evaluate_shard(
    cfg: EvalConfig,
    turns: Sequence[TurnSample],
    catalog: ItemCatalog,
    *,
    generator: LMGenerator | None = None,
    rec: ItemScorer | None = None,
) -> ShardResult:
    """Everything one rank computes for its turns; models are passed in already loaded."""
    t0 = time.perf_counter()
    res = ShardResult()
    ids = catalog.ids
    mode: Mode = cfg.mode
    records = [_base_record(t, catalog) for t in turns]
    if cfg.system in RANKERS:
        assert rec is not None
        r_all, r_new = rec_ranking(rec, turns, ids, cfg.rec_batch_size)
        res.rec_ranking, res.rec_ranking_new = [r_all], [r_new]
    if cfg.system in LM_SYSTEMS:
        assert generator is not None
        scorer = TeacherForcedScorer(
            generator, ids, include_mode=cfg.ppl_include_mode, batch_size=cfg.score_batch_size
        )
        res.scored = scorer.score(turns, gate_trace=cfg.gate_trace)
        if cfg.gate_trace:
            for row, m, gold in zip(
                records, res.scored.item_mass, res.scored.gold_item_pos, strict=True
            ):
                row["_gate"] = {"item_mass": m, "gold_item_pos": gold}
            res.scored.item_mass, res.scored.gold_item_pos = [], []  # now in the records
        for row, nll, n in zip(records, res.scored.turn_nll, res.scored.turn_tokens, strict=True):
            row.update(nll=nll, ppl_tokens=n)
        res.scored.turn_nll, res.scored.turn_tokens = [], []  # now in the records
        if rec is not None:  # R's top-1 item per turn (R-agree@1)
            for row, top in zip(records, rec_top_items(rec, turns, ids, 1, cfg.rec_batch_size)):
                row["r_top1"] = top[0] if top else None
        by_decoding: dict[str, list[dict[str, Any]]] = {}
        for dec in item_decodings(cfg):
            gen_d = generator
            if dec != generator.settings.item_decoding:
                settings = dataclasses.replace(generator.settings, item_decoding=dec)
                gen_d = LMGenerator(generator.model, generator.tok, settings)
            by_decoding[dec] = _generate(cfg, gen_d, turns, catalog, rec, mode)
        primary = cfg.generation.item_decoding
        for n, row in enumerate(records):
            row.update(by_decoding[primary][n])
            row["by_item_decoding"] = {d: v[n] for d, v in by_decoding.items() if d != primary}
    elif cfg.system in ("rec", "repeat"):
        assert rec is not None
        for s in range(0, len(turns), cfg.rec_batch_size):
            chunk = turns[s : s + cfg.rec_batch_size]
            scores_SI = rec_item_scores(rec, chunk, ids)  # [S, I]
            top_SK = top_indices(scores_SI, 10)  # [S][10]
            for n, top in enumerate(top_SK):
                records[s + n]["r_top_items"] = [ids[i] for i in top]
    res.records = records
    res.seconds = time.perf_counter() - t0
    return res


def item_decodings(cfg: EvalConfig) -> list[str]:
    """The item decodings an LM system is evaluated under: the configured one first, then
    the other with ``both_item_decodings`` (sampling draws from the full distribution, so
    item decoding does not apply to it)."""
    primary = cfg.generation.item_decoding
    if not cfg.both_item_decodings or cfg.generation.decoding == "sample":
        return [primary]
    return [primary, *(d for d in ITEM_DECODINGS if d != primary)]


def rec_top_items(
    rec: ItemScorer, turns: Sequence[TurnSample], ids: Sequence[str], k: int, batch_size: int
) -> list[list[str]]:
    """R's ``k`` best items per turn (over the whole catalog; ties to the lower index)."""
    out: list[list[str]] = []
    for s in range(0, len(turns), batch_size):
        scores_SI = rec_item_scores(rec, turns[s : s + batch_size], ids)  # [S, I]
        out += [[ids[i] for i in top] for top in top_indices(scores_SI, k)]
    return out


def _generate(
    cfg: EvalConfig,
    generator: LMGenerator,
    turns: Sequence[TurnSample],
    catalog: ItemCatalog,
    rec: ItemScorer | None,
    mode: Mode,
) -> list[dict[str, Any]]:
    """Per turn, the generated reply's fields under ``generator``'s item decoding."""
    if cfg.system == "pipeline":
        assert rec is not None
        pipe = Pipeline(
            generator,
            rec,
            catalog.ids,
            exclude_context=cfg.pipeline_exclude_context,
            rec_batch_size=cfg.rec_batch_size,
        )
        return [
            {
                "generated": p.reply,
                "mode": p.mode,
                "items": p.items,
                "rendered": display_text(p.reply, catalog),
                "d_generated": p.d_reply,
                "d_items": p.d_items,
                "r_top_item": p.r_top_item,
            }
            for p in pipe.generate(turns, mode)
        ]
    replies = generator.generate([t.context for t in turns], mode)
    return [
        {
            "generated": g.reply,
            "mode": g.mode,
            "items": g.items,
            "rendered": display_text(g.reply, catalog),
        }
        for g in replies
    ]


def _in_response(
    cfg: EvalConfig, records: Sequence[dict[str, Any]], has_rec: bool
) -> tuple[dict[str, Any], dict[str, int]]:
    """In-response metrics of ``records`` (each with ``items`` etc. of one item decoding)
    and the counts behind them."""
    acc = InResponseAccumulator()
    for r in records:
        acc.add(r["items"], r["gold_items"], r["context_items"])
    metrics: dict[str, Any] = {k: json_safe(v) for k, v in acc.result().items()}
    counts = {
        "recommendation_turns": acc.turns,
        "recommendation_turns/new": acc.turns_new,
        "recommendation_turns_with_item": acc.turns_with_item,
    }
    rate, hits, n = r_agree(
        (r["items"][0] if r["items"] else None, r.get("r_top1"))
        for r in records
        if r["is_recommendation"]
    )
    # the pipeline writes R's top item into its first slot: 1 by construction, not reported
    agree = has_rec and cfg.system != "pipeline"
    metrics["R-agree@1"] = json_safe(rate) if agree else None
    counts["r_agree_turns"], counts["r_agree_hits"] = (n, hits) if agree else (0, 0)
    if cfg.system == "pipeline":  # D's item vs R's top item
        pairs = ((r["d_items"][0] if r["d_items"] else None, r["r_top_item"]) for r in records)
        d_rate, d_n = discrepancy_rate(pairs)
        metrics["discrepancy"] = json_safe(d_rate)
        counts["discrepancy_turns"] = d_n
    return metrics, counts


def compute_metrics(cfg: EvalConfig, shards: Sequence[ShardResult]) -> dict[str, Any]:
    """``metrics.json`` content from all shards (rank 0)."""
    records = [r for s in shards for r in s.records]
    metrics: dict[str, float | None] = {}
    counts: dict[str, int] = {
        "turns": len(records),
        "recommendation_turns": sum(r["is_recommendation"] for r in records),
    }
    scored = ScoredTurns()
    for s in shards:
        if s.scored is not None:
            scored.merge(s.scored)
    if cfg.system in RANKERS:  # the pipeline's recommender is R
        ranking = merge_ranking_results([r for s in shards for r in s.rec_ranking])
        ranking_new = merge_ranking_results([r for s in shards for r in s.rec_ranking_new])
    else:
        ranking = merge_ranking_results(scored.ranking)
        ranking_new = merge_ranking_results(scored.ranking_new)
    for k in RANK_KEYS:
        metrics[k] = json_safe(ranking.get(k))
        metrics[k + NEW] = json_safe(ranking_new.get(k))
    counts["ranked_gold_items"] = int(ranking.get("n", 0))
    counts["ranked_gold_items/new"] = int(ranking_new.get("n", 0))
    names = [*COMMON_DEFINITIONS]
    meta_lm: dict[str, Any] = {}
    if cfg.system in LM_SYSTEMS:
        names += LM_DEFINITIONS
        metrics["PPL"] = json_safe(perplexity(scored.nll_sum, scored.n_tokens))
        counts["ppl_tokens"] = scored.n_tokens
        counts["gold_item_tokens_not_found"] = scored.items_not_found
        has_rec = bool(records) and all("r_top1" in r for r in records)
        decodings = [cfg.generation.item_decoding]
        if records:
            decodings += list(records[0].get("by_item_decoding", {}))
        for dec in decodings:
            recs = records
            if dec != cfg.generation.item_decoding:
                recs = [{**r, **r["by_item_decoding"][dec]} for r in records]
            m, c = _in_response(cfg, recs, has_rec)
            if dec == cfg.generation.item_decoding:  # unsuffixed: the configured decoding
                metrics.update(m)
                counts.update(c)
            if len(decodings) > 1:
                metrics.update({f"{k}[{dec}]": v for k, v in m.items()})
                counts.update({f"{k}[{dec}]": v for k, v in c.items()})
        gen = generation_metrics([r["generated"] for r in records], [r["gold"] for r in records])
        metrics.update({k: json_safe(v) for k, v in gen.items()})
        counts["generated_mode_rec"] = sum(r["mode"] == "rec" for r in records)
        counts["generated_mode_gen"] = sum(r["mode"] == "gen" for r in records)
        meta_lm = {
            "item_decoding": cfg.generation.item_decoding,
            "item_decodings": decodings,
            "ppl_include_mode": cfg.ppl_include_mode,
            "generation": {
                k: v for k, v in config_to_dict(cfg.generation).items() if k != "progress"
            },
        }
        if cfg.system == "pipeline":
            names.append("discrepancy")
            meta_lm["pipeline_exclude_context"] = cfg.pipeline_exclude_context
    definitions = {k: DEFINITIONS[k] for k in names}
    return {
        **metrics,
        "definitions": definitions,
        "counts": counts,
        "meta": {
            "system": cfg.system,
            "model": cfg.model,
            "rec_teacher": cfg.rec_teacher,
            "dataset": cfg.dataset,
            "data_dir": cfg.data_dir,
            "split": cfg.split,
            "decoding": cfg.generation.decoding,
            "mode": cfg.mode,
            "max_turns": cfg.max_turns,
            **meta_lm,
            "shards": len(shards),
            "shard_seconds": [round(s.seconds, 3) for s in shards],
        },
    }


def write_outputs(cfg: EvalConfig, metrics: dict[str, Any], shards: Sequence[ShardResult]) -> Path:
    out = Path(cfg.output_dir)
    records = sorted((r for s in shards for r in s.records), key=lambda r: r.get("_order", 0))
    traces = []
    for r in records:
        r.pop("_order", None)
        gate = r.pop("_gate", None)
        if gate is not None:
            keys = ("conv_id", "turn_index", "is_recommendation")
            traces.append({**{k: r[k] for k in keys}, **gate})
    write_json(out / "config.json", config_to_dict(cfg))
    write_jsonl(out / "generations.jsonl", records)
    if traces:
        write_jsonl(out / "gate_trace.jsonl", traces)
    write_json(out / "metrics.json", metrics)
    return out


# ---------------------------------------------------------------------- entry


def evaluate(
    cfg: EvalConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    rec: ItemScorer | None = None,
    generator: LMGenerator | None = None,
) -> dict[str, Any] | None:
    """Run one evaluation; returns the metrics on rank 0 (``None`` on other ranks).

    ``rec`` / ``generator`` may be passed in already loaded (tests, notebooks); otherwise they
    are loaded from ``cfg.rec_teacher`` / ``cfg.model``. Collective when ``world_size > 1``.
    """
    cfg.check()
    error: str | None = None
    shard = ShardResult()
    try:
        assert cfg.data_dir is not None
        repeat = cfg.system == "repeat"  # counts popularity on the training split
        splits = (cfg.split, "train") if repeat and cfg.split != "train" else (cfg.split,)
        corpus = load_dataset(cfg.dataset, cfg.data_dir, kg=cfg.kg, splits=splits)
        turns = corpus.samples(cfg.split)
        if cfg.max_turns:
            turns = turns[: cfg.max_turns]
        mine = list(range(rank, len(turns), world_size))
        device = resolve_device(cfg.device)
        if generator is None and cfg.system in LM_SYSTEMS:
            assert cfg.model is not None
            settings = dataclasses.replace(
                cfg.generation, progress=cfg.generation.progress and rank == 0
            )
            generator = build_generator(cfg.model, settings, device=device, dtype=cfg.dtype)
        if generator is not None:  # use_mode_tokens=None: resolved from the export (meta)
            used = dataclasses.replace(
                cfg.generation, use_mode_tokens=generator.settings.use_mode_tokens
            )
            cfg = dataclasses.replace(cfg, generation=used)
        if rec is None and cfg.system == "repeat":
            rec = RepeatBaseline.from_samples(corpus.samples("train"), corpus.catalog.ids)
        elif rec is None and cfg.system != "repeat" and cfg.rec_teacher is not None:
            rec = load_rec_teacher(cfg.rec_teacher, device)  # student/dialog: R-agree@1
        shard = evaluate_shard(
            cfg, [turns[n] for n in mine], corpus.catalog, generator=generator, rec=rec
        )
        for n, r in zip(mine, shard.records, strict=True):
            r["_order"] = n
    except Exception as e:
        if world_size == 1:
            raise
        error = f"rank {rank}: {type(e).__name__}: {e}"
    shards = _gather(shard, error, rank, world_size)
    if shards is None:
        return None
    metrics = compute_metrics(cfg, shards)
    write_outputs(cfg, metrics, shards)
    return metrics


def _gather(
    shard: ShardResult, error: str | None, rank: int, world_size: int
) -> list[ShardResult] | None:
    """All shards on rank 0 (``None`` elsewhere); raises on rank 0 if any rank failed."""
    if world_size == 1:
        return [shard]
    import torch.distributed as dist

    box: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object((shard, error), box, dst=0)
    if rank != 0:
        if error is not None:
            raise RuntimeError(error)
        return None
    assert box is not None
    errors = [e for _, e in box if e is not None]
    if errors:
        raise RuntimeError("evaluation failed: " + "; ".join(errors))
    return [s for s, _ in box]


def run_evaluation(cfg: EvalConfig) -> dict[str, Any] | None:
    """The CLI's entry: joins the process group under a multi-rank launcher, then evaluates."""
    cfg.check()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return evaluate(cfg)
    from conkd_scale.distributed import init_distributed, teardown

    info = init_distributed()
    try:
        if cfg.device == "auto":
            cfg = dataclasses.replace(cfg, device=str(info.device))
        return evaluate(cfg, rank=info.rank, world_size=info.world_size)
    finally:
        teardown()
