"""Train and evaluate the recommendation teacher R (KBRD protocol).

    python launch/train_rec_teacher.py --dataset redial --data-dir ../shared/data/redial \
        --output-dir runs/rec_redial

Samples: every recommendation turn of a split (a recommender turn that mentions an item);
one training sample per gold item, its context being the items (and entities) mentioned
before it. Loss: cross-entropy of ``s = u · e + b`` over the whole catalog. Early stopping
on validation R@10; the best epoch's checkpoint is saved and evaluated on the test split,
next to the popularity baseline.

Output directory::

    config.json       the full RecTeacherConfig, plus graph and data sizes
    metrics.jsonl     one row per epoch: epoch, train_loss, valid R@1/10/50, seconds
    metrics.json      test metrics of R and of popularity (keys in ``evaluate_turns``)
    checkpoint/       rec_teacher.pt (state dict, config, item ids, graph), item_ids.json,
                      rec_teacher.json (human-readable metadata); loaded by
                      :meth:`conkd_scale.rec.api.RecTeacher.load`

Distributed launch (torchrun / the DeepSpeed launcher, ``WORLD_SIZE > 1``; :func:`run_rec_teacher`):
R is small, so **rank 0 trains alone** and the other ranks wait until it finishes, polling
the rendezvous store outside any collective (no time limit applies to the training itself;
the others give up when rank 0's heartbeat has been silent for ``dist_timeout_minutes``,
which also bounds the group's collectives); a failure on rank 0 is reported on every rank. Rank 0
then uses every CPU the process may run on (launchers set ``OMP_NUM_THREADS=1``), unless
``threads`` says otherwise.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from conkd_scale.config import config_to_dict
from conkd_scale.data.corpus import DATASETS, Corpus, load_dataset
from conkd_scale.data.schema import TurnSample
from conkd_scale.distributed import (
    PeerLostError,
    get_rank,
    get_world_size,
    init_distributed,
    run_on_main,
    teardown,
)
from conkd_scale.metrics.ranking import RankingAccumulator, mask_items
from conkd_scale.rec.graph import ContextIndex, RecentLists, RecGraph, build_rec_graph
from conkd_scale.rec.model import (
    COPY_MODES,
    WORD_MODES,
    RecentItems,
    RecTeacherModel,
    WordBags,
    pad_contexts,
    pad_recent,
    pad_words,
)
from conkd_scale.rec.popularity import Popularity
from conkd_scale.rec.repeat import RepeatBaseline
from conkd_scale.utils.errors import ConfigError, ConkdError
from conkd_scale.utils.io import atomic_dir, atomic_open, write_json, write_jsonl

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "rec_teacher.pt"
CHECKPOINT_FORMAT = 2  # 2: the copy component; format 1 (no copy fields) loads as copy="none"
EVAL_KS = (1, 10, 50)
SELECT_METRICS = ("R@1", "R@10", "R@50", "R@mean")


def select_value(metrics: dict[str, float], select: str) -> float:
    """The early-stopping criterion ``select`` (``R@mean``: mean of R@1/10/50) of metrics."""
    if select == "R@mean":
        return sum(metrics[f"R@{k}"] for k in EVAL_KS) / len(EVAL_KS)
    return metrics[select]


@dataclass
class RecTeacherConfig:
    """Configuration of the recommendation teacher R (``config.json`` in the output dir)."""

    dataset: Literal["redial", "inspired", "synthetic"] = "synthetic"
    data_dir: str = ""  # dataset directory (required)
    kg: Literal["default", "kbrd", "dbpedia", "none"] = "default"  # default: the dataset's
    output_dir: str = ""  # run directory (required)
    use_kg: bool = True  # False: the --no-kg ablation (plain item/entity embeddings)
    copy: str = "recency"  # copy component (rec/model.py): "recency" or "none" (KBRD-style R)
    recency_buckets: int = 8  # copy features: rank and turns-ago buckets 1..K (K in 1..64)
    copy_lr: float = 0.05  # Adam learning rate of the copy weights and gate
    copy_roles: bool = False  # copy scores and gate also read who named each context item
    # last (seeker or recommender) and in how many context turns (copy_roles, copy_words and
    # copy_item_words refine copy=recency; copy=none ignores them)
    copy_words: bool = False  # the copy gate also reads the last context turn's words
    copy_item_words: bool = False  # each context item's copy score also reads the words
    # around its last mention (mention_window words either side)
    mention_window: int = 4  # copy_item_words: words on each side of the mention (1..64)
    words: Literal["none", "context"] = "none"  # context: u also reads the context's words
    # (mean of hashed word embeddings; rec/words.py)
    word_buckets: int = 16384  # hash buckets of the word embeddings (words, copy_words)
    calibrate: bool = True  # copy="recency": fit p_gen's temperature on validation NLL
    bias_init: Literal["zero", "popularity"] = "popularity"  # item bias b at start: 0, or
    # the log of the training popularity (add-one smoothed)
    dim: int = 128  # embedding size d
    layers: int = 1  # R-GCN layers (FINDINGS: 1; more layers reach a much larger graph)
    num_bases: int = 8  # RGCNConv basis decomposition (0: one full matrix per relation)
    min_relation_count: int = 1000  # relations with fewer triples are merged (FINDINGS)
    rare_relations: Literal["merge", "drop"] = "merge"  # what to do with rare relations
    rgcn_impl: Literal["basis", "pyg"] = "basis"  # RGCNConv forward: the exact per-basis
    # one (rec/rgcn.py, ~4x less CPU) or torch-geometric's per-relation loop; same weights
    dropout: float = 0.0  # dropout on the user vector u
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay (L2)
    epochs: int = 30  # at most this many epochs
    batch_size: int = 128  # training samples (gold items) per step
    patience: int = 3  # stop after this many epochs without a better validation `select`
    select: Literal["R@1", "R@10", "R@50", "R@mean"] = "R@10"  # early-stopping criterion on
    # the validation split (R@mean: the mean of R@1, R@10 and R@50)
    tau_R: float = 1.0  # temperature of q_R = softmax(s / tau_R) (api.item_distribution)
    exclude_seen: bool = False  # mask items already in the context (evaluation and q_R)
    seed: int = 0  # model init, shuffling and the popularity tie-break
    eval_batch_size: int = 256  # turns per evaluation batch
    threads: int = 0  # torch CPU threads; 0: torch's default, or on rank 0 of a
    # multi-process launch (where launchers set 1 per process) every CPU it may use
    progress: bool = True  # tqdm progress bars (rank 0 only)
    dist_timeout_minutes: int = 120  # gloo collective timeout of the group

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: {self.dataset!r} is not one of {list(DATASETS)}")
        if self.copy not in COPY_MODES:
            raise ConfigError(
                f"copy: unknown copy component {self.copy!r} (use one of {list(COPY_MODES)})"
            )
        if self.select not in SELECT_METRICS:
            raise ConfigError(f"select: {self.select!r} is not one of {list(SELECT_METRICS)}")
        if self.words not in WORD_MODES:
            raise ConfigError(
                f"words: unknown word context {self.words!r} (use one of {list(WORD_MODES)})"
            )
        if not 1 <= self.mention_window <= 64:
            raise ConfigError(f"mention_window: must be in [1, 64], got {self.mention_window}")
        if not 1 <= self.word_buckets <= 2**24:
            raise ConfigError(f"word_buckets: must be in [1, 2**24], got {self.word_buckets}")
        if not 1 <= self.recency_buckets <= 64:
            raise ConfigError(f"recency_buckets: must be in [1, 64], got {self.recency_buckets}")
        if self.kg == "none" and self.use_kg:
            raise ConfigError("kg=none leaves R without a graph: add --no-kg (use_kg=false)")
        positive = {
            "dim": self.dim,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "patience": self.patience,
            "eval_batch_size": self.eval_batch_size,
            "dist_timeout_minutes": self.dist_timeout_minutes,
        }
        for name, v in positive.items():
            if v < 1:
                raise ConfigError(f"{name}: must be >= 1, got {v}")
        if self.use_kg and self.layers < 1:
            raise ConfigError(f"layers: must be >= 1 with a KG, got {self.layers}")
        for name, v in {
            "num_bases": self.num_bases,
            "min_relation_count": self.min_relation_count,
            "threads": self.threads,
        }.items():
            if v < 0:
                raise ConfigError(f"{name}: must be >= 0, got {v}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        for name, v in {"lr": self.lr, "copy_lr": self.copy_lr, "tau_R": self.tau_R}.items():
            if not v > 0 or math.isinf(v):
                raise ConfigError(f"{name}: must be a positive number, got {v}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")

    def check_paths(self) -> None:
        """The fields a run needs but a config file may leave to the command line."""
        if not self.data_dir:
            raise ConfigError("data_dir is required (--data-dir DIR)")
        if not self.output_dir:
            raise ConfigError("output_dir is required (--output-dir OUT)")

    def build_model(self, graph: RecGraph) -> RecTeacherModel:
        """R's model over ``graph`` as this config describes it (fresh weights)."""
        return RecTeacherModel(
            graph,
            dim=self.dim,
            num_bases=self.num_bases,
            dropout=self.dropout,
            use_kg=self.use_kg,
            rgcn_impl=self.rgcn_impl,
            copy=self.copy,
            recency_buckets=self.recency_buckets,
            copy_roles=self.copy_roles,
            words=self.words,
            word_buckets=self.word_buckets,
            copy_words=self.copy_words,
            copy_item_words=self.copy_item_words,
        )

    def context_index(self, graph: RecGraph) -> ContextIndex:
        """The :class:`ContextIndex` this R reads turns with (hashes words only if used)."""
        copy_words = self.copy != "none" and (self.copy_words or self.copy_item_words)
        reads_words = self.words != "none" or copy_words
        return ContextIndex(
            graph,
            word_buckets=self.word_buckets if reads_words else 0,
            mention_window=self.mention_window if self.copy_item_words else 0,
        )

    def graph_params(self) -> dict[str, Any]:
        """What :func:`build_rec_graph` was called with (saved with the checkpoint)."""
        return {
            "layers": self.layers,
            "use_kg": self.use_kg,
            "min_relation_count": self.min_relation_count,
            "rare_relations": self.rare_relations,
        }


# ----------------------------------------------------------------------------- data


@dataclass
class EncodedTurns:
    """Recommendation turns of one split, as R's indices."""

    ctx: list[list[int]]  # context nodes per turn
    ctx_items: list[list[int]]  # context item indices per turn
    gold: list[list[int]]  # gold item indices per turn
    recent: list[RecentLists] = field(default_factory=list)  # context items, most recent
    # first, with their copy features
    words: list[list[int]] = field(default_factory=list)  # hashed context words
    last_words: list[list[int]] = field(default_factory=list)  # hashed words of the last turn

    def __len__(self) -> int:
        return len(self.gold)

    def _lists(self) -> list[list]:
        return [getattr(self, f.name) for f in fields(self)]

    def __getitem__(self, sl: slice) -> EncodedTurns:
        return EncodedTurns(*(xs[sl] for xs in self._lists()))

    def rows(self, rows: list[int]) -> EncodedTurns:
        """The turns at ``rows`` (repeats allowed), in that order (an unfilled list stays
        empty)."""
        return EncodedTurns(*([xs[r] for r in rows] if xs else [] for xs in self._lists()))


def encode_turns(turns: list[TurnSample], index: ContextIndex) -> EncodedTurns:
    """Encode the turns with at least one gold item known to R (others are dropped)."""
    enc = EncodedTurns([], [], [])
    for t in turns:
        gold = index.items(t.gold_items)
        if not gold:
            continue
        nodes, items = index.encode(t)
        words, last = index.words(t)
        enc.ctx.append(nodes)
        enc.ctx_items.append(items)
        enc.gold.append(gold)
        enc.recent.append(index.recent(t))
        enc.words.append(words)
        enc.last_words.append(last)
    return enc


def model_inputs(batch: EncodedTurns) -> tuple[torch.Tensor, torch.Tensor, RecentItems, WordBags]:
    """``(ctx_BC, mask_BC, recent, words)``: what :class:`RecTeacherModel` reads of a batch."""
    ctx_BC, mask_BC = pad_contexts(batch.ctx)
    return ctx_BC, mask_BC, pad_recent(batch.recent), pad_words(batch.words, batch.last_words)


def new_gold(enc: EncodedTurns) -> list[list[int]]:
    """Gold items not already mentioned in the context (the "new items" variant)."""
    out = []
    for gold, seen in zip(enc.gold, enc.ctx_items, strict=True):
        seen_set = set(seen)
        out.append([g for g in gold if g not in seen_set])
    return out


def mask_seen(scores_BI: torch.Tensor, ctx_items: list[list[int]]) -> torch.Tensor:
    """Scores with the items already in each context set to ``-inf`` (a new tensor); a
    context that holds every item is left unmasked."""
    n_items = scores_BI.shape[1]
    return mask_items(scores_BI, [i if len(i) < n_items else [] for i in ctx_items])


def evaluate_turns(
    score_fn: Any,
    enc: EncodedTurns,
    *,
    batch_size: int = 256,
    exclude_seen: bool = False,
    ks: tuple[int, ...] = EVAL_KS,
) -> dict[str, float]:
    """Metrics of ``score_fn(batch: EncodedTurns) -> [B, I]`` on encoded turns.

    Keys: ``R@k``, ``MRR@k``, ``NDCG@k`` (per gold item, KBRD protocol), the same under
    ``new/`` (METHOD.md's deduplicated protocol: only gold items not already in the context,
    ranked with the context's items removed from the candidates), ``new_unmasked/`` (the same
    gold items, ranked among all items) and ``turn/`` (one sample per turn with all its gold
    items), each with ``n`` and ``skipped`` counts.
    """
    accs = {
        "": RankingAccumulator(ks),
        "new/": RankingAccumulator(ks),
        "new_unmasked/": RankingAccumulator(ks),
        "turn/": RankingAccumulator(ks, per_turn=True),
    }
    fresh = new_gold(enc)
    for s in range(0, len(enc), batch_size):
        sl = slice(s, s + batch_size)
        scores_BI = score_fn(enc[sl])  # [B, I]
        if exclude_seen:
            scores_BI = mask_seen(scores_BI, enc.ctx_items[sl])
        accs[""].add(scores_BI, enc.gold[sl])
        accs["new_unmasked/"].add(scores_BI, fresh[sl])
        masked_BI = scores_BI if exclude_seen else mask_seen(scores_BI, enc.ctx_items[sl])
        accs["new/"].add(masked_BI, fresh[sl])
        accs["turn/"].add(scores_BI, enc.gold[sl])
    return {f"{p}{k}": v for p, acc in accs.items() for k, v in acc.result().items()}


# ----------------------------------------------------------------------------- recipe


def _progress(cfg: RecTeacherConfig, rank: int) -> bool:
    return cfg.progress and rank == 0


class RecTeacherTrainer:
    """One training run: ``setup() / train() / evaluate() / save_checkpoint()``."""

    def __init__(self, cfg: RecTeacherConfig, *, rank: int = 0) -> None:
        cfg.check_paths()
        self.cfg = cfg
        self.rank = rank
        self.out = Path(cfg.output_dir)

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.corpus: Corpus = load_dataset(
            cfg.dataset, cfg.data_dir, kg=None if cfg.kg == "default" else cfg.kg
        )
        self.graph: RecGraph = build_rec_graph(self.corpus, **cfg.graph_params())
        self.model = cfg.build_model(self.graph)
        self.popularity = Popularity.from_samples(
            self.corpus.samples("train"), self.graph.item_ids, seed=cfg.seed
        )
        if cfg.bias_init == "popularity":
            counts_I = self.popularity.counts_I.float() + 1.0  # [I]
            with torch.no_grad():
                self.model.item_bias.copy_((counts_I / counts_I.sum()).log())
        copy_params = [p for n, p in self.model.named_parameters() if n.startswith("copy_")]
        other = [p for n, p in self.model.named_parameters() if not n.startswith("copy_")]
        groups = [{"params": other}]
        if copy_params:  # a handful of scalars: they need a larger step than the embeddings
            groups.append({"params": copy_params, "lr": cfg.copy_lr, "weight_decay": 0.0})
        self.optim = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        index = cfg.context_index(self.graph)
        self.data = {s: encode_turns(self.corpus.samples(s), index) for s in self.corpus.splits}
        train = self.data["train"]
        # One training sample per gold item: (turn row, gold item).
        self.train_pairs = torch.tensor(
            [(r, g) for r, gold in enumerate(train.gold) for g in gold], dtype=torch.long
        ).reshape(-1, 2)
        if len(self.train_pairs) == 0:
            raise ConfigError(f"{cfg.data_dir}: the training split has no recommendation turns")
        self.out.mkdir(parents=True, exist_ok=True)
        info = {
            "items": self.graph.num_items,
            "items_without_kg_node": self.corpus.items_without_kg_node,
            "context_entities": len(self.graph.entity_keys),
            "nodes": self.graph.layer_sizes,
            "edges": [int(e.shape[1]) for e in self.graph.edge_index],
            "relations": self.graph.num_relations,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "train_samples": len(self.train_pairs),
            "turns": {s: len(d) for s, d in self.data.items()},
            "torch": str(torch.__version__),
            "threads": torch.get_num_threads(),
        }
        write_json(self.out / "config.json", {**config_to_dict(cfg), "derived": info})
        self.info = info

    def _scores(self, batch: EncodedTurns) -> torch.Tensor:
        return self.model.scores_from_nodes(self._nodes, *model_inputs(batch))

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current model on a split (see :func:`evaluate_turns`)."""
        self.model.eval()
        self._nodes = self.model.node_embeddings()
        return evaluate_turns(
            self._scores,
            self.data[split],
            batch_size=self.cfg.eval_batch_size,
            exclude_seen=self.cfg.exclude_seen,
        )

    def evaluate_baselines(self, split: str) -> dict[str, float]:
        """Popularity (``popularity/…``) and the repeat baseline (``repeat/…``) on a split,
        evaluated as R is."""
        repeat = RepeatBaseline(self.popularity, self.graph.item_ids)
        fns = {
            "popularity/": lambda batch: self.popularity.scores(len(batch)),
            "repeat/": lambda batch: repeat.scores_from_recent([r.items for r in batch.recent]),
        }
        return {
            f"{prefix}{k}": v
            for prefix, fn in fns.items()
            for k, v in evaluate_turns(
                fn,
                self.data[split],
                batch_size=self.cfg.eval_batch_size,
                exclude_seen=self.cfg.exclude_seen,
            ).items()
        }

    def _train_epoch(self, epoch: int) -> float:
        cfg, model, train = self.cfg, self.model, self.data["train"]
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = self.train_pairs[torch.randperm(len(self.train_pairs), generator=gen)]
        total, n = 0.0, 0
        bar = tqdm(
            range(0, len(perm), cfg.batch_size),
            desc=f"epoch {epoch}",
            leave=False,
            disable=not _progress(cfg, self.rank),
        )
        for s in bar:
            batch = perm[s : s + cfg.batch_size]
            turns = train.rows(batch[:, 0].tolist())
            scores_BI = model(*model_inputs(turns))  # [B, I]
            loss = F.cross_entropy(scores_BI, batch[:, 1])
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            self.optim.step()
            total += loss.item() * len(batch)
            n += len(batch)
            bar.set_postfix(loss=f"{total / n:.3f}")
        return total / n

    def train(self) -> dict[str, Any]:
        """Train with early stopping on the validation ``select``; keeps the best weights."""
        cfg = self.cfg
        rows: list[dict[str, Any]] = []
        best, best_epoch, best_state = -1.0, 0, None
        t0, c0 = time.perf_counter(), time.process_time()
        epochs = tqdm(
            range(1, cfg.epochs + 1), desc="rec teacher", disable=not _progress(cfg, self.rank)
        )
        for epoch in epochs:
            te = time.perf_counter()
            loss = self._train_epoch(epoch)
            valid = self.evaluate("valid")
            row = {
                "epoch": epoch,
                "train_loss": loss,
                **{f"valid/R@{k}": valid[f"R@{k}"] for k in EVAL_KS},
                "seconds": time.perf_counter() - te,
            }
            rows.append(row)
            write_jsonl(self.out / "metrics.jsonl", rows)
            if _progress(cfg, self.rank):
                tqdm.write(
                    f"epoch {epoch}: loss {loss:.4f} valid R@1/10/50 "
                    f"{valid['R@1']:.4f}/{valid['R@10']:.4f}/{valid['R@50']:.4f}"
                )
            if select_value(valid, cfg.select) > best:
                best, best_epoch = select_value(valid, cfg.select), epoch
                best_state = copy.deepcopy(self.model.state_dict())
                self.save_checkpoint(epoch=epoch, valid=valid, complete=False)
            elif epoch - best_epoch >= cfg.patience:
                break
        assert best_state is not None
        self.model.load_state_dict(best_state)
        if cfg.copy == "recency" and cfg.calibrate:
            self.model.gen_temperature.fill_(self.fit_temperature("valid"))
        self.save_checkpoint(epoch=best_epoch, valid=self.evaluate("valid"), complete=True)
        return {
            "best_epoch": best_epoch,
            f"best_valid/{cfg.select}": best,
            "epochs_run": len(rows),
            "train_seconds": time.perf_counter() - t0,
            "train_cpu_seconds": time.process_time() - c0,  # all threads; wall time on a
            # shared machine depends on the load, CPU time much less
        }

    @torch.no_grad()
    def fit_temperature(self, split: str) -> float:
        """The ``T`` of ``p_gen = softmax(s / T)`` that minimises the NLL of ``split``'s gold
        items under the copy mixture (a grid over [0.5, 8])."""
        self.model.eval()
        self._nodes = self.model.node_embeddings()
        data = self.data[split]
        pairs = [(r, g) for r, gold in enumerate(data.gold) for g in gold]
        rows, gold_N = [r for r, _ in pairs], torch.tensor([g for _, g in pairs])
        best_T, best_nll = 1.0, float("inf")
        for T in [0.5 * 1.25**k for k in range(13)]:
            self.model.gen_temperature.fill_(T)
            nll = 0.0
            for s in range(0, len(rows), self.cfg.eval_batch_size):
                batch = data.rows(rows[s : s + self.cfg.eval_batch_size])
                logp_BI = self._scores(batch).log_softmax(dim=1)  # [B, I]
                g_B = gold_N[s : s + len(batch)]
                nll -= float(logp_BI.gather(1, g_B[:, None]).sum())
            if nll < best_nll:
                best_T, best_nll = T, nll
        return best_T

    def save_checkpoint(
        self, *, epoch: int, valid: dict[str, float], complete: bool = True
    ) -> Path:
        """Write ``OUT/checkpoint/`` atomically (replacing the previous best); ``complete``
        is false while training goes on (an interrupted run is not a trained R)."""
        meta = {
            "format": CHECKPOINT_FORMAT,
            "complete": complete,
            "epoch": epoch,
            f"valid/{self.cfg.select}": select_value(valid, self.cfg.select),
            "config": config_to_dict(self.cfg),
            "graph_params": self.cfg.graph_params(),
            "num_items": self.graph.num_items,
            "derived": self.info,
        }
        state = {**meta, "graph": self.graph.state(), "state_dict": self.model.state_dict()}
        with atomic_dir(self.out / CHECKPOINT_DIR) as tmp:
            with atomic_open(tmp / CHECKPOINT_FILE, "wb") as f:
                torch.save(state, f)
            write_json(tmp / "item_ids.json", self.graph.item_ids, indent=None)
            write_json(tmp / "rec_teacher.json", meta)
        return self.out / CHECKPOINT_DIR

    def run(self) -> dict[str, Any]:
        """setup, train, evaluate R, popularity and the repeat baseline on the validation
        (keys ``valid/…``) and test splits, write metrics.json."""
        self.setup()
        summary = self.train()
        metrics: dict[str, Any] = {}
        for split, prefix in (("valid", "valid/"), ("test", "")):
            metrics.update({f"{prefix}{k}": v for k, v in self.evaluate(split).items()})
            metrics.update({f"{prefix}{k}": v for k, v in self.evaluate_baselines(split).items()})
        metrics.update(summary)
        metrics["model"] = "rgcn" if self.cfg.use_kg else "no_kg"
        write_json(self.out / "metrics.json", metrics)
        return metrics


# ----------------------------------------------------------------------------- launch


class RankZeroError(ConkdError, RuntimeError):
    """Raised on ranks > 0 when rank 0 failed to train the teacher."""


def train_rec_teacher(cfg: RecTeacherConfig) -> dict[str, Any]:
    """Train R on rank 0 (the only rank when not distributed); every rank returns the metrics.

    With several ranks the others wait outside any collective until rank 0 is done
    (:func:`~conkd_scale.distributed.run_on_main`); if rank 0 fails, every rank raises
    (:class:`RankZeroError` on the others).
    """
    cfg.check_paths()
    if get_world_size() == 1:
        return _train_here(cfg)
    try:
        return run_on_main(_train_here, cfg, phase="training the recommendation teacher R")
    except PeerLostError:  # rank 0 hung or died: not its error to pass on
        raise
    except BaseException as e:
        if get_rank() == 0:
            raise
        raise RankZeroError(
            f"rank 0 failed to train the recommendation teacher: {type(e).__name__}: {e}"
        ) from e


def _train_here(cfg: RecTeacherConfig) -> dict[str, Any]:
    """Train and evaluate R in this process (with ``cfg.threads``, or as rank 0 of several
    ranks every CPU this process may run on)."""
    threads = cfg.threads or (len(os.sched_getaffinity(0)) if get_world_size() > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    return RecTeacherTrainer(cfg, rank=0).run()


def run_rec_teacher(cfg: RecTeacherConfig) -> dict[str, Any]:
    """The CLI's entry: under a multi-rank launch (``WORLD_SIZE > 1``) joins a gloo group
    (collective timeout ``dist_timeout_minutes``); then :func:`train_rec_teacher` (rank 0
    trains, the others wait outside any collective), and leaves the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the whole run is rank-0-only work: no time limit beyond rank 0's heartbeat
        init_distributed("gloo", timeout_minutes=cfg.dist_timeout_minutes, rank0_timeout_minutes=0)
    try:
        return train_rec_teacher(cfg)
    finally:
        teardown()
