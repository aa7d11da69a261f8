"""Pure-PyTorch ground truth of the ConKD student loss (METHOD.md "The student loss").

For each loss row t (``labels_N[t] != -100``), with p_S, p_D over U and q_R over items I::

    kd_t = τ² · [ (1 − λ_t) · KL(p_D^τ ‖ p_S^τ) + λ_t · KL(q_R^τ ‖ p_S^τ) ]
    ce_t = − log p_S(y_t)                                   (untempered)
    L    = Σ_t (w_ce · ce_t + w_kd · kd_t) / N_valid          (0 when N_valid = 0)

p^τ = softmax(logits / τ); q_R^τ ∝ q_R^(1/τ) over items. KL(q_R ‖ p_S) sums over items only
while p_S is normalised over all of U. Zero teacher probabilities contribute 0 (xlogy), also
where the student's logit is -inf; a term whose weight (1 − λ_t or λ_t) is 0 contributes 0
even if its KL is infinite. Autograd does the backward; every [N, V] temporary is live, so
this is for tests and small inputs (the chunked and Triton paths compute the same function).

D may also be a :class:`~.sparse.SparseTeacher` (its top-k, the offline cache): then λ_t comes
from the stored m_t and KL(p_D^τ ‖ p_S^τ) is the K+1-bin KL of :mod:`.sparse`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from conkd_scale.loss.common import (
    IGNORE_INDEX,
    LossOutput,
    compute_dtype,
    flatten_inputs,
    tempered_log_q,
)
from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.gates import gate, item_mass
from conkd_scale.loss.sparse import SparseTeacher, teacher_bins


def _xlogy_kl(p: Tensor, log_p: Tensor, log_s: Tensor) -> Tensor:
    """Σ_last p · (log_p − log_s), with 0 wherever p == 0 (also when both logs are -inf)."""
    return torch.where(p > 0, p * (log_p - log_s), 0.0).sum(-1)


def _sparse_kl(
    logp_s_MV: Tensor,  # [M, V] log p_S^τ
    st: SparseTeacher,  # [M, K] D's top-k at the loss rows
    tau: float,
) -> Tensor:
    """[M] the K+1-bin KL(d ‖ s) of :mod:`.sparse` (differentiable in ``logp_s_MV``)."""
    V = logp_s_MV.shape[1]
    has_tail = st.k < V
    ids_MK = st.ids_NK.long()
    logd_MK, logd_tail_M = teacher_bins(st.logp_NK, tau, has_tail, logp_s_MV.dtype)
    kl_M = _xlogy_kl(logd_MK.exp(), logd_MK, logp_s_MV.gather(1, ids_MK))  # [M]
    if has_tail:
        tail_MV = logp_s_MV.scatter(1, ids_MK, float("-inf"))  # [M, V] log p_S^τ off the top-k
        log_s_tail_M = tail_MV.logsumexp(-1)  # [M]
        d_tail_M = logd_tail_M.exp()
        kl_M = kl_M + _xlogy_kl(d_tail_M[:, None], logd_tail_M[:, None], log_s_tail_M[:, None])
    return kl_M


def conkd_loss_reference(
    student_logits: Tensor,  # [N, V] or [B, T, V], any float dtype (needs grad)
    teacher_logits: Tensor | SparseTeacher,  # [N, V] or [B, T, V] D's logits (no grad), or
    # D's top-k ([N, K] or [B, T, K]) with its exact item mass
    rec_probs_SI: Tensor,  # [S, I] R's item distribution per recommender turn (rows sum to 1)
    rec_row: Tensor,  # [N] or [B, T] row of rec_probs for each loss row (-1 where no loss)
    item_ids_I: Tensor,  # [I] vocabulary id of each rec_probs column (any order)
    labels: Tensor,  # [N] or [B, T] gold next token, -100 where no loss
    cfg: LossConfig,
) -> LossOutput:
    """The ConKD loss and its parts, computed naively with autograd (ground truth)."""
    x = flatten_inputs(student_logits, teacher_logits, rec_probs_SI, rec_row, item_ids_I, labels)
    st = x.sparse
    dtype = compute_dtype(x.student_NV, *([x.teacher_NV] if st is None else []))
    tau = float(cfg.tau)
    N = x.labels_N.numel()

    valid_N = x.labels_N != IGNORE_INDEX  # [N]
    idx_M = valid_N.nonzero().squeeze(1)  # [M] loss rows
    M = idx_M.numel()
    z_MV = x.student_NV.index_select(0, idx_M).to(dtype)  # [M, V]
    y_M = x.labels_N[idx_M]  # [M]
    r_M = x.rec_row_N[idx_M]  # [M]
    logp_s_MV = F.log_softmax(z_MV / tau if tau != 1.0 else z_MV, dim=-1)  # [M, V]

    if st is None:
        t_MV = x.teacher_dense().detach().index_select(0, idx_M).to(dtype)  # [M, V]
        m_M = item_mass(t_MV, x.item_ids_I)  # [M]
        logp_d_MV = F.log_softmax(t_MV / tau if tau != 1.0 else t_MV, dim=-1)  # [M, V]
        kl_d_M = _xlogy_kl(logp_d_MV.exp(), logp_d_MV, logp_s_MV)  # [M]
    else:
        st_M = st.rows(idx_M)
        m_M = st_M.item_mass_N.to(dtype)  # [M] the stored exact m_t
        kl_d_M = _sparse_kl(logp_s_MV, st_M, tau)  # [M]
    lam_M = gate(m_M, y_M, x.item_ids_I, cfg.gate)  # [M]

    ce_M = F.cross_entropy(z_MV, y_M, reduction="none")  # [M]

    logq_MI = tempered_log_q(x.rec_probs_SI, tau, dtype)[r_M]  # [M, I]
    logp_s_MI = logp_s_MV.index_select(1, x.item_ids_I)  # [M, I]
    kl_r_M = _xlogy_kl(logq_MI.exp(), logq_MI, logp_s_MI)  # [M]

    zero_M = torch.zeros_like(kl_d_M)
    kd_d_M = tau**2 * torch.where(lam_M < 1, (1 - lam_M) * kl_d_M, zero_M)  # [M]
    kd_r_M = tau**2 * torch.where(lam_M > 0, lam_M * kl_r_M, zero_M)  # [M]
    kd_M = kd_d_M + kd_r_M

    denom = max(M, 1)
    loss = (cfg.w_ce * ce_M + cfg.w_kd * kd_M).sum() / denom
    lam_N = torch.zeros(N, dtype=torch.float32, device=lam_M.device)
    m_N = torch.zeros(N, dtype=torch.float32, device=m_M.device)
    lam_N[idx_M] = lam_M.float()
    m_N[idx_M] = m_M.float()
    return LossOutput(
        loss=loss,
        ce=ce_M.detach().sum() / denom,
        kd=kd_M.detach().sum() / denom,
        kd_dialog=kd_d_M.detach().sum() / denom,
        kd_rec=kd_r_M.detach().sum() / denom,
        lam_N=lam_N,
        m_N=m_N,
        n_tokens=M,
    )
