"""The dialogue teacher given sparsely: its top-k tokens per loss row and the exact gate.

An offline teacher cache (``teachers.mode=offline``) stores, per response token, D's top-k
token ids and untempered log-probabilities (normalised over the full vocabulary ``U``) and
D's item mass ``m_t`` computed from the full untempered distribution before truncation
(METHOD.md, "The gate"), so the gate stays exact. The probability outside the top-k is the
tail mass ``r_t = 1 − Σ_k exp(logp_k)``. Every loss implementation accepts a
:class:`SparseTeacher` wherever it accepts D's dense logits.

The sparse dialogue term. With the top-k ids ``K_t`` (distinct) and the tail ``T_t = U∖K_t``,
D and the student are both coarsened to K+1 bins: the K tokens and one tail bin::

    teacher bins   d_k ∝ p_D(k)^(1/τ)  (k ∈ K_t),   d_tail ∝ r_t^(1/τ)   (normalised over K+1)
    student bins   s_k = p_S^τ(k),                  s_tail = Σ_{v ∈ T_t} p_S^τ(v)
    KL_sparse      = Σ_k d_k·log(d_k / s_k) + d_tail·log(d_tail / s_tail)

p_S^τ is the student's tempered softmax over all of U, as in the dense loss, and
``kd_dialog = τ²·(1−λ_t)·KL_sparse`` with λ_t from the stored m_t (never from the top-k).

- τ = 1: KL_sparse is exactly the KL between the K+1-bin coarsenings of p_D and p_S, so by
  the chain rule ``KL(p_D‖p_S) = KL_sparse + r_t·KL(p_D(·|T_t) ‖ p_S(·|T_t))``: the sparse
  term never exceeds the dense one, and the gap is the tail mass times the KL of the two
  distributions conditioned on the tail.
- τ ≠ 1: the tail bin is tempered as if it were one token (r^(1/τ)); the dense tempered
  teacher would give the tail Σ_{v∈T} p_D(v)^(1/τ), which is larger for τ > 1 and unknown
  without D's full distribution. So the sparse term equals the dense tempered one only as
  k → |U| (empty tail); for k < |U| it is a different (smaller-tail) target. Measured on
  ReDial (BENCHMARKS.md, bench/bench_sparse_kl.py) it is far off at τ = 2 (total loss
  about +110 % for k = 8…128, where τ = 1 is off by −1 to −3 %): use it with τ = 1.
- k = |U| (no tail): the K bins are the whole vocabulary and the loss equals the dense one.
- Gradient with respect to the student logits: ``τ·(p_S^τ − q)`` with the target q = d_k on
  the top-k ids and ``d_tail · p_S^τ(v) / s_tail`` on the tail (D's tail mass spread like the
  student's own tail), so the tail's relative shape is left to the cross-entropy.

Drawn tail slots (:meth:`SparseTeacher.sampled_from_logits`, the cache's
``teachers.cache_tail_samples``) fill the K ids with D's top tokens and draws from its tail
whose stored probabilities sum to 1: the tail bin is then empty and, at τ = 1, the target q
equals p_D in expectation, so the gradient is unbiased. A slot of mass 0 (log-prob -inf)
contributes nothing.

Ids must be distinct within a row (``topk`` gives that; checked at loss rows). Rows whose
label is -100 are never read, so their ids, log-probs and mass may be anything (e.g. zeros,
-inf or NaN).
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

    def rows(self, idx: Tensor | slice) -> SparseTeacher:
        """The flattened rows ``idx`` (an index tensor or a slice)."""
        if isinstance(idx, slice):
            return SparseTeacher(self.ids_NK[idx], self.logp_NK[idx], self.item_mass_N[idx])
        return SparseTeacher(
            self.ids_NK.index_select(0, idx),
            self.logp_NK.index_select(0, idx),
            self.item_mass_N.index_select(0, idx),
        )

    @staticmethod
    def from_logits(teacher_logits: Tensor, item_ids_I: Tensor, k: int) -> SparseTeacher:
        """The top-k of dense teacher logits ``[..., V]`` (tests and the cache job)."""
        logp, m = _logp_and_item_mass(teacher_logits, item_ids_I)
        top = logp.topk(k, dim=-1)
        return SparseTeacher(top.indices, top.values, m)

    @staticmethod
    def sampled_from_logits(
        teacher_logits: Tensor,
        item_ids_I: Tensor,
        k: int,
        samples: int,
        generator: torch.Generator | None = None,
    ) -> SparseTeacher:
        """D's top-(k − ``samples``) tokens exactly and ``samples`` slots drawn from its tail.

        The tail ``T`` (mass ``r``) is represented by ``samples`` draws with replacement from
        ``p_D(·|T)``: a drawn token ``v`` drawn ``c_v`` times gets the probability
        ``r·c_v/samples``, so the stored probabilities sum to 1 (no tail bin is left) and,
        in expectation over the draws, equal ``p_D`` on every token of ``U``. At τ = 1 the
        sparse loss's gradient ``p_S − q`` is then an unbiased estimate of the dense one
        (random-sampling KD, Anshumann et al., ACL 2025), where the top-k alone leaves the
        tail's shape without a teacher. Slots left by repeated draws hold the most probable
        tail tokens not drawn, with log-probability -inf (mass 0). ``samples = 0``, or
        ``k = |U|`` (nothing left to draw from): the exact top-k.
        """
        if samples == 0 or k >= teacher_logits.shape[-1]:
            return SparseTeacher.from_logits(teacher_logits, item_ids_I, k)
        if not 0 < samples <= k:
            raise ValueError(f"samples = {samples} must lie in [0, k = {k}]")
        logp_NV, m_N = _logp_and_item_mass(teacher_logits, item_ids_I)  # [N, V], [N]
        head = logp_NV.topk(k - samples, dim=-1)  # [N, H]
        tail_NV = logp_NV.exp().scatter(-1, head.indices, 0.0)  # [N, V] p_D on the tail only
        r_N = tail_NV.sum(-1)  # [N] tail mass
        # a row whose tail holds no mass draws uniformly (its draws get mass r·c/S = 0)
        empty_N1 = (r_N <= 0).unsqueeze(-1)  # [N, 1]
        in_tail_NV = torch.ones_like(tail_NV).scatter(-1, head.indices, 0.0)  # [N, V]
        draws_NS = torch.multinomial(
            torch.where(empty_N1, in_tail_NV, tail_NV), samples, True, generator=generator
        )  # [N, S]
        counts_NV = torch.zeros_like(tail_NV).scatter_add_(
            -1, draws_NS, torch.ones_like(draws_NS, dtype=tail_NV.dtype)
        )  # [N, V]
        # drawn tokens first (count >= 1 > any p), then the most probable undrawn tail tokens
        key_NV = (counts_NV + tail_NV).masked_fill(in_tail_NV == 0, -1.0)
        slot_NS = key_NV.topk(samples, dim=-1).indices  # [N, S] distinct, disjoint from head
        c_NS = counts_NV.gather(-1, slot_NS)  # [N, S]
        lp_NS = (r_N.unsqueeze(-1) * c_NS / samples).log()  # [N, S] -inf where not drawn
        return SparseTeacher(
            torch.cat([head.indices, slot_NS], -1), torch.cat([head.values, lp_NS], -1), m_N
        )


def _logp_and_item_mass(teacher_logits: Tensor, item_ids_I: Tensor) -> tuple[Tensor, Tensor]:
    """D's untempered log-probabilities ``[..., V]`` (fp32) and its exact item mass m_t
    ``[...]`` over the item tokens ``item_ids_I``."""
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    return logp, logp.index_select(-1, item_ids_I).logsumexp(-1).exp()


def check_sparse(
    teacher: SparseTeacher,
    lead: tuple[int, ...],  # the student logits' leading shape ([N] or [B, T])
    V: int,  # vocabulary size |U|
    valid_N: Tensor,  # [N] bool: loss rows (labels != -100) of the flattened rows
) -> SparseTeacher:
    """The teacher flattened to rows, checked against the student's rows and vocabulary.

    Raises ``ValueError`` when the shapes do not match the student's rows, K is not in
    [1, |U|], ids are not integers or logp not floating, or at a loss row an id lies outside
    [0, |U|), an id repeats, a log-prob is NaN or the item mass is not in [0, 1]. Ignored
    rows are not inspected.
    """
    if not isinstance(teacher, SparseTeacher):
        raise TypeError(f"expected a SparseTeacher, got {type(teacher).__name__}")
    ids, logp, mass = teacher.ids_NK, teacher.logp_NK, teacher.item_mass_N
    if ids.dim() < 1 or ids.shape != logp.shape or tuple(ids.shape[:-1]) != tuple(lead):
        raise ValueError(
            f"sparse teacher ids {tuple(ids.shape)} and logp {tuple(logp.shape)} must both be "
            f"the student logits' leading shape {tuple(lead)} + (K,)"
        )
    if tuple(mass.shape) != tuple(lead):
        raise ValueError(
            f"sparse teacher item_mass {tuple(mass.shape)} must be the student logits' "
            f"leading shape {tuple(lead)}"
        )
    K = teacher.k
    if not 1 <= K <= V:
        raise ValueError(f"sparse teacher k = {K} must lie in [1, |U| = {V}]")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"sparse teacher ids must be an integer tensor, got {ids.dtype}")
    if not logp.dtype.is_floating_point or not mass.dtype.is_floating_point:
        raise ValueError("sparse teacher logp and item_mass must be floating-point tensors")
    flat = teacher.flatten()
    idx_M = valid_N.nonzero().squeeze(1)  # [M]
    if idx_M.numel() == 0:
        return flat
    rows = flat.rows(idx_M)
    ids_MK = rows.ids_NK
    if int(ids_MK.min()) < 0 or int(ids_MK.max()) >= V:
        raise ValueError(f"sparse teacher ids of loss rows must lie in [0, {V})")
    if K > 1:
        srt_MK = ids_MK.sort(dim=-1).values
        if bool((srt_MK[:, 1:] == srt_MK[:, :-1]).any()):
            raise ValueError("sparse teacher ids must be distinct within a row (a top-k)")
    if bool(rows.logp_NK.isnan().any()):
        raise ValueError("sparse teacher logp is NaN at a loss row")
    m_M = rows.item_mass_N
    if not bool(((m_M >= 0) & (m_M <= 1 + 1e-4)).all()):
        raise ValueError("sparse teacher item_mass must lie in [0, 1] at loss rows (or is NaN)")
    return flat


@torch.no_grad()
def teacher_bins(
    logp_MK: Tensor,  # [M, K] D's untempered log-probs of its top-k (over all of U)
    tau: float,
    has_tail: bool,  # K < |U|: there is a tail bin
    dtype: torch.dtype,  # compute dtype
) -> tuple[Tensor, Tensor]:
    """log of D's K+1 tempered bins: ``(log d_MK [M, K], log d_tail_M [M])``.

    ``d ∝ (p_1, ..., p_K, r)^(1/τ)`` renormalised over the K+1 bins, with the tail mass
    ``r = clamp(1 − Σ_k p_k, 0, 1)``; without a tail (K = |U|) log d_tail is -inf and the K
    bins are renormalised (absorbing the rounding of stored log-probs).
    """
    lp_MK = logp_MK.to(dtype)
    if has_tail:
        r_M = (1.0 - lp_MK.exp().sum(-1)).clamp(0.0, 1.0)  # [M]
        lr_M = r_M.log()  # [M] -inf where r = 0
    else:
        lr_M = torch.full(lp_MK.shape[:1], float("-inf"), dtype=dtype, device=lp_MK.device)
    all_MB = torch.cat([lp_MK, lr_M.unsqueeze(1)], dim=1)  # [M, K+1]
    if tau != 1.0:
        all_MB = all_MB / tau
    logd_MB = all_MB - all_MB.logsumexp(-1, keepdim=True)  # [M, K+1]
    return logd_MB[:, :-1], logd_MB[:, -1]
