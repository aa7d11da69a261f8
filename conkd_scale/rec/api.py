"""Loading API of the recommendation teacher, as used by distillation and evaluation.

    teacher = RecTeacher.load("runs/rec_redial")        # the run dir or its checkpoint/
    q_SI = teacher.item_distribution(turns, tokenizer_item_ids(tok))   # [S, len(item_ids)]

Alignment is explicit: ``item_ids`` is the caller's item order (e.g. the student tokenizer's
item tokens); :meth:`RecTeacher.aligned_index` maps it to R's item index and raises a
:class:`ConfigError` naming the first item R does not know. ``q_R`` is the softmax of R's
scores **over the given items only** (so rows sum to 1 over ``item_ids``; for the same item
set in another order it is exactly R's distribution, permuted).

Context items and entities that R does not know are ignored (an all-unknown context is an
empty context: u = 0, and the per-item bias ranks the items). With ``exclude_seen`` in the
training config the context's items get probability 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from conkd_scale.data.schema import TurnSample
from conkd_scale.rec.graph import RecGraph
from conkd_scale.rec.model import RecTeacherModel, pad_contexts, pad_recent, pad_words
from conkd_scale.rec.train import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    RecTeacherConfig,
    mask_seen,
)
from conkd_scale.utils.errors import ConfigError

__all__ = ["RecTeacher"]


def checkpoint_file(path: str | Path) -> Path:
    """R's checkpoint file in a training output dir (or its ``checkpoint/``)."""
    path = Path(path)
    for cand in (path / CHECKPOINT_FILE, path / CHECKPOINT_DIR / CHECKPOINT_FILE):
        if cand.is_file():
            return cand
    if not path.exists():
        problem = "does not exist"
    else:
        problem = f"holds no {CHECKPOINT_FILE} (nor {CHECKPOINT_DIR}/{CHECKPOINT_FILE})"
    raise ConfigError(
        f"recommendation-teacher checkpoint {path} {problem}: pass the --output-dir of "
        "`python launch/train_rec_teacher.py` (or its checkpoint/ folder)"
    )


class RecTeacher:
    """A trained, frozen recommendation teacher R (eval mode, no gradients)."""

    def __init__(self, model: RecTeacherModel, config: RecTeacherConfig) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = config
        self._index = config.context_index(model.graph)
        self._nodes_Td: torch.Tensor | None = None

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> RecTeacher:
        """Load from a training output dir (or its ``checkpoint/``); clear error if absent."""
        file = checkpoint_file(path)
        try:
            state: dict[str, Any] = torch.load(file, map_location=map_location, weights_only=True)
        except Exception as e:
            raise ConfigError(
                f"{file}: cannot load the checkpoint ({type(e).__name__}: {e}); "
                "retrain or copy it again"
            ) from None
        if state.get("format") not in (1, CHECKPOINT_FORMAT):
            raise ConfigError(
                f"{file}: checkpoint format {state.get('format')!r}, this code "
                f"reads formats 1 and {CHECKPOINT_FORMAT}; retrain the teacher"
            )
        fields = dict(state["config"])
        if state["format"] == 1:  # written before the copy component existed
            fields["copy"] = "none"
        cfg = RecTeacherConfig(**fields)
        graph = RecGraph.from_state(state["graph"])
        model = cfg.build_model(graph)
        model.load_state_dict(state["state_dict"])
        return cls(model.to(map_location), cfg)

    @property
    def item_ids(self) -> list[str]:
        """R's item index order."""
        return list(self.model.graph.item_ids)

    @property
    def tau(self) -> float:
        return self.config.tau_R

    def aligned_index(self, item_ids: Sequence[str]) -> torch.Tensor:
        """R's index of each of ``item_ids`` (``[len(item_ids)]`` long); errors if unknown."""
        known = self._index.item_index
        missing = [i for i in item_ids if i not in known]
        if missing:
            raise ConfigError(
                f"the recommendation teacher does not know item {missing[0]!r} "
                f"({len(missing)} of {len(item_ids)} requested items are unknown to it): it "
                "was trained on another item vocabulary; retrain it on this dataset"
            )
        if len(set(item_ids)) != len(item_ids):
            dup = next(i for i in item_ids if list(item_ids).count(i) > 1)
            raise ConfigError(f"item {dup!r} appears more than once in the requested item list")
        return torch.tensor([known[i] for i in item_ids], dtype=torch.long)

    def _node_embeddings(self) -> torch.Tensor:
        if self._nodes_Td is None:  # the teacher is frozen: compute the R-GCN pass once
            self._nodes_Td = self.model.node_embeddings()
        return self._nodes_Td

    @torch.no_grad()
    def scores(
        self, turns: Sequence[TurnSample], item_ids: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Raw scores ``s = u · e + b`` (no temperature, no masking): ``[S, I]``.

        Columns follow R's ``item_ids`` order, or the given ``item_ids`` order.
        """
        self.model.eval()
        ctx = [self._index.encode(t)[0] for t in turns]
        ctx_BC, mask_BC = pad_contexts(ctx)
        device = self.model.item_bias.device
        recent = words = None
        if self.model.copy != "none":  # only the copy component reads the recent items
            recent = pad_recent([self._index.recent(t) for t in turns]).to(device)
        if self._index.word_buckets:  # only an R that reads words hashes them
            ctx_words, last_words = zip(*(self._index.words(t) for t in turns), strict=True)
            words = pad_words(ctx_words, last_words).to(device)
        scores_SI = self.model.scores_from_nodes(
            self._node_embeddings(), ctx_BC.to(device), mask_BC.to(device), recent, words
        )  # [S, I_R]
        if item_ids is not None:
            scores_SI = scores_SI[:, self.aligned_index(item_ids).to(device)]
        return scores_SI

    @torch.no_grad()
    def item_distribution(
        self, turns: Sequence[TurnSample], item_ids: Sequence[str], tau: float | None = None
    ) -> torch.Tensor:
        """``q_R = softmax(s / tau)`` over ``item_ids``, in that order: ``[S, len(item_ids)]``.

        ``tau`` defaults to the config's ``tau_R``.
        """
        tau = self.tau if tau is None else tau
        if not tau > 0:
            raise ConfigError(f"tau must be positive, got {tau}")
        idx = self.aligned_index(item_ids)
        scores_SI = self.scores(turns)  # [S, I_R]
        if self.config.exclude_seen:
            scores_SI = mask_seen(scores_SI, [self._index.encode(t)[1] for t in turns])
        scores_SI = scores_SI[:, idx.to(scores_SI.device)]  # [S, len(item_ids)]
        all_masked_S = torch.isinf(scores_SI).all(dim=1)  # every requested item was seen
        scores_SI[all_masked_S] = 0.0
        return torch.softmax(scores_SI / tau, dim=-1)
