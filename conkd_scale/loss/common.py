"""Pieces shared by every implementation of the ConKD loss: output type, input checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.sparse import SparseTeacher, check_sparse

IGNORE_INDEX = -100
"""Label of positions without loss (same value as ``conkd_scale.data.sequences.IGNORE``)."""


@dataclass
class LossOutput:
    """The loss and its parts. Means are over the N_valid response tokens (0 when none)."""

    loss: Tensor  # [] differentiable: w_ce·ce + w_kd·kd
    ce: Tensor  # [] detached: mean −log p_S(y_t), untempered
    kd: Tensor  # [] detached: mean kd_t = kd_dialog + kd_rec
    kd_dialog: Tensor  # [] detached: mean τ²·(1−λ_t)·KL(p_D^τ ‖ p_S^τ)
    kd_rec: Tensor  # [] detached: mean τ²·λ_t·KL(q_R^τ ‖ p_S^τ)
    lam_N: Tensor  # [N] gate λ_t (fp32; 0 at ignored rows)
    m_N: Tensor  # [N] D's untempered item mass m_t (fp32; 0 at ignored rows)
    n_tokens: int  # N_valid


@dataclass
class FlatInputs:
    """The loss inputs flattened to rows, checked for shape. D comes either as dense logits
    (``teacher_NV``) or as a top-k (``sparse``, ``teacher_NV`` is then None)."""

    student_NV: Tensor  # [N, V]
    teacher_NV: Tensor | None  # [N, V], None with a sparse teacher
    rec_probs_SI: Tensor  # [S, I]
    rec_row_N: Tensor  # [N] long
    item_ids_I: Tensor  # [I] long
    labels_N: Tensor  # [N] long
    sparse: SparseTeacher | None = None  # [N, K] rows of a sparse teacher (checked)

    def teacher_dense(self) -> Tensor:
        """``teacher_NV`` of a dense teacher (for code paths without sparse support)."""
        if self.teacher_NV is None:
            raise TypeError("this loss path needs dense teacher logits, not a SparseTeacher")
        return self.teacher_NV

    @property
    def n_valid(self) -> int:
        """N_valid: the rows with a loss."""
        return int((self.labels_N != IGNORE_INDEX).sum())

    def teacher_and_logq(self, tau: float) -> tuple[Tensor | SparseTeacher, Tensor]:
        """D as the loss Functions take it (the top-k rows, or the logits ``[N, V]``) and
        log q_R^τ ``[S, I]`` in the compute dtype of the student's and D's logits."""
        teacher = self.sparse if self.sparse is not None else self.teacher_dense()
        dtype = compute_dtype(self.student_NV, *([] if self.sparse is not None else [teacher]))
        return teacher, tempered_log_q(self.rec_probs_SI, tau, dtype)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_rows(
    labels_N: Tensor,  # [N] long gold tokens, -100 where no loss
    rec_row_N: Tensor,  # [N] long row of rec_probs for each loss row
    item_ids_I: Tensor,  # [I] vocabulary ids of the items
    S: int,  # rows of rec_probs
    V: int,  # vocabulary size
) -> None:
    """Check the index ranges of the loss inputs (every implementation's entry runs this).

    Raises ``ValueError`` on an item id outside ``[0, V)``, a label of a loss row outside
    ``[0, V)``, or a loss row whose ``rec_row`` is not in ``[0, S)``.
    """
    I = item_ids_I.numel()
    if I > 0 and (int(item_ids_I.min()) < 0 or int(item_ids_I.max()) >= V):
        raise ValueError(f"item ids must lie in [0, {V})")
    valid_N = labels_N != IGNORE_INDEX  # [N]
    if bool(valid_N.any()):
        y_M, r_M = labels_N[valid_N], rec_row_N[valid_N]  # [M], [M]
        if int(y_M.min()) < 0 or int(y_M.max()) >= V:
            raise ValueError(f"labels of loss rows must lie in [0, {V}) (or be {IGNORE_INDEX})")
        if int(r_M.min()) < 0 or int(r_M.max()) >= S:
            raise ValueError(
                f"every loss row needs a recommender-turn row in [0, {S}) in rec_row "
                f"(got {int(r_M.min())}..{int(r_M.max())})"
            )


def flatten_inputs(
    student_logits: Tensor,  # [..., V]
    teacher_logits: Tensor | SparseTeacher,  # [..., V] or a top-k of [..., K]
    rec_probs_SI: Tensor,  # [S, I]
    rec_row: Tensor,  # [...]
    item_ids_I: Tensor,  # [I]
    labels: Tensor,  # [...]
) -> FlatInputs:
    """Flatten ``[B, T, V]`` / ``[N, V]`` inputs to rows and check shapes and index ranges.

    Raises ``ValueError`` on a shape mismatch or an index out of range (:func:`check_rows`,
    and :func:`~.sparse.check_sparse` for a sparse teacher).
    """
    V = student_logits.shape[-1]
    sparse = isinstance(teacher_logits, SparseTeacher)
    if not sparse and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} must have the same shape"
        )
    lead = student_logits.shape[:-1]
    if labels.shape != lead or rec_row.shape != lead:
        raise ValueError(
            f"labels {tuple(labels.shape)} and rec_row {tuple(rec_row.shape)} must have the "
            f"logits' leading shape {tuple(lead)}"
        )
    if item_ids_I.dim() != 1 or rec_probs_SI.dim() != 2:
        raise ValueError("item_ids must be [I] and rec_probs [S, I]")
    I = item_ids_I.numel()
    if rec_probs_SI.shape[1] != I:
        raise ValueError(f"rec_probs has {rec_probs_SI.shape[1]} columns but there are {I} items")
    labels_N = labels.reshape(-1).long()
    rec_row_N = rec_row.reshape(-1).long()
    check_rows(labels_N, rec_row_N, item_ids_I, rec_probs_SI.shape[0], V)
    student_NV = student_logits.reshape(-1, V)
    items_I = item_ids_I.long()
    if isinstance(teacher_logits, SparseTeacher):
        st = check_sparse(teacher_logits, tuple(lead), V, labels_N != IGNORE_INDEX)
        return FlatInputs(student_NV, None, rec_probs_SI, rec_row_N, items_I, labels_N, st)
    teacher_NV = teacher_logits.reshape(-1, V)
    return FlatInputs(student_NV, teacher_NV, rec_probs_SI, rec_row_N, items_I, labels_N)


def tempered_log_q(rec_probs_SI: Tensor, tau: float, dtype: torch.dtype) -> Tensor:
    """log q_R^τ: ``log q / τ`` renormalised over items (zero probabilities stay -inf)."""
    with torch.no_grad():
        logq_SI = torch.log(rec_probs_SI.detach().to(dtype))  # [S, I]
        if tau != 1.0:
            logq_SI = logq_SI / tau
        return torch.log_softmax(logq_SI, dim=-1)  # [S, I]


def saved_grad_scaled(ctx: Any, grad_loss: Tensor) -> Tensor:
    """Backward of a loss whose forward saved d loss / d logits: that gradient × grad_loss.

    With ``ctx.inplace`` the saved buffer is the caller's logits buffer and is scaled in place
    (a single backward only).
    """
    (grad_NV,) = ctx.saved_tensors
    if torch.equal(grad_loss, torch.ones_like(grad_loss)):
        return grad_NV
    scale = grad_loss.to(grad_NV.dtype)
    return grad_NV.mul_(scale) if ctx.inplace else grad_NV * scale


def loss_outputs(
    ctx: Any,
    sums_3: Tensor,  # [3] Σ over rows of ce, kd_dialog, kd_rec
    inv_m: float,  # 1/N_valid
    cfg: LossConfig,
    lam_N: Tensor,  # [N]
    m_N: Tensor,  # [N]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss Functions' forward outputs (loss, ce, kd, kd_dialog, kd_rec, λ, m): means over
    N_valid, ``loss = w_ce·ce + w_kd·kd``; all but the loss marked non-differentiable."""
    means_3 = sums_3 * inv_m
    ce, kd_d, kd_r = means_3[0], means_3[1], means_3[2]
    kd = kd_d + kd_r
    loss = cfg.w_ce * ce + cfg.w_kd * kd
    ctx.mark_non_differentiable(ce, kd, kd_d, kd_r, lam_N, m_N)
    return loss, ce, kd, kd_d, kd_r, lam_N, m_N
