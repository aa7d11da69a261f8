"""``BasisRGCNConv``: torch-geometric's ``RGCNConv`` with a faster, exact basis-decomposition path.

With bases, ``RGCNConv`` builds every relation's matrix ``W_r = Σ_b c_rb V_b`` and loops
over the relations: per relation a masked edge selection, a mean aggregation and an
``[N_out, d] @ [d, d]`` product (55 relations on ReDial). Because the aggregation is
linear, the same result is

    out_v = Σ_b V_bᵀ z_vb,   z_vb = Σ_{e: dst(e)=v} c_{rel(e), b} / |N_rel(e)(v)| · x_src(e)

i.e. one fused gather-and-weighted-sum (``F.embedding_bag`` with per-sample weights, one
bag per (destination, basis)) and **one** ``[N_out, B·d] @ [B·d, d]`` product. On ReDial
(73k edges, 55 relations, 8 bases) a forward+backward costs ~0.2 s of CPU time instead of
~0.9 s, with the same parameters (``weight`` = the bases
``V`` ``[B, d_in, d_out]``, ``comp`` = ``c`` ``[R, B]``, ``root``, ``bias``) and the same
state dict, so checkpoints are interchangeable with ``RGCNConv``. The fast path covers
what R uses (basis decomposition, ``aggr="mean"``, floating-point features, an
``edge_index`` tensor); anything else falls back to ``RGCNConv.forward``. It is tested
against ``RGCNConv.forward`` (outputs and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch_geometric.nn import RGCNConv


def _bag_layout(
    edge_index: torch.Tensor, edge_type: torch.Tensor, n_out: int, n_rel: int, n_bases: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``embedding_bag`` layout: bag ``v * B + b`` holds the edges into ``v`` (for basis ``b``).

    Returns ``(input, offsets, perm, edge_type, inv_deg)`` where ``input`` ``[E*B]`` are source
    nodes, ``offsets`` ``[N_out*B]`` the bag starts, ``perm`` ``[E*B]`` the index into the
    flattened ``[E, B]`` per-edge weights of each input slot, and ``edge_type`` / ``inv_deg``
    ``[E]`` each edge's relation and ``1 / |N_rel(dst)|`` (edges in ``edge_index`` order).
    """
    src_E, dst_E = edge_index[0], edge_index[1]
    n_edges, dev = src_E.numel(), src_E.device
    key_E = dst_E * n_rel + edge_type  # [E]
    inv_deg_E = 1.0 / torch.bincount(key_E, minlength=n_out * n_rel)[key_E]  # [E]
    cnt_N = torch.bincount(dst_E, minlength=n_out)  # [N_out]
    ptr_N = torch.cumsum(cnt_N, 0) - cnt_N  # [N_out]: first edge of v in dst-sorted order
    order_E = torch.argsort(dst_E, stable=True)
    pos_E = torch.empty_like(order_E)
    pos_E[order_E] = torch.arange(n_edges, device=dev) - ptr_N[dst_E[order_E]]  # rank within v
    bases_B = torch.arange(n_bases, device=dev)
    slot_EB = (  # where (edge e, basis b) goes in the bag input
        n_bases * ptr_N[dst_E][:, None] + bases_B[None, :] * cnt_N[dst_E][:, None] + pos_E[:, None]
    )
    perm = torch.empty(n_edges * n_bases, dtype=torch.long, device=dev)
    perm[slot_EB.reshape(-1)] = torch.arange(n_edges * n_bases, device=dev)
    inputs = src_E[perm // n_bases]  # [E*B]
    offsets = (n_bases * ptr_N[:, None] + bases_B[None, :] * cnt_N[:, None]).reshape(-1)
    return inputs, offsets, perm, edge_type, inv_deg_E


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
        n_out, n_bases, d_in = x_dst.size(0), self.num_bases, x_src.size(1)
        inputs, offsets, perm, rel_E, inv_deg_E = _bag_layout(
            edge_index, edge_type, n_out, self.num_relations, n_bases
        )
        w_EB = self.comp[rel_E] * inv_deg_E.to(x_src.dtype)[:, None]  # [E, B]
        if inputs.numel():
            z_Nb = F.embedding_bag(  # [N_out*B, d_in]: z_vb = Σ_{e→v} w_eb x_src(e)
                inputs, x_src, offsets, mode="sum", per_sample_weights=w_EB.reshape(-1)[perm]
            )
        else:
            z_Nb = x_src.new_zeros(n_out * n_bases, d_in)
        out_Nd = z_Nb.reshape(n_out, n_bases * d_in) @ self.weight.reshape(-1, self.out_channels)
        if self.root is not None:
            out_Nd = out_Nd + x_dst @ self.root
        if self.bias is not None:
            out_Nd = out_Nd + self.bias
        return out_Nd
