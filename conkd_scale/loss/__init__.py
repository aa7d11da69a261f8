"""The ConKD student loss: gated two-teacher KD plus cross-entropy (METHOD.md).

Layering (STYLE.md): :mod:`.reference` is the pure-PyTorch ground truth, :mod:`.chunked` the
CPU path (an autograd.Function computing the gradient in the forward), :mod:`.triton_kernel`
the CUDA kernel, :mod:`.fused_linear` the loss fused with the student's lm_head (from hidden
states; :class:`~.fused_linear.ConKDFusedLinearLoss` runs it inside a DeepSpeed engine's
forward), :mod:`.naive` the benchmarks' baseline. :func:`conkd_loss` picks one from
``cfg.impl``; :func:`gate_stats` gives the gate's logging figures.

Row alignment is the caller's: row t of the logits must predict ``labels[t]`` (shift causal-LM
logits and the ``rec_turn`` index together before calling).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from conkd_scale.loss.chunked import conkd_loss_chunked
from conkd_scale.loss.common import IGNORE_INDEX, LossOutput
from conkd_scale.loss.config import GateConfig, LossConfig
from conkd_scale.loss.gates import gate, item_mass
from conkd_scale.loss.reference import conkd_loss_reference
from conkd_scale.utils.errors import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "GateConfig",
    "LossConfig",
    "LossOutput",
    "conkd_loss",
    "conkd_loss_chunked",
    "conkd_loss_reference",
    "gate",
    "gate_stats",
    "item_mass",
    "resolve_impl",
]

GPU_IMPLS: dict[str, Callable[..., LossOutput]] = {}
"""Triton implementations on logits by ``impl`` name ("triton", and "fused_linear", which given
logits runs the same kernel on them). Registered lazily: :mod:`.triton_kernel` (and its
``@triton.jit`` functions) is imported on first use only, so importing the loss package costs
nothing and Triton's interpreter setting (``TRITON_INTERPRET``, read when a kernel is
defined) may still be chosen later."""


def _lazy_gpu_impl(name: str) -> Callable[..., LossOutput]:
    def run(*args: object, **kwargs: object) -> LossOutput:
        from conkd_scale.loss import triton_kernel

        triton_kernel.register()  # replaces these stand-ins with the real functions
        return GPU_IMPLS[name](*args, **kwargs)

    return run


if importlib.util.find_spec("triton") is not None:
    GPU_IMPLS.update({k: _lazy_gpu_impl(k) for k in ("triton", "fused_linear")})


def _cuda_kernel(device: torch.device) -> bool:
    return device.type == "cuda" and "triton" in GPU_IMPLS


def resolve_impl(cfg: LossConfig, device: torch.device, *, hidden_states: bool = False) -> str:
    """The implementation ``cfg.impl`` means on ``device`` (``auto`` resolved).

    ``auto``: "chunked" on the CPU (and on CUDA without triton); on CUDA with triton,
    "fused_linear" when the caller can give the student's final hidden states and lm_head
    (``hidden_states=True``: the distillation job, which then never builds ``[N, V]`` student
    logits), else "triton". "fused_linear" runs on any device (the Triton kernel per chunk on
    CUDA, the chunked math elsewhere); "triton" needs CUDA tensors and triton.
    """
    if cfg.impl == "auto":
        if not _cuda_kernel(device):
            return "chunked"
        return "fused_linear" if hidden_states else "triton"
    if cfg.impl == "triton":
        if "triton" not in GPU_IMPLS:
            raise ConfigError(
                "loss.impl: 'triton' needs the triton package (and a CUDA GPU); "
                "use 'auto', 'chunked', 'fused_linear' or 'reference'"
            )
        if device.type != "cuda":
            raise ConfigError(f"loss.impl: 'triton' needs CUDA tensors, got {device}")
    return cfg.impl


def conkd_loss(
    student_logits: Tensor,  # [N, V] or [B, T, V] (needs grad)
    teacher_logits: Tensor,  # [N, V] or [B, T, V] D's logits (no grad)
    rec_probs_SI: Tensor,  # [S, I] R's item distribution per recommender turn
    rec_row: Tensor,  # [N] or [B, T] row of rec_probs for each loss row (-1 where no loss)
    item_ids_I: Tensor,  # [I] vocabulary ids of rec_probs' columns
    labels: Tensor,  # [N] or [B, T] gold next token, -100 where no loss
    cfg: LossConfig,
    *,
    inplace: bool = False,
) -> LossOutput:
    """The ConKD loss by ``cfg.impl``. ``inplace`` (chunked and Triton): see
    conkd_loss_chunked. Given logits, "fused_linear" (whose saving needs hidden states: see
    :mod:`.fused_linear`) runs the Triton kernel on CUDA and the chunked path elsewhere."""
    impl = resolve_impl(cfg, student_logits.device)
    args = (student_logits, teacher_logits, rec_probs_SI, rec_row, item_ids_I, labels, cfg)
    if impl == "reference":
        return conkd_loss_reference(*args)
    if impl == "chunked" or (impl == "fused_linear" and not _cuda_kernel(student_logits.device)):
        return conkd_loss_chunked(*args, inplace=inplace)
    return GPU_IMPLS[impl](*args, inplace=inplace)


@torch.no_grad()
def gate_stats(
    lam_N: Tensor,  # [N] gate values
    m_N: Tensor,  # [N] D's item mass
    labels_N: Tensor,  # [N] gold tokens, -100 where no loss
    item_ids_I: Tensor,  # [I] vocabulary ids of the items
    eta: float,
) -> dict[str, float]:
    """Gate figures over the loss rows, for logging.

    Keys: ``gate_mean`` (mean λ), ``item_mass_mean`` (mean m), ``gate_frac_above_eta``
    (share with λ > η), ``gate_precision`` / ``gate_recall`` of "λ_t > η" against "y_t is an
    item token", and the counts ``gate_n_tokens``, ``gate_n_pred`` (λ > η), ``gate_n_gold``
    (item targets), ``gate_n_hit`` (both) so that steps can be pooled exactly. Precision is
    omitted when nothing is predicted and recall when there is no gold item (no NaN reaches
    metrics.jsonl); with no loss rows only the zero counts are returned.
    """
    valid_N = labels_N.reshape(-1) != IGNORE_INDEX  # [N]
    lam_M = lam_N.reshape(-1)[valid_N].float()  # [M]
    m_M = m_N.reshape(-1)[valid_N].float()  # [M]
    y_M = labels_N.reshape(-1)[valid_N]  # [M]
    pred_M = lam_M > eta
    gold_M = torch.isin(y_M, item_ids_I.to(y_M.device))
    n, n_pred, n_gold = y_M.numel(), int(pred_M.sum()), int(gold_M.sum())
    n_hit = int((pred_M & gold_M).sum())
    out: dict[str, float] = {
        "gate_n_tokens": n,
        "gate_n_pred": n_pred,
        "gate_n_gold": n_gold,
        "gate_n_hit": n_hit,
    }
    if n == 0:
        return out
    out["gate_mean"] = float(lam_M.mean())
    out["item_mass_mean"] = float(m_M.mean())
    out["gate_frac_above_eta"] = n_pred / n
    if n_pred > 0:
        out["gate_precision"] = n_hit / n_pred
    if n_gold > 0:
        out["gate_recall"] = n_hit / n_gold
    return out
