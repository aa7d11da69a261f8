"""The benchmarks' naive baseline computes the same function as the reference."""

from __future__ import annotations

import pytest
import torch

from conkd_scale.loss import IGNORE_INDEX, GateConfig, LossConfig, conkd_loss_reference
from conkd_scale.loss.naive import conkd_loss_naive


def _case(N: int = 29, V: int = 257, I: int = 19, S: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    items = torch.randperm(V, generator=g)[:I]
    t[: N // 2, items] += 5.0  # the hard gate opens on the first half
    q = torch.softmax(torch.randn(S, I, generator=g, dtype=torch.float64) * 2, -1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = items[: len(labels[::4])]
    labels[1::5] = IGNORE_INDEX
    rec_row = torch.randint(0, S, (N,), generator=g)
    rec_row[labels == IGNORE_INDEX] = -1
    return z, t, q, rec_row, items, labels


@pytest.mark.parametrize("mode", ["hard", "soft", "static", "oracle", "dialog", "rec"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_naive_equals_reference(mode: str, tau: float) -> None:
    z, *rest = _case()
    cfg = LossConfig(gate=GateConfig(mode=mode), tau=tau, w_ce=0.3, w_kd=0.9)
    outs, grads = [], []
    for fn in (conkd_loss_reference, conkd_loss_naive):
        zz = z.clone().requires_grad_(True)
        out = fn(zz, *rest, cfg)
        (out.loss * -1.3).backward()
        outs.append(out)
        grads.append(zz.grad)
    ref, nai = outs
    for key in ("loss", "ce", "kd", "kd_dialog", "kd_rec"):
        torch.testing.assert_close(getattr(nai, key), getattr(ref, key), msg=key)
    torch.testing.assert_close(nai.lam_N, ref.lam_N)
    torch.testing.assert_close(nai.m_N, ref.m_N)
    assert nai.n_tokens == ref.n_tokens
    torch.testing.assert_close(grads[1], grads[0])
    if mode == "hard":
        assert 0 < float(ref.lam_N.sum()) < ref.n_tokens  # the gate really mixes


def test_naive_fp32_batched() -> None:
    z, t, q, rec_row, items, labels = _case(N=24, seed=1)
    cfg = LossConfig()
    ref = conkd_loss_reference(z.float(), t.float(), q.float(), rec_row, items, labels, cfg)
    nai = conkd_loss_naive(z.float().view(4, 6, -1), t.float().view(4, 6, -1), q.float(),
                           rec_row.view(4, 6), items, labels.view(4, 6), cfg)  # fmt: skip
    torch.testing.assert_close(nai.loss, ref.loss, rtol=1e-5, atol=1e-6)
