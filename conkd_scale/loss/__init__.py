"""The ConKD student loss: gated two-teacher KD plus cross-entropy (METHOD.md).

Layering (STYLE.md): :mod:`.reference` is the pure-PyTorch ground truth, :mod:`.chunked` the
CPU path (an autograd.Function computing the gradient in the forward), :mod:`.triton_kernel`
the CUDA kernel and its autograd.Function (:mod:`.module` its ``nn.Module`` wrapper
:class:`ConKDLoss`, :mod:`.aot` its ahead-of-time compiler), :mod:`.fused_linear` the loss
fused with the student's lm_head (from hidden states;
:class:`~.fused_linear.ConKDFusedLinearLoss` runs it inside a DeepSpeed engine's forward),
:mod:`.naive` the benchmarks' baseline. :func:`~.dispatch.resolve_impl` is the one place that
picks an implementation; :func:`conkd_loss` runs the one ``cfg.impl`` means;
:func:`gate_stats` gives the gate's logging figures.

Row alignment is the caller's: row t of the logits must predict ``labels[t]`` (shift causal-LM
logits and the ``rec_turn`` index together before calling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from conkd_scale.loss.chunked import conkd_loss_chunked
from conkd_scale.loss.common import IGNORE_INDEX, LossOutput
from conkd_scale.loss.config import GateConfig, LossConfig
from conkd_scale.loss.dispatch import conkd_loss, resolve_impl
from conkd_scale.loss.gates import gate, item_mass
from conkd_scale.loss.module import ConKDLoss
from conkd_scale.loss.reference import conkd_loss_reference

__all__ = [
    "IGNORE_INDEX",
    "ConKDLoss",
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
