"""The recommendation teacher R (KBRD-style): R-GCN entity embeddings + attention pooling.

- A learned input embedding per node (``[n_0, d]``) replaces KBRD's one-hot input.
- ``layers`` ``RGCNConv`` layers (basis decomposition, ``num_bases`` bases, mean
  aggregation, ReLU between layers) over the compact graph of :mod:`conkd_scale.rec.graph`
  give the embeddings of the target nodes (items and context entities). By default the
  layers are :class:`~conkd_scale.rec.rgcn.BasisRGCNConv`, an ``RGCNConv`` subclass with an
  exact, faster basis path (``rgcn_impl="pyg"``: the stock forward, same parameters).
- The user vector ``u`` is KBRD's self-attention pooling over the context's nodes:
  ``α = softmax_c(tanh(h_c A) · b)``, ``u = Σ_c α_c h_c``; an empty context gives ``u = 0``.
- Item scores ``s_i = u · e_i + b_i`` (``b``: per-item bias, so an empty context is ranked
  by the learned popularity-like bias); ``q_R = softmax(s / τ_R)``.

``use_kg=False`` (the ``--no-kg`` ablation): the same model with no R-GCN layers, i.e.
plain learned item and entity embeddings.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import RGCNConv

from conkd_scale.rec.graph import RecGraph
from conkd_scale.rec.rgcn import BasisRGCNConv


class RecTeacherModel(nn.Module):
    """R over a :class:`RecGraph`. ``forward(ctx_BC, mask_BC) -> scores_BI``."""

    def __init__(
        self,
        graph: RecGraph,
        *,
        dim: int = 128,
        num_bases: int = 8,
        dropout: float = 0.0,
        use_kg: bool = True,
        rgcn_impl: str = "basis",
    ) -> None:
        super().__init__()
        if use_kg and graph.num_layers == 0:
            raise ValueError("use_kg=True needs a graph built with use_kg=True")
        self.graph = graph
        self.use_kg = use_kg
        self.dim = dim
        n_layers = graph.num_layers if use_kg else 0
        n_in = graph.num_nodes if use_kg else graph.num_targets
        self.node_emb = nn.Embedding(n_in, dim)  # learned input features
        nn.init.normal_(self.node_emb.weight, std=dim**-0.5)
        if rgcn_impl not in ("basis", "pyg"):
            raise ValueError(f"rgcn_impl must be 'basis' or 'pyg', got {rgcn_impl!r}")
        conv_cls = BasisRGCNConv if rgcn_impl == "basis" else RGCNConv
        bases = min(num_bases, graph.num_relations) if num_bases > 0 else None
        self.convs = nn.ModuleList(
            conv_cls(dim, dim, graph.num_relations, num_bases=bases) for _ in range(n_layers)
        )
        self.attn_a = nn.Linear(dim, dim, bias=False)  # KBRD SelfAttentionLayer: a [d, d_a]
        self.attn_b = nn.Linear(dim, 1, bias=False)  # b [d_a, 1]
        self.item_bias = nn.Parameter(torch.zeros(graph.num_items))  # [I]
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("item_node", graph.item_node.clone(), persistent=False)
        for l in range(n_layers):
            self.register_buffer(f"edge_index_{l}", graph.edge_index[l], persistent=False)
            self.register_buffer(f"edge_type_{l}", graph.edge_type[l], persistent=False)

    @property
    def num_items(self) -> int:
        return self.graph.num_items

    def node_embeddings(self) -> torch.Tensor:
        """Embeddings of the target nodes (items, then context entities): ``[T, d]``."""
        x_Nd = self.node_emb.weight  # [n_0, d]
        for l, conv in enumerate(self.convs):
            n_out = self.graph.layer_sizes[l + 1]
            edge_index = getattr(self, f"edge_index_{l}")  # [2, E_l]
            edge_type = getattr(self, f"edge_type_{l}")  # [E_l]
            x_Nd = conv((x_Nd, x_Nd[:n_out]), edge_index, edge_type)  # [n_{l+1}, d]
            if l < len(self.convs) - 1:
                x_Nd = torch.relu(x_Nd)
        return x_Nd[: self.graph.num_targets]  # [T, d]

    def user_vectors(
        self, node_Td: torch.Tensor, ctx_BC: torch.Tensor, mask_BC: torch.Tensor
    ) -> torch.Tensor:
        """KBRD self-attention pooling of the context nodes (``mask_BC``: real): ``[B, d]``."""
        h_BCd = node_Td[ctx_BC]  # [B, C, d]
        e_BC = self.attn_b(torch.tanh(self.attn_a(h_BCd))).squeeze(-1)  # [B, C]
        e_BC = e_BC.masked_fill(~mask_BC, torch.finfo(e_BC.dtype).min)
        alpha_BC = torch.softmax(e_BC, dim=-1) * mask_BC  # [B, C]; all 0 for an empty context
        return torch.einsum("bc,bcd->bd", alpha_BC, h_BCd)  # [B, d]

    def forward(self, ctx_BC: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
        """Item scores ``s = u · e_i + b_i`` for a batch of contexts: ``[B, I]``."""
        node_Td = self.node_embeddings()  # [T, d]
        return self.scores_from_nodes(node_Td, ctx_BC, mask_BC)

    def scores_from_nodes(
        self, node_Td: torch.Tensor, ctx_BC: torch.Tensor, mask_BC: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``[B, I]`` given precomputed target-node embeddings ``[T, d]``."""
        u_Bd = self.dropout(self.user_vectors(node_Td, ctx_BC, mask_BC))  # [B, d]
        item_Id = node_Td[self.item_node]  # [I, d]
        return u_Bd @ item_Id.T + self.item_bias  # [B, I]


def pad_contexts(contexts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Context node lists -> ``(ctx_BC, mask_BC)`` padded with node 0 (masked out); C >= 1."""
    C = max([len(c) for c in contexts] + [1])
    ctx_BC = torch.zeros(len(contexts), C, dtype=torch.long)
    mask_BC = torch.zeros(len(contexts), C, dtype=torch.bool)
    for b, c in enumerate(contexts):
        ctx_BC[b, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask_BC[b, : len(c)] = True
    return ctx_BC, mask_BC
