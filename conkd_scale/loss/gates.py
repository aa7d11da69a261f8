"""The gate λ_t of ConKD (METHOD.md "The gate"): D's item mass m_t, the gate modes, and the
gate's statistics (all of them counted by :func:`gate_counts`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from conkd_scale.loss.common import IGNORE_INDEX, compute_dtype
from conkd_scale.loss.config import GateConfig


@torch.no_grad()
def item_mass(teacher_logits_NV: Tensor, item_ids_I: Tensor) -> Tensor:
    """m_N = Σ_{i∈I} p_D(i) from D's untempered full distribution.

    This is exp(lse_items − lse_all), evaluated as a ratio of sums of exp(logit − row max) so
    that logits of magnitude 1e4 lose no precision to the cancellation of two large lse's.
    ``teacher_logits_NV``: [N, V] (any float dtype; computed in fp32, or fp64 for fp64).
    Returns [N] in the compute dtype. -inf logits are fine; a row of only -inf is not.
    """
    t_NV = teacher_logits_NV.to(compute_dtype(teacher_logits_NV))  # [N, V]
    mx_N1 = t_NV.amax(dim=-1, keepdim=True)  # [N, 1]
    mx_N1 = torch.where(torch.isinf(mx_N1), torch.zeros_like(mx_N1), mx_N1)
    s_all_N = torch.exp(t_NV - mx_N1).sum(-1)  # [N]
    s_items_N = torch.exp(t_NV.index_select(-1, item_ids_I) - mx_N1).sum(-1)  # [N]
    return s_items_N / s_all_N  # [N]


@torch.no_grad()
def gate(m_N: Tensor, labels_N: Tensor, item_ids_I: Tensor, cfg: GateConfig) -> Tensor:
    """λ_N for each row from the item mass ``m_N`` [N] and gold ``labels_N`` [N].

    hard: 1[m > η]; soft: m; static: c; oracle: 1[y ∈ I] (0 at ignored labels);
    dialog: 0; rec: 1. ``item_ids_I`` [I] are the vocabulary ids of the items.
    Returns [N] in ``m_N``'s dtype; no gradient flows through λ.
    """
    mode = cfg.mode
    if mode == "hard":
        return (m_N > cfg.threshold).to(m_N.dtype)
    if mode == "soft":
        return m_N.detach().clone()
    if mode == "static":
        return torch.full_like(m_N, cfg.c)
    if mode == "oracle":
        is_item_N = torch.isin(labels_N, item_ids_I) & (labels_N != IGNORE_INDEX)
        return is_item_N.to(m_N.dtype)
    if mode == "dialog":
        return torch.zeros_like(m_N)
    if mode == "rec":
        return torch.ones_like(m_N)
    raise ValueError(f"unknown gate mode {mode!r}")


ETA_GRID = tuple(k / 100 for k in range(100))  # candidate η of choose_eta: 0.00 ... 0.99


@torch.no_grad()
def gate_counts(lam_N: Tensor, m_N: Tensor, gold_N: Tensor, eta: float) -> dict[str, float]:
    """The gate's figures over N rows as sums, so that micro batches and ranks pool exactly.

    ``lam_N`` [N]: gate values; ``m_N`` [N]: item mass; ``gold_N`` [N] bool: the gold next
    token is an item. Keys: ``gate_lam_sum`` (Σ λ), ``item_mass_sum`` (Σ m), ``gate_n_tokens``,
    ``gate_n_pred`` (λ > η), ``gate_n_gold`` and ``gate_n_hit`` (both); the metrics.jsonl
    names of the distillation job's logged parts. :func:`gate_rates` turns them into ratios.
    """
    pred_N = lam_N > eta
    return {
        "gate_lam_sum": float(lam_N.detach().float().sum()),
        "item_mass_sum": float(m_N.detach().float().sum()),
        "gate_n_tokens": float(lam_N.numel()),
        "gate_n_pred": float(pred_N.sum()),
        "gate_n_gold": float(gold_N.sum()),
        "gate_n_hit": float((pred_N & gold_N).sum()),
    }


def gate_rates(counts: Mapping[str, float]) -> dict[str, float]:
    """Ratios of (pooled) :func:`gate_counts`: ``gate_mean``, ``item_mass_mean``,
    ``gate_frac_above_eta``, ``gate_precision`` and ``gate_recall`` of "λ > η" against gold
    item positions. Precision is omitted when nothing is predicted and recall when there is
    no gold item (no NaN reaches metrics.jsonl); nothing at all without rows."""
    n = counts.get("gate_n_tokens")
    if not n:
        return {}
    out = {
        "gate_mean": counts["gate_lam_sum"] / n,
        "item_mass_mean": counts["item_mass_sum"] / n,
        "gate_frac_above_eta": counts["gate_n_pred"] / n,
    }
    if counts["gate_n_pred"] > 0:
        out["gate_precision"] = counts["gate_n_hit"] / counts["gate_n_pred"]
    if counts["gate_n_gold"] > 0:
        out["gate_recall"] = counts["gate_n_hit"] / counts["gate_n_gold"]
    return out


@torch.no_grad()
def gate_stats(
    lam_N: Tensor,  # [N] gate values
    m_N: Tensor,  # [N] D's item mass
    labels_N: Tensor,  # [N] gold tokens, -100 where no loss
    item_ids_I: Tensor,  # [I] vocabulary ids of the items
    eta: float,
) -> dict[str, float]:
    """One batch's gate figures over its loss rows, as a metrics.jsonl row shows them: the
    counts ``gate_n_*`` of :func:`gate_counts` and the ratios of :func:`gate_rates` (with no
    loss rows only the zero counts)."""
    keep_N = labels_N.reshape(-1) != IGNORE_INDEX  # [N]
    y_M = labels_N.reshape(-1)[keep_N]  # [M]
    gold_M = torch.isin(y_M, item_ids_I.to(y_M.device))  # [M]
    counts = gate_counts(lam_N.reshape(-1)[keep_N], m_N.reshape(-1)[keep_N], gold_M, eta)
    n_keys = ("gate_n_tokens", "gate_n_pred", "gate_n_gold", "gate_n_hit")
    return {k: counts[k] for k in n_keys} | gate_rates(counts)


@torch.no_grad()
def gate_detection(m_N: Tensor, gold_N: Tensor, eta: float) -> dict[str, float]:
    """The hard gate ``1[m > η]`` as a detector of gold item positions (``gold_N`` [N] bool):
    ``precision``, ``recall``, ``f1`` (0 where undefined) and the counts behind them."""
    c = gate_counts(m_N, m_N, gold_N, eta)
    hit, n_pred, n_gold = int(c["gate_n_hit"]), int(c["gate_n_pred"]), int(c["gate_n_gold"])
    p = hit / n_pred if n_pred else 0.0
    r = hit / n_gold if n_gold else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {
        "eta": eta,
        "precision": p,
        "recall": r,
        "f1": f1,
        "n_hit": hit,
        "n_pred": n_pred,
        "n_gold": n_gold,
        "n_tokens": int(c["gate_n_tokens"]),
    }


@torch.no_grad()
def choose_eta(m_N: Tensor, gold_N: Tensor, grid: tuple[float, ...] = ETA_GRID) -> float:
    """``η = auto`` (METHOD.md "The gate"): the grid value whose hard gate ``1[m > η]`` has
    the highest F1 at detecting the positions whose gold next token is an item; ties go to
    the smallest η. ``m_N`` [N]: D's item mass; ``gold_N`` [N] bool. Call it on validation."""
    if m_N.shape != gold_N.shape or m_N.dim() != 1:
        raise ValueError(
            f"m_N and gold_N must be [N], got {tuple(m_N.shape)}, {tuple(gold_N.shape)}"
        )
    if not bool(gold_N.any()):
        raise ValueError("choose_eta: no gold item position to detect (empty validation split?)")
    best = max(grid, key=lambda eta: (gate_detection(m_N, gold_N, eta)["f1"], -eta))
    return float(best)
