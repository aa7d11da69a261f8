"""The ConKD loss written the straightforward way: the benchmarks' baseline, not for training.

What someone writes without thinking about memory: three full log-softmaxes over ``[N, V]``
(student / τ, D / τ, and D untempered for the gate's item mass), R's item distribution
scattered into a dense ``[N, V]`` table, two full KL terms, the gate, the cross-entropy, and
autograd for the backward. Nothing is deliberately wasted (the gate's log-softmax is freed at
once), but the tempered log-softmaxes, p_D, the dense q, the cross-entropy's log-softmax and
the backward's [N, V] gradients are live together: about 7 fp32 ``[N, V]`` tensors beyond
the inputs. bench/bench_loss.py measures the other implementations against it.

Same function as :mod:`conkd_scale.loss.reference` for finite logits (tests/test_loss_naive.py);
unlike the reference it does not guard 0·log 0 where a logit is -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from conkd_scale.loss.common import IGNORE_INDEX, LossOutput, compute_dtype, flatten_inputs
from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.gates import gate


def conkd_loss_naive(
    student_logits: Tensor,  # [N, V] or [B, T, V] (needs grad)
    teacher_logits: Tensor,  # [N, V] or [B, T, V] D's logits (no grad)
    rec_probs_SI: Tensor,  # [S, I] R's item distribution per recommender turn
    rec_row: Tensor,  # [N] or [B, T] row of rec_probs for each loss row (-1 where no loss)
    item_ids_I: Tensor,  # [I] vocabulary ids of rec_probs' columns (no repeats)
    labels: Tensor,  # [N] or [B, T] gold next token, -100 where no loss
    cfg: LossConfig,
) -> LossOutput:
    """The ConKD loss over all N rows with dense ``[N, V]`` tensors (ignored rows masked)."""
    x = flatten_inputs(student_logits, teacher_logits, rec_probs_SI, rec_row, item_ids_I, labels)
    t_NV = x.teacher_dense().detach()  # dense D only (the benchmarks' baseline)
    dtype = compute_dtype(x.student_NV, t_NV)
    tau = float(cfg.tau)
    z_NV = x.student_NV.to(dtype)
    t_NV = t_NV.to(dtype)
    N, V = z_NV.shape
    valid_N = x.labels_N != IGNORE_INDEX  # [N]
    y_N = torch.where(valid_N, x.labels_N, 0)  # [N]
    r_N = x.rec_row_N.clamp_min(0)  # [N]

    logp_s_NV = F.log_softmax(z_NV / tau, dim=-1)  # [N, V] student, tempered
    logp_d_NV = F.log_softmax(t_NV / tau, dim=-1)  # [N, V] D, tempered
    # the gate's item mass from D's untempered log-softmax (a temporary, freed at once)
    m_N = F.log_softmax(t_NV, dim=-1)[:, x.item_ids_I].exp().sum(-1)  # [N]
    lam_N = gate(m_N, y_N, x.item_ids_I, cfg.gate) * valid_N  # [N]

    kl_d_N = (logp_d_NV.exp() * (logp_d_NV - logp_s_NV)).sum(-1)  # [N]
    q_SI = torch.softmax(torch.log(x.rec_probs_SI.to(dtype)) / tau, dim=-1)  # [S, I] q_R^τ
    q_NV = torch.zeros(N, V, dtype=dtype, device=z_NV.device)  # [N, V] q_R^τ over U
    if q_SI.shape[0] > 0:
        q_NV[:, x.item_ids_I] = q_SI[r_N]
    kl_r_N = (torch.xlogy(q_NV, q_NV) - q_NV * logp_s_NV).sum(-1)  # [N]

    ce_N = F.cross_entropy(z_NV, y_N, reduction="none")  # [N] untempered
    kd_d_N = tau**2 * (1 - lam_N) * kl_d_N  # [N]
    kd_r_N = tau**2 * lam_N * kl_r_N  # [N]
    w_N = valid_N.to(dtype)  # [N]
    M = int(valid_N.sum())
    denom = max(M, 1)
    loss = ((cfg.w_ce * ce_N + cfg.w_kd * (kd_d_N + kd_r_N)) * w_N).sum() / denom
    parts = [(p.detach() * w_N).sum() / denom for p in (ce_N, kd_d_N, kd_r_N)]
    return LossOutput(
        loss=loss,
        ce=parts[0],
        kd=parts[1] + parts[2],
        kd_dialog=parts[1],
        kd_rec=parts[2],
        lam_N=lam_N.float(),
        m_N=(m_N * valid_N).float(),
        n_tokens=M,
    )
