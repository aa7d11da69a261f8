"""The recommendation teacher's compact graph: only the nodes and edges R actually needs.

R needs output embeddings for its **target** nodes only: the KG node of every catalog item
and of every non-item entity that a turn can mention (its context-entity vocabulary). An
``L``-layer R-GCN output at node ``v`` depends only on the edges that point into ``v``'s
``L``-hop in-neighbourhood, so for each layer we keep exactly the edges into the nodes whose
outputs the next layer reads:

    T_L       = targets
    T_{l-1}   = T_l ∪ sources of the edges into T_l
    layer l   : features on T_{l-1} -> features on T_l, using only the edges into T_l

RGCNConv's ``mean`` aggregation normalises per (destination, relation); every destination
that is computed keeps all of its incoming edges, so the pruned computation is **exact**
for any number of layers (tested against the full graph). With one layer on ReDial this
keeps ~70k of 382k edges (FINDINGS.md: 0.41 s instead of 5.8 s a step).

Nodes are renumbered compactly so that ``T_L`` comes first, then the nodes first needed by
layer ``L``, and so on: ``T_l`` is always a prefix, so the root (self) features of layer
``l``'s outputs are ``x[:n_l]``. Items without a KG node get a node of their own with only a
self-loop edge. Items that share a KG node share its embedding (they keep separate biases).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from conkd_scale.data.corpus import Corpus
from conkd_scale.data.schema import SEEKER, TurnSample
from conkd_scale.rec.words import hash_words, mention_windows, tokenize

SELF_LOOP = "self_loop"


@dataclass
class RecGraph:
    """Compact graph tensors and the item/entity -> node maps of a recommendation teacher."""

    item_ids: list[str]  # R's item index order (the catalog order at training time)
    item_node: torch.Tensor  # [I] long: compact node of each item (< num_targets)
    entity_keys: list[str]  # context-entity vocabulary (KG names), in node order
    entity_node: torch.Tensor  # [E] long: compact node of each entity key (< num_targets)
    layer_sizes: list[int]  # [n_0, ..., n_L]: nodes read by layer l are the first n_l
    edge_index: list[torch.Tensor]  # per layer l: [2, E_l], src < n_l, dst < n_{l+1}
    edge_type: list[torch.Tensor]  # per layer l: [E_l]
    relation_names: list[str]
    kg_node: torch.Tensor  # [n_0] original KG node id of each compact node, -1 if none

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_targets(self) -> int:
        return self.layer_sizes[-1]

    @property
    def num_nodes(self) -> int:
        return self.layer_sizes[0]

    @property
    def num_layers(self) -> int:
        return len(self.edge_index)

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)

    def state(self) -> dict[str, Any]:
        """Plain tensors/lists, loadable with ``torch.load(weights_only=True)``."""
        return {
            "item_ids": list(self.item_ids),
            "item_node": self.item_node,
            "entity_keys": list(self.entity_keys),
            "entity_node": self.entity_node,
            "layer_sizes": list(self.layer_sizes),
            "edge_index": list(self.edge_index),
            "edge_type": list(self.edge_type),
            "relation_names": list(self.relation_names),
            "kg_node": self.kg_node,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RecGraph:
        return cls(**state)


def context_entity_keys(corpus: Corpus) -> list[str]:
    """KG names of the non-item entities mentioned in any turn of the loaded splits (sorted).

    Only *which* node outputs are computed depends on this list, never their values (the
    pruning is exact), so including the evaluation splits leaks nothing.
    """
    if corpus.kg is None:
        return []
    idx = corpus.kg.entity_index
    keys = {
        e for convs in corpus.splits.values() for c in convs for t in c.turns for e in t.entities
    }
    return sorted(k for k in keys if k in idx)


def build_rec_graph(
    corpus: Corpus,
    *,
    layers: int = 1,
    use_kg: bool = True,
    min_relation_count: int = 1000,
    rare_relations: str = "merge",
) -> RecGraph:
    """The compact graph for R over ``corpus`` (see the module docstring).

    ``use_kg=False`` (the ``--no-kg`` ablation) gives the same item/entity nodes with no
    edges and no layers: plain learned embeddings.
    """
    kg = corpus.kg
    compact: dict[int, int] = {}  # KG node -> compact node
    kg_node: list[int] = []

    def node_of(u: int | None) -> int:
        if u is None:  # an item without a KG node: a node of its own
            kg_node.append(-1)
            return len(kg_node) - 1
        if u not in compact:
            compact[u] = len(kg_node)
            kg_node.append(u)
        return compact[u]

    item_node = [node_of(u) for u in corpus.item_entity]
    unlinked = [n for n, u in zip(item_node, corpus.item_entity, strict=True) if u is None]
    entity_keys = context_entity_keys(corpus)
    entity_node = [node_of(kg.entity_index[k]) for k in entity_keys] if kg else []
    sizes = [len(kg_node)]
    edge_index: list[torch.Tensor] = []
    edge_type: list[torch.Tensor] = []
    relation_names: list[str] = []
    if use_kg:
        if kg is None:
            raise ValueError("use_kg=True needs a knowledge graph (load the corpus with a KG)")
        if layers < 1:
            raise ValueError(f"layers must be >= 1 with a KG, got {layers}")
        gt = kg.build_graph(min_relation_count=min_relation_count, rare=rare_relations)
        relation_names = list(gt.relation_names)
        loop_rel = relation_names.index(SELF_LOOP)
        src_all, dst_all = gt.edge_index
        for _ in range(layers):  # from the last layer down to the first
            to_compact = torch.full((gt.num_nodes,), -1, dtype=torch.long)
            known = torch.tensor([u for u in kg_node if u >= 0], dtype=torch.long)
            to_compact[known] = torch.tensor([compact[int(u)] for u in known], dtype=torch.long)
            n_out = len(kg_node)
            dst_c = to_compact[dst_all]
            keep = (dst_c >= 0) & (dst_c < n_out)  # edges into the nodes this layer outputs
            src_k = src_all[keep]
            for u in torch.unique(src_k).tolist():  # sorted: deterministic numbering
                node_of(u)
            to_compact[torch.tensor(list(compact), dtype=torch.long)] = torch.tensor(
                list(compact.values()), dtype=torch.long
            )
            loops = torch.tensor(unlinked, dtype=torch.long)
            ei = torch.cat(
                [torch.stack([to_compact[src_k], dst_c[keep]]), torch.stack([loops, loops])], 1
            )
            et = torch.cat([gt.edge_type[keep], torch.full_like(loops, loop_rel)])
            order = torch.argsort(et, stable=True)  # grouped by relation
            edge_index.insert(0, ei[:, order].contiguous())
            edge_type.insert(0, et[order].contiguous())
            sizes.insert(0, len(kg_node))
    return RecGraph(
        item_ids=corpus.catalog.ids,
        item_node=torch.tensor(item_node, dtype=torch.long),
        entity_keys=entity_keys,
        entity_node=torch.tensor(entity_node, dtype=torch.long),
        layer_sizes=sizes,
        edge_index=edge_index,
        edge_type=edge_type,
        relation_names=relation_names,
        kg_node=torch.tensor(kg_node, dtype=torch.long),
    )


class ContextIndex:
    """Maps a turn's context to R's node and item indices (unknown ids are skipped), and,
    with ``word_buckets > 0``, its words to hashed word ids (:mod:`conkd_scale.rec.words`)."""

    def __init__(self, graph: RecGraph, *, word_buckets: int = 0, mention_window: int = 0) -> None:
        self.item_index = {i: n for n, i in enumerate(graph.item_ids)}
        item_node = graph.item_node.tolist()
        self._item_node = item_node
        self._entity_node = dict(zip(graph.entity_keys, graph.entity_node.tolist(), strict=True))
        self.word_buckets = word_buckets
        self.mention_window = mention_window

    def items(self, item_ids: Sequence[str]) -> list[int]:
        """R's item indices of the known ``item_ids``, in order."""
        return [self.item_index[i] for i in item_ids if i in self.item_index]

    def encode(self, turn: TurnSample) -> tuple[list[int], list[int]]:
        """``(context nodes, context item indices)``: mentioned items, then entities, unique."""
        items = list(dict.fromkeys(self.items(turn.context_items)))
        nodes = [self._item_node[i] for i in items]
        nodes += [self._entity_node[e] for e in turn.context_entities if e in self._entity_node]
        return list(dict.fromkeys(nodes)), items

    def recent(self, turn: TurnSample) -> RecentLists:
        """The context's known items, most recently mentioned first, with how many turns ago
        each was last mentioned, whether the seeker named it last, and how many context turns
        name it (what the copy component reads); with ``word_buckets`` and ``mention_window``,
        the hashed words around each item's last mention."""
        out = RecentLists([], [], [], [], [])
        roles = [role for role, _ in turn.context]
        counts: dict[str, int] = {}
        for items in turn.context_turn_items:
            for i in set(items):
                counts[i] = counts.get(i, 0) + 1
        windows: dict[int, dict[str, list[str]]] = {}  # per context turn (turns ago)
        for i, ago in turn.recent_items():
            if i not in self.item_index:
                continue
            out.items.append(self.item_index[i])
            out.ago.append(ago)
            out.seeker.append(len(roles) >= ago and roles[-ago] == SEEKER)
            out.count.append(counts.get(i, 1))
            if self.word_buckets and self.mention_window and len(roles) >= ago:
                if ago not in windows:
                    windows[ago] = mention_windows(turn.context[-ago][1], self.mention_window)
                out.words.append(hash_words(windows[ago].get(i, []), self.word_buckets))
            else:
                out.words.append([])
        return out

    def words(self, turn: TurnSample) -> tuple[list[int], list[int]]:
        """Hashed word ids of the whole context and of its last turn (empty without
        ``word_buckets``)."""
        if not self.word_buckets or not turn.context:
            return [], []
        ids = [hash_words(tokenize(text), self.word_buckets) for _, text in turn.context]
        return [w for turn_ids in ids for w in turn_ids], ids[-1]


@dataclass
class RecentLists:
    """One turn's recent context items (most recent first) and their copy features."""

    items: list[int]  # R's item index
    ago: list[int]  # turns since the last mention (1: the turn just before the response)
    seeker: list[bool]  # the last mention was the seeker's
    count: list[int]  # context turns that mention the item
    words: list[list[int]]  # hashed words around its last mention (copy_item_words)
