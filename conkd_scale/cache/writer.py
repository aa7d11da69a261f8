"""The cache job: the teachers run once over the training and validation sequences.

    deepspeed launch/cache_teachers.py --deepspeed ds_configs/zero3_inference.json \
        [--config FILE] [key=value ...]

It reads the distillation job's own config (``DistillConfig``: the same data, sequence
layout, teachers and ``teachers.cache_*`` settings) and writes ``teachers.cache_dir``. D is a
ZeRO-3 inference engine sharded exactly as in online mode (``distill/teachers.py``), R a
replica per rank. Every shard (``teachers.cache_shard_sequences`` consecutive sequences of a
split) is given to one rank (shard ``i`` of the pending ones to rank ``i mod W``); the ranks
go through the shards in rounds, and a rank with less to do in a round runs the same number
of D forwards on a dummy batch, since ZeRO-3 forwards are collective. Per shard and sequence:

- per response (loss) token: D's top-k token ids and untempered log-probabilities over all
  of ``U`` (or its top-(k − S) and S slots drawn from its tail, ``teachers.cache_tail_samples``),
  and D's item mass m_t from its full untempered distribution (exact gate);
- per recommender turn: R's item distribution (full, or its top-k and the tail mass).

Writes are atomic: a shard file, then its sidecar JSON with the file's SHA-256; the manifest
(``manifest.json``, ``complete: false``) is written before the first shard and completed at
the end. A killed job, run again, keeps the shards whose checksum matches their sidecar and
computes the rest. A directory holding another cache (another fingerprint) is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from conkd_scale.cache import manifest as M
from conkd_scale.config import config_to_dict
from conkd_scale.data.corpus import load_dataset
from conkd_scale.data.sequences import IGNORE
from conkd_scale.data.synthetic import ensure_synthetic
from conkd_scale.data.tokenizer import item_token_ids
from conkd_scale.distill import teachers as T
from conkd_scale.distill.config import DistillConfig
from conkd_scale.distributed import barrier, init_distributed, print0, run_on_main
from conkd_scale.loss.sparse import SparseTeacher
from conkd_scale.training import preemption
from conkd_scale.training.data import sequence_collate
from conkd_scale.training.ds_config import resolve_ds_config
from conkd_scale.training.lm_recipe import LMRecipe
from conkd_scale.training.trainer import lm_logits
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import atomic_open, write_json

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def index_dtype(n: int) -> torch.dtype:
    """The smallest stored integer type for indices below ``n``."""
    return torch.uint16 if n <= 65536 else torch.int32


class CacheJob(LMRecipe):
    """``setup -> train -> export -> cleanup`` (``conkd_scale/launching.py`` drives it)."""

    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig, ds_config: dict[str, Any], ds_path: str) -> None:
        super().__init__(cfg, ds_config, ds_path)
        self.cache = cfg.cache_dir
        self.teacher: Any = None
        self.pending: list[tuple[str, int, int, int]] = []

    # ---------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        if not cfg.uses_teachers:
            raise ConfigError("loss.w_kd=0 uses no teacher: there is nothing to cache")
        T.check_teachers_present(cfg)
        M.check_dir_is_cache_or_empty(self.cache)  # every rank, files only
        ready = T.rec_ready(cfg) and T.dialog_ready(cfg)
        if ready:  # every check that reads files only, before any collective
            self.prepare()
        self.dist = init_distributed(timeout_minutes=cfg.train.collective_timeout_minutes)
        if not ready:
            if cfg.dataset == "synthetic":
                run_on_main(ensure_synthetic, cfg.resolved_data_dir, seed=cfg.synthetic_seed)
            T.train_missing_teachers(cfg)
            self.prepare()  # the same files on every rank: every rank raises the same error
        self.pending = run_on_main(self._plan, self.old)
        n_all = sum(1 for _ in M.all_shards(self.layout))
        print0(f"teacher cache {self.cache}: {len(self.pending)} of {n_all} shards to write")
        self.t0 = time.monotonic()
        if self.pending:
            self.teacher = self._build_teacher()
        preemption.install()

    def prepare(self) -> None:
        """Data, tokenizer, R, the encoded splits and the cache's fingerprint and layout; a
        directory holding another cache, or a k beyond |U|, is refused. Files only."""
        cfg = self.cfg
        corpus = load_dataset(
            cfg.dataset, cfg.resolved_data_dir, kg=cfg.kg or "none", splits=("train", "valid")
        )
        self._require_training_split(corpus)
        tok = T.load_teacher_tokenizer(cfg)
        from conkd_scale.rec.api import RecTeacher

        self.rec = RecTeacher.load(cfg.rec_dir)
        self.item_ids = T.check_alignment(tok, self.rec, corpus.catalog.ids)
        self.item_tok_I = torch.tensor(item_token_ids(tok, self.item_ids), dtype=torch.long)
        self.vocab = len(tok)
        check_sizes(cfg, self.vocab, len(self.item_ids))
        self._encode_splits(corpus, tok)
        self.splits = {"train": self.train_data, "valid": self.eval_data}
        self.collate = sequence_collate(tok.pad_token_id)
        self.old = M.read_manifest(self.cache)
        self.hasher = M.FileHasher(self.old.get("files") if self.old else None)
        self.fp = M.run_fingerprint(cfg, tok, self.item_ids, self.splits)(self.hasher)
        self.layout = M.layout(self.splits, cfg.teachers.cache_shard_sequences)
        if self.old is not None:
            check_same_cache(self.cache, self.old, self.fp, self.layout)

    def _build_teacher(self) -> Any:
        """D as in online mode: a ZeRO-3 inference engine sharded over the ranks."""
        ds = resolve_ds_config(
            self.ds_raw,
            micro_batch=self.cfg.train.micro_batch,
            world_size=self.dist.world_size,
            client_optimizer=False,
            where=self.ds_path,
        )
        return T.build_dialog_engine(T.dialog_model_dir(self.cfg.dialog_dir), ds, self.vocab)

    def _plan(self, old: dict[str, Any] | None) -> list[tuple[str, int, int, int]]:
        """Rank 0: the manifest (``complete: false``) of a new cache, and the shards still to
        write; a shard whose file does not match its sidecar's checksum is removed."""
        if old is None:  # first, so that the directory is a cache from now on
            M.write_manifest(self.cache, self._manifest(complete=False))
        shards = self.cache / M.SHARDS
        shards.mkdir(parents=True, exist_ok=True)
        for tmp in shards.glob(".*.tmp"):  # a write that a kill interrupted
            tmp.unlink()
        pending = []
        for split, j, a, b in M.all_shards(self.layout):
            path = shards / M.shard_name(split, j)
            if M.shard_files_ok(path) is None:
                if path.exists() or M.sidecar(path).exists():
                    print(f"teacher cache: {path.name} is incomplete or damaged: rewriting it")
                    M.remove_shard(path)
                pending.append((split, j, a, b))
        if old is not None and pending and old.get("complete"):  # readers refuse it until done
            M.write_manifest(self.cache, self._manifest(complete=False))
        return pending

    def _manifest(self, *, complete: bool, **extra: Any) -> dict[str, Any]:
        return {
            "format": M.FORMAT,
            "complete": complete,
            "fingerprint": self.fp,
            "layout": self.layout,
            "shard_sequences": self.cfg.teachers.cache_shard_sequences,
            "files": self.hasher.used,
            "vocab": self.vocab,
            "items": len(self.item_ids),
            "config": config_to_dict(self.cfg),
            **extra,
        }

    # ---------------------------------------------------------------------------- run
    def train(self) -> dict[str, Any]:
        """Every pending shard, in rounds of one shard per rank (collective)."""
        W, r = self.dist.world_size, self.dist.rank
        mb = self.cfg.train.micro_batch
        rounds = [self.pending[i : i + W] for i in range(0, len(self.pending), W)]
        for n, group in enumerate(rounds):
            forwards = max(-(-(b - a) // mb) for _, _, a, b in group)  # the same on every rank
            if r < len(group):
                self._write_shard(*group[r], forwards)
            else:
                for _ in range(forwards):
                    self._dummy_forward()
            print0(f"teacher cache: round {n + 1}/{len(rounds)} written")
            if preemption.requested():
                barrier()
                preemption.stop(n + 1)  # the written shards are kept; a new run resumes
        return {}

    @torch.no_grad()
    def _dummy_forward(self) -> None:
        lm_logits(self.teacher, self.collate(self.train_data[:1]))

    @torch.no_grad()
    def _write_shard(self, split: str, j: int, a: int, b: int, forwards: int) -> None:
        cfg, t = self.cfg, self.cfg.teachers
        mb = cfg.train.micro_batch
        seqs = self.splits[split][a:b]
        ids, logp, mass, rows, rec, turns = [], [], [], [0], [], [0]
        draws = shard_generator(split, j, self.dist.device) if t.cache_tail_samples else None
        for s in range(0, len(seqs), mb):
            batch = self.collate(seqs[s : s + mb])
            logits_BTV = lm_logits(self.teacher, batch)  # [B, T, V]
            rows_BT = (batch["labels"][:, 1:] != IGNORE).to(logits_BTV.device)
            t_NV = logits_BTV[:, :-1][rows_BT][:, : self.vocab]  # [N, V]
            del logits_BTV
            sp = SparseTeacher.sampled_from_logits(
                t_NV, self.item_tok_I.to(t_NV.device), t.cache_k, t.cache_tail_samples, draws
            )
            del t_NV
            ids.append(sp.ids_NK.cpu())
            logp.append(sp.logp_NK.cpu())
            mass.append(sp.item_mass_N.float().cpu())
            for n in rows_BT.sum(1).tolist():
                rows.append(rows[-1] + int(n))
            for q in seqs[s : s + mb]:
                turns.append(turns[-1] + len(q.turns))
            if batch["turns"]:
                rec.append(self.rec.item_distribution(batch["turns"], self.item_ids).cpu())
        for _ in range(forwards - -(-len(seqs) // mb)):
            self._dummy_forward()
        tensors = self._pack(ids, logp, mass, rows, rec, turns)
        meta = {"split": split, "shard": str(j), "start": str(a), "end": str(b)}
        write_shard(self.cache / M.SHARDS / M.shard_name(split, j), tensors, meta)

    def _pack(
        self,
        ids: list[Tensor],
        logp: list[Tensor],
        mass: list[Tensor],
        rows: list[int],
        rec: list[Tensor],
        turns: list[int],
    ) -> dict[str, Tensor]:
        t = self.cfg.teachers
        dtype = DTYPES[t.cache_dtype]
        K, I = t.cache_k, len(self.item_ids)
        out = {
            "row_offsets": torch.tensor(rows, dtype=torch.int64),  # [S+1]
            "ids": _cat(ids, (0, K), torch.long).to(index_dtype(self.vocab)),  # [N, K]
            "logp": _cat(logp, (0, K), torch.float32).to(dtype),  # [N, K]
            "item_mass": _cat(mass, (0,), torch.float32),  # [N] exact m_t
            "turn_offsets": torch.tensor(turns, dtype=torch.int64),  # [S+1]
        }
        rec_SI = _cat(rec, (0, I), torch.float32)  # [turns, I]
        if t.cache_rec_topk == 0:
            out["rec_p"] = rec_SI.to(dtype)
        else:
            top = rec_SI.topk(t.cache_rec_topk, dim=-1)
            out["rec_ids"] = top.indices.to(index_dtype(I))  # [turns, kR] columns of I
            out["rec_p"] = top.values.to(dtype)  # [turns, kR]
            out["rec_tail"] = (1.0 - top.values.sum(-1)).clamp_min(0.0)  # [turns] fp32
        return {k: v.contiguous() for k, v in out.items()}

    # ---------------------------------------------------------------------------- end
    def export(self) -> Path:
        """The complete manifest (rank 0, after every rank's shards). Collective."""
        barrier()
        run_on_main(self._finish)
        print0(f"teacher cache complete: {self.cache / M.MANIFEST}")
        return self.cache

    def _finish(self) -> None:
        shards, stats = {}, {"rows": 0, "turns": 0, "bytes": 0, "d_bytes": 0, "r_bytes": 0}
        for split, j, _, _ in M.all_shards(self.layout):
            path = self.cache / M.SHARDS / M.shard_name(split, j)
            info = M.shard_files_ok(path)
            if info is None:
                raise ConfigError(f"teacher cache: shard {path} is missing or damaged at the end")
            shards[path.name] = info
            for k in stats:
                stats[k] += info[k]
        rows = max(stats["rows"], 1)
        stats.update(
            bytes_per_token=stats["bytes"] / rows,
            d_bytes_per_token=stats["d_bytes"] / rows,
            r_bytes_per_token=stats["r_bytes"] / rows,
        )
        man = self._manifest(
            complete=True,
            shards=shards,
            stats=stats,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            world_size=self.dist.world_size,
            wall_s_last_run=round(time.monotonic() - self.t0, 2),
        )
        M.write_manifest(self.cache, man)

    def _engines(self) -> list[Any]:
        return [self.teacher]


def shard_generator(split: str, shard: int, device: torch.device) -> torch.Generator:
    """The random draws of one shard, seeded by its name: a resumed job rewrites a shard
    with the same draws."""
    seed = int(hashlib.sha256(f"{split}/{shard}".encode()).hexdigest()[:15], 16)
    return torch.Generator(device=device).manual_seed(seed)


def _cat(parts: list[Tensor], empty: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.cat(parts).to(dtype) if parts else torch.zeros(empty, dtype=dtype)


def write_shard(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """The shard file, then its sidecar (SHA-256, sizes, counts), each atomically."""
    from safetensors.torch import save

    blob = save(tensors, metadata=meta)
    with atomic_open(path, "wb") as f:
        f.write(blob)
    d_keys = ("row_offsets", "ids", "logp", "item_mass")
    nbytes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    d_bytes = sum(nbytes[k] for k in d_keys)
    write_json(
        M.sidecar(path),
        {
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "sequences": len(tensors["row_offsets"]) - 1,
            "rows": len(tensors["item_mass"]),
            "turns": int(tensors["turn_offsets"][-1]),
            "d_bytes": d_bytes,
            "r_bytes": sum(nbytes.values()) - d_bytes,
            **meta,
        },
    )


def check_sizes(cfg: DistillConfig, vocab: int, items: int) -> None:
    """``teachers.cache_k`` ≤ |U| and ``teachers.cache_rec_topk`` ≤ |I|."""
    t = cfg.teachers
    if t.cache_k > vocab:
        raise ConfigError(
            f"teachers.cache_k={t.cache_k} exceeds the vocabulary |U| = {vocab} of the "
            f"dialogue teacher: set teachers.cache_k <= {vocab} (k = |U| keeps D's whole "
            "distribution)"
        )
    if t.cache_rec_topk > items:
        raise ConfigError(
            f"teachers.cache_rec_topk={t.cache_rec_topk} exceeds the {items} items: set it "
            f"<= {items}, or 0 for R's full distribution"
        )


def check_same_cache(
    cache: Path, old: dict[str, Any], fp: dict[str, Any], lay: dict[str, Any]
) -> None:
    """A cache job resumes only the cache it started: same fingerprint and shard layout."""
    diff = M.mismatches(old["fingerprint"], fp)
    if diff:
        raise ConfigError(
            f"teachers.cache_dir: {cache} holds another teacher cache (" + "; ".join(diff) + "): "
            "point teachers.cache_dir at a new directory, or delete this one to rebuild it"
        )
    if old["layout"] != lay:
        raise ConfigError(
            f"teachers.cache_shard_sequences: {cache} was started with "
            f"{old.get('shard_sequences')} sequences per shard, this run asks for another "
            "layout: use the same value to resume it"
        )
