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
first launch rather than at import (:func:`~.triton_common.jit_kernel`).

A sparse dialogue teacher (:class:`~.sparse.SparseTeacher`, D's top-k) runs the kernel of
:mod:`.triton_sparse` instead, through the same autograd.Function.

This module holds the kernel, its launcher and its autograd.Function; the jit helpers and the
launch code it shares with the sparse kernel are in :mod:`.triton_common`. Which implementation
runs is :func:`conkd_scale.loss.dispatch.resolve_impl`'s choice; the ``nn.Module`` wrapper is
:class:`conkd_scale.loss.module.ConKDLoss` and the ahead-of-time compiler
:func:`conkd_scale.loss.aot.aot_compile`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from conkd_scale.loss.common import (
    LossOutput,
    compute_dtype,
    flatten_inputs,
    loss_outputs,
    saved_grad_scaled,
)
from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.sparse import SparseTeacher
from conkd_scale.loss.triton_common import (
    GATE_CODES,
    HAVE_TRITON,
    cross_entropy,
    gate_lambda,
    interpret_mode,
    launch_config,
    launch_rows,
    log_sums,
    online_lse_step,
    rec_terms,
    store_grad,
    store_parts,
    student_block,
    tl,
    triton,  # noqa: F401 (re-exported: bench/bench_loss_gpu.py reads tk.triton)
    zero_row,
)

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


# The kernel as a plain function: triton_common.jit_kernel jits it per interpreter mode.
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
        zero_row(g_row, parts_ptr, row, N, V, WRITE_GRAD, BLOCK_V, ACC)
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
            mz, sz, szt, _, _, _, _ = online_lse_step(z, mz, sz, szt, inv_tau, TEMPERED)
            mt, st, stt, rescale_t, et, _, _ = online_lse_step(t, mt, st, stt, inv_tau, TEMPERED)
            sti = sti * rescale_t + tl.where(is_item, et, 0.0)
        log_sz, log_szt = log_sums(sz, szt, TEMPERED)
        _, log_stt = log_sums(st, stt, TEMPERED)
        m = tl.sum(sti, 0) / tl.sum(st, 0)  # D's untempered item mass: exp(lse_items − lse_all)

        lam, use_d, use_r = gate_lambda(m, y, col_ptr, eta, c_static, GATE, ACC)
        ce = cross_entropy(z_row, y, mz, log_sz, ACC)
        logq_row = logq_ptr + tl.load(r_ptr + row) * I

        # ---- sweep 2: KL terms and the gradient -----------------------------------------
        kld = tl.zeros([BLOCK_V], ACC)
        klr = tl.zeros([BLOCK_V], ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            logps, g = student_block(z_row, offs, mask, mz, log_sz, log_szt, inv_tau, w_ce, a_kd,
                                     1.0, TEMPERED, ACC)  # fmt: skip
            if GATE != 5:  # noqa: SIM102 (compile time, then run time)
                if use_d:
                    t = tl.load(t_row + offs, mask=mask, other=NEG_INF).to(ACC)
                    logpd = (t - mt) * inv_tau - log_stt  # log p_D^τ
                    pd = tl.exp(logpd)
                    kld += tl.where(pd > 0.0, pd * (logpd - logps), 0.0)
                    g -= (a_kd * (1.0 - lam)) * pd
            g, klr = rec_terms(g, klr, col_ptr, logq_row, offs, mask, logps, a_kd, lam, use_r,
                               GATE, ACC)  # fmt: skip
            if WRITE_GRAD:
                store_grad(g_row, offs, g, y, w_ce, inv_m, mask)

        store_parts(parts_ptr, row, N, ce, tl.sum(kld, 0), tl.sum(klr, 0), lam, m, use_d, use_r,
                    tau_sq)  # fmt: skip


def kernel_available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: CUDA, or any device under the interpreter."""
    return HAVE_TRITON and (device.type == "cuda" or interpret_mode())


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
    assert t_NV.stride(-1) == 1
    dtype = compute_dtype(z_NV, t_NV)
    return launch_rows(conkd_row_kernel, z_NV, grad_NV, logq_SI, col_V, labels_N, rec_row_N, cfg,
                       inv_m, dtype, t_ptr=t_NV, stride_t=t_NV.stride(0))  # fmt: skip


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
        if grad_NV is not None:
            ctx.save_for_backward(grad_NV)
        ctx.inplace = inplace
        lam_N, m_N = parts_5N[3].float(), parts_5N[4].float()
        return loss_outputs(ctx, parts_5N[:3].sum(dim=1), inv_m, cfg, lam_N, m_N)

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
    teacher, logq_SI = x.teacher_and_logq(float(cfg.tau))  # D, [S, I]
    col_V = item_column_map(x.item_ids_I, x.student_NV.shape[1])  # [V]
    n_valid = x.n_valid
    loss, ce, kd, kd_d, kd_r, lam_N, m_N = ConKDTritonFunction.apply(
        x.student_NV, teacher, logq_SI, x.rec_row_N, col_V, x.labels_N, cfg, n_valid,
        inplace,
    )  # fmt: skip
    return LossOutput(loss, ce, kd, kd_d, kd_r, lam_N, m_N, n_valid)
