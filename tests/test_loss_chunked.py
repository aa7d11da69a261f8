"""The chunked CPU loss against the pure-PyTorch reference (forward and backward)."""

from __future__ import annotations

import pytest
import torch

from conkd_scale.loss import (
    IGNORE_INDEX,
    GateConfig,
    LossConfig,
    conkd_loss_chunked,
    conkd_loss_reference,
)
from conkd_scale.loss.chunked import ConKDChunkedFunction
from conkd_scale.loss.common import tempered_log_q

MODES = ("hard", "soft", "static", "oracle", "dialog", "rec")
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP stalls when the shared cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _case(N=41, V=1271, I=97, S=5, dtype=torch.float32, seed=0, ignore_every=4):
    """Odd shapes; items scattered over the vocabulary, not sorted; some ignored rows."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = torch.randn(N, V, generator=g) * 3
    item_ids = torch.randperm(V, generator=g)[:I]
    t[: N // 2, item_ids] += 6.0  # high item mass in the first half → hard gate opens
    t = t.to(dtype)
    q = torch.softmax(torch.randn(S, I, generator=g) * 2, -1).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = item_ids[: len(labels[::7])]
    if ignore_every:
        labels[1::ignore_every] = IGNORE_INDEX
    rec_row = torch.randint(0, S, (N,), generator=g)
    rec_row[labels == IGNORE_INDEX] = -1
    return z, t, q, rec_row, item_ids, labels


def _both(z, t, q, rec_row, items, labels, cfg, grad_scale=1.0, **kw):
    outs, grads = [], []
    for fn in (conkd_loss_reference, conkd_loss_chunked):
        zz = z.clone().requires_grad_(True)
        extra = kw if fn is conkd_loss_chunked else {}
        out = fn(zz, t, q, rec_row, items, labels, cfg, **extra)
        (out.loss * grad_scale).backward()
        outs.append(out)
        grads.append(zz.grad)
    return outs, grads


def _assert_same(outs, grads, tol: float) -> None:
    ref, chk = outs
    for key in ("loss", "ce", "kd", "kd_dialog", "kd_rec"):
        a, b = getattr(ref, key).double(), getattr(chk, key).double()
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * 1e-2, msg=key)
    assert ref.n_tokens == chk.n_tokens
    torch.testing.assert_close(chk.m_N, ref.m_N, rtol=max(tol, 1e-6), atol=1e-7)
    torch.testing.assert_close(chk.lam_N, ref.lam_N, rtol=max(tol, 1e-6), atol=1e-7)
    g_ref, g_chk = grads[0].double(), grads[1].double()
    assert g_chk.dtype == g_ref.dtype and torch.isfinite(g_chk).all()
    scale = g_ref.abs().max()
    torch.testing.assert_close(g_chk, g_ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_reference_fp32(mode: str, tau: float) -> None:
    data = _case()
    cfg = LossConfig(gate=GateConfig(mode=mode), tau=tau, w_ce=0.4, w_kd=0.8, chunk_size=16)
    outs, grads = _both(*data, cfg)
    _assert_same(outs, grads, TOL[torch.float32])
    if mode in ("hard", "oracle"):
        assert 0 < outs[1].lam_N.sum() < outs[1].n_tokens  # the gate really mixes here


@pytest.mark.parametrize("chunk_size", [1, 7, 40, 41, 1000])
def test_chunk_sizes(chunk_size: int) -> None:
    data = _case(seed=1)
    cfg = LossConfig(gate=GateConfig(mode="soft"), chunk_size=chunk_size)
    _assert_same(*_both(*data, cfg), TOL[torch.float32])


@pytest.mark.parametrize("mode", ["hard", "soft", "rec"])
def test_matches_reference_bf16(mode: str) -> None:
    data = _case(dtype=torch.bfloat16, seed=2)
    cfg = LossConfig(gate=GateConfig(mode=mode), tau=1.5, chunk_size=8)
    _assert_same(*_both(*data, cfg), TOL[torch.bfloat16])


def test_no_ignored_rows_and_batched_shape() -> None:
    z, t, q, rec_row, items, labels = _case(N=42, ignore_every=0, seed=3)
    B, T = 6, 7
    data = (z.view(B, T, -1), t.view(B, T, -1), q, rec_row.view(B, T), items, labels.view(B, T))
    outs, grads = _both(*data, LossConfig(chunk_size=5))
    _assert_same(outs, grads, TOL[torch.float32])
    assert grads[1].shape == (B, T, z.shape[1]) and outs[1].lam_N.shape == (B * T,)


@pytest.mark.parametrize("c", [0.0, 1.0])
def test_lambda_extremes(c: float) -> None:
    cfg = LossConfig(gate=GateConfig(mode="static", c=c), tau=2.0, chunk_size=9)
    _assert_same(*_both(*_case(seed=4), cfg), TOL[torch.float32])


@pytest.mark.parametrize("inplace", [False, True])
def test_grad_output_not_one(inplace: bool) -> None:
    cfg = LossConfig(gate=GateConfig(mode="hard"), chunk_size=6)
    outs, grads = _both(*_case(seed=5), cfg, grad_scale=-2.5, inplace=inplace)
    _assert_same(outs, grads, TOL[torch.float32])


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
    grads = []
    for use_chunked in (False, True):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = hh @ ww  # [N, V]; matmul does not save its output
        if use_chunked:
            out = conkd_loss_chunked(logits, t, q, rec_row, items, labels, cfg, inplace=True)
            assert not torch.allclose(logits.detach(), h @ w)  # buffer now holds the gradient
        else:
            out = conkd_loss_reference(logits, t, q, rec_row, items, labels, cfg)
        out.loss.backward()
        grads.append((out.loss.detach(), hh.grad, ww.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


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
        outs, grads = _both(z, t, q, rec_row, items, labels, cfg)
        assert torch.isfinite(outs[1].loss) and torch.isfinite(grads[1]).all()
        _assert_same(outs, grads, 1e-4)


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
    _assert_same(*_both(z.t().contiguous().t(), t, q, rec_row, items, labels, cfg), 1e-5)
    data16 = (z.half(), t.half(), q, rec_row, items, labels)
    _assert_same(*_both(*data16, cfg), 5e-2)


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
