"""Divergence policy: a non-finite step is not a step, and a diverged model is never kept.

At every optimizer-step boundary the trainer combines three signs of divergence into one
verdict that every rank shares: a non-finite loss on any rank and micro batch (all-reduced),
a non-finite global gradient norm, and DeepSpeed having skipped the update (its overflow
check: ZeRO-1/2/3 discard a step whose gradient norm is inf/NaN, in fp16 also while the loss
scale settles). Such a step does not advance the step counter, its losses stay out of the
logged averages, and it is logged as a ``{"kind": "nonfinite"}`` row of ``metrics.jsonl``
(with the running count ``nonfinite_steps``, also on every train row). After
``train.max_nonfinite_steps`` such steps in a row the job stops with
:class:`~conkd_scale.utils.errors.DivergenceError` (exit code 3).

Checkpoints and the export pass :func:`nonfinite_params` and the validation loss first: a
checkpoint or a Hugging Face directory is never written from non-finite weights or after a
non-finite validation loss, so the newest checkpoint on disk stays the last good one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


def nonfinite_params(module: torch.nn.Module) -> list[str]:
    """Names of the parameters whose part held by this rank has a NaN or inf (ZeRO-3: the
    rank's partition ``ds_tensor``; otherwise the tensor itself). Local, no collective."""
    bad = []
    for name, p in module.named_parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def is_finite(x: Any) -> bool:
    """Whether a float or tensor value is finite (``None``: unknown, counts as finite)."""
    if x is None:
        return True
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x.detach()).all())
    return math.isfinite(float(x))


@dataclass
class StepVerdict:
    """What made an optimizer step non-finite (``bad`` if any of them)."""

    loss_nonfinite: bool = False
    grad_norm: float | None = None
    update_skipped: bool = False

    @property
    def bad(self) -> bool:
        return self.loss_nonfinite or self.update_skipped or not is_finite(self.grad_norm)

    def describe(self) -> str:
        parts = []
        if self.loss_nonfinite:
            parts.append("non-finite loss")
        if not is_finite(self.grad_norm):
            parts.append(f"gradient norm {self.grad_norm}")
        if self.update_skipped:
            parts.append("update skipped by DeepSpeed (overflow)")
        return ", ".join(parts) or "finite"


@dataclass
class DivergenceCounter:
    """Consecutive and total non-finite steps; ``record`` says when the limit is reached."""

    limit: int
    consecutive: int = 0
    total: int = 0
    last: StepVerdict = field(default_factory=StepVerdict)

    def record(self, verdict: StepVerdict) -> bool:
        if not verdict.bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        self.last = verdict
        return self.consecutive >= self.limit


def engine_verdict(engine: Any, loss_nonfinite: bool) -> StepVerdict:
    """The verdict of the step the engine just took (``loss_nonfinite`` already agreed by
    every rank). DeepSpeed's skip decision and gradient norm are the same on every rank."""
    applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if isinstance(norm, torch.Tensor):
        norm = float(norm.detach().float().item())
    return StepVerdict(
        loss_nonfinite=loss_nonfinite,
        grad_norm=None if norm is None else float(norm),
        update_skipped=not applied,
    )
