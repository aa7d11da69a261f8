"""The job planner: per-device memory (parameters, gradients, optimizer, activations,
logits, loss buffers, teacher shards, communication buckets), whether a distillation job
fits, its largest micro batch and its step time, from model sizes alone
(``python -m conkd_scale.plan``; ``memory.py`` states every formula)."""

from conkd_scale.plan.arch import ModelSpec, resolve_model
from conkd_scale.plan.memory import Plan, PlanInput, ZeroSettings, estimate

__all__ = ["ModelSpec", "Plan", "PlanInput", "ZeroSettings", "estimate", "resolve_model"]
