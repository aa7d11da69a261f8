"""Helpers shared by the loss tests: a one-thread fixture, random logits cases, running a
loss with its backward, and comparing an implementation with the reference.

Importing this module sets ``TRITON_INTERPRET=1`` without CUDA (as tests/conftest.py does),
so that a test file run outside pytest (the ZeRO-3 worker of test_loss_fused_linear.py) also
runs Triton kernels in the interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from conkd_scale.loss import IGNORE_INDEX, LossConfig, LossOutput, conkd_loss_reference

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PARTS = ("loss", "ce", "kd", "kd_dialog", "kd_rec")
"""The scalar fields of a LossOutput."""

Run = tuple[LossOutput, Tensor]
"""A loss output and the gradient of its loss with respect to the student input."""


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP stalls when the shared cores are busy. Autouse
    in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def logits_case(
    *,
    N: int,
    V: int,
    I: int,
    S: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ignore_every: int = 4,
    item_every: int = 5,
    cast_rec: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, ...]:
    """Student and teacher logits ``[N, V]`` (``dtype``), R's table ``[S, I]`` (fp32, or
    ``dtype`` with ``cast_rec``), ``rec_row`` [N], item ids [I] and labels [N], on ``device``.

    Items are scattered over the vocabulary, unsorted; the first half of the rows puts high
    teacher mass on items (the hard gate opens there); every ``item_every``-th label is an
    item; every ``ignore_every``-th row from row 1 is ignored (none with 0).
    """
    g = torch.Generator().manual_seed(seed)
    z_NV = torch.randn(N, V, generator=g) * 3
    t_NV = torch.randn(N, V, generator=g) * 3
    item_ids_I = torch.randperm(V, generator=g)[:I]
    t_NV[: N // 2, item_ids_I] += 6.0
    q_SI = torch.softmax(torch.randn(S, I, generator=g) * 2, -1)
    labels_N = torch.randint(0, V, (N,), generator=g)
    labels_N[::item_every] = item_ids_I[: len(labels_N[::item_every])]
    if ignore_every:
        labels_N[1::ignore_every] = IGNORE_INDEX
    rec_row_N = torch.randint(0, S, (N,), generator=g)
    rec_row_N[labels_N == IGNORE_INDEX] = -1
    q_SI = q_SI.to(dtype) if cast_rec else q_SI
    out = (z_NV.to(dtype), t_NV.to(dtype), q_SI, rec_row_N, item_ids_I, labels_N)
    return tuple(x.to(device) for x in out)


def run_loss(
    fn: Callable[..., LossOutput], z: Tensor, *args: Any, grad_scale: float = 1.0, **kw: Any
) -> Run:
    """``fn(z, *args, **kw)`` on a fresh leaf copy of the student input ``z``, with the
    backward of ``loss * grad_scale``; returns the output and the input's gradient."""
    zz = z.clone().requires_grad_(True)
    out = fn(zz, *args, **kw)
    (out.loss * grad_scale).backward()
    return out, zz.grad


def against_reference(
    fn: Callable[..., LossOutput],
    *data: Tensor,
    cfg: LossConfig,
    grad_scale: float = 1.0,
    **kw: Any,
) -> tuple[Run, Run]:
    """The reference and ``fn`` (given ``kw``, e.g. ``inplace``) on the same logits case."""
    ref = run_loss(conkd_loss_reference, *data, cfg, grad_scale=grad_scale)
    return ref, run_loss(fn, *data, cfg, grad_scale=grad_scale, **kw)


def assert_outputs_close(
    ref: LossOutput, out: LossOutput, tol: float, *, gate_atol: float = 1e-7
) -> None:
    """Loss parts within ``tol`` (relative), the same token count, λ and m (fp32) close."""
    for key in PARTS:
        a, b = getattr(ref, key).double(), getattr(out, key).double()
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * 1e-2, msg=key)
    assert ref.n_tokens == out.n_tokens
    assert out.lam_N.dtype == out.m_N.dtype == torch.float32
    torch.testing.assert_close(out.m_N, ref.m_N, rtol=max(tol, 1e-6), atol=gate_atol)
    torch.testing.assert_close(out.lam_N, ref.lam_N, rtol=max(tol, 1e-6), atol=gate_atol)


def assert_grad_close(grad: Tensor, grad_ref: Tensor, tol: float, msg: str | None = None) -> None:
    """Same dtype and shape, finite, and within ``tol`` of the reference (absolute part
    relative to the reference's largest entry)."""
    assert grad.dtype == grad_ref.dtype and grad.shape == grad_ref.shape, msg
    assert torch.isfinite(grad).all(), msg
    a, b = grad_ref.double(), grad.double()
    torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max(), msg=msg)


def assert_same(ref: Run, out: Run, tol: float) -> None:
    """An implementation's run equals the reference's: outputs and the student gradient."""
    assert_outputs_close(ref[0], out[0], tol)
    assert_grad_close(out[1], ref[1], tol)


def assert_inplace_through_lm_head(
    fn: Callable[..., LossOutput],
    h_NH: Tensor,  # [N, H] hidden states
    w_HV: Tensor,  # [H, V] lm_head
    *side: Any,  # teacher logits, rec_probs, rec_row, item ids, labels, cfg
) -> None:
    """``fn(h @ w, ..., inplace=True)`` writes the gradient into the logits buffer, and the
    lm_head matmul's backward still gives the reference's loss and gradients for h and w."""
    runs = []
    for inplace in (False, True):
        hh, ww = h_NH.clone().requires_grad_(True), w_HV.clone().requires_grad_(True)
        logits_NV = hh @ ww  # matmul does not save its output
        if inplace:
            out = fn(logits_NV, *side, inplace=True)
            assert not torch.allclose(logits_NV.detach(), h_NH @ w_HV)  # now the gradient
        else:
            out = conkd_loss_reference(logits_NV, *side)
        out.loss.backward()
        runs.append((out.loss.detach(), hh.grad, ww.grad))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
