"""The ConKD loss on the CPU: rows in chunks, gradient computed in the forward.

Same function as :mod:`conkd_scale.loss.reference`. Per chunk of C loss rows (ARCHITECTURE.md
"The loss path"), one exp pass per distribution gives the student's and the dialogue
teacher's probabilities and log-sum-exps; the teacher's item mass m = exp(lse_items − lse_all)
is read off the same pass as Σ_items p_D (a [C, I] gather; τ ≠ 1 needs one more untempered
pass), then come the loss parts and the gradient with respect to the student logits::

    ∂L/∂z_t = [ w_ce·(p_S − e_{y_t}) + w_kd·τ·(p_S^τ − (1−λ_t)·p_D^τ − λ_t·q_R^τ) ] / N_valid

(q_R^τ scattered to the item columns). The gradient is stored in the student's dtype, in a
separate [N, V] buffer or, with ``inplace=True``, in the student-logits buffer itself; the
backward only scales it by ``grad_output``. Live fp32 memory beyond that is two [C, V]
scratch buffers (p_D^τ and p_S^τ; the KL's temporary goes into the chunk's gradient rows
before the gradient does) and a few [C, I] ones; a third [C, V] buffer (and two for row
gathers when some rows are ignored) when the gradient cannot be written in place per chunk.
R's table stays [S, I]: its rows are gathered per chunk. Teacher logits get no gradient;
rows with label -100 are skipped (gradient 0) and, when every row is ignored, the loss and
its parts are 0.

A sparse teacher (:class:`~.sparse.SparseTeacher`, D's top-k) replaces the teacher pass: per
chunk the K+1-bin KL of :mod:`.sparse` from a [C, K] gather of log p_S^τ and the student's
tail mass Σ_{v∉top-k} p_S^τ(v), summed directly (no 1 − Σ cancellation) from a copy of p_S^τ
with the top-k zeroed; that copy, scaled by d_tail / s_tail, is the tail part of the target.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from conkd_scale.loss.common import (
    IGNORE_INDEX,
    LossOutput,
    compute_dtype,
    flatten_inputs,
    loss_outputs,
    saved_grad_scaled,
)
from conkd_scale.loss.config import GateConfig, LossConfig
from conkd_scale.loss.gates import gate, item_mass
from conkd_scale.loss.sparse import SparseTeacher, teacher_bins


def _softmax_lse(x_CV: Tensor, out_CV: Tensor | None) -> tuple[Tensor, Tensor]:
    """(softmax(x) [C, V], logsumexp(x) [C]) from one fused softmax, into ``out_CV`` if given.

    lse = max(x) − log(max(p)): the largest probability is ≥ 1/V, so its log is exact.
    """
    if out_CV is None:
        p_CV = torch.softmax(x_CV, dim=-1)  # [C, V]
    else:
        p_CV = torch.ops.aten._softmax.out(x_CV, -1, False, out=out_CV)  # [C, V]
    lse_C = x_CV.amax(dim=-1) - p_CV.amax(dim=-1).log()  # [C]
    return p_CV, lse_C


def _chunk(
    z_CV: Tensor,  # [C, V] student logits (compute dtype; not modified before the grad)
    teacher: Tensor | SparseTeacher,  # [C, V] teacher logits (compute dtype; not modified),
    # or D's top-k [C, K] of the chunk's rows
    y_C: Tensor,  # [C] gold labels
    logq_CI: Tensor,  # [C, I] log q_R^τ of each row's turn (compute dtype)
    item_ids_I: Tensor,  # [I]
    work: list[Tensor],  # [≥C, V] scratch buffers (compute dtype): 2, or 3 without grad_out_CV
    grad_out_CV: Tensor | None,  # [C, V] where to write the gradient (compute dtype) or None
    gate_cfg: GateConfig,
    tau: float,
    w_ce: float,
    w_kd: float,
    inv_M: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss parts of one chunk and its gradient [C, V] (already / N_valid).

    The gradient goes into ``grad_out_CV`` when given (it may alias ``z_CV``: every read of
    z happens first; with dense logits it also holds the KL's temporary before), else into a
    scratch buffer. D's top-k gives the K+1-bin KL of :mod:`.sparse` and the stored m_t.
    Returns (grad_CV, ce_C, kd_d_C, kd_r_C, lam_C, m_C).
    """
    C, V = z_CV.shape
    sparse = isinstance(teacher, SparseTeacher)
    zt_CV = z_CV if tau == 1.0 else z_CV / tau  # [C, V] student logits / τ
    rows_C = torch.arange(C, device=z_CV.device)
    use_d, use_r = gate_cfg.mode != "rec", gate_cfg.mode != "dialog"

    # D's untempered item mass m (the gate's input): stored, or from p_D^τ and its lse.
    if sparse:
        m_C = teacher.item_mass_N.to(z_CV.dtype)  # [C] the stored exact m_t
    else:
        tt_CV = teacher if tau == 1.0 else teacher / tau  # [C, V] teacher logits / τ
        pd_CV, lse_tt_C = _softmax_lse(tt_CV, work[0][:C])  # [C, V], [C]
        # m = Σ_items p_D = exp(lse_items − lse_all) without the cancellation of two large lse's
        if tau == 1.0:
            m_C = pd_CV.index_select(1, item_ids_I).sum(-1)  # [C]
        else:
            m_C = item_mass(teacher, item_ids_I)  # [C]
    lam_C = gate(m_C, y_C, item_ids_I, gate_cfg)  # [C]

    # Student: p_S^τ and its lse; untempered lse and p_S for the cross-entropy.
    ps_CV, lse_s_C = _softmax_lse(zt_CV, work[1][:C])  # [C, V] p_S^τ, [C]
    psu_CV, lse_z_C = (None, lse_s_C) if tau == 1.0 else _softmax_lse(z_CV, None)
    ce_C = lse_z_C - z_CV[rows_C, y_C]  # [C]

    # KL(q_R^τ ‖ p_S^τ) over items only; p_S^τ normalised over U.
    q_CI = logq_CI.exp()  # [C, I]
    zero_C = torch.zeros_like(m_C)
    if use_r:
        logps_CI = zt_CV.index_select(1, item_ids_I).sub_(lse_s_C.unsqueeze(1))  # [C, I]
        kl_r_C = torch.sub(logq_CI, logps_CI, out=logps_CI).mul_(q_CI).nansum(dim=-1)  # [C]
        del logps_CI
    else:
        kl_r_C = zero_C

    if not use_d:
        kl_d_C = zero_C
    elif sparse:
        # K+1 bins: d from the stored log-probs, s from a [C, K] gather and the direct tail sum.
        ids_CK = teacher.ids_NK.long()  # [C, K]
        has_tail = teacher.k < V
        logd_CK, logd_tail_C = teacher_bins(teacher.logp_NK, tau, has_tail, z_CV.dtype)
        d_CK = logd_CK.exp()  # [C, K]
        logs_CK = zt_CV.gather(1, ids_CK).sub_(lse_s_C.unsqueeze(1))  # [C, K] log s_k
        kl_d_C = torch.where(d_CK > 0, d_CK * (logd_CK - logs_CK), 0.0).sum(-1)  # [C]
        rho_C = zero_C
        if has_tail:
            tail_CV = work[0][:C].copy_(ps_CV).scatter_(1, ids_CK, 0.0)  # [C, V] p_S^τ off top-k
            s_tail_C = tail_CV.sum(-1)  # [C]
            d_tail_C = logd_tail_C.exp()
            pos_C = d_tail_C > 0
            kl_d_C = kl_d_C + torch.where(pos_C, d_tail_C * (logd_tail_C - s_tail_C.log()), 0.0)
            rho_C = torch.where(pos_C & (s_tail_C > 0), d_tail_C / s_tail_C, 0.0)  # [C]
    else:
        # KL(p_D^τ ‖ p_S^τ) = Σ p_D·(tt − zt) + lse_s − lse_tt, the last read of z (its
        # temporary may overwrite z's rows). nansum drops 0·(±inf) = NaN, which only arises
        # where p_D = 0 (a NaN input would still poison ce through the lse).
        buf_tmp = grad_out_CV if grad_out_CV is not None else work[2][:C]
        diff_CV = torch.sub(tt_CV, zt_CV, out=buf_tmp).mul_(pd_CV)  # [C, V]
        kl_d_C = diff_CV.nansum(dim=-1) + (lse_s_C - lse_tt_C)  # [C]
        del diff_CV
    kd_d_C = tau**2 * torch.where(lam_C < 1, (1 - lam_C) * kl_d_C, zero_C)  # [C]
    kd_r_C = tau**2 * torch.where(lam_C > 0, lam_C * kl_r_C, zero_C)  # [C]

    # Gradient / N_valid: w_ce·(p_S − e_y) + a·(p_S^τ − (1−λ)·target_D − λ·q), a = w_kd·τ;
    # target_D = p_D^τ, or with D's top-k d_k on the top-k ids and ρ·p_S^τ on the tail
    # (ρ = d_tail / s_tail).
    a = w_kd * tau
    g_CV = ps_CV if grad_out_CV is None else grad_out_CV
    if psu_CV is None:
        torch.mul(ps_CV, (w_ce + a) * inv_M, out=g_CV)
    else:
        torch.mul(ps_CV, a * inv_M, out=g_CV).add_(psu_CV, alpha=w_ce * inv_M)
    if use_d and a != 0.0 and sparse:  # ids_CK, d_CK, tail_CV, rho_C from the KL above
        coef_C = -a * inv_M * (1 - lam_C)  # [C]
        if has_tail:
            g_CV.addcmul_(tail_CV, (coef_C * rho_C).unsqueeze(1))
        g_CV.scatter_add_(1, ids_CK, d_CK * coef_C.unsqueeze(1))
    elif use_d and a != 0.0:
        g_CV.addcmul_(pd_CV, (a * inv_M * (1 - lam_C)).unsqueeze(1), value=-1.0)
    if use_r and a != 0.0:
        g_CV.index_add_(1, item_ids_I, q_CI.mul_((-a * inv_M * lam_C).unsqueeze(1)))
    if w_ce != 0.0:
        g_CV[rows_C, y_C] -= w_ce * inv_M
    return g_CV, ce_C, kd_d_C, kd_r_C, lam_C, m_C


def _gather_rows(src_NV: Tensor, rows_C: Tensor, buf_CV: Tensor) -> Tensor:
    """``src_NV[rows_C]`` in the buffer's dtype, through the buffer when dtypes agree."""
    if src_NV.dtype == buf_CV.dtype:
        return torch.index_select(src_NV, 0, rows_C, out=buf_CV)
    return src_NV.index_select(0, rows_C).to(buf_CV.dtype)


class ConKDChunkedFunction(torch.autograd.Function):
    """autograd.Function of the chunked loss; see :func:`conkd_loss_chunked`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_NV: Tensor,  # [N, V]
        teacher_NV: Tensor | SparseTeacher,  # [N, V], or D's top-k [N, K]
        logq_SI: Tensor,  # [S, I] log q_R^τ
        rec_row_N: Tensor,  # [N]
        item_ids_I: Tensor,  # [I]
        labels_N: Tensor,  # [N]
        cfg: LossConfig,
        inplace: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        N, V = student_NV.shape
        sparse = isinstance(teacher_NV, SparseTeacher)
        dtype = compute_dtype(student_NV, *([] if sparse else [teacher_NV]))
        device = student_NV.device
        tau = float(cfg.tau)
        z_NV = student_NV.detach()  # shares storage (and version counter) with the input
        t_NV = None if sparse else teacher_NV.detach()

        valid_N = labels_N != IGNORE_INDEX  # [N]
        idx_M = valid_N.nonzero().squeeze(1)  # [M]
        M = idx_M.numel()
        all_valid = M == N
        inv_M = 1.0 / max(M, 1)

        grad_NV = z_NV if inplace else torch.empty_like(z_NV)  # ignored rows zeroed below

        sums = torch.zeros(3, dtype=dtype, device=device)  # Σ ce, Σ kd_dialog, Σ kd_rec
        lam_N = torch.zeros(N, dtype=torch.float32, device=device)
        m_N = torch.zeros(N, dtype=torch.float32, device=device)
        C = min(cfg.chunk_size, max(M, 1))
        direct = grad_NV.dtype == dtype  # gradient written straight into its final buffer
        # Scratch reused by every chunk (no per-chunk allocation, no page faults): p_D, p_S,
        # a temporary unless the chunk's gradient rows hold it, row gathers unless all valid.
        n_work = 5 if not all_valid else 2 if direct else 3
        work = [torch.empty(C, V, dtype=dtype, device=device) for _ in range(n_work)] if M else []
        for start in range(0, M, C):
            end = min(start + C, M)
            c = end - start
            if all_valid:
                rows: slice | Tensor = slice(start, end)
                z_CV = z_NV[start:end].to(dtype)
            else:
                rows = idx_M[start:end]
                z_CV = _gather_rows(z_NV, rows, work[3][:c])
            y_C, r_C = labels_N[rows], rec_row_N[rows]
            out_CV = grad_NV[start:end] if all_valid and direct else None
            logq_CI = logq_SI.index_select(0, r_C)
            if sparse:
                teacher_C: Tensor | SparseTeacher = teacher_NV.rows(rows)
            else:
                assert t_NV is not None
                teacher_C = t_NV[start:end].to(dtype) if all_valid else _gather_rows(
                    t_NV, rows, work[4][:c])  # fmt: skip
            g_CV, ce_C, kd_d_C, kd_r_C, lam_C, m_C = _chunk(
                z_CV, teacher_C, y_C, logq_CI, item_ids_I, work[:3], out_CV, cfg.gate, tau,
                cfg.w_ce, cfg.w_kd, inv_M,
            )  # fmt: skip
            if out_CV is None and all_valid:
                grad_NV[start:end].copy_(g_CV)  # casts to the gradient's dtype
            elif out_CV is None:
                grad_NV.index_copy_(0, rows, g_CV.to(grad_NV.dtype))
            sums[0] += ce_C.sum()
            sums[1] += kd_d_C.sum()
            sums[2] += kd_r_C.sum()
            lam_N[rows] = lam_C.float()
            m_N[rows] = m_C.float()
        del work
        if not all_valid:
            grad_NV.index_fill_(0, (~valid_N).nonzero().squeeze(1), 0.0)

        ctx.save_for_backward(grad_NV)
        ctx.inplace = inplace
        return loss_outputs(ctx, sums, inv_M, cfg, lam_N, m_N)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        return saved_grad_scaled(ctx, grad_loss), None, None, None, None, None, None, None


def conkd_loss_chunked(
    student_logits: Tensor,  # [N, V] or [B, T, V], any float dtype (needs grad)
    teacher_logits: Tensor | SparseTeacher,  # [N, V] or [B, T, V], D's logits (no grad), or
    # D's top-k with its exact item mass (loss/sparse.py)
    rec_probs_SI: Tensor,  # [S, I] R's item distribution per recommender turn
    rec_row: Tensor,  # [N] or [B, T] row of rec_probs for each loss row (-1 where no loss)
    item_ids_I: Tensor,  # [I] vocabulary id of each rec_probs column (any order)
    labels: Tensor,  # [N] or [B, T] gold next token, -100 where no loss
    cfg: LossConfig,
    *,
    inplace: bool = False,
) -> LossOutput:
    """The ConKD loss in chunks of ``cfg.chunk_size`` loss rows (CPU path; any device works).

    ``inplace=True`` writes the gradient into the student-logits buffer during the forward,
    so the logits' values are destroyed and the backward may run only once. Use it only for
    logits nothing else reads afterwards and no other autograd node saved (a matmul output
    is fine; autograd raises if a saved tensor was overwritten). It takes effect only when
    the logits flatten to [N, V] without a copy.
    """
    x = flatten_inputs(student_logits, teacher_logits, rec_probs_SI, rec_row, item_ids_I, labels)
    teacher, logq_SI = x.teacher_and_logq(float(cfg.tau))  # D, [S, I]
    loss, ce, kd, kd_d, kd_r, lam_N, m_N = ConKDChunkedFunction.apply(
        x.student_NV, teacher, logq_SI, x.rec_row_N, x.item_ids_I, x.labels_N, cfg,
        inplace,
    )  # fmt: skip
    return LossOutput(loss, ce, kd, kd_d, kd_r, lam_N, m_N, x.n_valid)
