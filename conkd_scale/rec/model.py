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

Copy component (``copy="recency"``, the default; ``copy="none"`` is the KBRD-style R), a
pointer-generator mixture that splits repeats from new items:
``p(i) = (1 − g) · p_gen(i) + g · p_copy(i)``. ``p_gen`` is the softmax of ``s`` over the
items **not** in the context; ``p_copy`` is a softmax over the context's distinct items of
``w_rank[min(r_i, K − 1)] + w_ago[min(a_i, K) − 1] + β · s_i`` (``r_i = 0``: the most recently
mentioned item; ``a_i``: turns since its last mention, 1 = the seeker's turn just before;
``K = recency_buckets``). The copy gate ``g = σ(g · u + g_0 + v[min(a_0, K) − 1])`` reads
the user vector and how recent the newest mention is (``g = 0`` for a context without
items). The scores are ``log p`` (``q_R = softmax(log p / τ_R)``). ``p_gen`` is
``softmax(s / T)``, with ``T`` (1 while training) fitted afterwards on the validation
split's NLL (temperature scaling): an overfitted ``p_gen`` is overconfident, and the
mixture's ranking of a repeat against a new item depends on its calibration. Trained with
the same cross-entropy, the copy part learns how often and which of a conversation's items
come back, and the graph part learns to rank only the items not named yet (``R@k/new``).

Optional readers of the conversation (each off by default): ``copy_roles`` adds
``w_role[seeker named i last] + w_count[min(n_i, 3) − 1]`` to the copy logits and
``v_role[seeker named the newest item]`` to the gate; ``copy_words`` adds the mean of a
learned weight per (hashed) word of the last context turn to the gate; ``copy_item_words``
adds to each item's copy logit the mean weight of the words around its last mention;
``words="context"`` adds the mean embedding of the context's words to ``u``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch_geometric.nn import RGCNConv

from conkd_scale.rec.graph import RecentLists, RecGraph
from conkd_scale.rec.rgcn import BasisRGCNConv

COPY_MODES = ("none", "recency")
WORD_MODES = ("none", "context")
COUNT_BUCKETS = 3  # copy_roles: an item named in 1, 2, or 3+ context turns


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
        copy: str = "none",
        recency_buckets: int = 8,
        copy_roles: bool = False,
        words: str = "none",
        word_buckets: int = 0,
        copy_words: bool = False,
        copy_item_words: bool = False,
    ) -> None:
        super().__init__()
        if copy not in COPY_MODES:
            raise ValueError(f"copy must be one of {COPY_MODES}, got {copy!r}")
        if words not in WORD_MODES:
            raise ValueError(f"words must be one of {WORD_MODES}, got {words!r}")
        if (words != "none" or copy_words or copy_item_words) and word_buckets < 1:
            raise ValueError("words need word_buckets >= 1")
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
        self.copy = copy
        self.recency_buckets = recency_buckets
        if copy == "recency":
            K = recency_buckets
            self.copy_rank = nn.Parameter(torch.zeros(K))  # [K] w_rank
            self.copy_ago = nn.Parameter(torch.zeros(K))  # [K] w_ago
            self.copy_gate_ago = nn.Parameter(torch.zeros(K))  # [K] v
            self.copy_score = nn.Parameter(torch.zeros(()))  # β: weight of s_i in p_copy
            # T of p_gen = softmax(s / T), fitted on validation after training (calibration)
            self.register_buffer("gen_temperature", torch.ones(()))
            self.copy_gate = nn.Linear(dim, 1)  # g · u + g_0
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.zeros_(self.copy_gate.bias)
            if copy_roles:  # who named each item last, and in how many turns
                self.copy_role = nn.Parameter(torch.zeros(2))  # [2] w_role (1: the seeker)
                self.copy_count = nn.Parameter(torch.zeros(COUNT_BUCKETS))  # [3] w_count
                self.copy_gate_role = nn.Parameter(torch.zeros(2))  # [2] v_role
            if copy_words:  # the gate reads the last turn's words
                self.copy_gate_words = nn.EmbeddingBag(
                    word_buckets + 1, 1, mode="mean", padding_idx=0
                )
                nn.init.zeros_(self.copy_gate_words.weight)
            if copy_item_words:  # each item's copy score reads the words around its mention
                self.copy_item_words = nn.EmbeddingBag(
                    word_buckets + 1, 1, mode="mean", padding_idx=0
                )
                nn.init.zeros_(self.copy_item_words.weight)
        self.use_item_words = copy == "recency" and copy_item_words
        self.copy_roles = copy == "recency" and copy_roles
        self.copy_words = copy == "recency" and copy_words
        self.words = words
        if words == "context":  # u += mean embedding of the context's words
            self.word_emb = nn.EmbeddingBag(word_buckets + 1, dim, mode="mean", padding_idx=0)
            nn.init.normal_(self.word_emb.weight, std=dim**-0.5)
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

    def forward(
        self,
        ctx_BC: torch.Tensor,
        mask_BC: torch.Tensor,
        recent: RecentItems | None = None,
        words: WordBags | None = None,
    ) -> torch.Tensor:
        """Item scores ``s = u · e_i + b_i`` (+ the copy term) for a batch: ``[B, I]``."""
        node_Td = self.node_embeddings()  # [T, d]
        return self.scores_from_nodes(node_Td, ctx_BC, mask_BC, recent, words)

    def scores_from_nodes(
        self,
        node_Td: torch.Tensor,
        ctx_BC: torch.Tensor,
        mask_BC: torch.Tensor,
        recent: RecentItems | None = None,
        words: WordBags | None = None,
    ) -> torch.Tensor:
        """Scores ``[B, I]`` given precomputed target-node embeddings ``[T, d]``."""
        u_Bd = self.user_vectors(node_Td, ctx_BC, mask_BC)  # [B, d]
        if (self.words != "none" or self.copy_words) and words is None:
            raise ValueError("this R reads the context's words: pass words=WordBags")
        if self.words == "context":
            u_Bd = u_Bd + self.word_emb(words.ctx_BW)  # [B, d]; an empty bag adds 0
        u_Bd = self.dropout(u_Bd)
        item_Id = node_Td[self.item_node]  # [I, d]
        scores_BI = u_Bd @ item_Id.T + self.item_bias  # [B, I]
        if self.copy == "none":
            return scores_BI
        if recent is None:
            raise ValueError("copy='recency' needs the context's recent items")
        return self.copy_scores(scores_BI, u_Bd, recent, words)

    def copy_scores(
        self,
        scores_BI: torch.Tensor,
        u_Bd: torch.Tensor,
        recent: RecentItems,
        words: WordBags | None = None,
    ) -> torch.Tensor:
        """Log-probabilities of the copy mixture ``(1 − g) p_gen + g p_copy``: ``[B, I]``.

        ``p_gen = softmax(scores_BI / T)`` over the items not in the context; ``p_copy`` and
        ``g`` as in the module docstring.
        """
        K = self.recency_buckets
        rank_BK = torch.arange(recent.items_BK.shape[1], device=scores_BI.device)
        rank_BK = rank_BK.clamp(max=K - 1).expand_as(recent.items_BK)  # [B, K']
        ago_BK = recent.ago_BK.clamp(min=1, max=K) - 1  # [B, K']
        s_BK = scores_BI.gather(1, recent.items_BK)  # [B, K'] the graph part's score of each
        logit_BK = self.copy_rank[rank_BK] + self.copy_ago[ago_BK] + self.copy_score * s_BK
        gate_B = self.copy_gate(u_Bd).squeeze(1) + self.copy_gate_ago[ago_BK[:, 0]]  # [B]
        if self.copy_roles:
            seeker_BK = recent.seeker_BK.long()  # [B, K']
            count_BK = recent.count_BK.clamp(min=1, max=COUNT_BUCKETS) - 1  # [B, K']
            logit_BK = logit_BK + self.copy_role[seeker_BK] + self.copy_count[count_BK]
            gate_B = gate_B + self.copy_gate_role[seeker_BK[:, 0]]
        if self.use_item_words:
            B, K, L = recent.words_BKL.shape
            item_words_BK = self.copy_item_words(recent.words_BKL.reshape(B * K, L))  # [BK, 1]
            logit_BK = logit_BK + item_words_BK.reshape(B, K)
        if self.copy_words:
            gate_B = gate_B + self.copy_gate_words(words.last_BL).squeeze(1)  # [B]
        has_B = recent.mask_BK.any(dim=1)  # [B]
        logit_BK = logit_BK.masked_fill(~recent.mask_BK & has_B[:, None], float("-inf"))
        p_copy_BK = torch.softmax(logit_BK, dim=1) * recent.mask_BK  # [B, K']
        g_B = torch.sigmoid(gate_B) * has_B  # [B]
        mass_BI = torch.zeros_like(scores_BI).scatter_add(
            1, recent.items_BK, (g_B[:, None] * p_copy_BK).to(scores_BI.dtype)
        )  # [B, I]: g · p_copy at each context item
        in_ctx_BI = torch.zeros_like(scores_BI, dtype=torch.bool).scatter(
            1, recent.items_BK, recent.mask_BK
        )  # [B, I]: context items, which only the copy part ranks
        gen_BI = torch.log_softmax(
            (scores_BI / self.gen_temperature).masked_fill(in_ctx_BI, float("-inf")), dim=1
        )
        logp_gen_BI = gen_BI + torch.log1p(-g_B)[:, None]  # [B, I]
        tiny = torch.finfo(mass_BI.dtype).tiny  # log 0 = -inf with a finite gradient (0)
        log_mass_BI = torch.log(mass_BI.clamp_min(tiny)).masked_fill(mass_BI == 0, float("-inf"))
        return torch.logaddexp(logp_gen_BI, log_mass_BI)


class RecentItems(NamedTuple):
    """The context's distinct items, most recent first (padded): what the copy term reads."""

    items_BK: torch.Tensor  # [B, K'] long, R's item index (0 at padding)
    ago_BK: torch.Tensor  # [B, K'] long: turns since the last mention (1: the turn before)
    mask_BK: torch.Tensor  # [B, K'] bool: a real entry
    seeker_BK: torch.Tensor  # [B, K'] bool: the seeker named it last
    count_BK: torch.Tensor  # [B, K'] long: context turns that name it
    words_BKL: torch.Tensor  # [B, K', L] long: hashed words around its last mention (0-pad)

    def to(self, device: torch.device | str) -> RecentItems:
        return RecentItems(*(x.to(device) for x in self))


def pad_recent(recent: Sequence[RecentLists]) -> RecentItems:
    """Per-context :class:`~conkd_scale.rec.graph.RecentLists` -> padded :class:`RecentItems`."""
    K = max([len(r.items) for r in recent] + [1])
    L = max([len(w) for r in recent for w in r.words] + [1])
    B = len(recent)
    out = RecentItems(
        torch.zeros(B, K, dtype=torch.long),
        torch.ones(B, K, dtype=torch.long),
        torch.zeros(B, K, dtype=torch.bool),
        torch.zeros(B, K, dtype=torch.bool),
        torch.ones(B, K, dtype=torch.long),
        torch.zeros(B, K, L, dtype=torch.long),
    )
    for b, r in enumerate(recent):
        n = len(r.items)
        out.items_BK[b, :n] = torch.tensor(r.items, dtype=torch.long)
        out.ago_BK[b, :n] = torch.tensor(r.ago, dtype=torch.long)
        out.mask_BK[b, :n] = True
        out.seeker_BK[b, :n] = torch.tensor(r.seeker, dtype=torch.bool)
        out.count_BK[b, :n] = torch.tensor(r.count, dtype=torch.long)
        for k, w in enumerate(r.words):
            out.words_BKL[b, k, : len(w)] = torch.tensor(w, dtype=torch.long)
    return out


class WordBags(NamedTuple):
    """Hashed word ids (0-padded) of each context and of its last turn."""

    ctx_BW: torch.Tensor  # [B, W] long
    last_BL: torch.Tensor  # [B, L] long

    def to(self, device: torch.device | str) -> WordBags:
        return WordBags(*(x.to(device) for x in self))


def pad_words(ctx: Sequence[Sequence[int]], last: Sequence[Sequence[int]]) -> WordBags:
    """Per-context word id lists -> :class:`WordBags` (an empty list: an all-padding row)."""

    def pad(rows: Sequence[Sequence[int]]) -> torch.Tensor:
        out = torch.zeros(len(rows), max([len(r) for r in rows] + [1]), dtype=torch.long)
        for b, r in enumerate(rows):
            out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    return WordBags(pad(ctx), pad(last))


def pad_contexts(contexts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Context node lists -> ``(ctx_BC, mask_BC)`` padded with node 0 (masked out); C >= 1."""
    C = max([len(c) for c in contexts] + [1])
    ctx_BC = torch.zeros(len(contexts), C, dtype=torch.long)
    mask_BC = torch.zeros(len(contexts), C, dtype=torch.bool)
    for b, c in enumerate(contexts):
        ctx_BC[b, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask_BC[b, : len(c)] = True
    return ctx_BC, mask_BC
