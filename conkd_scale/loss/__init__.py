"""The ConKD student loss: gated two-teacher KD plus cross-entropy (METHOD.md).

Layering (STYLE.md): :mod:`.reference` is the pure-PyTorch ground truth, :mod:`.chunked` the
CPU path (an autograd.Function computing the gradient in the forward), :mod:`.triton_kernel`
the CUDA kernel and its autograd.Function (:mod:`.module` its ``nn.Module`` wrapper
:class:`ConKDLoss`, :mod:`.aot` its ahead-of-time compiler), :mod:`.fused_linear` the loss
fused with the student's lm_head (from hidden states;
:class:`~.fused_linear.ConKDFusedLinearLoss` runs it inside a DeepSpeed engine's forward),
:mod:`.naive` the benchmarks' baseline. :func:`~.dispatch.resolve_impl` is the one place that
picks an implementation; :func:`conkd_loss` runs the one ``cfg.impl`` means;
:mod:`.gates` holds the gate and its statistics (:func:`gate_counts` per micro batch,
:func:`gate_rates` of pooled counts, :func:`gate_stats` both for one batch).

D is given as dense logits or as a :class:`~.sparse.SparseTeacher` (its top-k log-probs and
exact item mass, the offline cache) to every implementation; :mod:`.sparse` defines that KL.

Row alignment is the caller's: row t of the logits must predict ``labels[t]`` (shift causal-LM
logits and the ``rec_turn`` index together before calling).
"""

from __future__ import annotations

from conkd_scale.loss.chunked import conkd_loss_chunked
from conkd_scale.loss.common import IGNORE_INDEX, LossOutput
from conkd_scale.loss.config import GateConfig, LossConfig
from conkd_scale.loss.dispatch import conkd_loss, resolve_impl
from conkd_scale.loss.gates import gate, gate_counts, gate_rates, gate_stats, item_mass
from conkd_scale.loss.module import ConKDLoss
from conkd_scale.loss.reference import conkd_loss_reference
from conkd_scale.loss.sparse import SparseTeacher

__all__ = [
    "IGNORE_INDEX",
    "ConKDLoss",
    "GateConfig",
    "LossConfig",
    "LossOutput",
    "SparseTeacher",
    "conkd_loss",
    "conkd_loss_chunked",
    "conkd_loss_reference",
    "gate",
    "gate_counts",
    "gate_rates",
    "gate_stats",
    "item_mass",
    "resolve_impl",
]
