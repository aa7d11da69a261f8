"""Causal-LM builder: a GPT-2-architecture model from a size preset, or any Hugging Face
causal LM from a local directory / hub name, over the vocabulary ``U = W ∪ I`` (words,
item tokens, mode and role tokens).

Under ZeRO-3 the model is created partitioned:
- from scratch: ``AutoModelForCausalLM.from_config`` while a ``HfDeepSpeedConfig`` is alive,
  which enters ``deepspeed.zero.Init(config_dict_or_path=ds_config)`` and initialises the
  weights with each module's parameters gathered (rank 0 initialises, the others receive);
- pretrained: ``HfDeepSpeedConfig`` is created *before* ``from_pretrained`` and kept alive (on
  the returned :class:`BuiltModel`) so that transformers loads the weights straight into
  partitions, and so that later ``resize_token_embeddings`` / ``generate`` see ZeRO-3.

Extending a pretrained model with the CRS tokens: the embedding matrix is resized to the
tokenizer's length (never shrunk: checkpoints such as Qwen's carry spare rows), then every
token that the base tokenizer lacked gets its row(s) set **[decision]**: an item token with a
title gets the mean embedding of its title's tokens (the title tokenised with the base
vocabulary); other new tokens (mode, role, pad, items without a title) get the mean of all
old rows. Both the input embedding and an untied output embedding are set this way. The
partitioned rows are edited inside ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``.
A from-scratch model has no "old" rows, so nothing is re-initialised there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from conkd_scale.data.schema import ITEM_TOKEN_RE, ItemCatalog, item_token
from conkd_scale.data.tokenizer import (
    item_token_ids,
    load_pretrained_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_sentencepiece_tokenizer,
)
from conkd_scale.models.presets import get_preset
from conkd_scale.utils.errors import ConfigError


@dataclass
class ModelConfig:
    """Which causal LM to build (fields are ``model.<name>`` on the command line)."""

    preset: str = "tiny"  # size preset for from-scratch training (models/presets.py)
    pretrained: str | None = None  # local dir or hub name; when set, `preset` is not used
    tokenizer: Literal["auto", "sentencepiece", "pretrained"] = "auto"
    # auto: the pretrained model's own tokenizer, else a SentencePiece model trained on `train`
    tokenizer_path: str | None = None  # a tokenizer dir/name to use instead (kind: pretrained)
    vocab_size: int = 16000  # SentencePiece vocabulary before the CRS tokens are added
    n_positions: int = 1024  # context length of a from-scratch model
    dropout: float | None = None  # from scratch: resid/embd/attn dropout (None: GPT-2's 0.1)
    init_items_from_titles: bool = True  # pretrained: new item rows = mean of title tokens
    trust_remote_code: bool = False  # only for checkpoints that need their own code
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype to load weights in

    def __post_init__(self) -> None:
        if self.pretrained is None:
            get_preset(self.preset)
            if self.tokenizer == "pretrained" and self.tokenizer_path is None:
                raise ConfigError(
                    "model.tokenizer=pretrained needs model.pretrained or model.tokenizer_path"
                )
        if self.vocab_size < 100:
            raise ConfigError(f"model.vocab_size: expected >= 100, got {self.vocab_size}")
        if self.n_positions < 8:
            raise ConfigError(f"model.n_positions: expected >= 8, got {self.n_positions}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: expected in [0, 1), got {self.dropout}")

    @property
    def tokenizer_kind(self) -> str:
        if self.tokenizer != "auto":
            return self.tokenizer
        return "pretrained" if (self.pretrained or self.tokenizer_path) else "sentencepiece"


@dataclass
class BuiltModel:
    """A model ready for ``deepspeed.initialize`` plus what later steps need."""

    model: Any  # transformers PreTrainedModel (partitioned under ZeRO-3)
    tokenizer: Any
    item_ids: list[int]  # token id of each catalog item, catalog order
    new_token_ids: list[int]  # rows (re)initialised by the builder (pretrained only)
    num_params: int
    source: str  # "preset:<name>" or "pretrained:<path>"
    hf_ds_config: Any = field(default=None, repr=False)  # keep alive while the model lives


def is_zero3(ds_config: dict[str, Any] | None) -> bool:
    return bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def count_params(model: torch.nn.Module) -> int:
    """Parameter count that is right for partitioned (ZeRO-3) parameters too."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


# ----------------------------------------------------------------------------- tokenizer
def prepare_tokenizer(
    cfg: ModelConfig, catalog: ItemCatalog, train_texts: list[str], save_dir: str | Path
) -> Any:
    """Build the CRS tokenizer and save it to ``save_dir`` (kept if it already exists).

    Call on rank 0 only (``distributed.run_on_main``); every rank then loads ``save_dir``
    with :func:`~conkd_scale.data.tokenizer.load_tokenizer`, so all ranks and a resumed run
    use byte-identical tokenizers. An existing ``save_dir`` must cover the catalog's items.
    """
    save_dir = Path(save_dir)
    if save_dir.is_dir():
        tok = load_tokenizer(save_dir)
        item_token_ids(tok, catalog.ids)  # raises if built for another item vocabulary
        return tok
    if cfg.tokenizer_kind == "pretrained":
        name = cfg.tokenizer_path or cfg.pretrained
        assert name is not None
        tok = load_pretrained_tokenizer(name, catalog.ids, trust_remote_code=cfg.trust_remote_code)
    else:
        tok = train_sentencepiece_tokenizer(train_texts, catalog.ids, vocab_size=cfg.vocab_size)
    save_tokenizer(tok, save_dir)
    return tok


# ----------------------------------------------------------------------------- model
def _scratch_model(cfg: ModelConfig, tok: Any) -> Any:
    from transformers import AutoModelForCausalLM, GPT2Config

    p = get_preset(cfg.preset)
    drop = (
        {}
        if cfg.dropout is None
        else {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    )
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=cfg.n_positions,
        n_embd=p.n_embd,
        n_layer=p.n_layer,
        n_head=p.n_head,
        bos_token_id=bos,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        **drop,
    )
    # With a live HfDeepSpeedConfig (ZeRO-3) this runs under deepspeed.zero.Init.
    return AutoModelForCausalLM.from_config(config)


def _title_token_ids(
    tok: Any, catalog: ItemCatalog | None, token_ids: list[int], old_rows: int, new: set[int]
) -> dict[int, list[int]]:
    """For each new item token id: the base-vocabulary ids of its title (may be empty)."""
    if catalog is None:
        return {}
    out: dict[int, list[int]] = {}
    id_to_tok = {i: t for t, i in tok.get_vocab().items()}
    for tid in token_ids:
        m = ITEM_TOKEN_RE.fullmatch(id_to_tok.get(tid, ""))
        if m is None:
            continue
        item = catalog.get(m.group(1))
        title = item.title.strip() if item is not None else ""
        if not title or title == item_token(m.group(1)):
            continue
        ids = [
            i for i in tok.encode(title, add_special_tokens=False) if i < old_rows and i not in new
        ]
        out[tid] = ids
    return out


@torch.no_grad()
def init_new_rows(model: Any, new_ids: list[int], title_ids: dict[int, list[int]]) -> None:
    """Set embedding rows of new tokens: title mean for items, mean of old rows otherwise.

    Collective under ZeRO-3 (every rank must call it). Every rank computes the same values
    from the gathered weights; with ``modifier_rank=0`` rank 0's are kept for partitioned
    parameters, and unpartitioned ones (e.g. just resized) are identical everywhere.
    """
    import deepspeed

    if not new_ids:
        return
    w_in = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    params = [w_in]
    if out_emb is not None and out_emb.weight is not w_in:
        params.append(out_emb.weight)
    new_set = set(new_ids)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        for W_VD in params:  # [V, D]
            V = W_VD.shape[0]
            old_mask_V = torch.ones(V, dtype=torch.bool)
            old_mask_V[[i for i in new_ids if i < V]] = False
            mean_D = W_VD[old_mask_V.to(W_VD.device)].float().mean(0)
            for i in new_ids:
                if i >= V:
                    continue
                ids = title_ids.get(i)
                if ids:
                    rows = torch.tensor([j for j in ids if j not in new_set], dtype=torch.long)
                    W_VD[i] = W_VD[rows.to(W_VD.device)].float().mean(0).to(W_VD.dtype)
                else:
                    W_VD[i] = mean_D.to(W_VD.dtype)


def _pretrained_model(cfg: ModelConfig, tok: Any, catalog: ItemCatalog | None) -> tuple[Any, list]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cfg.pretrained is not None
    model = AutoModelForCausalLM.from_pretrained(
        cfg.pretrained, dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code
    )
    old_rows = int(model.get_input_embeddings().num_embeddings)
    if len(tok) > old_rows:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    base = AutoTokenizer.from_pretrained(
        cfg.tokenizer_path or cfg.pretrained, trust_remote_code=cfg.trust_remote_code
    ).get_vocab()
    new_ids = sorted(i for t, i in tok.get_vocab().items() if t not in base)
    titles = (
        _title_token_ids(tok, catalog, new_ids, old_rows, set(new_ids))
        if cfg.init_items_from_titles
        else {}
    )
    init_new_rows(model, new_ids, titles)
    return model, new_ids


def build_model(
    cfg: ModelConfig,
    tokenizer: Any,
    *,
    ds_config: dict[str, Any] | None = None,
    catalog: ItemCatalog | None = None,
) -> BuiltModel:
    """The causal LM over ``U`` for ``tokenizer`` (already extended with the CRS tokens).

    ``ds_config``: the resolved DeepSpeed config (``training.ds_config.resolve_ds_config``);
    with ZeRO stage 3 the model is created partitioned and every rank must call this.
    ``catalog``: the item vocabulary (titles for the new item rows; item ids to check).
    Seed the RNG identically on every rank before calling (replicated stages init locally).
    """
    hf_ds = None
    if is_zero3(ds_config):
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # must stay referenced: transformers keeps a weakref
    if cfg.pretrained is None:
        model, new_ids, source = _scratch_model(cfg, tokenizer), [], f"preset:{cfg.preset}"
    else:
        model, new_ids = _pretrained_model(cfg, tokenizer, catalog)
        source = f"pretrained:{cfg.pretrained}"
    if is_zero3(ds_config) and cfg.pretrained is None:
        assert all(hasattr(p, "ds_id") for p in model.parameters()), "not created partitioned"
    for c in (model.config, getattr(model, "generation_config", None)):
        if c is None:
            continue
        c.pad_token_id = tokenizer.pad_token_id
        c.eos_token_id = tokenizer.eos_token_id
        if tokenizer.bos_token_id is not None:
            c.bos_token_id = tokenizer.bos_token_id
    items = item_token_ids(tokenizer, catalog.ids) if catalog is not None else []
    n_rows = int(model.get_input_embeddings().num_embeddings)
    if n_rows < len(tokenizer):
        raise ConfigError(f"model has {n_rows} embedding rows but the tokenizer {len(tokenizer)}")
    return BuiltModel(model, tokenizer, items, new_ids, count_params(model), source, hf_ds)
