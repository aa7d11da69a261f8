"""The dialogue teacher given sparsely: its top-k tokens per loss row and the exact gate.

An offline teacher cache (``teachers.mode=offline``) stores, per response token, D's top-k
token ids and untempered log-probabilities (normalised over the full vocabulary ``U``) and
D's item mass ``m_t`` computed from the full untempered distribution before truncation
(METHOD.md, "The gate"), so the gate stays exact. The probability outside the top-k is the
tail mass ``1 − Σ_k exp(logp_k)``. Every loss implementation accepts a
:class:`SparseTeacher` wherever it accepts D's dense logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SparseTeacher:
    """D's top-k per row, aligned with the student's rows like dense teacher logits."""

    ids_NK: Tensor  # [N, K] or [B, T, K] long: vocabulary ids of D's top-k tokens
    logp_NK: Tensor  # [N, K] or [B, T, K] float: D's untempered log p over all of U
    item_mass_N: Tensor  # [N] or [B, T] float: exact m_t from D's full untempered distribution

    @property
    def k(self) -> int:
        return int(self.ids_NK.shape[-1])

    def flatten(self) -> SparseTeacher:
        """Rows flattened to ``[N, K]`` / ``[N]``."""
        K = self.k
        return SparseTeacher(
            self.ids_NK.reshape(-1, K), self.logp_NK.reshape(-1, K), self.item_mass_N.reshape(-1)
        )

    def tail_mass(self) -> Tensor:
        """``[N]`` D's probability outside the top-k (clamped at 0 against rounding)."""
        return (1.0 - self.logp_NK.float().exp().sum(-1)).clamp_min(0.0)

    @staticmethod
    def from_logits(teacher_logits: Tensor, item_ids_I: Tensor, k: int) -> SparseTeacher:
        """The top-k of dense teacher logits ``[..., V]`` (tests and the cache job)."""
        logp = torch.log_softmax(teacher_logits.float(), dim=-1)  # [..., V]
        top = logp.topk(k, dim=-1)
        m = logp.index_select(-1, item_ids_I).logsumexp(-1).exp()  # [...]
        return SparseTeacher(top.indices, top.values, m)
