"""The Triton ConKD kernel with a sparse dialogue teacher (D's top-k, loss/sparse.py).

Same function as :func:`conkd_scale.loss.reference.conkd_loss_reference` given a
:class:`~.sparse.SparseTeacher`. One program per row, as in :mod:`.triton_kernel`, but D is
never read densely:

1. sweep 1, online over V: the student's log-sum-exps (untempered; tempered when τ ≠ 1) and
   its tempered tail sum Σ_{v∉top-k} exp((z_v − max)/τ) with the same running max, so that
   log s_tail = log(tail sum) − log(all sum) has no 1 − Σ cancellation. Top-k membership of a
   column is a bit of a per-row bitmask ``[N, ⌈V/8⌉]`` uint8 (:func:`topk_bitmask`);
2. the K+1-bin KL from a [K] gather of the student logits at the top-k ids and D's tempered
   bins (computed on the host by :func:`~.sparse.teacher_bins`); λ from the stored m_t;
3. sweep 2: R's KL and the gradient of every tail column, ``p_S^τ·(1 − (1−λ)·ρ)`` with
   ρ = d_tail / s_tail (plus the cross-entropy and R's terms); top-k columns are not written;
4. after a barrier, the gradient at the K top-k columns, from the logits gathered in step 2
   (so the in-place mode, where the gradient overwrites the logits, reads nothing it wrote).
"""

from __future__ import annotations

import torch
from torch import Tensor

from conkd_scale.loss.common import compute_dtype
from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.sparse import SparseTeacher, teacher_bins
from conkd_scale.loss.triton_common import (
    cross_entropy,
    gate_lambda,
    launch_rows,
    log_sums,
    online_lse_step,
    rec_terms,
    store_grad,
    store_parts,
    student_block,
    student_grad,
    tl,
    triton,
    zero_row,
)

__all__ = ["conkd_row_kernel_sparse", "conkd_rows_sparse_", "topk_bitmask"]


def conkd_row_kernel_sparse(
    z_ptr,  # [N, V] student logits (any float dtype), unit column stride
    g_ptr,  # [N, V] out: ∂L/∂z in the gradient's dtype; may alias z_ptr
    ids_ptr,  # [N, K] int64 top-k ids of D (contiguous)
    logd_ptr,  # [N, K] log d_k: D's tempered top-k bins (compute dtype, contiguous)
    logdt_ptr,  # [N] log d_tail (compute dtype; -inf without a tail)
    mass_ptr,  # [N] D's stored item mass m_t (compute dtype)
    bits_ptr,  # [N, NB] uint8 top-k bitmask (bit v%8 of byte v//8), contiguous
    logq_ptr,  # [S, I] log q_R^τ (compute dtype), contiguous
    col_ptr,  # [V] int32 item column of each vocabulary id, -1 for words
    y_ptr,  # [N] int64 gold labels, -100 at ignored rows
    r_ptr,  # [N] int64 row of logq for each row (read only at loss rows)
    parts_ptr,  # [5, N] out (compute dtype): ce, kd_dialog, kd_rec, λ, m per row
    stride_z,  # row stride of z (elements)
    stride_g,  # row stride of g
    N,  # rows
    V,  # vocabulary size |U|
    I,  # items
    K,  # top-k size
    NB,  # bytes per bitmask row
    inv_tau,  # 1/τ
    tau_sq,  # τ²
    w_ce,  # weight of the cross-entropy
    a_kd,  # w_kd·τ: the KD gradient's factor
    inv_m,  # 1/N_valid (global, also for a chunk of a larger batch)
    eta,  # hard-gate threshold η
    c_static,  # static-gate λ
    GATE: tl.constexpr,  # GATE_CODES[mode]
    TEMPERED: tl.constexpr,  # τ != 1
    WRITE_GRAD: tl.constexpr,  # False: loss parts only, g_ptr untouched
    BLOCK_V: tl.constexpr,  # columns per block (power of two)
    BLOCK_K: tl.constexpr,  # next power of two ≥ K
    ACC: tl.constexpr,  # compute dtype: tl.float32 or tl.float64
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * stride_g
    bits_row = bits_ptr + row * NB
    y = tl.load(y_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    NEG_INF = float("-inf")

    if y == -100:  # no loss: zero gradient row, zero parts (D's row is never read)
        zero_row(g_row, parts_ptr, row, N, V, WRITE_GRAD, BLOCK_V, ACC)
    else:
        # ---- sweep 1: the student's log-sum-exps and its tempered tail sum --------------
        mz = tl.full([], NEG_INF, ACC)
        sz = tl.zeros([BLOCK_V], ACC)  # Σ exp(z − mz)
        szt = tl.zeros([BLOCK_V], ACC)  # Σ exp((z − mz)/τ)
        stl = tl.zeros([BLOCK_V], ACC)  # Σ_{v∉top-k} exp((z − mz)/τ)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=NEG_INF).to(ACC)
            byte = tl.load(bits_row + (offs >> 3), mask=mask, other=0).to(tl.int32)
            in_tail = ((byte >> (offs & 7)) & 1) == 0
            mz, sz, szt, _, _, rescale, ezt = online_lse_step(z, mz, sz, szt, inv_tau, TEMPERED)
            stl = stl * rescale + tl.where(in_tail, ezt, 0.0)
        log_sz, log_szt = log_sums(sz, szt, TEMPERED)
        s_tail_rel = tl.sum(stl, 0)  # s_tail · exp(log_szt)
        log_stail = tl.log(s_tail_rel) - log_szt  # log s_tail (-inf without a tail)

        # ---- the gate from the stored m_t ----------------------------------------------
        m = tl.load(mass_ptr + row).to(ACC)
        lam, use_d, use_r = gate_lambda(m, y, col_ptr, eta, c_static, GATE, ACC)
        ce = cross_entropy(z_row, y, mz, log_sz, ACC)
        logq_row = logq_ptr + tl.load(r_ptr + row) * I

        # ---- the K+1-bin KL: gather the student at the top-k (before any write) ---------
        kk = tl.arange(0, BLOCK_K)
        kmask = kk < K
        ids = tl.load(ids_ptr + row * K + kk, mask=kmask, other=0)
        logd = tl.load(logd_ptr + row * K + kk, mask=kmask, other=NEG_INF).to(ACC)
        z_k = tl.load(z_row + ids, mask=kmask, other=0.0).to(ACC)
        logs_k = (z_k - mz) * inv_tau - log_szt  # log s_k
        d_k = tl.exp(logd)
        kld = tl.sum(tl.where(d_k > 0.0, d_k * (logd - logs_k), 0.0), 0)
        logdt = tl.load(logdt_ptr + row).to(ACC)
        d_t = tl.exp(logdt)
        tail_ok = (d_t > 0.0) & (s_tail_rel > 0.0)
        kld += tl.where(d_t > 0.0, d_t * (logdt - log_stail), 0.0)
        rho = tl.where(tail_ok, tl.exp(logdt - log_stail), 0.0)  # d_tail / s_tail
        rho = tl.where(use_d, rho, 0.0)
        c_tail = 1.0 - (1.0 - lam) * rho  # the tail's KD factor: p_S^τ·(1 − (1−λ)·ρ)

        # ---- sweep 2: R's KL and the gradient of the tail columns -----------------------
        klr = tl.zeros([BLOCK_V], ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            logps, g = student_block(z_row, offs, mask, mz, log_sz, log_szt, inv_tau, w_ce, a_kd,
                                     c_tail, TEMPERED, ACC)  # fmt: skip
            g, klr = rec_terms(g, klr, col_ptr, logq_row, offs, mask, logps, a_kd, lam, use_r,
                               GATE, ACC)  # fmt: skip
            if WRITE_GRAD:
                byte = tl.load(bits_row + (offs >> 3), mask=mask, other=0).to(tl.int32)
                in_tail = ((byte >> (offs & 7)) & 1) == 0
                store_grad(g_row, offs, g, y, w_ce, inv_m, mask & in_tail)

        # ---- the gradient at the top-k columns (after every thread's sweep-2 reads) -----
        if WRITE_GRAD:
            tl.debug_barrier()
            g_k = student_grad(z_k, tl.exp(logs_k), mz, log_sz, w_ce, a_kd, 1.0, TEMPERED)
            if GATE != 5:
                g_k -= (a_kd * (1.0 - lam)) * d_k
            g_k, _ = rec_terms(g_k, tl.zeros([BLOCK_K], ACC), col_ptr, logq_row, ids, kmask,
                               logs_k, a_kd, lam, use_r, GATE, ACC)  # fmt: skip
            store_grad(g_row, ids, g_k, y, w_ce, inv_m, kmask)

        store_parts(parts_ptr, row, N, ce, kld, tl.sum(klr, 0), lam, m, use_d, use_r, tau_sq)


def topk_bitmask(
    ids_NK: Tensor,  # [N, K] distinct ids at loss rows
    V: int,
    valid_N: Tensor,  # [N] bool: loss rows (other rows' ids are not read)
) -> Tensor:
    """[N, ⌈V/8⌉] uint8: bit ``v % 8`` of byte ``v // 8`` is set when v is in the row's top-k
    (zeros at ignored rows). Distinct ids make the byte sums below a bitwise or."""
    N, _ = ids_NK.shape
    NB = (V + 7) // 8
    ids = torch.where(valid_N.unsqueeze(1), ids_NK.long(), 0)  # [N, K]
    bit = torch.where(valid_N.unsqueeze(1), 1 << (ids & 7), 0).to(torch.int32)  # [N, K]
    bytes_NB = torch.zeros(N, NB, dtype=torch.int32, device=ids_NK.device)
    bytes_NB.scatter_add_(1, ids >> 3, bit)
    return bytes_NB.to(torch.uint8)


def conkd_rows_sparse_(
    z_NV: Tensor,  # [N, V] student logits (any float dtype), unit column stride
    st: SparseTeacher,  # [N, K] flattened, checked (loss/sparse.py::check_sparse)
    logq_SI: Tensor,  # [S, I] log q_R^τ in the compute dtype
    rec_row_N: Tensor,  # [N] long
    col_V: Tensor,  # [V] int32 from item_column_map
    labels_N: Tensor,  # [N] long, -100 where no loss
    cfg: LossConfig,
    inv_m: float,  # 1/N_valid of the whole batch
    grad_NV: Tensor | None,  # [N, V] out: the gradient (may be z_NV itself), or None
) -> Tensor:
    """Launch the sparse kernel on N rows; returns the per-row parts ``[5, N]`` (compute
    dtype) as :func:`~.triton_kernel.conkd_rows_` does. No checks."""
    V = z_NV.shape[1]
    dtype = compute_dtype(z_NV)
    K = st.k
    valid_N = labels_N != -100
    logd_NK, logdt_N = teacher_bins(st.logp_NK, float(cfg.tau), K < V, dtype)  # [N, K], [N]
    v1 = valid_N.unsqueeze(1)
    logd_NK = torch.where(v1, logd_NK, float("-inf")).contiguous()  # garbage rows: inert
    logdt_N = torch.where(valid_N, logdt_N, float("-inf")).contiguous()
    mass_N = torch.where(valid_N, st.item_mass_N.to(dtype), 0.0).contiguous()
    ids_NK = torch.where(v1, st.ids_NK.long(), 0).contiguous()
    bits_NB = topk_bitmask(ids_NK, V, valid_N)
    return launch_rows(
        conkd_row_kernel_sparse, z_NV, grad_NV, logq_SI, col_V, labels_N, rec_row_N, cfg, inv_m,
        dtype, ids_ptr=ids_NK, logd_ptr=logd_NK, logdt_ptr=logdt_N, mass_ptr=mass_N,
        bits_ptr=bits_NB, K=K, NB=bits_NB.shape[1], BLOCK_K=triton.next_power_of_2(K),
    )  # fmt: skip
