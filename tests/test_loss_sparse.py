"""The ConKD loss with a sparse dialogue teacher (D's top-k + exact m_t, loss/sparse.py).

Every implementation against the reference given the same SparseTeacher; with k = |U| the
sparse loss against the dense one; the reference's gradient by gradcheck (float64); the
error of a small k against the dense loss (an exact identity at τ = 1 and a bound that uses
the student alone); shapes, gates, the stored m_t, and bad input. Triton runs under its
interpreter without CUDA (tiny shapes: it is slow).
"""

from __future__ import annotations

import math

import pytest
import torch

from conkd_scale.loss import (
    IGNORE_INDEX,
    ConKDLoss,
    GateConfig,
    LossConfig,
    SparseTeacher,
    conkd_loss,
    conkd_loss_chunked,
    conkd_loss_reference,
)
from conkd_scale.loss import triton_kernel as tk
from conkd_scale.loss.fused_linear import ConKDFusedLinearLoss, conkd_loss_fused_linear
from conkd_scale.loss.sparse import teacher_bins
from conkd_scale.loss.triton_sparse import topk_bitmask
from tests.loss_helpers import (
    assert_grad_close,
    assert_outputs_close,
    assert_same,
    logits_case,
    one_thread,  # noqa: F401 (autouse fixture)
    run_loss,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",  # interpreter
    "ignore:divide by zero encountered:RuntimeWarning",
)
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
triton = pytest.mark.skipif(not tk.HAVE_TRITON, reason="triton is not installed")
TOL = 1e-5


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter: blocks of 16 columns, so that rows span several."""
    if not CUDA:
        monkeypatch.setenv("CONKD_TRITON_BLOCK_V", "16")


def _case(N: int = 11, V: int = 37, I: int = 5, S: int = 3, k: int = 6, **kw):
    """A logits case and the teacher's top-k: (z, t, q, rec_row, items, labels, st)."""
    z, t, q, r, items, y = logits_case(N=N, V=V, I=I, S=S, device=DEVICE, **kw)
    return z, t, q, r, items, y, SparseTeacher.from_logits(t, items, k)


def _tri(*args, **kw):
    return tk.conkd_loss_triton(*args, **kw)


def _fused_chunked(z, *args, **kw):
    """The fused-linear loss with an identity lm_head: its hidden states are the logits."""
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    return conkd_loss_fused_linear(z, eye, *args, chunk_size=4, backend="chunked", **kw)


def _fused_triton(z, *args, **kw):
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    return conkd_loss_fused_linear(z, eye, *args, chunk_size=4, backend="triton", **kw)


_PARAMS = [
    pytest.param(conkd_loss_chunked, id="chunked"),
    pytest.param(lambda *a, **k: conkd_loss_chunked(*a, inplace=True, **k), id="chunked_inplace"),
    pytest.param(_fused_chunked, id="fused_chunked"),
    pytest.param(_tri, id="triton", marks=triton),
    pytest.param(lambda *a, **k: _tri(*a, inplace=True, **k), id="triton_inplace", marks=triton),
    pytest.param(_fused_triton, id="fused_triton", marks=triton),
]
_ALL = [pytest.param(conkd_loss_reference, id="reference"), *_PARAMS]


# ------------------------------------------------------------------------- k = |U|
@pytest.mark.parametrize("fn", _ALL)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_k_equals_dense(fn, tau: float) -> None:
    """k = |U|: loss, parts, λ, m and gradient equal the dense reference's (the stored m_t is
    D's exact item mass here)."""
    z, t, q, r, items, y, _ = _case()
    st = SparseTeacher.from_logits(t, items, t.shape[-1])
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=tau, w_ce=0.3, w_kd=0.9, chunk_size=4)
    dense = run_loss(conkd_loss_reference, z, t, q, r, items, y, cfg)
    sparse = run_loss(fn, z, st, q, r, items, y, cfg)
    assert_same(dense, sparse, TOL)
    assert sparse[0].kd_dialog > 0.1


# ------------------------------------------------------- implementations, small k
@pytest.mark.parametrize("fn", _PARAMS)
@pytest.mark.parametrize(
    ("mode", "tau"), [("hard", 1.0), ("soft", 1.7), ("oracle", 1.0), ("dialog", 0.8)]
)
def test_implementations_match_reference(fn, mode: str, tau: float) -> None:
    """k = 6 of |U| = 37: every implementation equals the sparse reference (parts, λ, m, grad)."""
    z, _t, q, r, items, y, st = _case()
    cfg = LossConfig(gate=GateConfig(mode=mode, eta=0.3), tau=tau, w_ce=0.4, w_kd=0.8,
                     chunk_size=4)  # fmt: skip
    ref = run_loss(conkd_loss_reference, z, st, q, r, items, y, cfg)
    out = run_loss(fn, z, st, q, r, items, y, cfg, grad_scale=1.0)
    assert_same(ref, out, TOL)
    if mode in ("hard", "oracle"):
        assert 0 < out[0].lam_N.sum() < out[0].n_tokens  # the gate really mixes


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_reference_gradcheck_float64(tau: float, k: int) -> None:
    """The reference's sparse KL is differentiable and its autograd gradient is right."""
    z, t, q, r, items, y = logits_case(N=5, V=13, I=3, S=2, dtype=torch.float64, seed=3)
    st = SparseTeacher.from_logits(t, items, k)
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=tau)
    zz = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: conkd_loss_reference(x, st, q, r, items, y, cfg).loss, (zz,)
    )


def test_batched_shape_and_dispatch() -> None:
    """[B, T, K] teacher with [B, T, V] logits equals the flattened [N, K] case; the
    dispatcher and the module wrapper take a SparseTeacher too."""
    z, _t, q, r, items, y, st = _case(N=12)
    cfg = LossConfig(gate=GateConfig(mode="hard", eta=0.3), tau=1.3, chunk_size=5)
    flat = run_loss(conkd_loss_reference, z, st, q, r, items, y, cfg)
    st3 = SparseTeacher(st.ids_NK.view(3, 4, -1), st.logp_NK.view(3, 4, -1),
                        st.item_mass_N.view(3, 4))  # fmt: skip
    z3, r3, y3 = z.view(3, 4, -1), r.view(3, 4), y.view(3, 4)
    fns = [conkd_loss_reference, conkd_loss_chunked, lambda *a: conkd_loss(*a),
           lambda *a: ConKDLoss(a[-1])(*a[:-1])]  # fmt: skip
    if tk.HAVE_TRITON:
        fns.append(_tri)
    for fn in fns:
        out, g = run_loss(fn, z3, st3, q, r3, items, y3, cfg)
        assert_same(flat, (out, g.view_as(flat[1])), TOL)
        assert out.lam_N.shape == (12,)


def test_fused_module_takes_a_sparse_teacher() -> None:
    """ConKDFusedLinearLoss (the DeepSpeed engine's module) with D's top-k at the loss rows
    equals the reference on the LM's logits."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    V = 40
    mcfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(mcfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[:, :3] = IGNORE_INDEX
    items = torch.randperm(V, generator=g)[:5]
    rec_row = torch.where(labels == IGNORE_INDEX, -1, 0)
    q = torch.softmax(torch.randn(1, 5, generator=g), -1)
    rows = labels[:, 1:] != IGNORE_INDEX
    st = SparseTeacher.from_logits(torch.randn(int(rows.sum()), V, generator=g) * 2, items, 7)
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=1.5, chunk_size=3)
    out = ConKDFusedLinearLoss(model, cfg, backend="chunked")(
        ids, mask, labels, rec_row, q, items, teacher_logits=st
    )
    out["loss"].backward()
    gw = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][rows]
    ref = conkd_loss_reference(logits, st, q, rec_row[:, 1:][rows], items, labels[:, 1:][rows],
                               cfg)  # fmt: skip
    ref.loss.backward()
    torch.testing.assert_close(out["loss"], ref.loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["m_N"], st.item_mass_N)
    assert_grad_close(gw, model.lm_head.weight.grad, 1e-4)


# ------------------------------------------------------------------- the gate's m_t
@pytest.mark.parametrize("fn", _ALL)
def test_gate_reads_the_stored_item_mass(fn) -> None:
    """λ and m_N come from the stored m_t (never from the top-k): a changed m_t changes the
    soft gate exactly; m_N is 0 at ignored rows."""
    z, _t, q, r, items, y, st = _case()
    g = torch.Generator().manual_seed(7)
    st.item_mass_N = torch.rand(st.item_mass_N.shape, generator=g).to(DEVICE)
    out = fn(z.clone().requires_grad_(True), st, q, r, items, y,
             LossConfig(gate=GateConfig(mode="soft"), chunk_size=4))  # fmt: skip
    valid = y != IGNORE_INDEX
    want = torch.where(valid, st.item_mass_N, 0.0)
    torch.testing.assert_close(out.m_N, want)
    torch.testing.assert_close(out.lam_N, want)


# --------------------------------------------------------- error of a small k
def _zipf_case(N: int = 48, V: int = 1500, seed: int = 0):
    """A realistic-looking pair: D Zipf-like over a shuffled vocabulary with a sharp head,
    the student a noisy, flatter copy of D (a partly trained student)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    t = torch.stack([(-1.2 * ranks.log())[torch.randperm(V, generator=g)] for _ in range(N)])
    t = t * (1 + torch.rand(N, 1, generator=g, dtype=torch.float64)) + torch.randn(
        N, V, generator=g, dtype=torch.float64) * 0.3  # fmt: skip
    z = 0.7 * t + torch.randn(N, V, generator=g, dtype=torch.float64) * 0.8
    return z, t


def _tail_identity(z, t, k):
    """Per row: r·KL(p_D(·|T) ‖ p_S(·|T)) and r·(−log min_{v∈T} p_S(v|T)), from dense logits."""
    logpd, logps = t.log_softmax(-1), z.log_softmax(-1)
    top = logpd.topk(k, dim=-1).indices
    tail = torch.ones_like(t, dtype=torch.bool).scatter(1, top, False)
    inf = torch.tensor(float("-inf"), dtype=t.dtype)
    ld_t = torch.where(tail, logpd, inf)
    ls_t = torch.where(tail, logps, inf)
    r = ld_t.logsumexp(-1).exp()
    cd, cs = ld_t - ld_t.logsumexp(-1, keepdim=True), ls_t - ls_t.logsumexp(-1, keepdim=True)
    kl_cond = torch.where(tail, cd.exp() * (cd - cs), 0.0).sum(-1)
    worst = -torch.where(tail, cs, math.inf).amin(-1)
    return r * kl_cond, r * worst, r


@pytest.mark.parametrize("k", [4, 32])
def test_small_k_error_identity_and_bound(k: int) -> None:
    """τ = 1, λ = 0: dense − sparse kd_dialog is exactly mean_t r_t·KL(p_D(·|T)‖p_S(·|T))
    (the chain rule of KL), so it lies in [0, mean_t r_t·(−log min_{v∈T} p_S(v|T))]; on this
    seeded Zipf-like pair the relative error of the mean dialogue KL is < 2 × mean r_t."""
    z, t = _zipf_case()
    N, V = z.shape
    items = torch.arange(10)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    q, r_row = torch.full((1, 10), 0.1, dtype=torch.float64), torch.zeros(N, dtype=torch.long)
    cfg = LossConfig(gate=GateConfig(mode="dialog"))
    st = SparseTeacher.from_logits(t, items, k)
    st.logp_NK = t.log_softmax(-1).gather(1, st.ids_NK)  # float64, as D's exact log-probs
    dense = conkd_loss_reference(z, t, q, r_row, items, y, cfg).kd_dialog
    sparse = conkd_loss_reference(z, st, q, r_row, items, y, cfg).kd_dialog
    gap, bound, r = _tail_identity(z, t, k)
    err = float(dense - sparse)
    assert err == pytest.approx(float(gap.mean()), rel=1e-9, abs=1e-12)
    assert 0 <= err <= float(bound.mean())
    assert err / float(dense) < 2 * float(r.mean()), (err / float(dense), float(r.mean()))
    assert float(r.mean()) > 0.01  # the tail is not negligible: the checks above have teeth


def test_teacher_bins_tempered_and_tail() -> None:
    """D's K+1 bins: the tail is 1 − Σ p_k; tempering is p^(1/τ) renormalised over the bins;
    k = |U| has no tail bin (-inf) and renormalises the top-k."""
    logp = torch.tensor([[0.5, 0.2, 0.1]]).log()
    ld, lt = teacher_bins(logp, 1.0, True, torch.float64)
    torch.testing.assert_close(ld.exp(), torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64))
    torch.testing.assert_close(lt.exp(), torch.tensor([0.2], dtype=torch.float64))
    ld, lt = teacher_bins(logp, 2.0, True, torch.float64)
    w = torch.tensor([0.5, 0.2, 0.1, 0.2], dtype=torch.float64).sqrt()
    torch.testing.assert_close(torch.cat([ld[0], lt]).exp(), w / w.sum())
    ld, lt = teacher_bins(logp, 1.0, False, torch.float64)
    assert lt.item() == float("-inf")
    torch.testing.assert_close(ld.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_bitmask_marks_exactly_the_top_k() -> None:
    ids = torch.tensor([[0, 7, 8, 20], [3, 3, 3, 3]])
    bits = topk_bitmask(ids, 21, torch.tensor([True, False]))
    assert bits.shape == (2, 3) and bits.dtype == torch.uint8
    assert bits[0].tolist() == [0b10000001, 0b00000001, 0b00010000] and bits[1].sum() == 0


# ----------------------------------------------- top-k plus draws from D's tail
def _sampled(t, items, k: int, samples: int, seed: int = 0) -> SparseTeacher:
    g = torch.Generator(device=t.device).manual_seed(seed)
    return SparseTeacher.sampled_from_logits(t, items, k, samples, generator=g)


def test_sampled_rows_are_a_distribution_with_the_exact_gate() -> None:
    """Head = D's top-(k − S) with its exact log-probs; the S drawn slots are distinct tail
    tokens; the stored probabilities sum to 1 (no tail bin); m_t is D's exact item mass."""
    _z, t, _q, _r, items, _y, _ = _case(N=40, V=50, I=8, k=12)
    st, top = _sampled(t, items, 12, 8), SparseTeacher.from_logits(t, items, 12)
    assert torch.equal(st.ids_NK[:, :4], top.ids_NK[:, :4])
    assert torch.equal(st.logp_NK[:, :4], top.logp_NK[:, :4])
    assert all(len(set(row.tolist())) == 12 for row in st.ids_NK)
    torch.testing.assert_close(st.logp_NK.exp().sum(-1), torch.ones(40), atol=1e-5, rtol=0)
    assert float(st.tail_mass().max()) < 1e-5
    assert torch.isinf(st.logp_NK).any()  # repeated draws leave zero-mass slots
    assert torch.equal(st.item_mass_N, top.item_mass_N)
    assert torch.equal(_sampled(t, items, 12, 8).ids_NK, st.ids_NK)  # seeded: reproducible
    assert torch.equal(_sampled(t, items, 12, 0).ids_NK, top.ids_NK)  # S = 0: the top-k
    full = SparseTeacher.from_logits(t, items, 50)
    assert torch.equal(_sampled(t, items, 50, 8).logp_NK, full.logp_NK)  # k = |U|: exact
    with pytest.raises(ValueError, match=r"samples = 13 must lie in \[0, k = 12\]"):
        _sampled(t, items, 12, 13)


@pytest.mark.parametrize("fn", _PARAMS)
def test_implementations_match_reference_with_drawn_slots(fn) -> None:
    """Zero-mass (-inf) slots and an empty tail bin: every implementation equals the
    reference, finite."""
    z, t, q, r, items, y, _ = _case()
    st = _sampled(t, items, 6, 4)
    assert torch.isinf(st.logp_NK[y != IGNORE_INDEX]).any()
    cfg = LossConfig(gate=GateConfig(mode="hard", eta=0.3), tau=1.0, w_ce=0.4, w_kd=0.8,
                     chunk_size=4)  # fmt: skip
    ref = run_loss(conkd_loss_reference, z, st, q, r, items, y, cfg)
    out = run_loss(fn, z, st, q, r, items, y, cfg)
    assert torch.isfinite(ref[0].loss) and torch.isfinite(ref[1]).all()
    assert_same(ref, out, TOL)


def test_drawn_slots_give_an_unbiased_gradient() -> None:
    """τ = 1: the mean gradient over many draws approaches the dense loss's gradient, where
    the top-k alone (same k) stays biased: the tail's shape is taught."""
    z, t, q, r, items, y, _ = _case(N=16, V=40, I=4, k=8)
    cfg = LossConfig(gate=GateConfig(mode="dialog"), tau=1.0, w_ce=0.0, w_kd=1.0)
    dense = run_loss(conkd_loss_reference, z, t, q, r, items, y, cfg)[1]
    topk = run_loss(conkd_loss_reference, z, SparseTeacher.from_logits(t, items, 8), q, r,
                    items, y, cfg)[1]  # fmt: skip
    n = 400
    mean = (
        sum(
            run_loss(conkd_loss_reference, z, _sampled(t, items, 8, 6, seed), q, r, items, y, cfg)[
                1
            ]
            for seed in range(n)
        )
        / n
    )
    scale = dense.abs().max()
    err_sampled = float((mean - dense).abs().max() / scale)
    err_topk = float((topk - dense).abs().max() / scale)
    assert err_sampled < 0.03, err_sampled  # Monte-Carlo error of 400 draws
    assert err_topk > 3 * err_sampled, (err_topk, err_sampled)
    print(f"max gradient error: top-k {err_topk:.3f}, mean of {n} draws {err_sampled:.4f}")


# ----------------------------------------------------------- ignored rows, bad input
@pytest.mark.parametrize("fn", _ALL)
def test_garbage_at_ignored_rows(fn) -> None:
    """Ignored rows' ids, log-probs and mass may be garbage (zeros, -inf, NaN, out of range):
    no NaN, and the same result as with clean rows."""
    z, _t, q, r, items, y, st = _case()
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=1.5, chunk_size=4)
    clean = run_loss(fn, z, st, q, r, items, y, cfg)
    ign = y == IGNORE_INDEX
    bad = SparseTeacher(st.ids_NK.clone(), st.logp_NK.clone(), st.item_mass_N.clone())
    bad.ids_NK[ign] = 0
    bad.ids_NK[ign.nonzero()[0]] = -5
    bad.logp_NK[ign] = float("-inf")
    bad.logp_NK[ign.nonzero()[-1]] = float("nan")
    bad.item_mass_N[ign] = float("nan")
    out = run_loss(fn, z, bad, q, r, items, y, cfg)
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0].loss)
    assert_outputs_close(clean[0], out[0], 1e-6)
    torch.testing.assert_close(out[1], clean[1])


@pytest.mark.parametrize("fn", _ALL)
def test_all_rows_ignored(fn) -> None:
    """No loss row (ids all garbage): loss, parts and gradient are 0."""
    z, _t, q, r, items, y, st = _case()
    y_all = torch.full_like(y, IGNORE_INDEX)
    st.ids_NK.fill_(-1)
    out = run_loss(fn, z, st, q, r, items, y_all, LossConfig(chunk_size=4))
    assert out[0].loss.item() == 0 and out[0].n_tokens == 0 and not out[1].any()


def _bad(st: SparseTeacher, **kw) -> SparseTeacher:
    return SparseTeacher(**{"ids_NK": st.ids_NK, "logp_NK": st.logp_NK,
                            "item_mass_N": st.item_mass_N, **kw})  # fmt: skip


def test_bad_input_raises() -> None:
    """K > |U|, ids out of range, repeated ids, mismatched rows, NaN log-probs, a mass
    outside [0, 1], float ids: a ValueError naming the problem, in every entry point."""
    z, _t, q, r, items, y, st = _case(N=8, V=20, k=4)
    V = z.shape[-1]
    valid = (y != IGNORE_INDEX).nonzero()[0, 0]
    big = SparseTeacher(torch.arange(V + 1).expand(8, -1), torch.zeros(8, V + 1),
                        st.item_mass_N)  # fmt: skip
    out_of_range = st.ids_NK.clone()
    out_of_range[valid, 0] = V
    rep = st.ids_NK.clone()
    rep[valid, 1] = rep[valid, 0]
    nan = st.logp_NK.clone()
    nan[valid, 2] = float("nan")
    mass = st.item_mass_N.clone()
    mass[valid] = 1.5
    cases = {
        "k = 21 must lie in": big,
        "must lie in \\[0, 20\\)": _bad(st, ids_NK=out_of_range),
        "distinct": _bad(st, ids_NK=rep),
        "leading shape": _bad(st, ids_NK=st.ids_NK[:-1], logp_NK=st.logp_NK[:-1]),
        "ids .* and logp .* must both": _bad(st, logp_NK=st.logp_NK[:, :3]),
        "item_mass .* must be": _bad(st, item_mass_N=st.item_mass_N[:-1]),
        "NaN": _bad(st, logp_NK=nan),
        "item_mass must lie in": _bad(st, item_mass_N=mass),
        "integer": _bad(st, ids_NK=st.ids_NK.float()),
    }
    eye = torch.eye(V)
    entries = [
        lambda s: conkd_loss_reference(z, s, q, r, items, y, LossConfig()),
        lambda s: conkd_loss_chunked(z, s, q, r, items, y, LossConfig()),
        lambda s: conkd_loss_fused_linear(z, eye, s, q, r, items, y, LossConfig()),
    ]
    if tk.HAVE_TRITON:
        entries.append(lambda s: _tri(z, s, q, r, items, y, LossConfig()))
    for msg, bad in cases.items():
        for entry in entries:
            with pytest.raises(ValueError, match=msg):
                entry(bad)
