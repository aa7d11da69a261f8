"""The loss package's surface: configs, the dispatcher, gate statistics."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from conkd_scale.config import build_config, config_to_dict
from conkd_scale.data.sequences import IGNORE
from conkd_scale.loss import (
    IGNORE_INDEX,
    GateConfig,
    LossConfig,
    conkd_loss,
    gate_counts,
    gate_rates,
    gate_stats,
    resolve_impl,
)
from conkd_scale.utils.errors import ConfigError

CPU = torch.device("cpu")


def test_defaults_are_method_decisions() -> None:
    cfg = LossConfig()
    assert (cfg.tau, cfg.w_ce, cfg.w_kd) == (1.0, 0.5, 0.5)
    assert (cfg.gate.mode, cfg.gate.eta, cfg.gate.c) == ("hard", 0.5, 0.5)
    assert (cfg.impl, cfg.chunk_size) == ("auto", 1024)
    assert IGNORE_INDEX == IGNORE
    assert config_to_dict(cfg)["gate"]["eta"] == 0.5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("tau=0", "loss.tau"),
        ("tau=-1", "loss.tau"),
        ("w_ce=-0.1", "loss.w_ce"),
        ("w_kd=-1", "loss.w_kd"),
        ("chunk_size=0", "loss.chunk_size"),
        ("impl=cuda", "impl"),  # type error from the generic reader: key relative to root
        ("gate.eta=-0.01", "loss.gate.eta"),
        ("gate.c=1.01", "loss.gate.c"),
    ],
)
def test_invalid_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(LossConfig, overrides=[override])


def test_overrides() -> None:
    cfg = build_config(LossConfig, overrides=["gate.mode=oracle", "tau=2", "chunk_size=64"])
    assert (cfg.gate.mode, cfg.tau, cfg.chunk_size) == ("oracle", 2.0, 64)


def _inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 30, generator=g, requires_grad=True)
    t = torch.randn(2, 6, 30, generator=g)
    labels = torch.randint(0, 30, (2, 6), generator=g)
    labels[:, 0] = IGNORE_INDEX
    labels[0, 3] = 17  # an item target
    rec_row = torch.where(labels == IGNORE_INDEX, -1, torch.tensor([[0], [1]]))
    q = torch.softmax(torch.randn(2, 4, generator=g), -1)
    return z, t, q, rec_row, torch.tensor([29, 3, 17, 8]), labels


def test_dispatch() -> None:
    assert resolve_impl(LossConfig(), CPU) == "chunked"
    assert resolve_impl(LossConfig(impl="reference"), CPU) == "reference"
    args = _inputs()
    out_auto = conkd_loss(*args, LossConfig())
    assert type(out_auto.loss.grad_fn).__name__.startswith("ConKDChunked")
    out_ref = conkd_loss(*args, LossConfig(impl="reference"))
    torch.testing.assert_close(out_auto.loss, out_ref.loss)
    with pytest.raises(ConfigError, match="needs CUDA tensors|needs the triton package"):
        conkd_loss(*args, LossConfig(impl="triton"))
    # fused_linear runs anywhere; given logits on the CPU it is the chunked path
    assert resolve_impl(LossConfig(impl="fused_linear"), CPU) == "fused_linear"
    out_fl = conkd_loss(*args, LossConfig(impl="fused_linear"))
    assert type(out_fl.loss.grad_fn).__name__.startswith("ConKDChunked")
    torch.testing.assert_close(out_fl.loss, out_ref.loss)
    # a bare name (a function's backend argument) raises RuntimeError where it cannot run
    assert resolve_impl("chunked", CPU) == "chunked"
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        resolve_impl("triton", CPU)
    # auto picks the fused lm_head path only on CUDA, and only for callers with hidden states
    assert resolve_impl(LossConfig(), CPU, hidden_states=True) == "chunked"
    if importlib.util.find_spec("triton") is not None:
        cuda = torch.device("cuda")
        assert resolve_impl(LossConfig(), cuda, hidden_states=True) == "fused_linear"
        assert resolve_impl(LossConfig(), cuda) == "triton"


def test_gate_stats() -> None:
    labels = torch.tensor([5, 9, IGNORE_INDEX, 2, 9, 1])
    items = torch.tensor([9, 2])  # gold item positions: rows 1, 3, 4
    lam = torch.tensor([0.9, 0.8, 1.0, 0.1, 0.0, 0.6])  # > η at rows 0, 1, (2 ignored), 5
    m = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.0, 0.6])
    s = gate_stats(lam, m, labels, items, eta=0.5)
    assert s["gate_n_tokens"] == 5 and s["gate_n_pred"] == 3 and s["gate_n_gold"] == 3
    assert s["gate_mean"] == pytest.approx(0.48)
    assert s["item_mass_mean"] == pytest.approx(0.48)
    assert s["gate_frac_above_eta"] == pytest.approx(0.6)
    assert s["gate_precision"] == pytest.approx(1 / 3)
    assert s["gate_recall"] == pytest.approx(1 / 3)
    assert all(math.isfinite(v) for v in s.values())


def test_gate_stats_without_positives_omits_ratios() -> None:
    labels = torch.tensor([5, 6, IGNORE_INDEX])
    s = gate_stats(torch.zeros(3), torch.zeros(3), labels, torch.tensor([9]), eta=0.5)
    assert "gate_precision" not in s and "gate_recall" not in s
    assert s["gate_frac_above_eta"] == 0.0
    s = gate_stats(torch.zeros(2), torch.zeros(2), torch.full((2,), IGNORE_INDEX),
                   torch.tensor([9]), eta=0.5)  # fmt: skip
    assert s == {"gate_n_tokens": 0, "gate_n_pred": 0, "gate_n_gold": 0, "gate_n_hit": 0}


def test_gate_rates_of_pooled_counts_equal_the_whole() -> None:
    """How the distillation job logs the gate: each micro batch's gate_counts, added up over
    micro batches (and ranks), then gate_rates; the same figures as one batch of all rows."""
    labels = torch.tensor([5, 9, 4, 2, 9, 1, 2])
    items = torch.tensor([9, 2])
    lam = torch.tensor([0.9, 0.8, 0.3, 0.1, 0.0, 0.6, 0.7])
    m = torch.tensor([0.9, 0.7, 0.3, 0.2, 0.1, 0.6, 0.7])
    whole = gate_stats(lam, m, labels, items, eta=0.5)
    parts = [
        gate_counts(lam[s], m[s], torch.isin(labels[s], items), 0.5)
        for s in (slice(0, 3), slice(3, 7))
    ]
    pooled = {k: sum(c[k] for c in parts) for k in parts[0]}
    rates = gate_rates(pooled)
    assert set(rates) == set(whole) - {k for k in whole if k.startswith("gate_n_")}
    for k, v in rates.items():
        assert v == pytest.approx(whole[k]), k
    assert gate_rates({}) == {} and gate_rates({**pooled, "gate_n_tokens": 0.0}) == {}


def test_gate_stats_from_a_loss_output() -> None:
    z, t, q, rec_row, items, labels = _inputs()
    cfg = LossConfig(gate=GateConfig(mode="oracle"))
    out = conkd_loss(z, t, q, rec_row, items, labels, cfg)
    s = gate_stats(out.lam_N, out.m_N, labels, items, cfg.gate.eta)
    assert s["gate_n_tokens"] == out.n_tokens == 10
    assert s["gate_n_gold"] >= 1
    assert s["gate_precision"] == s["gate_recall"] == 1.0  # the oracle is exact
