"""The chunked CPU loss against the pure-PyTorch reference (forward and backward)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from conkd_scale.loss import IGNORE_INDEX, GateConfig, LossConfig, conkd_loss_chunked
from conkd_scale.loss.chunked import ConKDChunkedFunction
from conkd_scale.loss.common import tempered_log_q
from tests.loss_helpers import (
    against_reference,
    assert_inplace_through_lm_head,
    assert_same,
    logits_case,
    one_thread,  # noqa: F401 (autouse fixture)
)

MODES = ("hard", "soft", "static", "oracle", "dialog", "rec")
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float64: 1e-10}

# Odd shapes (41 rows, 1271 columns, 97 items); R's table in the logits' dtype.
_case = partial(logits_case, N=41, V=1271, I=97, S=5, item_every=7, cast_rec=True)
_both = partial(against_reference, conkd_loss_chunked)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_reference_fp32(mode: str, tau: float) -> None:
    data = _case()
    cfg = LossConfig(gate=GateConfig(mode=mode), tau=tau, w_ce=0.4, w_kd=0.8, chunk_size=16)
    ref, chk = _both(*data, cfg=cfg)
    assert_same(ref, chk, TOL[torch.float32])
    if mode in ("hard", "oracle"):
        assert 0 < chk[0].lam_N.sum() < chk[0].n_tokens  # the gate really mixes here


@pytest.mark.parametrize("chunk_size", [1, 7, 40, 41, 1000])
def test_chunk_sizes(chunk_size: int) -> None:
    data = _case(seed=1)
    cfg = LossConfig(gate=GateConfig(mode="soft"), chunk_size=chunk_size)
    assert_same(*_both(*data, cfg=cfg), TOL[torch.float32])


@pytest.mark.parametrize("mode", ["hard", "soft", "rec"])
def test_matches_reference_bf16(mode: str) -> None:
    data = _case(dtype=torch.bfloat16, seed=2)
    cfg = LossConfig(gate=GateConfig(mode=mode), tau=1.5, chunk_size=8)
    assert_same(*_both(*data, cfg=cfg), TOL[torch.bfloat16])


def test_no_ignored_rows_and_batched_shape() -> None:
    z, t, q, rec_row, items, labels = _case(N=42, ignore_every=0, seed=3)
    B, T = 6, 7
    data = (z.view(B, T, -1), t.view(B, T, -1), q, rec_row.view(B, T), items, labels.view(B, T))
    ref, chk = _both(*data, cfg=LossConfig(chunk_size=5))
    assert_same(ref, chk, TOL[torch.float32])
    assert chk[1].shape == (B, T, z.shape[1]) and chk[0].lam_N.shape == (B * T,)


@pytest.mark.parametrize("c", [0.0, 1.0])
def test_lambda_extremes(c: float) -> None:
    cfg = LossConfig(gate=GateConfig(mode="static", c=c), tau=2.0, chunk_size=9)
    assert_same(*_both(*_case(seed=4), cfg=cfg), TOL[torch.float32])


@pytest.mark.parametrize("inplace", [False, True])
def test_grad_output_not_one(inplace: bool) -> None:
    cfg = LossConfig(gate=GateConfig(mode="hard"), chunk_size=6)
    ref, chk = _both(*_case(seed=5), cfg=cfg, grad_scale=-2.5, inplace=inplace)
    assert_same(ref, chk, TOL[torch.float32])


def test_all_rows_ignored() -> None:
    z, t, q, _, items, _ = _case(N=10, V=50, I=5)
    labels = torch.full((10,), IGNORE_INDEX)
    rec_row = torch.full((10,), -1)
    for inplace in (False, True):
        zz = (z.clone().requires_grad_(True) * 1.0) if inplace else z.clone().requires_grad_(True)
        out = conkd_loss_chunked(zz, t, q[:0], rec_row, items, labels, LossConfig(),
                                 inplace=inplace)  # fmt: skip
        out.loss.backward()
        assert out.n_tokens == 0
        for v in (out.loss, out.ce, out.kd, out.kd_dialog, out.kd_rec):
            assert v.item() == 0.0
    z.requires_grad_(True)
    conkd_loss_chunked(z, t, q, rec_row, items, labels, LossConfig()).loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("ignore_every", [0, 3])
def test_inplace_through_lm_head(ignore_every: int) -> None:
    """Gradient written into the logits buffer; the lm_head's backward still works."""
    g = torch.Generator().manual_seed(6)
    _, t, q, rec_row, items, labels = _case(N=33, V=301, I=23, seed=6, ignore_every=ignore_every)
    h = torch.randn(33, 16, generator=g)
    w = torch.randn(16, 301, generator=g)
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=1.3, chunk_size=10)
    assert_inplace_through_lm_head(conkd_loss_chunked, h, w, t, q, rec_row, items, labels, cfg)


def test_inplace_refuses_a_saved_tensor() -> None:
    """Overwriting logits another node saved is caught by autograd, not silently wrong."""
    _, t, q, rec_row, items, labels = _case(N=8, V=40, I=4)
    x = torch.randn(8, 40, requires_grad=True)
    logits = x.exp()  # exp's backward needs its output: the logits
    out = conkd_loss_chunked(logits, t, q, rec_row, items, labels, LossConfig(), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_stable_for_huge_and_infinite_logits() -> None:
    z, t, q, rec_row, items, labels = _case(N=12, V=64, I=8, seed=7)
    z, t = z * 3e3, t * 3e3  # magnitudes ~1e4
    words = [v for v in range(64) if v not in set(items.tolist())]
    z[0, words[:5]] = t[0, words[:5]] = -float("inf")  # both -inf (an item there → KL_R = inf)
    t[2, 10:] = -float("inf")
    q[0, 1] = 0.0
    labels[0] = 7
    for mode in MODES:
        cfg = LossConfig(gate=GateConfig(mode=mode), chunk_size=5)
        ref, chk = _both(z, t, q, rec_row, items, labels, cfg=cfg)
        assert torch.isfinite(chk[0].loss) and torch.isfinite(chk[1]).all()
        assert_same(ref, chk, 1e-4)


def test_teacher_gets_no_gradient() -> None:
    z, t, q, rec_row, items, labels = _case(N=9, V=30, I=4)
    z.requires_grad_(True)
    t.requires_grad_(True)
    conkd_loss_chunked(z, t, q, rec_row, items, labels, LossConfig()).loss.backward()
    assert t.grad is None and z.grad is not None


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_gradcheck_fp64(tau: float) -> None:
    z, t, q, rec_row, items, labels = _case(N=6, V=11, I=4, S=2, seed=8, ignore_every=3)
    z, t = z.double().requires_grad_(True), t.double()
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=tau, chunk_size=4)
    logq = tempered_log_q(q, tau, torch.float64)

    def f(z_: torch.Tensor) -> torch.Tensor:
        return ConKDChunkedFunction.apply(z_, t, logq, rec_row, items, labels, cfg, False)[0]

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-8)


def test_non_contiguous_and_fp16_inputs() -> None:
    z, t, q, rec_row, items, labels = _case(N=30, V=50, I=6, seed=9)
    cfg = LossConfig(gate=GateConfig(mode="soft"), chunk_size=7)
    assert_same(*_both(z.t().contiguous().t(), t, q, rec_row, items, labels, cfg=cfg), 1e-5)
    data16 = (z.half(), t.half(), q, rec_row, items, labels)
    assert_same(*_both(*data16, cfg=cfg), 5e-2)


@pytest.mark.parametrize("ignore_every", [0, 3])
def test_inplace_on_column_sliced_rows(ignore_every: int) -> None:
    """As the recipe builds them: gathered rows, padded vocabulary sliced off (a view)."""
    z, t, q, rec_row, items, labels = _case(N=20, V=60, I=5, seed=10, ignore_every=ignore_every)
    cfg = LossConfig(gate=GateConfig(mode="soft"), chunk_size=6)
    grads = []
    for inplace in (False, True):
        x = torch.cat([z, torch.randn(20, 4)], 1).requires_grad_(True)  # padded vocab 64
        student = x[torch.arange(20)][:, :60]  # [N, V] non-contiguous view of a copy
        out = conkd_loss_chunked(student, t, q, rec_row, items, labels, cfg, inplace=inplace)
        (out.loss * 3.0).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)
    assert torch.all(grads[1][:, 60:] == 0)
