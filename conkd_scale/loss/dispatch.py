"""The loss package's one dispatcher: :func:`resolve_impl` picks the implementation.

Every caller that chooses between the implementations asks :func:`resolve_impl`:
:func:`conkd_loss` (``cfg.impl`` on logits), the distillation recipe (``cfg.impl`` with hidden
states at hand), :func:`~.fused_linear.conkd_loss_fused_linear` (its per-chunk ``backend``)
and :class:`~.module.ConKDLoss`. Triton is never imported here: whether it is installed is
read from its package spec, and the kernel module is imported only to run it (or, when the
interpreter may count, to read Triton's interpreter setting).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import Tensor

from conkd_scale.loss.chunked import conkd_loss_chunked
from conkd_scale.loss.common import LossOutput
from conkd_scale.loss.config import LossConfig, LossImpl
from conkd_scale.loss.reference import conkd_loss_reference
from conkd_scale.loss.sparse import SparseTeacher
from conkd_scale.utils.errors import ConfigError

__all__ = ["conkd_loss", "resolve_impl"]


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_runs(device: torch.device, interpreter: bool) -> bool:
    """Whether the Triton kernel runs on ``device``: CUDA with triton installed, or (when
    ``interpreter``) any device under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return True
    if not interpreter:
        return False
    from conkd_scale.loss.triton_kernel import kernel_available

    return kernel_available(device)


def resolve_impl(
    cfg: LossConfig | LossImpl,
    device: torch.device,
    *,
    hidden_states: bool = False,
    interpreter: bool = False,
) -> LossImpl:
    """The implementation ``cfg.impl`` (or the name ``cfg``) means on ``device``.

    ``auto``: "chunked" on the CPU (and on CUDA without triton); on CUDA with triton,
    "fused_linear" when the caller can give the student's final hidden states and lm_head
    (``hidden_states=True``: the distillation job, which then never builds ``[N, V]`` student
    logits), else "triton". "fused_linear" runs on any device (the Triton kernel per chunk on
    CUDA, the chunked math elsewhere); "triton" needs CUDA tensors and triton. Other names
    are returned as they are.

    ``interpreter=True`` also counts Triton's interpreter as a place where the kernel runs, on
    any device (explicit kernel requests: the module wrapper, a ``backend="triton"`` argument);
    a config's ``auto`` never picks the interpreted kernel. A ``"triton"`` that cannot run
    raises ``ConfigError`` (naming ``loss.impl``) for a config and ``RuntimeError`` for a bare
    name (a function's ``backend`` argument).
    """
    impl = cfg.impl if isinstance(cfg, LossConfig) else cfg
    runs = _triton_runs(device, interpreter)
    if impl == "auto":
        if not runs:
            return "chunked"
        return "fused_linear" if hidden_states else "triton"
    if impl == "triton" and not runs:
        if not isinstance(cfg, LossConfig):
            raise RuntimeError(f"backend='triton' needs CUDA tensors and triton, got {device}")
        if not _triton_installed():
            raise ConfigError(
                "loss.impl: 'triton' needs the triton package (and a CUDA GPU); "
                "use 'auto', 'chunked', 'fused_linear' or 'reference'"
            )
        raise ConfigError(f"loss.impl: 'triton' needs CUDA tensors, got {device}")
    return impl


_WARNED_FUSED = False


def _warn_fused_on_logits() -> None:
    """Warn once that ``impl='fused_linear'`` was given logits, which already exist."""
    global _WARNED_FUSED
    if not _WARNED_FUSED:
        _WARNED_FUSED = True
        warnings.warn(
            "loss.impl='fused_linear' called with logits: running the Triton kernel on them; "
            "pass hidden states to conkd_loss_fused_linear / ConKDFusedLinearLoss to never "
            "materialise [N, V] logits",
            stacklevel=3,
        )


def conkd_loss(
    student_logits: Tensor,  # [N, V] or [B, T, V] (needs grad)
    teacher_logits: Tensor | SparseTeacher,  # [N, V] or [B, T, V] D's logits (no grad), or
    # D's top-k with its exact item mass (loss/sparse.py)
    rec_probs_SI: Tensor,  # [S, I] R's item distribution per recommender turn
    rec_row: Tensor,  # [N] or [B, T] row of rec_probs for each loss row (-1 where no loss)
    item_ids_I: Tensor,  # [I] vocabulary ids of rec_probs' columns
    labels: Tensor,  # [N] or [B, T] gold next token, -100 where no loss
    cfg: LossConfig,
    *,
    inplace: bool = False,
) -> LossOutput:
    """The ConKD loss by ``cfg.impl`` (:func:`resolve_impl`). ``inplace`` (chunked and
    Triton): see conkd_loss_chunked. Given logits, "fused_linear" (whose saving needs hidden
    states: see :mod:`.fused_linear`) runs its per-chunk kernel on them: Triton on CUDA (with a
    warning, once), the chunked path elsewhere."""
    device = student_logits.device
    impl = resolve_impl(cfg, device)
    if impl == "fused_linear":
        impl = resolve_impl("auto", device)  # the kernel fused_linear runs per chunk
        if impl == "triton":
            _warn_fused_on_logits()
    args = (student_logits, teacher_logits, rec_probs_SI, rec_row, item_ids_I, labels, cfg)
    if impl == "reference":
        return conkd_loss_reference(*args)
    if impl == "chunked":
        return conkd_loss_chunked(*args, inplace=inplace)
    from conkd_scale.loss.triton_kernel import conkd_loss_triton

    return conkd_loss_triton(*args, inplace=inplace)
