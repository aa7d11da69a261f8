"""The pretrained model families the builder supports, and the checks on a model directory
and its tokenizer that run before any weight is read.

A family is decided by ``config.json``'s ``model_type``:

| family | examples                    | positions | norm      | tokenizer          | lm_head |
|--------|-----------------------------|-----------|-----------|--------------------|---------|
| gpt2   | DialoGPT-small/medium/large | learned   | LayerNorm | byte-level BPE     | tied    |
| llama  | Llama-2/3, TinyLlama        | RoPE      | RMSNorm   | SentencePiece, BPE | untied* |

(*) Llama checkpoints are usually untied (Llama-3.2-1B/3B are tied); the builder handles
both from ``tie_word_embeddings``. Other families are refused until they are tested here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conkd_scale.utils.errors import ConfigError

FAMILIES: dict[str, str] = {
    "gpt2": "GPT-2 / DialoGPT (learned positions, LayerNorm, byte-level BPE, tied lm_head)",
    "llama": "Llama (RoPE, RMSNorm, SentencePiece or BPE tokenizer, usually untied lm_head)",
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def looks_like_path(name: str) -> bool:
    """A value meant as a local path (``/x``, ``./x``, ``../x``, ``~/x``), not a hub name."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def check_family(model_type: Any, where: str) -> str:
    """``model_type`` is a supported family; else a ConfigError naming it and the list."""
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{where}: architecture {model_type!r} (config.json model_type) is not supported; "
            f"supported families: {', '.join(FAMILIES)}. Use a checkpoint of one of them (e.g. "
            "DialoGPT for gpt2, Llama-2 / TinyLlama for llama)"
        )
    return str(model_type)


def check_pretrained_dir(path: str | Path, key: str, *, need_tokenizer: bool = True) -> dict:
    """Check a local Hugging Face causal-LM directory; returns its ``config.json``.

    Refused, each with what to change: a path that does not exist, a directory without
    ``config.json``, an unsupported architecture, no weights (:data:`WEIGHT_FILES`), and,
    with ``need_tokenizer``, no tokenizer files (:data:`TOKENIZER_FILES`).
    """
    d = Path(path).expanduser()
    where = f"{key}={path}"
    if not d.is_dir():
        raise ConfigError(
            f"{where}: no such directory; point {key} at a local Hugging Face model directory "
            "(config.json, weights and tokenizer, as save_pretrained writes it)"
        )
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(
            f"{where}: the directory has no config.json, so it is not a Hugging Face model "
            "directory; point it at one (e.g. the hf/ folder of a training run)"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json is not a JSON object")
    check_family(config.get("model_type"), where)
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(
            f"{where}: the directory has config.json but no weights (expected one of "
            f"{', '.join(WEIGHT_FILES)}); copy the checkpoint's weight files in"
        )
    if need_tokenizer and not any((d / f).is_file() for f in TOKENIZER_FILES):
        other = (
            f", or set {key.removesuffix('.pretrained')}.tokenizer_path to it"
            if key.endswith(".pretrained")
            else ""
        )
        raise ConfigError(
            f"{where}: the directory has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            f"copy the model's tokenizer in{other}"
        )
    return config


def max_positions(config: Mapping[str, Any]) -> int | None:
    """The context length of a model config (``n_positions`` or ``max_position_embeddings``)."""
    for k in ("n_positions", "max_position_embeddings"):
        if isinstance(config.get(k), int):
            return int(config[k])
    return None


def check_vocab_matches(
    tok_vocab: Mapping[str, int],
    base_vocab: Mapping[str, int],
    rows: int,
    *,
    key: str,
    base_source: str,
) -> list[int]:
    """Check that the tokenizer in use extends the model's own vocabulary; the new ids.

    ``base_vocab``: the vocabulary the checkpoint was trained with (its own tokenizer, or
    ``<key>.tokenizer_path``); ``rows``: its embedding rows before any resize; ``tok_vocab``:
    the tokenizer the run uses (the base plus item, mode and role tokens; for a distilled
    student, D's). Two rules:

    1. every base id indexes an existing row (``id < rows``): a base vocabulary larger than
       the embedding belongs to another model;
    2. every base token has the same id in the tokenizer in use: otherwise trained rows
       would be read for the wrong tokens (e.g. a student of another tokenizer family than
       D's).

    Tokens of the tokenizer in use that the base lacks are new: their rows are (re)set by
    the builder, appended by a resize where their ids are beyond ``rows``.
    """
    top = max(base_vocab.values(), default=-1)
    if top >= rows:
        raise ConfigError(
            f"{key}: the tokenizer {base_source} has token ids up to {top} but the model has "
            f"only {rows} embedding rows: the tokenizer belongs to another model; use the "
            f"checkpoint's own tokenizer (remove {key}.tokenizer_path or point it at the right one)"
        )
    wrong = [(t, i, tok_vocab.get(t)) for t, i in base_vocab.items() if tok_vocab.get(t) != i]
    if wrong:
        t, i, j = min(wrong, key=lambda w: w[1])
        there = "absent" if j is None else f"id {j}"
        raise ConfigError(
            f"{key}: the tokenizer in use does not extend the model's own vocabulary "
            f"({base_source}): {len(wrong)} of its {len(base_vocab)} tokens differ, e.g. {t!r} "
            f"is id {i} in the model's tokenizer but {there} in the one in use. A distilled "
            "student must share the dialogue teacher's base tokenizer (e.g. DialoGPT-large -> "
            "DialoGPT-small, Llama-2-7B -> TinyLlama-1.1B): pick a student of D's tokenizer "
            "family, or a D trained from one"
        )
    return sorted(i for t, i in tok_vocab.items() if t not in base_vocab)
