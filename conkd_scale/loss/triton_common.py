"""What the dense-teacher and the sparse-teacher Triton kernels share: jit helpers and launch.

The kernels (:mod:`.triton_kernel`, :mod:`.triton_sparse`) differ only in how they read D;
the rest of a row's work is here as ``@triton.jit``-able helpers (one online log-sum-exp
step, the gate, the cross-entropy, the student's and R's parts of the gradient, the stores)
and one launcher, :func:`launch_rows`, that passes every common argument by name.

Triton reads ``TRITON_INTERPRET`` when ``triton.jit`` is applied, and a kernel may only call
helpers jitted the same way, so nothing is jitted at import: :func:`jit_kernel` jits a kernel
and these helpers together, per interpreter mode, at the first launch (the kernel sees the
jitted helpers through a copy of its module's globals).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from conkd_scale.loss.config import LossConfig

try:  # triton is a declared dependency, but keep CPU-only installs importable
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

GATE_CODES = {"hard": 0, "soft": 1, "static": 2, "oracle": 3, "dialog": 4, "rec": 5}
"""Gate mode → the kernels' ``GATE`` constexpr."""

N_PARTS = 5
"""Per-row outputs of the kernels, in this order: ce, kd_dialog, kd_rec, λ, m."""


# ---------------------------------------------------------------- jit helpers (plain here)
def zero_row(g_row, parts_ptr, row, N, V, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
             ACC: tl.constexpr):  # fmt: skip
    """An ignored row: a zero gradient row (when written) and zero parts."""
    if WRITE_GRAD:
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(g_row + offs, tl.zeros([BLOCK_V], ACC).to(g_row.dtype.element_ty),
                     mask=offs < V)  # fmt: skip
    for k in range(5):
        tl.store(parts_ptr + k * N + row, tl.zeros([], ACC))


def online_lse_step(x, m, s, s_tau, inv_tau, TEMPERED: tl.constexpr):
    """One block ``x`` [BLOCK_V] of an online log-sum-exp with the scalar running max ``m``
    and per-lane sums ``s`` = Σ exp(x − m), ``s_tau`` = Σ exp((x − m)/τ) (kept only when
    TEMPERED). Returns (m, s, s_tau, r, e, r_tau, e_tau): the updated three, and this block's
    rescale factor and exp terms, untempered and tempered (the same when not TEMPERED)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite: no (-inf) − (-inf)
    d = x - base
    e = tl.exp(d)
    r = tl.exp(m - base)
    s = s * r + e
    if TEMPERED:
        r_tau = tl.exp((m - base) * inv_tau)
        e_tau = tl.exp(d * inv_tau)
        s_tau = s_tau * r_tau + e_tau
    else:
        r_tau = r
        e_tau = e
    return m_new, s, s_tau, r, e, r_tau, e_tau


def log_sums(s, s_tau, TEMPERED: tl.constexpr):
    """(log Σ s, log Σ s_tau) of per-lane sums; the first twice when not TEMPERED."""
    log_s = tl.log(tl.sum(s, 0))
    if TEMPERED:  # noqa: SIM108 (a compile-time branch)
        log_s_tau = tl.log(tl.sum(s_tau, 0))
    else:
        log_s_tau = log_s
    return log_s, log_s_tau


def gate_lambda(m, y, col_ptr, eta, c_static, GATE: tl.constexpr, ACC: tl.constexpr):
    """(λ, λ < 1, λ > 0) of a row from D's item mass ``m`` and the gold label ``y``."""
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
    return lam, lam < 1.0, lam > 0.0


def cross_entropy(z_row, y, mz, log_sz, ACC: tl.constexpr):
    """lse(z) − z_y from the running max and log Σ exp(z − max), without subtracting two
    large numbers."""
    z_y = tl.load(z_row + y).to(ACC)
    return (mz - z_y) + log_sz


def student_grad(z, ps, mz, log_sz, w_ce, a_kd, c, TEMPERED: tl.constexpr):
    """The student's part of the gradient at columns with logits ``z`` and p_S^τ ``ps``:
    w_ce·p_S + a_kd·c·p_S^τ (``c`` = 1 but for the sparse teacher's tail)."""
    if TEMPERED:  # noqa: SIM108 (a compile-time branch)
        g = w_ce * tl.exp((z - mz) - log_sz) + a_kd * ps * c
    else:
        g = (w_ce + a_kd * c) * ps
    return g


def student_block(z_row, offs, mask, mz, log_sz, log_szt, inv_tau, w_ce, a_kd, c,
                  TEMPERED: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Sweep 2's student part at columns ``offs``: (log p_S^τ, :func:`student_grad`)."""
    z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(ACC)
    logps = (z - mz) * inv_tau - log_szt  # log p_S^τ
    return logps, student_grad(z, tl.exp(logps), mz, log_sz, w_ce, a_kd, c, TEMPERED)


def rec_terms(g, klr, col_ptr, logq_row, offs, mask, logps, a_kd, lam, use_r,
              GATE: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """R's part at columns ``offs``: adds q·(log q − log p_S^τ) to ``klr`` and subtracts
    a_kd·λ·q from ``g`` (item columns only; nothing when λ = 0). Returns (g, klr)."""
    if GATE != 4:  # noqa: SIM102 (compile time, then run time)
        if use_r:
            col = tl.load(col_ptr + offs, mask=mask, other=-1)
            is_item = col >= 0
            logq = tl.load(logq_row + col, mask=is_item, other=float("-inf")).to(ACC)
            q = tl.exp(logq)
            klr += tl.where(q > 0.0, q * (logq - logps), 0.0)
            g -= (a_kd * lam) * q
    return g, klr


def store_grad(g_row, offs, g, y, w_ce, inv_m, mask):
    """Subtract w_ce at the gold column, divide by N_valid and store at ``offs``."""
    g = tl.where(offs == y, g - w_ce, g) * inv_m
    tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)


def store_parts(parts_ptr, row, N, ce, kl_d, kl_r, lam, m, use_d, use_r, tau_sq):
    """Store a row's ce, kd_dialog = τ²(1−λ)·KL_D, kd_rec = τ²λ·KL_R, λ and m."""
    kd_d = tl.where(use_d, tau_sq * (1.0 - lam) * kl_d, 0.0)
    kd_r = tl.where(use_r, tau_sq * lam * kl_r, 0.0)
    tl.store(parts_ptr + row, ce)
    tl.store(parts_ptr + N + row, kd_d)
    tl.store(parts_ptr + 2 * N + row, kd_r)
    tl.store(parts_ptr + 3 * N + row, lam)
    tl.store(parts_ptr + 4 * N + row, m)


JIT_HELPERS = (zero_row, online_lse_step, log_sums, gate_lambda, cross_entropy, student_grad,
               student_block, rec_terms, store_grad, store_parts)  # fmt: skip
"""The helpers a kernel may call; :func:`jit_kernel` jits them with it."""


# ------------------------------------------------------------------------- jitting
def interpret_mode() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET``), as Triton reads it."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _with_globals(fn: Callable[..., Any], scope: dict[str, Any]) -> Callable[..., Any]:
    """``fn`` (same code, name and annotations) reading its globals from ``scope``."""
    out = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__annotations__ = dict(fn.__annotations__)
    out.__qualname__ = fn.__qualname__
    return out


_HELPERS: dict[bool, dict[str, Any]] = {}
_KERNELS: dict[tuple[Callable[..., Any], bool], Any] = {}


def jit_kernel(kernel: Callable[..., Any]) -> Any:
    """The plain kernel function ``kernel`` jitted for the current interpreter mode, calling
    :data:`JIT_HELPERS` jitted the same way (both jitted on first use, then cached)."""
    mode = interpret_mode()
    if mode not in _HELPERS:
        scope = dict(globals())
        _HELPERS[mode] = {f.__name__: triton.jit(_with_globals(f, scope)) for f in JIT_HELPERS}
        scope.update(_HELPERS[mode])
    if (kernel, mode) not in _KERNELS:
        scope = {**kernel.__globals__, **_HELPERS[mode]}
        _KERNELS[kernel, mode] = triton.jit(_with_globals(kernel, scope))
    return _KERNELS[kernel, mode]


# -------------------------------------------------------------------------- launching
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


def acc_of(dtype: torch.dtype) -> Any:
    """The kernels' ``ACC`` constexpr for a compute dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def launch_rows(
    kernel: Callable[..., Any],  # conkd_row_kernel or conkd_row_kernel_sparse (plain)
    z_NV: Tensor,  # [N, V] student logits (any float dtype), unit column stride
    grad_NV: Tensor | None,  # [N, V] out: the gradient (may be z_NV itself), or None
    logq_SI: Tensor,  # [S, I] log q_R^τ in the compute dtype
    col_V: Tensor,  # [V] int32 from item_column_map
    labels_N: Tensor,  # [N] long, -100 where no loss
    rec_row_N: Tensor,  # [N] long
    cfg: LossConfig,
    inv_m: float,  # 1/N_valid of the whole batch
    dtype: torch.dtype,  # compute dtype
    **teacher: Any,  # the kernel's teacher arguments (and constexprs), by name
) -> Tensor:
    """Launch ``kernel`` on N rows with the arguments both kernels share, by name; returns
    the per-row parts ``[5, N]`` (compute dtype): ce, kd_dialog, kd_rec, λ, m."""
    N, V = z_NV.shape
    parts_5N = torch.empty(N_PARTS, N, dtype=dtype, device=z_NV.device)
    if N == 0:
        return parts_5N
    g_NV = grad_NV if grad_NV is not None else z_NV  # not written without a gradient
    assert z_NV.stride(-1) == 1 and g_NV.stride(-1) == 1
    tau = float(cfg.tau)
    block, warps = launch_config(V, 8 if dtype == torch.float64 else 4)
    logq_SI = logq_SI.contiguous()
    if logq_SI.numel() == 0:  # no loss row reads it; keep a valid pointer
        logq_SI = torch.full((1, 1), float("-inf"), dtype=dtype, device=z_NV.device)
    jit_kernel(kernel)[(N,)](
        z_ptr=z_NV, g_ptr=g_NV, logq_ptr=logq_SI, col_ptr=col_V, y_ptr=labels_N.contiguous(),
        r_ptr=rec_row_N.contiguous(), parts_ptr=parts_5N, stride_z=z_NV.stride(0),
        stride_g=g_NV.stride(0), N=N, V=V, I=logq_SI.shape[1], inv_tau=1.0 / tau,
        tau_sq=tau * tau, w_ce=float(cfg.w_ce), a_kd=float(cfg.w_kd) * tau, inv_m=float(inv_m),
        eta=float(cfg.gate.threshold), c_static=float(cfg.gate.c),
        GATE=GATE_CODES[cfg.gate.mode], TEMPERED=tau != 1.0, WRITE_GRAD=grad_NV is not None,
        BLOCK_V=block, ACC=acc_of(dtype), num_warps=warps, **teacher,
    )  # fmt: skip
    return parts_5N
