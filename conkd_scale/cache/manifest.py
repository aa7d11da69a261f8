"""The teacher cache's manifest: what the cache was made from (its fingerprint), its layout,
and a SHA-256 per shard.

The **fingerprint** names everything that determines the cache's content, field by field, so
that a run whose settings differ is refused with the field named:

- ``dataset``, ``max_length``, ``use_mode_tokens``, ``context_budget``,
  ``max_train_conversations``: the sequence layout (``conkd_scale/data/sequences.py``);
- ``k``, ``dtype``, ``rec_topk``: what is kept per response token and per recommender turn;
- ``tokenizer`` (SHA-256 of the vocabulary), ``items`` (of the item ids in token order);
- ``dialog_teacher`` (SHA-256 of every file of D's Hugging Face directory) and
  ``rec_teacher`` (of R's checkpoint file);
- ``data``: SHA-256 of the encoded training and validation sequences (tokens, labels, turn
  index) and of every recommender turn's sample (R reads its context): it covers the data
  files and everything that turns them into sequences.

The KD temperature τ and the gate are not in it: the cache holds D's untempered
log-probabilities and its exact item mass m_t, and R's distribution at R's own τ_R (part of
R's checkpoint); the loss applies τ and the gate when it reads them.

File hashes are remembered in the manifest with each file's size and modification time
(``files``), as git's index does: a later check rehashes a file only when either changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from conkd_scale.utils.errors import ConfigError, DataError
from conkd_scale.utils.io import sha256_file, write_json

FORMAT = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
SPLITS = ("train", "valid")

# fingerprint field -> the run setting that decides it (named in a refusal)
FIELD_KEYS: dict[str, str] = {
    "format": "the cache format (rebuild the cache with this code)",
    "dataset": "dataset",
    "max_length": "max_length",
    "use_mode_tokens": "use_mode_tokens",
    "context_budget": "context_budget",
    "max_train_conversations": "max_train_conversations",
    "k": "teachers.cache_k",
    "tail_samples": "teachers.cache_tail_samples",
    "dtype": "teachers.cache_dtype",
    "rec_topk": "teachers.cache_rec_topk",
    "tokenizer": "the tokenizer (D's, in teachers.dialog_dir)",
    "items": "the item table (the tokenizer's item tokens)",
    "dialog_teacher": "the dialogue teacher's files (teachers.dialog_dir)",
    "rec_teacher": "the recommendation teacher's checkpoint (teachers.rec_dir)",
    "data": "the training/validation sequences (data_dir and its files)",
}


# ----------------------------------------------------------------------------- hashing
class FileHasher:
    """SHA-256 of files, reusing a remembered hash while a file's size and mtime match."""

    def __init__(self, memo: dict[str, list[Any]] | None = None) -> None:
        self.memo = dict(memo or {})  # absolute path -> [size, mtime_ns, sha256]
        self.used: dict[str, list[Any]] = {}

    def __call__(self, path: Path) -> str:
        path = path.resolve()
        st = path.stat()
        key = str(path)
        old = self.memo.get(key)
        if old is not None and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            sha = str(old[2])
        else:
            sha = sha256_file(path)
        self.used[key] = [st.st_size, st.st_mtime_ns, sha]
        return sha

    def tree(self, root: Path) -> str:
        """One SHA-256 over every file under ``root`` (relative names and contents)."""
        h = hashlib.sha256()
        for p in sorted(q for q in root.rglob("*") if q.is_file()):
            h.update(f"{p.relative_to(root).as_posix()}\0{self(p)}\n".encode())
        return h.hexdigest()


def _sha_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def sequences_sha(splits: dict[str, Sequence[Any]]) -> str:
    """SHA-256 of encoded sequences (``EncodedSequence``): tokens, labels, turn index and
    each recommender turn's sample."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(f"split {name} {len(splits[name])}\n".encode())
        for s in splits[name]:
            h.update(json.dumps([s.input_ids, s.labels, s.rec_turn]).encode())
            for t in s.turns:
                h.update(repr(t).encode())
    return h.hexdigest()


def fingerprint(
    cfg: Any,  # DistillConfig
    tok: Any,
    item_ids: Sequence[str],
    splits: dict[str, Sequence[Any]],
    dialog_dir: Path,
    rec_file: Path,
    hasher: FileHasher,
) -> dict[str, Any]:
    """The fingerprint of a cache made for run config ``cfg`` (see the module docstring)."""
    t = cfg.teachers
    # the draws from D's tail (absent for a plain top-k, so older top-k caches still match)
    sampled = {"tail_samples": t.cache_tail_samples} if t.cache_tail_samples else {}
    return {
        "format": FORMAT,
        "dataset": cfg.dataset,
        "max_length": cfg.max_length,
        "use_mode_tokens": cfg.use_mode_tokens,
        "context_budget": cfg.context_budget,
        "max_train_conversations": cfg.max_train_conversations,
        "k": t.cache_k,
        **sampled,
        "dtype": t.cache_dtype,
        "rec_topk": t.cache_rec_topk,
        "tokenizer": _sha_json(sorted(tok.get_vocab().items())),
        "items": _sha_json(list(item_ids)),
        "dialog_teacher": hasher.tree(dialog_dir),
        "rec_teacher": hasher(rec_file),
        "data": sequences_sha(splits),
    }


def run_fingerprint(
    cfg: Any, tok: Any, item_ids: Sequence[str], splits: dict[str, Sequence[Any]]
) -> Any:
    """``hasher -> fingerprint`` of the run ``cfg`` (a ``DistillConfig``): its teachers'
    directories, tokenizer, items and encoded splits."""
    from conkd_scale.distill.teachers import dialog_model_dir
    from conkd_scale.rec.api import checkpoint_file

    def fp(hasher: FileHasher) -> dict[str, Any]:
        d, r = dialog_model_dir(cfg.dialog_dir), checkpoint_file(cfg.rec_dir)
        return fingerprint(cfg, tok, item_ids, splits, d, r, hasher)

    return fp


def mismatches(cache: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The fingerprint fields that differ, each with the setting behind it and both values
    (hashes shortened)."""
    out = []
    absent = {"tail_samples": 0}  # a field kept out of the fingerprint at its default
    for key in FIELD_KEYS:
        a, b = cache.get(key, absent.get(key)), run.get(key, absent.get(key))
        if a != b:
            short = [v[:12] if isinstance(v, str) and len(v) == 64 else v for v in (a, b)]
            out.append(f"{key} [{FIELD_KEYS[key]}]: cache {short[0]!r}, run {short[1]!r}")
    return out


# ----------------------------------------------------------------------------- layout
def shard_name(split: str, j: int) -> str:
    return f"{split}-{j:05d}.safetensors"


def shard_ranges(n: int, per_shard: int) -> list[tuple[int, int]]:
    """``[start, end)`` sequence ranges of a split's shards."""
    return [(s, min(s + per_shard, n)) for s in range(0, n, per_shard)]


def layout(splits: dict[str, Sequence[Any]], per_shard: int) -> dict[str, Any]:
    """The shards of every split: ``{split: {"sequences": n, "shards": [[start, end], ...]}}``."""
    return {
        name: {
            "sequences": len(seqs),
            "shards": [list(r) for r in shard_ranges(len(seqs), per_shard)],
        }
        for name, seqs in splits.items()
    }


def sidecar(shard: Path) -> Path:
    """The JSON beside a shard (its SHA-256 and counts), written after the shard itself."""
    return shard.with_suffix(".json")


def all_shards(lay: dict[str, Any]) -> Iterable[tuple[str, int, int, int]]:
    """``(split, shard index, start, end)`` of every shard of a layout."""
    for split in SPLITS:
        for j, (a, b) in enumerate(lay.get(split, {}).get("shards", [])):
            yield split, j, a, b


# ----------------------------------------------------------------------------- files
def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The manifest of ``cache_dir`` (None when it has none); a damaged one is a DataError."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(
            path, f"cannot read the cache manifest ({e})", hint="rebuild the cache"
        ) from None
    if not isinstance(man, dict) or "fingerprint" not in man or "layout" not in man:
        raise DataError(path, "not a teacher-cache manifest", hint="rebuild the cache")
    return man


def write_manifest(cache_dir: Path, man: dict[str, Any]) -> None:
    write_json(cache_dir / MANIFEST, man)


def check_dir_is_cache_or_empty(cache_dir: Path) -> None:
    """A cache job may write into a missing or empty directory, or one holding a cache."""
    if not cache_dir.exists():
        return
    if not cache_dir.is_dir():
        raise ConfigError(f"teachers.cache_dir: {cache_dir} is a file, not a directory")
    if (cache_dir / MANIFEST).is_file():
        return
    entries = [p.name for p in cache_dir.iterdir()]
    if entries:
        raise ConfigError(
            f"teachers.cache_dir: {cache_dir} holds files ({', '.join(sorted(entries)[:3])}"
            f"{' ...' if len(entries) > 3 else ''}) but no {MANIFEST}: it is not a teacher "
            "cache; point teachers.cache_dir at a new or empty directory"
        )


def shard_files_ok(path: Path) -> dict[str, Any] | None:
    """The sidecar of a complete, intact shard (its file's SHA-256 matches), else None."""
    side = sidecar(path)
    if not (path.is_file() and side.is_file()):
        return None
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("bytes") != path.stat().st_size or info.get("sha256") != sha256_file(path):
        return None
    return info


def remove_shard(path: Path) -> None:
    for p in (sidecar(path), path):
        if p.exists():
            os.unlink(p)
