"""Knowledge graphs: KBRD pickles, UniCRS DBpedia JSON, and the graph tensors for R-GCN.

Pickles run code when loaded naively; :func:`safe_load_pickle` only admits plain containers
and scalars and refuses anything else with a clear error.
"""

from __future__ import annotations

import io
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from conkd_scale.data.jsonl import load_json, require_file
from conkd_scale.utils.errors import DataError

_SAFE_GLOBALS = {
    ("builtins", n)
    for n in (
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "int",
        "float",
        "str",
        "bytes",
        "bool",
        "complex",
    )
} | {("collections", "defaultdict"), ("collections", "OrderedDict")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedReader, path: Path) -> None:
        super().__init__(f)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            self._path,
            f"refusing to unpickle {module}.{name}: only plain containers and scalars are "
            "allowed in knowledge-graph pickles",
            hint="this file is not a KBRD data file, or has been tampered with; re-download it",
        )


def safe_load_pickle(path: str | Path) -> Any:
    """Load a data pickle, allowing only dict/list/tuple/set/defaultdict and builtin scalars."""
    path = require_file(path, "knowledge-graph pickle")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except DataError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise DataError(
                path, f"cannot unpickle ({type(e).__name__}: {e})", hint="re-download the file"
            ) from None


@dataclass
class KnowledgeGraph:
    """A raw KG: named entities and relations and (head, relation, tail) triples."""

    entity_names: list[str]  # index -> name (URI, or a raw id)
    relation_names: list[str]  # index -> name
    triples: torch.Tensor  # [T, 3] int64: head, relation, tail (as in the source files)
    source: str = ""

    def __post_init__(self) -> None:
        self.entity_index = {n: i for i, n in enumerate(self.entity_names)}

    @property
    def num_entities(self) -> int:
        return len(self.entity_names)

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)

    def build_graph(
        self,
        *,
        min_relation_count: int = 0,
        rare: str = "merge",
        add_reverse: bool = True,
        add_self_loops: bool = True,
        keep_source_self_loops: bool = False,
    ) -> GraphTensors:
        """Graph tensors for torch-geometric (``edge_index`` [2, E], ``edge_type`` [E]).

        Relations with fewer than ``min_relation_count`` triples are merged into one ``other``
        relation (``rare="merge"``) or dropped (``rare="drop"``). Reverse edges get their own
        relation types; self-loops get one type of their own. The source files' own self-loop
        triples (head == tail) are dropped unless ``keep_source_self_loops``.
        """
        if rare not in ("merge", "drop"):
            raise ValueError(f"rare must be 'merge' or 'drop', got {rare!r}")
        t = self.triples
        if not keep_source_self_loops and len(t):
            t = t[t[:, 0] != t[:, 2]]
        counts = Counter(t[:, 1].tolist())
        kept = sorted(r for r, c in counts.items() if c >= min_relation_count)
        names = [self.relation_names[r] for r in kept]
        remap = torch.full((max(self.num_relations, 1),), -1, dtype=torch.long)
        remap[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        rare_ids = [r for r in counts if r not in set(kept)]
        if rare_ids and rare == "merge":
            remap[torch.tensor(rare_ids, dtype=torch.long)] = len(names)
            names.append("other")
        rel = remap[t[:, 1]] if len(t) else t[:, 1]
        keep = rel >= 0
        head, tail, rel = t[keep, 0], t[keep, 2], rel[keep]
        edge_index = torch.stack([head, tail])  # message flows head -> tail
        edge_type = rel
        n_rel = len(names)
        if add_reverse:
            edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
            edge_type = torch.cat([edge_type, edge_type + n_rel])
            names = names + [f"{n}^-1" for n in names]
            n_rel *= 2
        if add_self_loops:
            loops = torch.arange(self.num_entities)
            edge_index = torch.cat([edge_index, torch.stack([loops, loops])], dim=1)
            edge_type = torch.cat([edge_type, torch.full_like(loops, n_rel)])
            names.append("self_loop")
            n_rel += 1
        return GraphTensors(edge_index.contiguous(), edge_type, self.num_entities, names)


@dataclass
class GraphTensors:
    edge_index: torch.Tensor  # [2, E] int64
    edge_type: torch.Tensor  # [E] int64
    num_nodes: int
    relation_names: list[str]

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)

    def to_pyg(self) -> Any:
        """As a ``torch_geometric.data.Data`` object."""
        from torch_geometric.data import Data

        return Data(edge_index=self.edge_index, edge_type=self.edge_type, num_nodes=self.num_nodes)


def _check_id(x: Any, n: int, path: Path, what: str, key: Any) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < n:
        raise DataError(
            path,
            f"unknown {what} id {x!r} (valid: 0..{n - 1})",
            field=str(key),
            hint="the graph files come from different releases",
        )
    return x


def load_kbrd_kg(kg_dir: str | Path) -> tuple[KnowledgeGraph, dict[Any, str | None]]:
    """KBRD pickles -> (graph, id2entity) where id2entity maps ReDial movieId -> URI or None."""
    kg_dir = Path(kg_dir)
    e2id = safe_load_pickle(kg_dir / "entity2entityId.pkl")
    sub_path = kg_dir / "subkg.pkl"
    subkg = safe_load_pickle(sub_path)
    id2entity = safe_load_pickle(kg_dir / "id2entity.pkl")
    for name, obj in (
        ("entity2entityId.pkl", e2id),
        ("subkg.pkl", subkg),
        ("id2entity.pkl", id2entity),
    ):
        if not isinstance(obj, dict):
            raise DataError(kg_dir / name, f"expected a dict, got {type(obj).__name__}")
    n = max(e2id.values(), default=-1) + 1
    names = [""] * n
    for uri, i in e2id.items():
        names[_check_id(i, n, kg_dir / "entity2entityId.pkl", "entity", uri)] = str(uri)
    rows: list[tuple[int, int, int]] = []
    max_rel = -1
    for h, edges in subkg.items():
        _check_id(h, n, sub_path, "entity", h)
        for edge in edges:
            if not isinstance(edge, (tuple, list)) or len(edge) != 2:
                raise DataError(
                    sub_path,
                    f"bad edge {edge!r}",
                    field=str(h),
                    hint="expected (relation id, tail id)",
                )
            r, t = edge
            _check_id(t, n, sub_path, "entity", h)
            if not isinstance(r, int) or r < 0:
                raise DataError(sub_path, f"bad relation id {r!r}", field=str(h))
            max_rel = max(max_rel, r)
            rows.append((h, r, t))
    triples = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    rel_names = [str(r) for r in range(max_rel + 1)]
    return KnowledgeGraph(names, rel_names, triples, source=str(kg_dir)), id2entity


def load_dbpedia_kg(kg_dir: str | Path) -> KnowledgeGraph:
    """UniCRS DBpedia JSON (entity2id, relation2id, dbpedia_subkg) -> graph."""
    kg_dir = Path(kg_dir)
    e2id = load_json(kg_dir / "entity2id.json", "entity2id.json")
    r2id = load_json(kg_dir / "relation2id.json", "relation2id.json")
    sub_path = kg_dir / "dbpedia_subkg.json"
    subkg = load_json(sub_path, "dbpedia_subkg.json")
    n = max(e2id.values(), default=-1) + 1
    names = [""] * n
    for uri, i in e2id.items():
        names[_check_id(i, n, kg_dir / "entity2id.json", "entity", uri)] = uri
    n_rel = max(r2id.values(), default=-1) + 1
    rel_names = [""] * n_rel
    for r, i in r2id.items():
        rel_names[_check_id(i, n_rel, kg_dir / "relation2id.json", "relation", r)] = r
    rows: list[tuple[int, int, int]] = []
    for h_str, edges in subkg.items():
        try:
            h = int(h_str)
        except ValueError:
            raise DataError(sub_path, f"head id {h_str!r} is not an integer", field=h_str) from None
        _check_id(h, n, sub_path, "entity", h_str)
        for edge in edges:
            if not isinstance(edge, list) or len(edge) != 2:
                raise DataError(
                    sub_path,
                    f"bad edge {edge!r}",
                    field=h_str,
                    hint="expected [relation id, tail id]",
                )
            r, t = edge
            _check_id(r, n_rel, sub_path, "relation", h_str)
            _check_id(t, n, sub_path, "entity", h_str)
            rows.append((h, r, t))
    triples = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    return KnowledgeGraph(names, rel_names, triples, source=str(kg_dir))
