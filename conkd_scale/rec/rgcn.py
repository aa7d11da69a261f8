"""``BasisRGCNConv``: torch-geometric's ``RGCNConv`` with a faster, exact basis-decomposition path.

With bases, ``RGCNConv`` builds every relation's matrix ``W_r = Σ_b c_rb V_b`` and loops
over the relations: per relation a masked edge selection, a mean aggregation and an
``[N_out, d] @ [d, d]`` product (55 relations on ReDial). Because the aggregation is
linear, the same result is

    out_v = Σ_b V_bᵀ z_vb,   z_vb = Σ_{e: dst(e)=v} c_{rel(e), b} / |N_rel(e)(v)| · x_src(e)

i.e. one edge gather, one weighted scatter per basis and **one** ``[N_out, B·d] @ [B·d, d]``
product: about 7x fewer FLOPs on ReDial, with the same parameters (``weight`` = the bases
``V`` ``[B, d_in, d_out]``, ``comp`` = ``c`` ``[R, B]``, ``root``, ``bias``) and the same
state dict, so checkpoints are interchangeable with ``RGCNConv``. The fast path covers
what R uses (basis decomposition, ``aggr="mean"``, floating-point features, an
``edge_index`` tensor); anything else falls back to ``RGCNConv.forward``. It is tested
against ``RGCNConv.forward`` (outputs and gradients).
"""

from __future__ import annotations

import torch
from torch_geometric.nn import RGCNConv


class BasisRGCNConv(RGCNConv):
    """``RGCNConv`` (mean aggregation) whose basis-decomposition forward is computed per basis."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        edge_index: torch.Tensor,
        edge_type: torch.Tensor,
    ) -> torch.Tensor:
        x_src, x_dst = x if isinstance(x, tuple) else (x, x)
        fast = (
            self.num_bases is not None
            and self.aggr == "mean"
            and isinstance(edge_index, torch.Tensor)
            and x_src is not None
            and x_src.is_floating_point()
        )
        if not fast:
            return super().forward(x, edge_index, edge_type)
        n_out, n_rel = x_dst.size(0), self.num_relations
        src_E, dst_E = edge_index[0], edge_index[1]  # [E], [E]
        # mean per (destination, relation): 1 / |N_r(v)| for every edge
        key_E = dst_E * n_rel + edge_type  # [E]
        deg_E = torch.bincount(key_E, minlength=n_out * n_rel)[key_E]  # [E]
        w_EB = self.comp[edge_type] / deg_E.to(x_src.dtype)[:, None]  # [E, B]
        msg_Ed = x_src[src_E]  # [E, d_in]
        z_NBd = torch.stack(
            [
                torch.zeros(n_out, x_src.size(1), dtype=x_src.dtype, device=x_src.device).index_add(
                    0, dst_E, msg_Ed * w_EB[:, b, None]
                )
                for b in range(self.num_bases)
            ],
            dim=1,
        )  # [N_out, B, d_in]
        out_Nd = z_NBd.reshape(n_out, -1) @ self.weight.reshape(-1, self.out_channels)
        if self.root is not None:
            out_Nd = out_Nd + x_dst @ self.root
        if self.bias is not None:
            out_Nd = out_Nd + self.bias
        return out_Nd
