"""The ConKD loss fused with the student's lm_head: no ``[N, V]`` tensor is ever alive.

Same function as :mod:`conkd_scale.loss.reference` applied to ``hidden @ weight.T (+ bias)``.
The loss rows are processed in chunks of C rows; per chunk:

    z_CV = h_CH @ W_VH.T (+ b)             student logits of the chunk (the hidden's dtype)
    t_CV = teacher_logits[rows]             or  h^D_CH @ W^D_VH.T  (no grad)
                                            or  D's top-k rows (a SparseTeacher, loss/sparse.py)
    dL_CV  <- loss kernel, written into z_CV (Triton on CUDA, the chunked math on the CPU)
    dh_CH  = dL_CV @ W_VH                   scattered into the [N, H] hidden gradient
    dW_VH += dL_CV.T @ h_CH,  db += Σ_C dL   (fp32 accumulators for half-precision weights)

so the live extra memory is two ``[C, V]`` buffers, the ``[N, H]`` and ``[V, H]`` gradients
(computed in the forward, as in Liger-Kernel's fused-linear losses) and the kernel's scratch.
The backward only scales the stored gradients by ``grad_output``.

ZeRO-3 (ARCHITECTURE.md "The loss path"): the lm_head weight is partitioned (``numel() == 0``
outside its module's forward), and this loss reads it without calling the lm_head module, so
two things are needed (the failure mode behind Liger-Kernel #480/#1048 and TRL #6372):

1. the full weight during the forward: :func:`gathered` (``deepspeed.zero.GatheredParameters``,
   a no-op for ordinary or already gathered parameters);
2. the full weight again in the backward, where autograd checks the weight gradient's shape
   and ZeRO-3's gradient hooks reduce-scatter it: run the loss *inside the engine's forward*
   from a module that declares the weight as an external parameter, so that ZeRO-3's
   pre-backward hook re-gathers it. :class:`ConKDFusedLinearLoss` is that module: give it to
   ``deepspeed.initialize`` in place of the causal LM and call ``engine(...)``.

This holds for a tied lm_head (GPT-2: the input embedding's weight, released after the
embedding's forward) and for an untied one whose module is never called (Llama's
``lm_head``): both are gathered as the wrapper's external parameter, and both are tested
against the logits path under 2-rank ZeRO-3 (``tests/test_pretrained_families.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from conkd_scale.loss.common import (
    IGNORE_INDEX,
    LossOutput,
    check_rows,
    compute_dtype,
    loss_outputs,
    tempered_log_q,
)
from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.dispatch import resolve_impl
from conkd_scale.loss.sparse import SparseTeacher, check_sparse

Backend = Literal["auto", "triton", "chunked"]

__all__ = [
    "ConKDFusedLinearFunction",
    "ConKDFusedLinearLoss",
    "conkd_loss_fused_linear",
    "gathered",
    "is_zero3_param",
    "register_external_weight",
]


# ------------------------------------------------------------------------------- ZeRO-3
def is_zero3_param(p: Tensor | None) -> bool:
    """True for a parameter managed (partitioned) by DeepSpeed ZeRO-3."""
    return p is not None and hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(*params: Tensor | None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned ``params`` for the block (read only: ``modifier_rank=None``).

    No-op for ordinary tensors and for parameters already available (e.g. gathered by the
    pre-forward hook of a module that registered them as external parameters): gathering
    those again would re-partition them on exit under the module's feet. Collective: every
    rank must enter it with the same parameters.
    """
    todo = [p for p in params if is_zero3_param(p) and not _available(p)]
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(todo, modifier_rank=None):
        yield


def _available(p: Tensor) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE  # type: ignore[attr-defined]


def register_external_weight(module: nn.Module, *params: Tensor | None) -> None:
    """Declare ZeRO-3 ``params`` as used by ``module``'s forward (and so its backward)."""
    todo = [p for p in params if is_zero3_param(p)]
    if todo:
        import deepspeed

        for p in todo:
            deepspeed.zero.register_external_parameter(module, p)


# ------------------------------------------------------------------------ the function
class ConKDFusedLinearFunction(torch.autograd.Function):
    """autograd.Function of the fused-linear loss; see :func:`conkd_loss_fused_linear`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_NH: Tensor,  # [N, H] student final hidden states
        weight_VH: Tensor,  # [V, H] student lm_head weight
        bias_V: Tensor | None,  # [V] student lm_head bias
        teacher_NV: Tensor | SparseTeacher | None,  # [N, V] logits, D's top-k [N, K] (checked),
        # or None with the two below
        teacher_hidden_NH: Tensor | None,  # [N, Ht] teacher final hidden states
        teacher_weight_VH: Tensor | None,  # [V, Ht] teacher lm_head weight
        rec_probs_SI: Tensor,  # [S, I]
        rec_row_N: Tensor,  # [N] long
        item_ids_I: Tensor,  # [I] long
        labels_N: Tensor,  # [N] long
        cfg: LossConfig,
        chunk: int,
        use_triton: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        N, H = hidden_NH.shape
        V = weight_VH.shape[0]
        device = hidden_NH.device
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h_NH, W_VH = hidden_NH.detach(), weight_VH.detach()
        b_V = bias_V.detach() if bias_V is not None else None
        dtype = compute_dtype(h_NH, W_VH)

        idx_M = (labels_N != IGNORE_INDEX).nonzero().squeeze(1)  # [M] loss rows
        M = idx_M.numel()
        inv_m = 1.0 / max(M, 1)
        acc = torch.float32 if W_VH.element_size() < 4 else W_VH.dtype
        grad_h = torch.zeros_like(h_NH) if need_h else None  # [N, H]
        grad_w = torch.zeros(V, H, dtype=acc, device=device) if need_w else None  # [V, H]
        grad_b = torch.zeros(V, dtype=acc, device=device) if need_b else None  # [V]
        sums_3 = torch.zeros(3, dtype=dtype, device=device)  # Σ ce, Σ kd_dialog, Σ kd_rec
        lam_N = torch.zeros(N, dtype=torch.float32, device=device)
        m_N = torch.zeros(N, dtype=torch.float32, device=device)
        if use_triton:
            from conkd_scale.loss.triton_kernel import conkd_rows_, item_column_map

            logq_SI = tempered_log_q(rec_probs_SI, float(cfg.tau), torch.float32)  # [S, I]
            col_V = item_column_map(item_ids_I, V)  # [V]

        for start in range(0, M, chunk):
            rows_C = idx_M[start : start + chunk]  # [C]
            c = rows_C.numel()
            h_CH = h_NH.index_select(0, rows_C)  # [C, H]
            z_CV = h_CH @ W_VH.t() if b_V is None else torch.addmm(b_V, h_CH, W_VH.t())  # [C, V]
            if isinstance(teacher_NV, SparseTeacher):
                t_CV = teacher_NV.rows(rows_C)  # [C, K] top-k rows
            elif teacher_NV is not None:
                t_CV = teacher_NV.detach().index_select(0, rows_C)  # [C, V]
            else:
                th_CH = teacher_hidden_NH.detach().index_select(0, rows_C)  # type: ignore[union-attr]
                t_CV = th_CH @ teacher_weight_VH.detach().t()  # type: ignore[union-attr]
            y_C, r_C = labels_N[rows_C], rec_row_N[rows_C]
            if use_triton and isinstance(t_CV, SparseTeacher):
                from conkd_scale.loss.triton_sparse import conkd_rows_sparse_

                parts_5C = conkd_rows_sparse_(z_CV, t_CV, logq_SI, r_C, col_V, y_C, cfg, inv_m,
                                              z_CV)  # fmt: skip
                sums_3 += parts_5C[:3].sum(dim=1).to(dtype)
                lam_N[rows_C], m_N[rows_C] = parts_5C[3].float(), parts_5C[4].float()
            elif use_triton:  # gradient / M written over the chunk's logits
                parts_5C = conkd_rows_(z_CV, t_CV, logq_SI, r_C, col_V, y_C, cfg, inv_m, z_CV)
                sums_3 += parts_5C[:3].sum(dim=1).to(dtype)
                lam_N[rows_C], m_N[rows_C] = parts_5C[3].float(), parts_5C[4].float()
            else:  # the chunked CPU math, weights scaled by c/M: its 1/c mean becomes 1/M
                from conkd_scale.loss.chunked import conkd_loss_chunked

                s = c * inv_m
                cfg_c = dataclasses.replace(cfg, w_ce=cfg.w_ce * s, w_kd=cfg.w_kd * s)
                out = conkd_loss_chunked(z_CV, t_CV, rec_probs_SI, r_C, item_ids_I, y_C, cfg_c,
                                         inplace=True)  # fmt: skip
                sums_3 += torch.stack([out.ce, out.kd_dialog, out.kd_rec]).to(dtype) * c
                lam_N[rows_C], m_N[rows_C] = out.lam_N, out.m_N
            dz_CV = z_CV  # [C, V] ∂L/∂z of the chunk (now holds the gradient)
            del t_CV
            if grad_h is not None:
                grad_h.index_copy_(0, rows_C, dz_CV @ W_VH)  # [C, H]
            if grad_w is not None:
                grad_w.add_(dz_CV.t() @ h_CH)  # [V, H]
            if grad_b is not None:
                grad_b.add_(dz_CV.sum(0))  # [V]
            del z_CV, dz_CV, h_CH

        if grad_w is not None:
            grad_w = grad_w.to(W_VH.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(b_V.dtype)  # type: ignore[union-attr]
        ctx.grads = (grad_h, grad_w, grad_b)
        return loss_outputs(ctx, sums_3, inv_m, cfg, lam_N, m_N)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        ctx.grads = None  # single backward; frees the references
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return (*grads, *([None] * 10))


def conkd_loss_fused_linear(
    hidden: Tensor,  # [N, H] or [B, T, H] student final hidden states (needs grad)
    weight_VH: Tensor,  # [V, H] student lm_head weight (a [:V] slice of a padded one is fine)
    teacher_logits: Tensor | SparseTeacher | None,  # [N, V] or [B, T, V] D's logits, D's
    # top-k ([N, K] or [B, T, K], loss/sparse.py), or None (see below)
    rec_probs_SI: Tensor,  # [S, I] R's item distribution per recommender turn
    rec_row: Tensor,  # [N] or [B, T] row of rec_probs for each loss row (-1 where no loss)
    item_ids_I: Tensor,  # [I] vocabulary id of each rec_probs column (any order, no repeats)
    labels: Tensor,  # [N] or [B, T] gold next token, -100 where no loss
    cfg: LossConfig,
    *,
    bias_V: Tensor | None = None,  # [V] student lm_head bias
    teacher_hidden: Tensor | None = None,  # [N, Ht] or [B, T, Ht] D's final hidden states
    teacher_weight_VH: Tensor | None = None,  # [V, Ht] D's lm_head weight
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> LossOutput:
    """The ConKD loss of the logits ``hidden @ weight_VH.T (+ bias_V)``, chunk by chunk.

    The teacher comes as logits (``teacher_logits``) or as hidden states and lm_head weight
    (``teacher_hidden`` + ``teacher_weight_VH``, ``teacher_logits=None``): then neither model
    has an ``[N, V]`` tensor; or as D's top-k (a :class:`~.sparse.SparseTeacher` in
    ``teacher_logits``, the offline cache). Ignored rows (label -100) cost nothing: only loss
    rows are chunked. ``chunk_size`` rows per chunk (default ``cfg.chunk_size``). ``backend``: the
    per-chunk loss kernel, "triton" (CUDA, or the interpreter), "chunked" (the CPU math) or
    "auto" (triton on CUDA, else chunked). Under ZeRO-3, see :class:`ConKDFusedLinearLoss`.
    """
    H = hidden.shape[-1]
    lead = hidden.shape[:-1]
    if weight_VH.dim() != 2 or weight_VH.shape[1] != H:
        raise ValueError(f"weight {tuple(weight_VH.shape)} must be [V, {H}]")
    V = weight_VH.shape[0]
    if V == 0:
        raise ValueError("empty lm_head weight: under ZeRO-3 gather it first (see `gathered`)")
    if bias_V is not None and bias_V.shape != (V,):
        raise ValueError(f"bias {tuple(bias_V.shape)} must be [{V}]")
    if (teacher_logits is None) == (teacher_hidden is None or teacher_weight_VH is None):
        raise ValueError("give either teacher_logits or teacher_hidden and teacher_weight_VH")
    if labels.shape != lead or rec_row.shape != lead:
        raise ValueError(f"labels and rec_row must have the hidden's leading shape {tuple(lead)}")
    h_NH = hidden.reshape(-1, H)
    N = h_NH.shape[0]
    labels_N, rec_row_N = labels.reshape(-1).long(), rec_row.reshape(-1).long()
    t_NV: Tensor | SparseTeacher | None = None
    th_NH = None
    if isinstance(teacher_logits, SparseTeacher):
        t_NV = check_sparse(teacher_logits, tuple(lead), V, labels_N != IGNORE_INDEX)
    elif teacher_logits is not None:
        if teacher_logits.shape != (*lead, V):
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must be {(*lead, V)}")
        t_NV = teacher_logits.reshape(N, V)
    else:
        th_NH = teacher_hidden.reshape(N, -1)  # type: ignore[union-attr]
        if teacher_weight_VH.shape != (V, th_NH.shape[1]):  # type: ignore[union-attr]
            raise ValueError("teacher weight must be [V, teacher hidden size]")
    if rec_probs_SI.dim() != 2 or rec_probs_SI.shape[1] != item_ids_I.numel():
        raise ValueError("rec_probs must be [S, I] with one column per item id")
    items_I = item_ids_I.long()
    check_rows(labels_N, rec_row_N, items_I, rec_probs_SI.shape[0], V)
    chunk = int(chunk_size or cfg.chunk_size)
    if chunk < 1:
        raise ValueError("chunk_size must be >= 1")
    # an explicit backend='triton' may run interpreted; 'auto' picks Triton on CUDA only
    use_triton = resolve_impl(backend, hidden.device, interpreter=backend == "triton") == "triton"
    loss, ce, kd, kd_d, kd_r, lam_N, m_N = ConKDFusedLinearFunction.apply(
        h_NH, weight_VH, bias_V, t_NV, th_NH, teacher_weight_VH, rec_probs_SI, rec_row_N,
        items_I, labels_N, cfg, chunk, use_triton,
    )  # fmt: skip
    n_tokens = int((labels_N != IGNORE_INDEX).sum())
    return LossOutput(loss, ce, kd, kd_d, kd_r, lam_N, m_N, n_tokens)


# --------------------------------------------------------------------- the module
class ConKDFusedLinearLoss(nn.Module):
    """A causal LM and the fused ConKD loss through its lm_head, as one module.

    Give this module (not the bare LM) to ``deepspeed.initialize`` and call ``engine(...)``:
    the loss then runs inside the engine's forward, with the lm_head weight declared as an
    external parameter of this module, so ZeRO-3 gathers it for the forward and again for
    the backward (where the fused gradient must meet the full-shape parameter). Without
    ZeRO-3 it is a plain module. ``model`` must be a Hugging Face-style causal LM:
    ``model.base_model(...)`` returns the final hidden states (``last_hidden_state``) and
    ``model.get_output_embeddings()`` is the lm_head (``weight`` [V_pad, H], optional bias).
    ``vocab_size`` keeps the first V rows of a padded lm_head (default: all).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: LossConfig,
        *,
        vocab_size: int | None = None,
        chunk_size: int | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        self.backend: Backend = backend
        head = self._head()
        register_external_weight(self, head.weight, getattr(head, "bias", None))

    def _head(self) -> nn.Module:
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        if head is None or not hasattr(head, "weight"):
            raise ValueError("model.get_output_embeddings() must return a module with .weight")
        return head

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        attention_mask: Tensor,  # [B, T]
        labels: Tensor | None = None,  # [B, T] unshifted: labels[:, t+1] is predicted at t
        rec_row: Tensor | None = None,  # [B, T] unshifted turn row of each position (-1: none)
        rec_probs_SI: Tensor | None = None,  # [S, I]
        item_ids_I: Tensor | None = None,  # [I]
        teacher_logits: Tensor | SparseTeacher | None = None,  # [N, V] D's logits at the N
        # loss rows, or D's top-k there ([N, K], loss/sparse.py)
        teacher_hidden: Tensor | None = None,  # [N, Ht] D's final hidden states at the loss rows
        teacher_weight_VH: Tensor | None = None,  # [V, Ht] D's lm_head weight (gathered)
        **lm_kwargs: Any,
    ) -> Any:
        """The loss and its parts as a dict of tensors (DeepSpeed's hooks see every tensor).

        Rows follow the recipe's convention: the loss rows are the positions t < T−1 whose
        shifted label ``labels[:, t+1]`` is not -100, in row-major order; the teacher inputs
        are given at exactly those rows. Keys: loss, ce, kd, kd_dialog, kd_rec, lam_N, m_N,
        n_tokens (a 0-d long tensor). Without ``labels`` it is the wrapped LM's own forward
        (``model(input_ids, attention_mask, **lm_kwargs)``, with its full logits), so that an
        engine built on this module still serves evaluation and generation code.
        """
        if labels is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)
        if rec_row is None or rec_probs_SI is None or item_ids_I is None:
            raise ValueError("the loss needs labels, rec_row, rec_probs_SI and item_ids_I")
        out_h = self.model.base_model(  # type: ignore[operator]
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        hidden_BTH = out_h.last_hidden_state if hasattr(out_h, "last_hidden_state") else out_h[0]
        labels_BT = labels[:, 1:].to(hidden_BTH.device)
        rows_BT = labels_BT != IGNORE_INDEX  # [B, T-1]
        h_NH = hidden_BTH[:, :-1][rows_BT]  # [N, H]
        labels_N = labels_BT[rows_BT]  # [N]
        rec_row_N = rec_row[:, 1:].to(hidden_BTH.device)[rows_BT]  # [N]
        head = self._head()
        bias = getattr(head, "bias", None)
        with gathered(head.weight, bias):
            V = self.vocab_size or head.weight.shape[0]
            out = conkd_loss_fused_linear(
                h_NH, head.weight[:V], teacher_logits, rec_probs_SI, rec_row_N, item_ids_I,
                labels_N, self.cfg, bias_V=None if bias is None else bias[:V],
                teacher_hidden=teacher_hidden, teacher_weight_VH=teacher_weight_VH,
                chunk_size=self.chunk_size, backend=self.backend,
            )  # fmt: skip
        return {
            "loss": out.loss,
            "ce": out.ce,
            "kd": out.kd,
            "kd_dialog": out.kd_dialog,
            "kd_rec": out.kd_rec,
            "lam_N": out.lam_N,
            "m_N": out.m_N,
            "n_tokens": torch.tensor(out.n_tokens, device=out.loss.device),
        }
