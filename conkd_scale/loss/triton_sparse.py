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

from typing import Any

import torch
from torch import Tensor

from conkd_scale.loss.common import compute_dtype
from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.sparse import SparseTeacher, teacher_bins
from conkd_scale.loss.triton_kernel import GATE_CODES, N_PARTS, _acc_of, launch_config

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

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
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(g_row + offs, tl.zeros([BLOCK_V], ACC).to(g_ptr.dtype.element_ty),
                         mask=offs < V)  # fmt: skip
        for k in range(5):
            tl.store(parts_ptr + k * N + row, tl.zeros([], ACC))
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
            mz_new = tl.maximum(mz, tl.max(z, 0))
            base_z = tl.where(mz_new == NEG_INF, 0.0, mz_new)
            dz = z - base_z
            ez = tl.exp(dz)
            sz = sz * tl.exp(mz - base_z) + ez
            if TEMPERED:
                rescale = tl.exp((mz - base_z) * inv_tau)
                ezt = tl.exp(dz * inv_tau)
                szt = szt * rescale + ezt
            else:
                rescale = tl.exp(mz - base_z)
                ezt = ez
            stl = stl * rescale + tl.where(in_tail, ezt, 0.0)
            mz = mz_new
        log_sz = tl.log(tl.sum(sz, 0))
        if TEMPERED:  # noqa: SIM108 (a compile-time branch)
            log_szt = tl.log(tl.sum(szt, 0))
        else:
            log_szt = log_sz
        s_tail_rel = tl.sum(stl, 0)  # s_tail · exp(log_szt)
        log_stail = tl.log(s_tail_rel) - log_szt  # log s_tail (-inf without a tail)

        # ---- the gate from the stored m_t ----------------------------------------------
        m = tl.load(mass_ptr + row).to(ACC)
        if GATE == 0:
            lam = tl.where(m > eta, 1.0, 0.0).to(ACC)
        elif GATE == 1:
            lam = m
        elif GATE == 2:
            lam = tl.full([], 0.0, ACC) + c_static
        elif GATE == 3:
            lam = tl.where(tl.load(col_ptr + y) >= 0, 1.0, 0.0).to(ACC)
        elif GATE == 4:
            lam = tl.zeros([], ACC)
        else:
            lam = tl.full([], 1.0, ACC)
        use_d = lam < 1.0
        use_r = lam > 0.0

        z_y = tl.load(z_row + y).to(ACC)
        ce = (mz - z_y) + log_sz
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

        # ---- sweep 2: R's KL and the gradient of the tail columns -----------------------
        klr = tl.zeros([BLOCK_V], ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=NEG_INF).to(ACC)
            logps = (z - mz) * inv_tau - log_szt
            ps = tl.exp(logps)
            if TEMPERED:
                g = w_ce * tl.exp((z - mz) - log_sz) + a_kd * ps * (1.0 - (1.0 - lam) * rho)
            else:
                g = (w_ce + a_kd * (1.0 - (1.0 - lam) * rho)) * ps
            if GATE != 4:  # noqa: SIM102
                if use_r:
                    col = tl.load(col_ptr + offs, mask=mask, other=-1)
                    is_item = col >= 0
                    logq = tl.load(logq_row + col, mask=is_item, other=NEG_INF).to(ACC)
                    q = tl.exp(logq)
                    klr += tl.where(q > 0.0, q * (logq - logps), 0.0)
                    g -= (a_kd * lam) * q
            if WRITE_GRAD:
                byte = tl.load(bits_row + (offs >> 3), mask=mask, other=0).to(tl.int32)
                in_tail = ((byte >> (offs & 7)) & 1) == 0
                g = tl.where(offs == y, g - w_ce, g) * inv_m
                tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask & in_tail)

        # ---- the gradient at the top-k columns (after every thread's sweep-2 reads) -----
        if WRITE_GRAD:
            tl.debug_barrier()
            ps_k = tl.exp(logs_k)
            if TEMPERED:
                g_k = w_ce * tl.exp((z_k - mz) - log_sz) + a_kd * ps_k
            else:
                g_k = (w_ce + a_kd) * ps_k
            if GATE != 5:
                g_k -= (a_kd * (1.0 - lam)) * d_k
            if GATE != 4:  # noqa: SIM102
                if use_r:
                    col_k = tl.load(col_ptr + ids, mask=kmask, other=-1)
                    q_k = tl.exp(tl.load(logq_row + col_k, mask=col_k >= 0, other=NEG_INF).to(ACC))
                    g_k -= (a_kd * lam) * q_k
            g_k = tl.where(ids == y, g_k - w_ce, g_k) * inv_m
            tl.store(g_row + ids, g_k.to(g_ptr.dtype.element_ty), mask=kmask)

        kd_d = tl.where(use_d, tau_sq * (1.0 - lam) * kld, 0.0)
        kd_r = tl.where(use_r, tau_sq * lam * tl.sum(klr, 0), 0.0)
        tl.store(parts_ptr + row, ce)
        tl.store(parts_ptr + N + row, kd_d)
        tl.store(parts_ptr + 2 * N + row, kd_r)
        tl.store(parts_ptr + 3 * N + row, lam)
        tl.store(parts_ptr + 4 * N + row, m)


_JITTED: dict[bool, Any] = {}


def _kernel() -> Any:
    """The jitted sparse kernel for the current interpreter mode (jitted on first use)."""
    from conkd_scale.loss.triton_kernel import _interpret_mode

    mode = _interpret_mode()
    if mode not in _JITTED:
        _JITTED[mode] = triton.jit(conkd_row_kernel_sparse)
    return _JITTED[mode]


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
    N, V = z_NV.shape
    dtype = compute_dtype(z_NV)
    parts_5N = torch.empty(N_PARTS, N, dtype=dtype, device=z_NV.device)
    if N == 0:
        return parts_5N
    K = st.k
    valid_N = labels_N != -100
    tau = float(cfg.tau)
    logd_NK, logdt_N = teacher_bins(st.logp_NK, tau, K < V, dtype)  # [N, K], [N]
    v1 = valid_N.unsqueeze(1)
    logd_NK = torch.where(v1, logd_NK, float("-inf")).contiguous()  # garbage rows: inert
    logdt_N = torch.where(valid_N, logdt_N, float("-inf")).contiguous()
    mass_N = torch.where(valid_N, st.item_mass_N.to(dtype), 0.0).contiguous()
    ids_NK = torch.where(v1, st.ids_NK.long(), 0).contiguous()
    bits_NB = topk_bitmask(ids_NK, V, valid_N)
    write_grad = grad_NV is not None
    g_NV = grad_NV if grad_NV is not None else z_NV
    assert z_NV.stride(-1) == 1 and g_NV.stride(-1) == 1
    block, warps = launch_config(V, 8 if dtype == torch.float64 else 4)
    logq_SI = logq_SI.contiguous()
    if logq_SI.numel() == 0:
        logq_SI = torch.full((1, 1), float("-inf"), dtype=dtype, device=z_NV.device)
    _kernel()[(N,)](
        z_NV, g_NV, ids_NK, logd_NK, logdt_N, mass_N, bits_NB, logq_SI, col_V,
        labels_N.contiguous(), rec_row_N.contiguous(), parts_5N, z_NV.stride(0),
        g_NV.stride(0), N, V, logq_SI.shape[1], K, bits_NB.shape[1], 1.0 / tau, tau * tau,
        float(cfg.w_ce), float(cfg.w_kd) * tau, float(inv_m), float(cfg.gate.threshold),
        float(cfg.gate.c), GATE=GATE_CODES[cfg.gate.mode], TEMPERED=tau != 1.0,
        WRITE_GRAD=write_grad, BLOCK_V=block, BLOCK_K=triton.next_power_of_2(K),
        ACC=_acc_of(dtype), num_warps=warps,
    )  # fmt: skip
    return parts_5N
