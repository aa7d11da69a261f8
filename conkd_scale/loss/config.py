"""Configs of the ConKD student loss (METHOD.md "The gate", "The student loss").

Every **[decision]** of METHOD.md that concerns the loss is a field here with the METHOD
default. In a run config these live under ``loss`` (``loss.tau=2``, ``loss.gate.mode=soft``).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from conkd_scale.utils.errors import ConfigError

GateMode = Literal["hard", "soft", "static", "oracle", "dialog", "rec"]
LossImpl = Literal["auto", "reference", "chunked", "triton", "fused_linear"]


def _check_literal(value: object, tp: object, key: str) -> None:
    allowed = typing.get_args(tp)
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")


def _check_range(value: float, lo: float, hi: float, key: str) -> None:
    if not (isinstance(value, int | float) and lo <= value <= hi):
        raise ConfigError(f"{key}: {value!r} must be a number in [{lo}, {hi}]")


@dataclass
class GateConfig:
    """How the per-token mixing weight λ_t between the two teachers is computed.

    ``m_t`` is the dialogue teacher's untempered probability mass on item tokens.
    """

    mode: GateMode = "hard"  # hard: λ=1[m>η]; soft: λ=m; static: λ=c; oracle: λ=1[y_t ∈ I]
    # (gold token, an upper bound); dialog: λ=0 (dialogue-only KD); rec: λ=1 (rec-only KD)
    eta: float | Literal["auto"] = 0.5  # [decision] threshold η of the hard gate (strict:
    # λ=1 only when m > η), in [0, 1]; or auto: the η whose hard gate best detects (F1) the
    # positions whose gold next token is an item, on the validation split (the distillation
    # job resolves it before training: loss/gates.py::choose_eta)
    c: float = 0.5  # [decision] constant λ of the static-gate ablation; in [0, 1]

    def __post_init__(self) -> None:
        _check_literal(self.mode, GateMode, "loss.gate.mode")
        number = isinstance(self.eta, int | float) and 0.0 <= self.eta <= 1.0
        if self.eta != "auto" and not number:
            raise ConfigError(f"loss.gate.eta: {self.eta!r} must be a number in [0, 1] or auto")
        _check_range(self.c, 0.0, 1.0, "loss.gate.c")

    @property
    def threshold(self) -> float:
        """η as a number; ``auto`` must have been resolved on the validation split first."""
        if self.eta == "auto":
            raise ConfigError(
                "loss.gate.eta=auto is resolved on the validation split before training "
                "(the distillation job does it); set a number to use the loss on its own"
            )
        return float(self.eta)


@dataclass
class LossConfig:
    """The student loss ``L = Σ_t (w_ce·ce_t + w_kd·kd_t) / N_response_tokens``."""

    gate: GateConfig = field(default_factory=GateConfig)  # λ_t between D (1−λ) and R (λ)
    tau: float = 1.0  # [decision] KD temperature τ (> 0): student and D logits are divided by
    # τ, R's item distribution is tempered as q^(1/τ) renormalised over items, kd_t scaled by τ²
    w_ce: float = 0.5  # [decision] weight of the (untempered) cross-entropy on the gold token
    w_kd: float = 0.5  # [decision] weight of the gated KD term (0: the one-hot multi-task row)
    impl: LossImpl = "auto"  # the same function by: auto (chunked on the CPU; on CUDA the
    # Triton kernel, fused with the student's lm_head where the caller has hidden states),
    # reference (pure PyTorch, [N, V] temporaries), chunked (CPU path), triton (CUDA:
    # loss/triton_kernel.py), fused_linear (lm_head + loss a chunk of rows at a time, no
    # [N, V] student logits: loss/fused_linear.py; Triton per chunk on CUDA, else chunked)
    chunk_size: int = 1024  # rows (response tokens) per chunk of the chunked path; >= 1

    def __post_init__(self) -> None:
        if not isinstance(self.gate, GateConfig):
            raise ConfigError(f"loss.gate: expected a GateConfig, got {self.gate!r}")
        if not (isinstance(self.tau, int | float) and self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigError(f"loss.tau: {self.tau!r} must be a finite number > 0")
        for key in ("w_ce", "w_kd"):
            v = getattr(self, key)
            if not (isinstance(v, int | float) and v >= 0 and math.isfinite(v)):
                raise ConfigError(f"loss.{key}: {v!r} must be a finite number >= 0")
        _check_literal(self.impl, LossImpl, "loss.impl")
        if isinstance(self.chunk_size, bool) or not (
            isinstance(self.chunk_size, int) and self.chunk_size >= 1
        ):
            raise ConfigError(f"loss.chunk_size: {self.chunk_size!r} must be an integer >= 1")
