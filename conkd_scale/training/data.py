"""Data loading for DeepSpeed jobs: sharded, deterministic, resumable at a batch offset.

Training: a ``DistributedSampler`` (shuffled with ``seed``, ``set_epoch(epoch)``; it pads the
index list so that every rank gets the same number of samples, hence the same number of
micro batches: ZeRO-3 forwards are collective). With ``lengths`` given (``train.group_by_length``)
each window of 64 micro batches is sorted by length before it is cut into micro batches, whose
order is then shuffled (seeded per epoch): whole conversations vary a lot in length, and this
removes most of the padding. The stream runs across epoch boundaries;
its position is ``(epoch, batch_offset)`` = the next micro batch to read, saved in every
checkpoint, so a resumed run reads exactly the batches an uninterrupted one would.

Evaluation: every sample exactly once (rank r takes samples r, r+W, ...); ranks with fewer
samples are padded with copies whose labels are all ignored and ``is_pad`` set, so every rank
runs the same number of forwards while sums (NLL, token counts) stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from conkd_scale.data.sequences import IGNORE, EncodedSequence, collate

Batch = dict[str, Any]


class ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def sequence_collate(pad_id: int) -> Callable[[Sequence[EncodedSequence]], Batch]:
    """``conkd_scale.data.sequences.collate`` with ``is_pad`` (all False) added."""

    def fn(batch: Sequence[EncodedSequence]) -> Batch:
        out = collate(batch, pad_id)
        out["is_pad"] = torch.zeros(len(batch), dtype=torch.bool)
        return out

    return fn


@dataclass
class DataPosition:
    """Where the training stream is: the next micro batch is ``batch_offset`` of ``epoch``.

    ``done``: after a change of world size mid-epoch, the dataset indices the epoch had
    already used; the rest of that epoch is then the epoch's other samples, shared over the
    new ranks (:meth:`TrainStream.epoch_batches`), and ``batch_offset`` counts within it."""

    epoch: int = 0
    batch_offset: int = 0
    done: list[int] | None = None


class TrainStream:
    """Endless, resumable stream of this rank's training micro batches."""

    def __init__(
        self,
        dataset: Sequence[Any],
        collate_fn: Callable[[list[Any]], Batch],
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        num_workers: int = 0,
        lengths: Sequence[int] | None = None,
        group_size: int = 64,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("empty training set")
        self.dataset = ListDataset(dataset)
        self.collate_fn = collate_fn
        self.micro_batch = micro_batch
        self.num_workers = num_workers
        self.lengths = lengths
        self.group_size = group_size
        self.seed = seed
        self.sampler = DistributedSampler(
            self.dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.position = DataPosition()

    @property
    def batches_per_epoch(self) -> int:
        """Micro batches per epoch, the same on every rank."""
        return math.ceil(self.sampler.num_samples / self.micro_batch)

    def epoch_batches(
        self, epoch: int, done: list[int] | None = None, rank: int | None = None
    ) -> list[list[int]]:
        """This rank's (or ``rank``'s) micro batches (dataset indices) of one epoch,
        deterministic; with ``done``, those of the samples the epoch has not used yet."""
        rank = self.sampler.rank if rank is None else rank
        if done is None:
            sampler = DistributedSampler(
                self.dataset,
                num_replicas=self.sampler.num_replicas,
                rank=rank,
                shuffle=self.sampler.shuffle,
                seed=self.seed,
                drop_last=False,
            )
            sampler.set_epoch(epoch)
            idx = list(sampler)
        else:
            idx = _shard(self._epoch_order(epoch, set(done)), rank, self.sampler.num_replicas)
        mb = self.micro_batch
        if self.lengths is None:
            return [idx[i : i + mb] for i in range(0, len(idx), mb)]
        # Length grouping: sort each window of `group_size` micro batches by length (less
        # padding), cut it into micro batches, then shuffle their order (seeded per epoch).
        window = mb * self.group_size
        batches = []
        for w in range(0, len(idx), window):
            chunk = sorted(idx[w : w + window], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + mb] for i in range(0, len(chunk), mb)]
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def _epoch_order(self, epoch: int, skip: set[int]) -> list[int]:
        """The epoch's samples in the sampler's shuffled order, without ``skip``."""
        n = len(self.dataset)
        if self.sampler.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return [i for i in order if i not in skip]

    def used(self, position: DataPosition, world_size: int) -> list[int]:
        """The dataset indices that ``world_size`` ranks (this stream's layout otherwise)
        have read in ``position.epoch`` before ``position``: what a resume on another
        number of ranks must not read again in that epoch."""
        other = TrainStream(
            self.dataset.items,
            self.collate_fn,
            micro_batch=self.micro_batch,
            rank=0,
            world_size=world_size,
            seed=self.seed,
            shuffle=self.sampler.shuffle,
            lengths=self.lengths,
            group_size=self.group_size,
        )
        seen = set(position.done or [])
        for r in range(world_size):
            for b in other.epoch_batches(position.epoch, position.done, r)[: position.batch_offset]:
                seen.update(b)
        return sorted(seen)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            pos = self.position
            batches = self.epoch_batches(pos.epoch, pos.done)[pos.batch_offset :]
            loader = DataLoader(
                self.dataset,
                batch_sampler=batches,
                collate_fn=self.collate_fn,
                num_workers=self.num_workers,
            )
            for batch in loader:
                self.position = DataPosition(pos.epoch, self.position.batch_offset + 1, pos.done)
                yield batch
            self.position = DataPosition(pos.epoch + 1, 0)


def _shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """``rank``'s share of ``indices`` the way ``DistributedSampler`` shares: padded with
    the first ones to a multiple of ``world_size``, then every ``world_size``-th."""
    if not indices:
        return []
    total = math.ceil(len(indices) / world_size) * world_size
    padded = (indices * math.ceil(total / len(indices)))[:total]
    return padded[rank:total:world_size]


def eval_batches(
    n: int, micro_batch: int, rank: int, world_size: int
) -> list[list[tuple[int, bool]]]:
    """Rank ``rank``'s evaluation micro batches as ``(index, is_pad)``; equal count per rank."""
    per_rank = math.ceil(n / world_size)
    mine = [(i, False) for i in range(rank, n, world_size)]
    mine += [(mine[0][0] if mine else 0, True)] * (per_rank - len(mine))
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


def iter_eval(
    dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], Batch],
    *,
    micro_batch: int,
    rank: int,
    world_size: int,
    max_batches: int = 0,
) -> Iterator[Batch]:
    """Evaluation batches with ``is_pad`` [B] set and padded rows' labels ignored."""
    batches = eval_batches(len(dataset), micro_batch, rank, world_size)
    if max_batches:
        batches = batches[:max_batches]
    for b in batches:
        batch = collate_fn([dataset[i] for i, _ in b])
        is_pad_B = torch.tensor([p for _, p in b], dtype=torch.bool)
        batch["is_pad"] = is_pad_B
        if "labels" in batch and is_pad_B.any():
            batch["labels"][is_pad_B] = IGNORE
        yield batch
