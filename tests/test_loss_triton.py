"""The Triton ConKD kernel against the pure-PyTorch reference (forward and backward).

Without CUDA the kernel runs under Triton's interpreter. Triton reads ``TRITON_INTERPRET``
when ``triton.jit`` wraps a function (``triton.knobs.runtime.interpret``, read from the
environment at that moment), so tests/conftest.py sets it before anything imports triton;
the kernel module also jits lazily at the first launch, per interpreter mode, so the order of
imports across test modules does not matter. With CUDA the same tests run compiled on the
GPU, and the ``gpu`` tests at the end run too. Interpreted kernels are slow: shapes stay
small, with one odd-shape case (N = 41, V = 1271, 97 scattered items) over 3 blocks of 512
columns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from conkd_scale.loss import (
    IGNORE_INDEX,
    ConKDLoss,
    GateConfig,
    LossConfig,
    conkd_loss,
    conkd_loss_chunked,
    conkd_loss_reference,
    resolve_impl,
)
from conkd_scale.loss import dispatch as D
from conkd_scale.loss import triton_kernel as tk
from tests.loss_helpers import (
    against_reference,
    assert_inplace_through_lm_head,
    assert_same,
    logits_case,
    one_thread,  # noqa: F401 (autouse fixture)
    run_loss,
)

pytestmark = [
    pytest.mark.skipif(not tk.HAVE_TRITON, reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # interpreter
]

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
MODES = ("hard", "soft", "static", "oracle", "dialog", "rec")
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-2}

_case = partial(logits_case, N=13, V=301, I=23, S=3, device=DEVICE)
_both = partial(against_reference, tk.conkd_loss_triton)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter: small blocks so that rows span several."""
    if not CUDA:
        monkeypatch.setenv("CONKD_TRITON_BLOCK_V", "128")


@pytest.mark.parametrize("mode", MODES)
def test_odd_shape_fp32(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """N = 41, V = 1271 (3 blocks of 512, the last partial), 97 items, τ = 1."""
    if not CUDA:
        monkeypatch.setenv("CONKD_TRITON_BLOCK_V", "512")
    data = _case(N=41, V=1271, I=97, S=5)
    cfg = LossConfig(gate=GateConfig(mode=mode), w_ce=0.4, w_kd=0.8)
    ref, tri = _both(*data, cfg=cfg)
    assert_same(ref, tri, TOL[torch.float32])
    if mode in ("hard", "oracle"):
        assert 0 < tri[0].lam_N.sum() < tri[0].n_tokens  # the gate really mixes here


@pytest.mark.parametrize("mode", MODES)
def test_tempered_fp32(mode: str) -> None:
    cfg = LossConfig(gate=GateConfig(mode=mode), tau=2.0, w_ce=0.3, w_kd=1.1)
    assert_same(*_both(*_case(seed=1), cfg=cfg), TOL[torch.float32])


@pytest.mark.parametrize(("mode", "dtype"), [("hard", torch.bfloat16), ("soft", torch.bfloat16),
                                             ("rec", torch.float16)])  # fmt: skip
def test_half_precision(mode: str, dtype: torch.dtype) -> None:
    cfg = LossConfig(gate=GateConfig(mode=mode), tau=1.5)
    assert_same(*_both(*_case(dtype=dtype, seed=2), cfg=cfg), TOL[dtype])


def test_mixed_dtypes_bf16_teacher_fp32_student() -> None:
    z, t, *rest = _case(seed=3)
    cfg = LossConfig(gate=GateConfig(mode="soft"))
    assert_same(*_both(z, t.bfloat16(), *rest, cfg=cfg), TOL[torch.float32])


@pytest.mark.parametrize("inplace", [False, True])
def test_grad_output_not_one(inplace: bool) -> None:
    cfg = LossConfig(gate=GateConfig(mode="hard"), tau=1.3)
    assert_same(*_both(*_case(seed=4), cfg=cfg, grad_scale=-2.5, inplace=inplace), 1e-5)


@pytest.mark.parametrize("c", [0.0, 1.0])
def test_lambda_extremes(c: float) -> None:
    cfg = LossConfig(gate=GateConfig(mode="static", c=c), tau=2.0)
    ref, tri = _both(*_case(seed=5), cfg=cfg)
    assert_same(ref, tri, 1e-5)
    assert (tri[0].kd_rec == 0) if c == 0.0 else (tri[0].kd_dialog == 0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_hard_gate_thresholds(eta: float) -> None:
    """η = 0: every row with item mass opens (λ = 1); η = 1: none can (m ≤ 1, strict >)."""
    cfg = LossConfig(gate=GateConfig(mode="hard", eta=eta))
    ref, tri = _both(*_case(seed=6), cfg=cfg)
    assert_same(ref, tri, 1e-5)
    valid = tri[0].lam_N[_case(seed=6)[-1] != IGNORE_INDEX]
    assert bool((valid == (1.0 if eta == 0.0 else 0.0)).all())


def test_all_rows_ignored() -> None:
    z, t, q, _, items, _ = _case(N=6, V=70, I=5)
    labels = torch.full((6,), IGNORE_INDEX, device=DEVICE)
    rec_row = torch.full((6,), -1, device=DEVICE)
    for inplace, rec in ((False, q), (True, q[:0])):
        zz = z.clone().requires_grad_(True)
        out = tk.conkd_loss_triton(zz * 1.0, t, rec, rec_row, items, labels, LossConfig(),
                                   inplace=inplace)  # fmt: skip
        out.loss.backward()
        assert out.n_tokens == 0
        for v in (out.loss, out.ce, out.kd, out.kd_dialog, out.kd_rec):
            assert v.item() == 0.0
        assert torch.equal(zz.grad, torch.zeros_like(z))
        assert not out.lam_N.any() and not out.m_N.any()


def test_batched_shape_without_ignored_rows() -> None:
    z, t, q, rec_row, items, labels = _case(N=12, ignore_every=0, seed=7)
    B, T = 3, 4
    data = (z.view(B, T, -1), t.view(B, T, -1), q, rec_row.view(B, T), items, labels.view(B, T))
    ref, tri = _both(*data, cfg=LossConfig(gate=GateConfig(mode="soft")))
    assert_same(ref, tri, 1e-5)
    assert tri[1].shape == (B, T, z.shape[1]) and tri[0].lam_N.shape == (B * T,)


def test_stable_for_huge_and_infinite_logits() -> None:
    z, t, q, rec_row, items, labels = _case(N=8, V=64, I=8, seed=8)
    z, t = z * 3e3, t * 3e3  # magnitudes ~1e4
    item_set = set(items.tolist())
    words = [v for v in range(64) if v not in item_set]
    z[0, words[:5]] = t[0, words[:5]] = -float("inf")  # both -inf
    t[2, 10:] = -float("inf")  # teacher mass on few columns
    z[3, words[5:9]] = -float("inf")  # student -inf where the teacher is finite
    q = q.clone()
    q[0, 1] = 0.0
    q = q / q.sum(-1, keepdim=True)
    labels[0] = words[10]
    for mode in ("hard", "soft", "rec", "static"):
        cfg = LossConfig(gate=GateConfig(mode=mode))
        ref, tri = _both(z, t, q, rec_row, items, labels, cfg=cfg)
        assert torch.isfinite(tri[1]).all()
        assert torch.equal(torch.isfinite(tri[0].loss), torch.isfinite(ref[0].loss))
        if torch.isfinite(ref[0].loss):
            assert_same(ref, tri, 1e-4)
        else:  # KL(p_D ‖ p_S) = ∞ where p_S = 0 < p_D: the gradient is still finite and equal
            torch.testing.assert_close(tri[1], ref[1], rtol=1e-4, atol=1e-6)


def test_matches_chunked_path() -> None:
    """Two implementations of the same function agree (here without the reference)."""
    data = _case(seed=9)
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=0.7, chunk_size=5)
    a = run_loss(conkd_loss_chunked, *data, cfg)
    b = run_loss(tk.conkd_loss_triton, *data, cfg)
    assert_same(a, b, 1e-5)


@pytest.mark.parametrize("ignore_every", [0, 3])
def test_inplace_through_lm_head(ignore_every: int) -> None:
    """Gradient written into the logits buffer; the lm_head matmul's backward still works."""
    g = torch.Generator().manual_seed(10)
    _, t, q, rec_row, items, labels = _case(N=11, V=97, I=9, seed=10, ignore_every=ignore_every)
    h = torch.randn(11, 8, generator=g).to(DEVICE)
    w = torch.randn(8, 97, generator=g).to(DEVICE)
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=1.3)
    assert_inplace_through_lm_head(tk.conkd_loss_triton, h, w, t, q, rec_row, items, labels, cfg)


def test_inplace_refuses_a_saved_tensor() -> None:
    """The kernel writes through a raw pointer; the version bump still lets autograd catch
    logits that another node saved (here exp's output)."""
    _, t, q, rec_row, items, labels = _case(N=5, V=40, I=4)
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    logits = x.exp()
    out = tk.conkd_loss_triton(logits, t, q, rec_row, items, labels, LossConfig(), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_vocabulary_slice_of_padded_logits() -> None:
    """Rows with stride > V (a [:, :V] slice of vocabulary-padded logits) are read, and the
    gradient written in place, without a copy; the padding columns stay untouched and the
    gradient reaches the padded tensor's producer."""
    z, t, q, rec_row, items, labels = _case(N=7, V=90, I=6, seed=11)
    leaf = torch.randn(7, 128, device=DEVICE, requires_grad=True)
    buf = leaf * 1.0  # [N, V_pad] non-leaf logits (mul by a number saves nothing)
    with torch.no_grad():
        buf[:, :90] = z
    pad = buf[:, 90:].detach().clone()
    view = buf[:, :90]
    assert view.stride(0) == 128 and not view.is_contiguous()
    cfg = LossConfig(gate=GateConfig(mode="soft"))
    ref, g_ref = run_loss(conkd_loss_reference, z, t, q, rec_row, items, labels, cfg)
    out = tk.conkd_loss_triton(view, t, q, rec_row, items, labels, cfg, inplace=True)
    torch.testing.assert_close(buf.detach()[:, :90], g_ref, rtol=1e-5, atol=1e-7)  # in place
    assert torch.equal(buf.detach()[:, 90:], pad)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(leaf.grad[:, :90], g_ref, rtol=1e-5, atol=1e-7)
    assert not leaf.grad[:, 90:].any()


@pytest.mark.parametrize("inplace", [False, True])
def test_no_grad_evaluation_writes_nothing(inplace: bool) -> None:
    z, t, q, rec_row, items, labels = _case(seed=13)
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=1.5)
    ref = run_loss(conkd_loss_reference, z, t, q, rec_row, items, labels, cfg)
    z_before = z.clone()
    with torch.no_grad():
        out = tk.conkd_loss_triton(z, t, q, rec_row, items, labels, cfg, inplace=inplace)
    assert torch.equal(z, z_before) and out.loss.grad_fn is None
    torch.testing.assert_close(out.loss, ref[0].loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.lam_N, ref[0].lam_N, rtol=1e-6, atol=1e-7)


def test_teacher_gets_no_gradient_and_repeated_items_rejected() -> None:
    z, t, q, rec_row, items, labels = _case(N=5, V=30, I=4)
    z, t = z.clone().requires_grad_(True), t.clone().requires_grad_(True)
    tk.conkd_loss_triton(z, t, q, rec_row, items, labels, LossConfig()).loss.backward()
    assert t.grad is None and z.grad is not None
    dup = items.clone()
    dup[1] = dup[0]
    with pytest.raises(ValueError, match="must not repeat"):
        tk.conkd_loss_triton(z, t, q, rec_row, dup, labels, LossConfig())


def test_module_wrapper_and_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _case(seed=12)
    cfg = LossConfig(gate=GateConfig(mode="oracle"), tau=1.2)
    mod = ConKDLoss(cfg)
    assert "oracle" in repr(mod)
    z = data[0].clone().requires_grad_(True)
    out = mod(z, *data[1:])
    out.loss.backward()
    assert type(out.loss.grad_fn).__name__.startswith("ConKDTriton")
    assert_same(run_loss(conkd_loss_reference, *data, cfg), (out, z.grad), 1e-5)

    # the module's choice: the kernel wherever it runs, interpreted ones included
    assert resolve_impl("auto", DEVICE, interpreter=True) == "triton"
    assert resolve_impl(LossConfig(), torch.device("cuda")) == "triton"
    assert resolve_impl(LossConfig(), torch.device("cpu")) == "chunked"

    # conkd_loss where the kernel runs (the interpreter stands in for CUDA without one):
    # "triton" is the kernel; "fused_linear" given logits runs it on them, with a warning
    if not CUDA:
        monkeypatch.setattr(D, "_triton_runs", lambda device, interpreter: True)
    z1 = data[0].clone().requires_grad_(True)
    out1 = conkd_loss(z1, *data[1:], LossConfig(gate=cfg.gate, tau=cfg.tau, impl="triton"))
    assert type(out1.loss.grad_fn).__name__.startswith("ConKDTriton")
    torch.testing.assert_close(out1.loss.detach(), out.loss.detach())
    monkeypatch.setattr(D, "_WARNED_FUSED", False)
    with pytest.warns(UserWarning, match="called with logits"):
        out2 = conkd_loss(*data, LossConfig(gate=cfg.gate, tau=cfg.tau, impl="fused_linear"))
    torch.testing.assert_close(out2.loss, out.loss.detach())


def test_kernel_compiles_for_sm90() -> None:
    """Compile (not run) the kernel, and that of a sparse dialogue teacher (loss/triton_sparse.py),
    for an H100 with Triton's bundled ptxas: catches code the
    interpreter accepts but the compiler rejects. Needs no GPU. A fresh process: interpreter
    mode leaves state in triton.language that the compiler trips over."""
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "from conkd_scale.loss.aot import aot_compile\n"
        "for args in [('bf16', 'hard', False), ('fp32', 'soft', True), ('fp16', 'oracle', True),"
        " ('bf16', 'rec', True), ('bf16', 'dialog', False), ('fp32', 'static', False)]:\n"
        "    assert aot_compile(*args).asm['cubin']\n"
        "assert aot_compile('bf16', 'soft', True, write_grad=False).asm['cubin']\n"
        "for args in [('bf16', 'hard', False), ('fp32', 'soft', True), ('bf16', 'rec', True)]:\n"
        "    assert aot_compile(*args, sparse=True).asm['cubin']\n"
        "assert aot_compile('bf16', 'oracle', False, sparse=True, block_k=128).asm['cubin']\n"
        "print('compiled')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300, check=False)  # fmt: skip
    if res.returncode != 0 and "ptxas" in res.stderr.lower() and "error" not in res.stderr:
        pytest.skip(f"no usable ptxas: {res.stderr[-300:]}")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the kernel runs compiled there)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic_shape(dtype: torch.dtype) -> None:
    """N = 512, |U| = 57,181 with 6,924 items appended after the words, against the reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    N, W, I, S = 512, 50_257, 6_924, 32
    z = (torch.randn(N, W + I, device="cuda", generator=g) * 3).to(dtype)
    t = torch.randn(N, W + I, device="cuda", generator=g) * 3
    t[: N // 3, W:] += 4.0
    items = torch.arange(W, W + I, device="cuda")
    q = torch.softmax(torch.randn(S, I, device="cuda", generator=g) * 2, -1)
    labels = torch.randint(0, W + I, (N,), device="cuda", generator=g)
    labels[::9] = IGNORE_INDEX
    rec_row = torch.randint(0, S, (N,), device="cuda", generator=g)
    for mode in ("hard", "soft"):
        cfg = LossConfig(gate=GateConfig(mode=mode), tau=1.5)
        assert_same(*_both(z, t.to(dtype), q, rec_row, items, labels, cfg=cfg), TOL[dtype])


@pytest.mark.gpu
@gpu
def test_gpu_faster_and_leaner_than_reference() -> None:
    N, V, I = 2048, 57_181, 6_924
    z = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    items = torch.arange(V - I, V, device="cuda")
    q = torch.softmax(torch.randn(4, I, device="cuda"), -1)
    labels = torch.randint(0, V, (N,), device="cuda")
    rec_row = torch.randint(0, 4, (N,), device="cuda")
    cfg = LossConfig()

    def measure(fn, **kw):
        zz = z.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(zz, t, q, rec_row, items, labels, cfg, **kw).loss.backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), torch.cuda.max_memory_allocated() - base

    measure(tk.conkd_loss_triton)  # compile
    t_ref, m_ref = measure(conkd_loss_reference)
    t_tri, m_tri = measure(tk.conkd_loss_triton, inplace=True)
    assert t_tri < t_ref, (t_tri, t_ref)
    assert m_tri < 0.25 * m_ref, (m_tri, m_ref)
