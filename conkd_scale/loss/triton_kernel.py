"""The ConKD loss as one Triton kernel: both teachers, the gate and the gradient, per row.

Same function as :mod:`conkd_scale.loss.reference` (the ground truth). One program per row of
the student logits; two sweeps over the row in blocks of ``BLOCK_V`` columns:

1. online softmax over V: the student's log-sum-exp (untempered for the cross-entropy, and
   tempered when τ ≠ 1, sharing one running max), the dialogue teacher's tempered
   log-sum-exp, and the teacher's untempered all-vocabulary and item-only sums. The item mass
   is their ratio, ``m = exp(lse_items − lse_all)``, so the gate λ costs no extra pass
   (items are found through a ``[V]`` vocabulary→item-column map, -1 for words);
2. the loss parts and the gradient with respect to the student logits::

       kd_t  = τ²·[(1−λ)·Σ_V p_D^τ·(log p_D^τ − log p_S^τ) + λ·Σ_I q^τ·(log q^τ − log p_S^τ)]
       ∂L/∂z = [ w_ce·(p_S − e_y) + w_kd·τ·(p_S^τ − (1−λ)·p_D^τ − λ·q^τ) ] / N_valid

   written in the student's dtype into a gradient buffer (the student-logits buffer itself
   with ``inplace=True``). A row whose λ is 1 never reloads the teacher; one whose λ is 0
   never reads R's table.

R's distribution stays an ``[S, I]`` table (tempered and logged on the host, a few MB) read
through the per-row turn index; it is never expanded to N rows. The backward only scales the
stored gradient by ``grad_output``. Loads are upcast to fp32 (fp64 for fp64 inputs; the
kernel's scalar parameters are fp32 either way).

On a machine without CUDA the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``
in the environment before the first launch; slow, for tests). Triton reads that variable
when ``triton.jit`` is applied, so the kernel is jitted lazily, per interpreter mode, at its
first launch rather than at import.

A sparse dialogue teacher (:class:`~.sparse.SparseTeacher`, D's top-k) runs the kernel of
:mod:`.triton_sparse` instead, through the same autograd.Function.

This module holds the kernel, its launcher and its autograd.Function. Which implementation
runs is :func:`conkd_scale.loss.dispatch.resolve_impl`'s choice; the ``nn.Module`` wrapper is
:class:`conkd_scale.loss.module.ConKDLoss` and the ahead-of-time compiler
:func:`conkd_scale.loss.aot.aot_compile`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from conkd_scale.loss.common import (
    IGNORE_INDEX,
    LossOutput,
    compute_dtype,
    flatten_inputs,
    saved_grad_scaled,
    tempered_log_q,
)
from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.sparse import SparseTeacher

try:  # triton is a declared dependency, but keep CPU-only installs importable
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

__all__ = [
    "GATE_CODES",
    "HAVE_TRITON",
    "ConKDTritonFunction",
    "conkd_loss_triton",
    "conkd_row_kernel",
    "conkd_rows_",
    "item_column_map",
    "kernel_available",
    "launch_config",
]

GATE_CODES = {"hard": 0, "soft": 1, "static": 2, "oracle": 3, "dialog": 4, "rec": 5}
"""Gate mode → the kernel's ``GATE`` constexpr."""

N_PARTS = 5
"""Per-row outputs of the kernel, in this order: ce, kd_dialog, kd_rec, λ, m."""


# The kernel as a plain function: _kernel() jits it per interpreter mode, aot.py compiles it.
def conkd_row_kernel(
    z_ptr,  # [N, V] student logits (any float dtype), unit column stride
    t_ptr,  # [N, V] dialogue-teacher logits (any float dtype), unit column stride
    g_ptr,  # [N, V] out: ∂L/∂z in the gradient's dtype; may alias z_ptr
    logq_ptr,  # [S, I] log q_R^τ (compute dtype), contiguous
    col_ptr,  # [V] int32 item column of each vocabulary id, -1 for words
    y_ptr,  # [N] int64 gold labels, -100 at ignored rows
    r_ptr,  # [N] int64 row of logq for each row (read only at loss rows)
    parts_ptr,  # [5, N] out (compute dtype): ce, kd_dialog, kd_rec, λ, m per row
    stride_z,  # row stride of z (elements)
    stride_t,  # row stride of t
    stride_g,  # row stride of g
    N,  # rows
    V,  # vocabulary size |U|
    I,  # items
    inv_tau,  # 1/τ
    tau_sq,  # τ²
    w_ce,  # weight of the cross-entropy
    a_kd,  # w_kd·τ: the KD gradient's factor
    inv_m,  # 1/N_valid (global, also for a chunk of a larger batch)
    eta,  # hard-gate threshold η
    c_static,  # static-gate λ
    GATE: tl.constexpr,  # GATE_CODES[mode]
    TEMPERED: tl.constexpr,  # τ != 1
    WRITE_GRAD: tl.constexpr,  # False: loss parts only (no_grad / eval), g_ptr untouched
    BLOCK_V: tl.constexpr,  # columns per block (power of two)
    ACC: tl.constexpr,  # compute dtype: tl.float32 or tl.float64
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * stride_g
    y = tl.load(y_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    NEG_INF = float("-inf")

    if y == -100:  # no loss: zero gradient row, zero parts
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(g_row + offs, tl.zeros([BLOCK_V], ACC).to(g_ptr.dtype.element_ty),
                         mask=offs < V)  # fmt: skip
        for k in range(5):
            tl.store(parts_ptr + k * N + row, tl.zeros([], ACC))
    else:
        # ---- sweep 1: online log-sum-exps of the student and the teacher ----------------
        # Running maxima are scalars (one reduction per block and tensor); the sums stay
        # per-lane vectors rescaled by the scalar factor and are reduced once at the end.
        mz = tl.full([], NEG_INF, ACC)  # running max of z
        mt = tl.full([], NEG_INF, ACC)  # running max of t
        sz = tl.zeros([BLOCK_V], ACC)  # Σ exp(z − mz)
        szt = tl.zeros([BLOCK_V], ACC)  # Σ exp((z − mz)/τ)
        st = tl.zeros([BLOCK_V], ACC)  # Σ exp(t − mt)          (untempered, all of U)
        sti = tl.zeros([BLOCK_V], ACC)  # Σ_items exp(t − mt)   (untempered, items only)
        stt = tl.zeros([BLOCK_V], ACC)  # Σ exp((t − mt)/τ)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=NEG_INF).to(ACC)
            t = tl.load(t_row + offs, mask=mask, other=NEG_INF).to(ACC)
            is_item = tl.load(col_ptr + offs, mask=mask, other=-1) >= 0

            mz_new = tl.maximum(mz, tl.max(z, 0))
            base_z = tl.where(mz_new == NEG_INF, 0.0, mz_new)  # finite: no (-inf) − (-inf)
            dz = z - base_z
            sz = sz * tl.exp(mz - base_z) + tl.exp(dz)
            if TEMPERED:
                szt = szt * tl.exp((mz - base_z) * inv_tau) + tl.exp(dz * inv_tau)
            mz = mz_new

            mt_new = tl.maximum(mt, tl.max(t, 0))
            base_t = tl.where(mt_new == NEG_INF, 0.0, mt_new)
            dt = t - base_t
            et = tl.exp(dt)
            rescale_t = tl.exp(mt - base_t)
            st = st * rescale_t + et
            sti = sti * rescale_t + tl.where(is_item, et, 0.0)
            if TEMPERED:
                stt = stt * tl.exp((mt - base_t) * inv_tau) + tl.exp(dt * inv_tau)
            mt = mt_new
        log_sz = tl.log(tl.sum(sz, 0))
        st_all = tl.sum(st, 0)
        if TEMPERED:
            log_szt = tl.log(tl.sum(szt, 0))
            log_stt = tl.log(tl.sum(stt, 0))
        else:
            log_szt = log_sz
            log_stt = tl.log(st_all)
        m = tl.sum(sti, 0) / st_all  # D's untempered item mass: exp(lse_items − lse_all)

        # ---- the gate ------------------------------------------------------------------
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

        z_y = tl.load(z_row + y).to(ACC)
        ce = (mz - z_y) + log_sz  # lse(z) − z_y without subtracting two large numbers
        logq_row = logq_ptr + tl.load(r_ptr + row) * I

        # ---- sweep 2: KL terms and the gradient -----------------------------------------
        kld = tl.zeros([BLOCK_V], ACC)
        klr = tl.zeros([BLOCK_V], ACC)
        use_d = lam < 1.0
        use_r = lam > 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=NEG_INF).to(ACC)
            logps = (z - mz) * inv_tau - log_szt  # log p_S^τ
            ps = tl.exp(logps)
            if TEMPERED:  # noqa: SIM108 (a compile-time branch)
                g = w_ce * tl.exp((z - mz) - log_sz) + a_kd * ps
            else:
                g = (w_ce + a_kd) * ps
            if GATE != 5:  # noqa: SIM102 (compile time, then run time)
                if use_d:
                    t = tl.load(t_row + offs, mask=mask, other=NEG_INF).to(ACC)
                    logpd = (t - mt) * inv_tau - log_stt  # log p_D^τ
                    pd = tl.exp(logpd)
                    kld += tl.where(pd > 0.0, pd * (logpd - logps), 0.0)
                    g -= (a_kd * (1.0 - lam)) * pd
            if GATE != 4:  # noqa: SIM102
                if use_r:
                    col = tl.load(col_ptr + offs, mask=mask, other=-1)
                    is_item = col >= 0
                    logq = tl.load(logq_row + col, mask=is_item, other=NEG_INF).to(ACC)
                    q = tl.exp(logq)
                    klr += tl.where(q > 0.0, q * (logq - logps), 0.0)
                    g -= (a_kd * lam) * q
            if WRITE_GRAD:
                g = tl.where(offs == y, g - w_ce, g) * inv_m
                tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)

        kd_d = tl.where(use_d, tau_sq * (1.0 - lam) * tl.sum(kld, 0), 0.0)
        kd_r = tl.where(use_r, tau_sq * lam * tl.sum(klr, 0), 0.0)
        tl.store(parts_ptr + row, ce)
        tl.store(parts_ptr + N + row, kd_d)
        tl.store(parts_ptr + 2 * N + row, kd_r)
        tl.store(parts_ptr + 3 * N + row, lam)
        tl.store(parts_ptr + 4 * N + row, m)


_JITTED: dict[bool, Any] = {}


def _interpret_mode() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET``), as Triton reads it."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel() -> Any:
    """The jitted kernel for the current interpreter mode (jitted on first use)."""
    mode = _interpret_mode()
    if mode not in _JITTED:
        _JITTED[mode] = triton.jit(conkd_row_kernel)
    return _JITTED[mode]


def kernel_available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: CUDA, or any device under the interpreter."""
    return HAVE_TRITON and (device.type == "cuda" or _interpret_mode())


def launch_config(V: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V and an element size (compute dtype bytes).

    Default 4096 columns and 16 warps (8 values per thread and tensor): compiled for sm_90 it
    takes 110 registers and spills nothing, where 8 warps need 186. Not yet tuned on a GPU
    (bench/bench_loss_gpu.py sweeps it); CONKD_TRITON_BLOCK_V / CONKD_TRITON_NUM_WARPS
    override it.
    """
    block = int(os.environ.get("CONKD_TRITON_BLOCK_V", "0")) or (4096 if elem_bytes <= 4 else 2048)
    block = min(block, triton.next_power_of_2(max(V, 16)))
    default_warps = 16 if block >= 4096 else 8 if block >= 2048 else 4
    warps = int(os.environ.get("CONKD_TRITON_NUM_WARPS", "0")) or default_warps
    return block, warps


def item_column_map(item_ids_I: Tensor, V: int) -> Tensor:
    """[V] int32: the rec-table column of each vocabulary id, -1 for words.

    Raises ``ValueError`` when an item id repeats (the map holds one column per id).
    """
    col_V = torch.full((V,), -1, dtype=torch.int32, device=item_ids_I.device)
    I = item_ids_I.numel()
    if I:
        col_V[item_ids_I] = torch.arange(I, dtype=torch.int32, device=item_ids_I.device)
        if int((col_V >= 0).sum()) != I:
            raise ValueError("item_ids must not repeat (one rec_probs column per item token)")
    return col_V


def _acc_of(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _unit_cols(x_NV: Tensor) -> Tensor:
    """x with unit column stride (rows may be strided, e.g. a vocabulary slice); copies if not."""
    return x_NV if x_NV.stride(-1) == 1 or x_NV.shape[-1] == 1 else x_NV.contiguous()


def conkd_rows_(
    z_NV: Tensor,  # [N, V] student logits (any float dtype)
    t_NV: Tensor,  # [N, V] teacher logits (any float dtype)
    logq_SI: Tensor,  # [S, I] log q_R^τ in the compute dtype (from tempered_log_q)
    rec_row_N: Tensor,  # [N] long
    col_V: Tensor,  # [V] int32 from item_column_map
    labels_N: Tensor,  # [N] long, -100 where no loss
    cfg: LossConfig,
    inv_m: float,  # 1/N_valid of the whole batch
    grad_NV: Tensor | None,  # [N, V] out: the gradient (may be z_NV itself), or None
) -> Tensor:
    """Launch the kernel on N rows; returns the per-row parts ``[5, N]`` (compute dtype):
    ce, kd_dialog, kd_rec, λ, m (all 0 at ignored rows). The gradient, already divided by
    N_valid (``inv_m``), is written into ``grad_NV`` (unit column stride) unless it is None.
    No checks: see :func:`conkd_loss_triton`.
    """
    N, V = z_NV.shape
    dtype = compute_dtype(z_NV, t_NV)
    parts_5N = torch.empty(N_PARTS, N, dtype=dtype, device=z_NV.device)
    if N == 0:
        return parts_5N
    write_grad = grad_NV is not None
    g_NV = grad_NV if grad_NV is not None else z_NV  # not written without a gradient
    assert z_NV.stride(-1) == 1 and t_NV.stride(-1) == 1 and g_NV.stride(-1) == 1
    tau = float(cfg.tau)
    block, warps = launch_config(V, 8 if dtype == torch.float64 else 4)
    logq_SI = logq_SI.contiguous()
    if logq_SI.numel() == 0:  # no loss row reads it; keep a valid pointer
        logq_SI = torch.full((1, 1), float("-inf"), dtype=dtype, device=z_NV.device)
    _kernel()[(N,)](
        z_NV, t_NV, g_NV, logq_SI, col_V, labels_N.contiguous(), rec_row_N.contiguous(),
        parts_5N, z_NV.stride(0), t_NV.stride(0), g_NV.stride(0), N, V, logq_SI.shape[1],
        1.0 / tau, tau * tau, float(cfg.w_ce), float(cfg.w_kd) * tau, float(inv_m),
        float(cfg.gate.threshold), float(cfg.gate.c), GATE=GATE_CODES[cfg.gate.mode],
        TEMPERED=tau != 1.0, WRITE_GRAD=write_grad, BLOCK_V=block, ACC=_acc_of(dtype),
        num_warps=warps,
    )  # fmt: skip
    return parts_5N


class ConKDTritonFunction(torch.autograd.Function):
    """autograd.Function of the Triton loss; see :func:`conkd_loss_triton`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_NV: Tensor,  # [N, V]
        teacher_NV: Tensor | SparseTeacher,  # [N, V], or D's top-k [N, K] (checked)
        logq_SI: Tensor,  # [S, I] log q_R^τ
        rec_row_N: Tensor,  # [N] long
        col_V: Tensor,  # [V] int32
        labels_N: Tensor,  # [N] long
        cfg: LossConfig,
        n_valid: int,
        inplace: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        z_NV = _unit_cols(student_NV.detach())
        need_grad = bool(ctx.needs_input_grad[0])  # False under no_grad (evaluation)
        grad_NV = (z_NV if inplace else torch.empty_like(z_NV)) if need_grad else None
        inv_m = 1.0 / max(n_valid, 1)
        if isinstance(teacher_NV, SparseTeacher):
            from conkd_scale.loss.triton_sparse import conkd_rows_sparse_

            parts_5N = conkd_rows_sparse_(z_NV, teacher_NV, logq_SI, rec_row_N, col_V,
                                          labels_N, cfg, inv_m, grad_NV)  # fmt: skip
        else:
            t_NV = _unit_cols(teacher_NV.detach())
            parts_5N = conkd_rows_(z_NV, t_NV, logq_SI, rec_row_N, col_V, labels_N, cfg, inv_m,
                                   grad_NV)  # fmt: skip
        if need_grad and inplace and z_NV.data_ptr() == student_NV.data_ptr():
            # the kernel wrote through a raw pointer: let autograd see the write
            torch.autograd.graph.increment_version(student_NV)
        sums_3 = parts_5N[:3].sum(dim=1) * inv_m  # [3] mean ce, kd_dialog, kd_rec
        ce, kd_d, kd_r = sums_3[0], sums_3[1], sums_3[2]
        kd = kd_d + kd_r
        loss = cfg.w_ce * ce + cfg.w_kd * kd
        lam_N, m_N = parts_5N[3].float(), parts_5N[4].float()
        if grad_NV is not None:
            ctx.save_for_backward(grad_NV)
        ctx.inplace = inplace
        ctx.mark_non_differentiable(ce, kd, kd_d, kd_r, lam_N, m_N)
        return loss, ce, kd, kd_d, kd_r, lam_N, m_N

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        return saved_grad_scaled(ctx, grad_loss), None, None, None, None, None, None, None, None


def conkd_loss_triton(
    student_logits: Tensor,  # [N, V] or [B, T, V], any float dtype (needs grad)
    teacher_logits: Tensor | SparseTeacher,  # [N, V] or [B, T, V], D's logits (no grad), or
    # D's top-k with its exact item mass (loss/sparse.py)
    rec_probs_SI: Tensor,  # [S, I] R's item distribution per recommender turn
    rec_row: Tensor,  # [N] or [B, T] row of rec_probs for each loss row (-1 where no loss)
    item_ids_I: Tensor,  # [I] vocabulary id of each rec_probs column (any order, no repeats)
    labels: Tensor,  # [N] or [B, T] gold next token, -100 where no loss
    cfg: LossConfig,
    *,
    inplace: bool = False,
) -> LossOutput:
    """The ConKD loss by the Triton kernel (CUDA tensors, or any under ``TRITON_INTERPRET=1``).

    Same contract as :func:`conkd_scale.loss.conkd_loss_chunked`: the gradient is computed in
    the forward and stored in the student's dtype; ``inplace=True`` stores it in the
    student-logits buffer (the logits are destroyed, backward runs once; autograd raises if
    another node saved them). It takes effect only when the logits flatten to ``[N, V]`` rows
    with unit column stride without a copy (a vocabulary slice of wider logits is fine).
    Without a gradient to compute (``torch.no_grad()``, or logits that do not require grad)
    nothing is written: evaluation costs no ``[N, V]`` buffer and leaves the logits intact.
    ``cfg.chunk_size`` is not used: each row is one program.
    """
    if not kernel_available(student_logits.device):
        raise RuntimeError(
            "conkd_loss_triton needs CUDA tensors and triton (or TRITON_INTERPRET=1 set before "
            f"the first launch); got {student_logits.device}, triton "
            f"{'present' if HAVE_TRITON else 'missing'}"
        )
    x = flatten_inputs(student_logits, teacher_logits, rec_probs_SI, rec_row, item_ids_I, labels)
    teacher = x.sparse if x.sparse is not None else x.teacher_dense()
    dtype = compute_dtype(x.student_NV, *([] if x.sparse is not None else [teacher]))
    logq_SI = tempered_log_q(x.rec_probs_SI, float(cfg.tau), dtype)  # [S, I]
    col_V = item_column_map(x.item_ids_I, x.student_NV.shape[1])  # [V]
    n_valid = int((x.labels_N != IGNORE_INDEX).sum())
    loss, ce, kd, kd_d, kd_r, lam_N, m_N = ConKDTritonFunction.apply(
        x.student_NV, teacher, logq_SI, x.rec_row_N, col_V, x.labels_N, cfg, n_valid,
        inplace,
    )  # fmt: skip
    return LossOutput(loss, ce, kd, kd_d, kd_r, lam_N, m_N, n_valid)
