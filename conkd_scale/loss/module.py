"""``nn.Module`` face of the ConKD loss on logits (the Triton kernel where it runs)."""

from __future__ import annotations

from torch import Tensor, nn

from conkd_scale.loss.chunked import conkd_loss_chunked
from conkd_scale.loss.common import LossOutput
from conkd_scale.loss.config import LossConfig
from conkd_scale.loss.dispatch import resolve_impl
from conkd_scale.loss.sparse import SparseTeacher

__all__ = ["ConKDLoss"]


class ConKDLoss(nn.Module):
    """The loss as a module: the Triton kernel where it can run (CUDA, or any device under
    Triton's interpreter), else the chunked CPU path (same function); ``cfg.impl`` is not
    read. ``forward`` takes the arguments of :func:`~.triton_kernel.conkd_loss_triton`."""

    def __init__(self, cfg: LossConfig | None = None, *, inplace: bool = False) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()
        self.inplace = inplace

    def forward(
        self,
        student_logits: Tensor,  # [N, V] or [B, T, V]
        teacher_logits: Tensor | SparseTeacher,  # [N, V] or [B, T, V], or D's top-k
        rec_probs_SI: Tensor,  # [S, I]
        rec_row: Tensor,  # [N] or [B, T]
        item_ids_I: Tensor,  # [I]
        labels: Tensor,  # [N] or [B, T]
    ) -> LossOutput:
        args = (student_logits, teacher_logits, rec_probs_SI, rec_row, item_ids_I, labels)
        if resolve_impl("auto", student_logits.device, interpreter=True) == "chunked":
            return conkd_loss_chunked(*args, self.cfg, inplace=self.inplace)
        from conkd_scale.loss.triton_kernel import conkd_loss_triton

        return conkd_loss_triton(*args, self.cfg, inplace=self.inplace)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"gate={c.gate.mode}, tau={c.tau}, w_ce={c.w_ce}, w_kd={c.w_kd}"
