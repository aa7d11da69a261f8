"""One entry point for every dataset: :func:`load_dataset` returns a :class:`Corpus`.

Layouts under ``data_dir``:
- ``redial`` and ``synthetic``: ``{train,valid,test}_data.jsonl``, ``movies_with_mentions.csv``,
  ``kg/kbrd/*.pkl`` and/or ``kg/dbpedia/*.json`` (movies linked to the KG through
  ``kg/kbrd/id2entity.pkl``).
- ``inspired``: ``{train,valid}_data_dbpedia.jsonl`` and the DBpedia JSON files beside them.

Items without a KG node **[decision]**: a movie counts as having a node only when it is
linked to a KG URI. In KBRD's pickles 812 ReDial movies have no URI; their raw movieId
appears in ``entity2entityId.pkl`` as a node with only a self-loop, which is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from conkd_scale.data import inspired, redial
from conkd_scale.data.jsonl import load_json
from conkd_scale.data.kg import KnowledgeGraph, load_dbpedia_kg, load_kbrd_kg, safe_load_pickle
from conkd_scale.data.schema import (
    RECOMMENDER,
    Conversation,
    ItemCatalog,
    TurnSample,
    turn_samples,
)
from conkd_scale.utils.errors import DataError

DATASETS = ("redial", "inspired", "synthetic")
KG_FORMATS = ("kbrd", "dbpedia", "none")
DEFAULT_KG = {"redial": "kbrd", "synthetic": "dbpedia", "inspired": "dbpedia"}
SPLITS = ("train", "valid", "test")


@dataclass
class Corpus:
    name: str
    data_dir: Path
    catalog: ItemCatalog
    splits: dict[str, list[Conversation]]
    kg: KnowledgeGraph | None
    item_entity: list[int | None]  # KG node of each catalog item (catalog order), or None

    def samples(self, split: str, roles: Sequence[str] = (RECOMMENDER,)) -> list[TurnSample]:
        """Per-turn samples of one split, for the given responding roles."""
        return [s for c in self.splits[split] for s in turn_samples(c, roles)]

    def entity_ids(self, keys: Sequence[str]) -> list[int]:
        """KG node ids of entity keys (URIs); unknown keys are skipped."""
        if self.kg is None:
            return []
        idx = self.kg.entity_index
        return [idx[k] for k in keys if k in idx]

    @property
    def items_without_kg_node(self) -> int:
        return sum(e is None for e in self.item_entity)


def _link_redial_items(
    catalog: ItemCatalog, id2entity: dict, kg: KnowledgeGraph
) -> list[int | None]:
    out: list[int | None] = []
    for it in catalog:
        uri = id2entity.get(int(it.item_id))
        out.append(kg.entity_index.get(uri) if isinstance(uri, str) else None)
    return out


def load_dataset(
    name: str,
    data_dir: str | Path,
    *,
    kg: str | None = None,
    splits: Sequence[str] = SPLITS,
) -> Corpus:
    """Load a dataset's splits, item vocabulary and knowledge graph (``kg=None``: its default)."""
    if name not in DATASETS:
        raise DataError(data_dir, f"unknown dataset {name!r}", hint=f"use one of {DATASETS}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            data_dir,
            "data directory does not exist",
            hint="pass --data-dir, or create one with `python -m conkd_scale.data synth --out DIR`",
        )
    kg_format = kg or DEFAULT_KG[name]
    if kg_format not in KG_FORMATS:
        raise DataError(
            data_dir, f"unknown KG format {kg_format!r}", hint=f"use one of {KG_FORMATS}"
        )
    graph: KnowledgeGraph | None = None
    if name == "inspired":
        entity2id = load_json(data_dir / "entity2id.json", "entity2id.json")
        catalog = inspired.load_catalog(data_dir, entity2id)
        convs = {s: inspired.load_split(data_dir, s, entity2id) for s in splits}
        if kg_format == "kbrd":
            raise DataError(data_dir, "INSPIRED has no KBRD pickles", hint="use --kg dbpedia")
        if kg_format == "dbpedia":
            graph = load_dbpedia_kg(data_dir)
            item_entity: list[int | None] = [int(it.item_id) for it in catalog]
        else:
            item_entity = [None] * len(catalog)
    else:
        catalog = redial.load_movies(data_dir)
        convs = {s: redial.load_split(data_dir, s, catalog) for s in splits}
        item_entity = [None] * len(catalog)
        if kg_format == "kbrd":
            graph, id2entity = load_kbrd_kg(data_dir / "kg" / "kbrd")
            item_entity = _link_redial_items(catalog, id2entity, graph)
        elif kg_format == "dbpedia":
            graph = load_dbpedia_kg(data_dir / "kg" / "dbpedia")
            id2entity = safe_load_pickle(data_dir / "kg" / "kbrd" / "id2entity.pkl")
            if not isinstance(id2entity, dict):
                raise DataError(data_dir / "kg" / "kbrd" / "id2entity.pkl", "expected a dict")
            item_entity = _link_redial_items(catalog, id2entity, graph)
    return Corpus(name, data_dir, catalog, convs, graph, item_entity)


def corpus_stats(corpus: Corpus, split: str) -> dict[str, int | str]:
    """Counts for one split plus the item vocabulary and KG (the ``stats`` command's output)."""
    convs = corpus.splits[split]
    turns = [t for c in convs for t in c.turns]
    kg = corpus.kg
    return {
        "dataset": corpus.name,
        "split": split,
        "conversations": len(convs),
        "messages": sum(c.n_messages for c in convs),
        "turns": len(turns),
        "recommender_turns": sum(t.role == RECOMMENDER for t in turns),
        "recommendation_turns": sum(t.is_recommendation for t in turns),
        "item_mentions": sum(len(t.items) for t in turns),
        "items": len(corpus.catalog),
        "kg_entities": kg.num_entities if kg else 0,
        "kg_relations": kg.num_relations if kg else 0,
        "kg_edges": int(kg.triples.shape[0]) if kg else 0,
        "items_without_kg_node": corpus.items_without_kg_node,
    }
