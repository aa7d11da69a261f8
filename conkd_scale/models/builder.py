"""Causal-LM builder: a GPT-2-architecture model from a size preset, or a pretrained causal LM
of a supported family from a local directory (or hub name), over the vocabulary
``U = W ∪ I`` (words, item tokens, mode and role tokens).

Pretrained families (``models/families.py``, decided by ``config.json``'s ``model_type``):
``gpt2`` (DialoGPT-small/medium/large: byte-level BPE, tied lm_head) and ``llama`` (Llama-2/3,
TinyLlama: RoPE, RMSNorm, SentencePiece or BPE tokenizer, usually an untied lm_head). Before
any weight is read, the directory is checked (config.json, weights, tokenizer files, the
family) and so is the tokenizer against the embedding (``families.check_vocab_matches``).

Under ZeRO-3 the model is created partitioned, and no rank ever holds the whole model:
- from scratch: ``AutoModelForCausalLM.from_config`` while a ``HfDeepSpeedConfig`` is alive,
  which enters ``deepspeed.zero.Init(config_dict_or_path=ds_config)`` and initialises the
  weights with each module's parameters gathered (rank 0 initialises, the others receive);
- pretrained: ``HfDeepSpeedConfig`` is created *before* ``from_pretrained`` and kept alive (on
  the returned :class:`BuiltModel`) so that transformers builds the modules under zero.Init
  and copies the checkpoint's tensors into the partitions one module at a time, and so that
  later ``resize_token_embeddings`` / ``generate`` see ZeRO-3. transformers' resize builds the
  new embedding (and an untied lm_head) whole on every rank, as a forward's gather would;
  the builder partitions them at once (:func:`partition_plain_params`).

Extending a pretrained model with the CRS tokens: the embedding matrix is resized to the
tokenizer's length (never shrunk: checkpoints such as Qwen's carry spare rows), then every
token that the base tokenizer lacked gets its row(s) set **[decision]**: an item token with a
title gets the mean embedding of its title's tokens (the title tokenised with the base
vocabulary); other new tokens (mode, role, pad, items without a title) get the mean of all
old rows. Both the input embedding and an untied output embedding are set this way. The
partitioned rows are edited inside ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``.
A from-scratch model has no "old" rows, so nothing is re-initialised there.

Precision: the training dtype is the DeepSpeed config's (``bf16``/``fp16`` ``enabled: "auto"``
resolves to bf16 on a GPU that supports it, fp32 on the CPU; ``training/ds_config.py``).
ZeRO-3 creates the partitions in that dtype and ZeRO-0/1/2 casts the module to it, with fp32
master weights in the optimizer; the export writes fp32. ``model.dtype`` is only the dtype
the checkpoint is read in: ``auto`` (default) reads it in the training precision, ``float32``
reads it in fp32; a half dtype other than the training one is refused.

Memory levers: ``model.attn_implementation`` (``sdpa`` by default, ``eager``,
``flash_attention_2`` on GPUs with flash-attn) is passed to ``from_config`` /
``from_pretrained``; ``train.activation_checkpointing`` calls the model's own activation
(gradient) checkpointing through :func:`enable_activation_checkpointing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from conkd_scale.data.schema import ITEM_TOKEN_RE, ItemCatalog, item_token
from conkd_scale.data.tokenizer import (
    item_token_ids,
    load_pretrained_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_sentencepiece_tokenizer,
)
from conkd_scale.models.families import (
    check_family,
    check_pretrained_dir,
    check_vocab_matches,
    looks_like_path,
    max_positions,
)
from conkd_scale.models.presets import get_preset
from conkd_scale.training.ds_config import precision
from conkd_scale.utils.errors import ConfigError


@dataclass
class ModelConfig:
    """Which causal LM to build (fields are ``model.<name>`` on the command line; a distilled
    student's are ``student.<name>``)."""

    preset: str = "tiny"  # size preset for from-scratch training (models/presets.py)
    pretrained: str | None = None  # local HF directory (or hub name) of a supported family
    # (gpt2, llama; models/families.py); when set, `preset` is not used
    tokenizer: Literal["auto", "sentencepiece", "pretrained"] = "auto"
    # auto: the pretrained model's own tokenizer, else a SentencePiece model trained on `train`
    tokenizer_path: str | None = None  # a tokenizer dir/name to use instead (kind: pretrained)
    vocab_size: int = 16000  # SentencePiece vocabulary before the CRS tokens are added
    n_positions: int = 1024  # context length of a from-scratch model
    dropout: float | None = None  # from scratch: resid/embd/attn dropout (None: GPT-2's 0.1)
    init_items_from_titles: bool = True  # pretrained: new item rows = mean of title tokens
    trust_remote_code: bool = False  # only for checkpoints that need their own code
    # dtype the checkpoint is read in; training runs in the DeepSpeed config's precision
    # (auto: read in that precision; float32; a half dtype must match it)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # attention kernel, passed to from_config / from_pretrained (flash_attention_2: GPU only,
    # needs the flash-attn package)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    key: ClassVar[str] = "model"  # the config prefix errors name (set to "student" there)
    hf_config: ClassVar[dict[str, Any] | None] = None  # config.json of a local pretrained dir

    def __post_init__(self) -> None:
        k = self.key
        self.hf_config = None
        if self.pretrained is not None:
            path = self.pretrained
            if Path(path).expanduser().is_dir() or looks_like_path(path):
                self.hf_config = check_pretrained_dir(
                    path, f"{k}.pretrained", need_tokenizer=self.tokenizer_path is None
                )
        else:
            get_preset(self.preset)
            if self.tokenizer == "pretrained" and self.tokenizer_path is None:
                raise ConfigError(
                    f"{k}.tokenizer=pretrained needs {k}.pretrained or {k}.tokenizer_path"
                )
        if self.vocab_size < 100:
            raise ConfigError(f"{k}.vocab_size: expected >= 100, got {self.vocab_size}")
        if self.n_positions < 8:
            raise ConfigError(f"{k}.n_positions: expected >= 8, got {self.n_positions}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{k}.dropout: expected in [0, 1), got {self.dropout}")

    @classmethod
    def for_key(cls, key: str) -> ModelConfig:
        """A default config whose errors name ``<key>.<field>`` (e.g. ``student``)."""
        cfg = cls()
        cfg.key = key
        return cfg

    @property
    def tokenizer_kind(self) -> str:
        if self.tokenizer != "auto":
            return self.tokenizer
        return "pretrained" if (self.pretrained or self.tokenizer_path) else "sentencepiece"

    @property
    def max_positions(self) -> int | None:
        """The model's context length (a preset's ``n_positions``; a local pretrained
        directory's config.json; None for a hub name)."""
        if self.pretrained is None:
            return self.n_positions
        return max_positions(self.hf_config) if self.hf_config is not None else None


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
    num_params_local: int = 0  # elements of this rank's partitions (all of them unpartitioned)


def is_zero3(ds_config: dict[str, Any] | None) -> bool:
    return bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def count_params(model: torch.nn.Module, *, local: bool = False) -> int:
    """Parameter count that is right for partitioned (ZeRO-3) parameters too; ``local``: the
    elements this rank's partitions hold (≈ 1/world of the total under ZeRO-3; parameters
    below ``stage3_param_persistence_threshold`` are also kept whole on every rank)."""
    if local:
        return sum(
            int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
            for p in model.parameters()
        )
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def load_dtype(cfg: ModelConfig, ds_config: dict[str, Any] | None) -> torch.dtype:
    """The dtype the checkpoint is read in (``model.dtype`` against the DeepSpeed
    precision; module docstring). Refuses a half dtype the DeepSpeed config does not train in."""
    train = precision(ds_config) if ds_config else "float32"
    if cfg.dtype == "auto":
        return getattr(torch, train)
    if cfg.dtype not in ("float32", train):
        raise ConfigError(
            f"{cfg.key}.dtype={cfg.dtype}, but the DeepSpeed config trains in {train} (its "
            'bf16/fp16 "enabled": "auto" is bf16 on a GPU that supports it, fp32 on the '
            f"CPU): set {cfg.key}.dtype=auto (read in the training precision) or float32, or "
            f"enable {cfg.dtype} in the DeepSpeed config"
        )
    return getattr(torch, cfg.dtype)


@contextmanager
def _attention_errors(cfg: ModelConfig) -> Iterator[None]:
    """transformers' refusal of an attention kernel, as a ConfigError naming the field."""
    try:
        yield
    except (ValueError, ImportError) as e:
        if "attn_implementation" not in str(e) and "attention" not in str(e).lower():
            raise
        raise ConfigError(
            f"{cfg.key}.attn_implementation={cfg.attn_implementation} cannot be used here "
            f"({str(e).splitlines()[0][:300]}); use sdpa or eager"
        ) from None


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each transformer block in the backward instead of keeping its activations
    (the model's own activation checkpointing, non-reentrant ``torch.utils.checkpoint``), and
    turn the KV cache off, which checkpointing cannot use. Same loss and gradients; under
    ZeRO-3 the recomputation gathers each block's parameters again through its hooks."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def partition_plain_params(model: torch.nn.Module) -> int:
    """Under ZeRO-3: partition the parameters created outside ``zero.Init`` (transformers'
    resize builds the new embedding and untied lm_head whole on every rank) with the same
    settings as the rest; rank 0's values are kept. Collective. Returns how many."""
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    params = list(model.parameters())
    plain = [p for p in params if not is_zero_param(p)]
    zero = next((p for p in params if is_zero_param(p)), None)
    if plain and zero is not None:
        zero.convert_to_zero_parameters(param_list=plain)  # type: ignore[attr-defined]
    return len(plain)


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
    with _attention_errors(cfg):
        return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)


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


def _pretrained_model(
    cfg: ModelConfig, tok: Any, catalog: ItemCatalog | None, dtype: torch.dtype, zero3: bool
) -> tuple[Any, list]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert cfg.pretrained is not None
    k, remote = cfg.key, cfg.trust_remote_code
    hf_cfg = AutoConfig.from_pretrained(cfg.pretrained, trust_remote_code=remote)
    check_family(hf_cfg.model_type, f"{k}.pretrained={cfg.pretrained}")
    base_src = cfg.tokenizer_path or cfg.pretrained
    base = AutoTokenizer.from_pretrained(base_src, trust_remote_code=remote).get_vocab()
    old_rows = int(hf_cfg.vocab_size)
    vocab = tok.get_vocab()
    new_ids = check_vocab_matches(  # before any weight is read
        vocab, base, old_rows, key=k, base_source=f"at {base_src}"
    )
    with _attention_errors(cfg):
        model = AutoModelForCausalLM.from_pretrained(
            cfg.pretrained,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=remote,
        )
    rows = max(len(tok), max(vocab.values()) + 1)
    if rows > old_rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    if zero3:
        partition_plain_params(model)
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
    dtype = load_dtype(cfg, ds_config)
    zero3 = is_zero3(ds_config)
    hf_ds = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # must stay referenced: transformers keeps a weakref
    if cfg.pretrained is None:
        model, new_ids, source = _scratch_model(cfg, tokenizer), [], f"preset:{cfg.preset}"
    else:
        model, new_ids = _pretrained_model(cfg, tokenizer, catalog, dtype, zero3)
        source = f"pretrained:{cfg.pretrained}"
    if zero3:
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
        raise ConfigError(
            f"{cfg.key}: the model has {n_rows} embedding rows but the tokenizer "
            f"{len(tokenizer)} tokens"
        )
    return BuiltModel(
        model,
        tokenizer,
        items,
        new_ids,
        count_params(model),
        source,
        hf_ds,
        num_params_local=count_params(model, local=True),
    )
