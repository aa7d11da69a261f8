"""η = auto (METHOD.md "The gate"): the hard-gate threshold chosen by F1 on a trace."""

import pytest
import torch

from conkd_scale.config import build_config
from conkd_scale.loss.config import GateConfig, LossConfig
from conkd_scale.loss.gates import choose_eta, gate, gate_detection
from conkd_scale.utils.errors import ConfigError

# a hand-made trace: D's item mass per position and whether the gold next token is an item
M = torch.tensor([0.9, 0.6, 0.3, 0.25, 0.2, 0.1, 0.05, 0.4])
GOLD = torch.tensor([True, True, True, False, False, False, False, False])


def test_detection_counts_by_hand():
    d = gate_detection(M, GOLD, 0.5)  # predicts 0.9, 0.6: both gold
    assert (d["n_pred"], d["n_hit"], d["n_gold"]) == (2, 2, 3)
    assert d["precision"] == 1.0 and d["recall"] == pytest.approx(2 / 3)
    d = gate_detection(M, GOLD, 0.2)  # predicts 0.9 0.6 0.3 0.25 0.4: 3 hits of 5
    assert d["f1"] == pytest.approx(2 * 0.6 * 1.0 / 1.6)


def test_choose_eta_maximises_f1_on_the_grid():
    # η in [0.30, 0.40) predicts {0.9, 0.6, 0.4}: P 2/3, R 2/3; η in [0.25, 0.30) adds the
    # gold 0.3: P 3/4, R 1 -> F1 6/7, the best; ties go to the smallest η (0.25)
    eta = choose_eta(M, GOLD)
    assert eta == 0.25
    best = gate_detection(M, GOLD, eta)["f1"]
    assert best == pytest.approx(6 / 7)
    assert all(gate_detection(M, GOLD, k / 100)["f1"] <= best for k in range(100))


def test_choose_eta_needs_gold_positions():
    with pytest.raises(ValueError, match="no gold item position"):
        choose_eta(M, torch.zeros_like(GOLD))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half", "nan"])
def test_bad_eta_is_a_config_error(value):
    with pytest.raises(ConfigError, match="gate.eta"):
        build_config(LossConfig, None, [f"gate.eta={value}"])


def test_auto_eta_must_be_resolved_before_the_loss():
    cfg = build_config(LossConfig, None, ["gate.eta=auto"])
    assert cfg.gate.eta == "auto"
    with pytest.raises(ConfigError, match="validation split"):
        gate(M, torch.zeros(8, dtype=torch.long), torch.tensor([1]), cfg.gate)
    assert GateConfig(eta=0.3).threshold == 0.3
