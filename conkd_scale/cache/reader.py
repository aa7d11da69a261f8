"""Reading the teacher cache in the distillation job (``teachers.mode=offline``).

:meth:`TeacherCache.open` checks, on every rank and from files only (call it before any
collective): the manifest exists and is complete, its fingerprint equals the run's (a
mismatch names each differing field and the setting behind it), every shard is present
(missing ones are named) and matches its SHA-256. Then :meth:`TeacherCache.teachers` gives,
for a collated batch of :class:`CachedSequence` (whose collate adds ``cache_keys``), D as a
:class:`~conkd_scale.loss.sparse.SparseTeacher` at the batch's loss rows and R's
distribution per recommender turn ``[S, |I|]``: what online mode's teacher forward gives.
Shards are memory-mapped (safetensors) and read by slices, so the data loader's order (any
shuffle, any resume position) costs no more than a sequential pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from conkd_scale.cache import manifest as M
from conkd_scale.data.sequences import IGNORE, EncodedSequence
from conkd_scale.loss.sparse import SparseTeacher
from conkd_scale.utils.errors import ConfigError, DataError

Batch = dict[str, Any]
CACHE_JOB = "deepspeed launch/cache_teachers.py --deepspeed ds_configs/zero3_inference.json"


@dataclass
class CachedSequence:
    """A training or validation sequence and its place in the cache."""

    seq: EncodedSequence
    split: str
    index: int

    def __len__(self) -> int:
        return len(self.seq)


def cached_sequences(seqs: Sequence[EncodedSequence], split: str) -> list[CachedSequence]:
    return [CachedSequence(s, split, i) for i, s in enumerate(seqs)]


def cached_collate(base: Callable[[list[Any]], Batch]) -> Callable[[list[Any]], Batch]:
    """``base`` on the sequences, with ``cache_keys``: ``(split, index)`` per sample."""

    def fn(items: list[CachedSequence]) -> Batch:
        batch = base([c.seq for c in items])
        batch["cache_keys"] = [(c.split, c.index) for c in items]
        return batch

    return fn


class TeacherCache:
    """An open, verified teacher cache."""

    def __init__(self, root: Path, man: dict[str, Any]) -> None:
        self.root = root
        self.man = man
        self.per_shard = int(man["shard_sequences"])
        self.k = int(man["fingerprint"]["k"])
        self.rec_topk = int(man["fingerprint"]["rec_topk"])
        self.items = int(man["items"])
        self._open: dict[str, Any] = {}
        self._offsets: dict[str, tuple[list[int], list[int]]] = {}

    # ---------------------------------------------------------------------------- open
    @classmethod
    def open(
        cls,
        root: Path,
        run_fp: Callable[[M.FileHasher], dict[str, Any]],
        *,
        verify: bool = True,
    ) -> TeacherCache:
        """The cache in ``root`` if it fits the run whose fingerprint ``run_fp`` computes
        (given the manifest's file-hash memo); a clear error otherwise."""
        man = M.read_manifest(root)
        if man is None:
            where = "does not exist" if not root.exists() else f"has no {M.MANIFEST}"
            raise ConfigError(
                f"teachers.cache_dir: {root} {where}: build the cache first ({CACHE_JOB} with "
                "this run's config and settings), or point teachers.cache_dir at one "
                "(teachers.mode=online runs D instead)"
            )
        if not man.get("complete"):
            raise ConfigError(
                f"teachers.cache_dir: the teacher cache in {root} is not finished (its cache job "
                f"stopped): run the cache job again ({CACHE_JOB}, same settings) to complete it"
            )
        diff = M.mismatches(man["fingerprint"], run_fp(M.FileHasher(man.get("files"))))
        if diff:
            raise ConfigError(
                f"teachers.cache_dir: the teacher cache in {root} was made for another run: "
                + "; ".join(diff)
                + ". Build a cache for this run (another teachers.cache_dir) or use its settings"
            )
        cache = cls(root, man)
        cache.check_shards(verify=verify)
        return cache

    def _path(self, name: str) -> Path:
        return self.root / M.SHARDS / name

    def check_shards(self, *, verify: bool = True) -> None:
        """Every shard of the manifest is present (missing ones named) and, with ``verify``,
        matches its SHA-256 (a damaged one named)."""
        names = [M.shard_name(s, j) for s, j, _, _ in M.all_shards(self.man["layout"])]
        missing = [n for n in names if not self._path(n).is_file()]
        if missing:
            more = f" and {len(missing) - 5} more" if missing[5:] else ""
            shown = ", ".join(missing[:5]) + more
            raise DataError(
                self.root / M.SHARDS,
                f"{len(missing)} of {len(names)} cache shards are missing: {shown}",
                hint=f"run the cache job again ({CACHE_JOB}, same settings): it rewrites them",
            )
        for n in names:
            info = self.man["shards"][n]
            path = self._path(n)
            if path.stat().st_size != info["bytes"] or (
                verify and M.sha256_file(path) != info["sha256"]
            ):
                raise DataError(
                    path,
                    "checksum mismatch: the shard is damaged",
                    hint=f"run the cache job again ({CACHE_JOB}, same settings): it rewrites it",
                )

    # ---------------------------------------------------------------------------- read
    def _shard(self, split: str, index: int) -> tuple[Any, int, str]:
        j = index // self.per_shard
        name = M.shard_name(split, j)
        if name not in self._open:
            from safetensors import safe_open

            f = safe_open(str(self._path(name)), framework="pt")
            self._open[name] = f
            self._offsets[name] = (
                f.get_tensor("row_offsets").tolist(),
                f.get_tensor("turn_offsets").tolist(),
            )
        return self._open[name], index - j * self.per_shard, name

    def teachers(self, batch: Batch) -> tuple[SparseTeacher, Tensor]:
        """D at the batch's loss rows (``[N, K]``, rows in the order of the batch's
        ``labels[:, 1:] != -100``) and R per recommender turn (``[S, |I|]``, the order of
        ``batch["turns"]``)."""
        rows_B = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
        pad_B = batch.get("is_pad", torch.zeros(len(rows_B), dtype=torch.bool)).tolist()
        ids, logp, mass, rec = [], [], [], []
        for b, (split, index) in enumerate(batch["cache_keys"]):
            f, i, name = self._shard(split, index)
            row_off, turn_off = self._offsets[name]
            r0, r1 = row_off[i], row_off[i + 1]
            if not pad_B[b]:  # a padded evaluation copy has no loss rows
                if r1 - r0 != rows_B[b]:
                    raise DataError(
                        self._path(name),
                        f"sequence {split}/{index} has {r1 - r0} cached rows, the batch "
                        f"{rows_B[b]}: the cache does not belong to these sequences",
                        hint="rebuild the cache",
                    )
                ids.append(f.get_slice("ids")[r0:r1])
                logp.append(f.get_slice("logp")[r0:r1])
                mass.append(f.get_slice("item_mass")[r0:r1])
            t0, t1 = turn_off[i], turn_off[i + 1]
            rec.append(self._rec(f, t0, t1))
        K = self.k
        teacher = SparseTeacher(
            torch.cat(ids).long() if ids else torch.zeros(0, K, dtype=torch.long),  # [N, K]
            torch.cat(logp).float() if logp else torch.zeros(0, K),  # [N, K]
            torch.cat(mass).float() if mass else torch.zeros(0),  # [N]
        )
        rec_SI = torch.cat(rec) if rec else torch.zeros(0, self.items)  # [S, I]
        return teacher, rec_SI

    def _rec(self, f: Any, t0: int, t1: int) -> Tensor:
        """R's distribution of turns ``[t0, t1)`` of a shard, ``[S, I]`` fp32, rows summing
        to 1: stored in full, or its top-k with the tail spread evenly over the rest."""
        p = f.get_slice("rec_p")[t0:t1].float()  # [S, I] or [S, kR]
        if self.rec_topk:
            ids = f.get_slice("rec_ids")[t0:t1].long()  # [S, kR]
            tail = f.get_slice("rec_tail")[t0:t1].float()  # [S]
            rest = max(self.items - self.rec_topk, 1)
            q = (tail / rest).unsqueeze(1).expand(-1, self.items).clone()  # [S, I]
            if self.items == self.rec_topk:
                q.zero_()
            p = q.scatter_(1, ids, p)
        return p / p.sum(-1, keepdim=True).clamp_min(1e-30)

    def item_mass(self, batch: Batch) -> Tensor:
        """D's exact item mass m_t at the batch's loss rows ``[N]`` (``η = auto``)."""
        return self.teachers(batch)[0].item_mass_N
