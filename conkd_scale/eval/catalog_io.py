"""The item catalog that travels with an exported model: ``items.json`` beside the weights.

Format: a JSON list of ``{"item_id": str, "title": str}`` in catalog order (the order in
which the item tokens were added to the tokenizer). The exporter calls
:func:`save_item_catalog`; the chat CLI and anything else that shows replies to people call
:func:`load_item_catalog` to render ``<item_ID>`` tokens as titles.
"""

from __future__ import annotations

import json
from pathlib import Path

from conkd_scale.data.schema import Item, ItemCatalog
from conkd_scale.utils.errors import DataError
from conkd_scale.utils.io import write_json

ITEMS_FILE = "items.json"


def save_item_catalog(model_dir: str | Path, catalog: ItemCatalog) -> Path:
    """Write ``model_dir/items.json`` atomically; returns its path."""
    path = Path(model_dir) / ITEMS_FILE
    rows = [{"item_id": it.item_id, "title": it.title} for it in catalog]
    write_json(path, rows, indent=None)
    return path


def load_item_catalog(path: str | Path) -> ItemCatalog:
    """Read ``items.json`` (``path`` is the file or the model directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / ITEMS_FILE
    if not path.is_file():
        raise DataError(
            path,
            "item catalog not found",
            hint="export the model with conkd_scale.eval.catalog_io.save_item_catalog, "
            "or pass --catalog PATH/items.json",
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise DataError(path, "expected a JSON list of {item_id, title}")
    items = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or "item_id" not in row or "title" not in row:
            raise DataError(path, f"entry {n} is not an object with item_id and title")
        items.append(Item(str(row["item_id"]), str(row["title"])))
    try:
        return ItemCatalog(items)
    except ValueError as e:
        raise DataError(path, str(e)) from None
