"""Model architectures for the planner: a size preset, a local Hugging Face directory, or an
architecture written out (``gpt2:layers=24,hidden=1024,heads=16``), instantiated on the meta
device (``accelerate.init_empty_weights``) so that counting a 70 B model's parameters
allocates nothing.

Spec strings (:func:`resolve_model`):

- ``tiny`` … ``large`` or ``preset:NAME``: the project's GPT-2 presets (``models/presets.py``);
- a directory with ``config.json`` (a Hugging Face model dir, or a run dir with ``hf/``),
  or the path of a ``config.json``;
- ``FAMILY:key=value,...`` with FAMILY ``gpt2`` (keys ``layers``, ``hidden``, ``heads``,
  optional ``vocab``, ``positions``, ``intermediate``) or ``llama`` (``layers``, ``hidden``,
  ``heads``, ``kv_heads``, ``intermediate``, optional ``vocab``, ``positions``, ``tied``).

The vocabulary: the distillation job trains the student over D's tokenizer and resizes an
embedding that is smaller, so every model is planned at ``max(own vocabulary, vocab)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conkd_scale.models.presets import PRESETS, get_preset
from conkd_scale.utils.errors import ConfigError

GATED_MLP_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo")
ARCH_KEYS = {
    "gpt2": {"layers", "hidden", "heads", "vocab", "positions", "intermediate"},
    "llama": {
        "layers",
        "hidden",
        "heads",
        "kv_heads",
        "intermediate",
        "vocab",
        "positions",
        "tied",
    },
}
ARCH_REQUIRED = {
    "gpt2": {"layers", "hidden", "heads"},
    "llama": {"layers", "hidden", "heads", "intermediate"},
}


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about one causal LM."""

    source: str  # how it was given (preset:NAME, a path, or the architecture string)
    model_type: str  # the Hugging Face model_type (gpt2, llama, ...)
    params: int  # parameters, each shared (tied) tensor once
    largest_layer_params: int  # the largest module's own parameters (DeepSpeed's "layer")
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    intermediate: int
    vocab: int
    max_positions: int
    gated_mlp: bool  # SwiGLU-style MLP (gate, up, down) instead of GPT-2's (fc, proj)
    dropout: float  # residual/attention dropout in training (masks are kept for backward)
    tied: bool  # the lm_head shares the input embedding
    position_params: int  # learnt position embeddings (GPT-2), 0 with rotary positions

    @property
    def matmul_params(self) -> int:
        """Parameters that multiply every token (the lm_head included; lookups excluded)."""
        untied_input = 0 if self.tied else self.vocab * self.hidden
        return self.params - untied_input - self.position_params


def _hf_config_from_arch(spec: str, vocab: int | None) -> Any:
    from transformers import GPT2Config, LlamaConfig

    family, _, rest = spec.partition(":")
    family = family.strip().lower()
    if family not in ARCH_KEYS:
        raise ConfigError(
            f"model {spec!r}: unknown architecture family {family!r} (use gpt2:... or "
            "llama:..., a preset name, or a directory with config.json)"
        )
    kv: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, val = part.partition("=")
        if not eq or key not in ARCH_KEYS[family]:
            raise ConfigError(
                f"model {spec!r}: {part!r} is not key=value with key one of "
                f"{sorted(ARCH_KEYS[family])}"
            )
        try:
            kv[key] = int(val)
        except ValueError:
            raise ConfigError(f"model {spec!r}: {key}={val!r} is not an integer") from None
        if kv[key] < 1 and key != "tied":
            raise ConfigError(f"model {spec!r}: {key} must be >= 1, got {kv[key]}")
    missing = ARCH_REQUIRED[family] - set(kv)
    if missing:
        raise ConfigError(f"model {spec!r}: missing {sorted(missing)} (e.g. {family}:layers=24,…)")
    if kv["hidden"] % kv["heads"]:
        raise ConfigError(
            f"model {spec!r}: hidden {kv['hidden']} is not a multiple of heads {kv['heads']}"
        )
    v = kv.get("vocab", vocab or 16_000)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=v,
            n_positions=kv.get("positions", 1024),
            n_embd=kv["hidden"],
            n_layer=kv["layers"],
            n_head=kv["heads"],
            n_inner=kv.get("intermediate"),
            bos_token_id=None,
            eos_token_id=None,
        )
    kvh = kv.get("kv_heads", kv["heads"])
    if kv["heads"] % kvh:
        raise ConfigError(f"model {spec!r}: heads {kv['heads']} not a multiple of kv_heads {kvh}")
    return LlamaConfig(
        vocab_size=v,
        hidden_size=kv["hidden"],
        intermediate_size=kv["intermediate"],
        num_hidden_layers=kv["layers"],
        num_attention_heads=kv["heads"],
        num_key_value_heads=kvh,
        max_position_embeddings=kv.get("positions", 4096),
        tie_word_embeddings=bool(kv.get("tied", 0)),
    )


def _hf_config_from_path(path: Path) -> Any:
    from transformers import AutoConfig

    if path.is_dir() and (path / "hf" / "config.json").is_file():
        path = path / "hf"  # a training run's directory (its own config.json is the run's)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise ConfigError(f"model {path}: no config.json there (a Hugging Face model directory?)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"model {cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"model {cfg_file}: no model_type (not a Hugging Face config.json)")
    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model {cfg_file}: transformers cannot read it ({e})") from None


def _hf_config_from_preset(name: str, vocab: int | None) -> Any:
    from transformers import GPT2Config

    p = get_preset(name)
    return GPT2Config(
        vocab_size=vocab or 16_000,
        n_positions=1024,
        n_embd=p.n_embd,
        n_layer=p.n_layer,
        n_head=p.n_head,
        bos_token_id=None,
        eos_token_id=None,
    )


def hf_config(spec: str, vocab: int | None = None) -> tuple[Any, str]:
    """A transformers config for ``spec`` (see the module docstring) and its source label;
    ``vocab`` is the vocabulary of presets and architectures that do not give one."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("model: empty specification (a preset, a directory, or gpt2:/llama:)")
    name = spec.removeprefix("preset:")
    if name in PRESETS:
        return _hf_config_from_preset(name, vocab), f"preset:{name}"
    if spec.startswith("preset:"):
        get_preset(name)  # raises, naming the presets
    path = Path(spec).expanduser()
    if path.exists():
        return _hf_config_from_path(path), str(path)
    if ":" in spec:
        return _hf_config_from_arch(spec, vocab), spec
    raise ConfigError(
        f"model {spec!r}: not a preset ({', '.join(PRESETS)}), not an existing directory or "
        "config.json, and not an architecture such as gpt2:layers=24,hidden=1024,heads=16"
    )


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def count_meta(config: Any) -> tuple[int, int]:
    """(parameters, largest layer's parameters) of ``config``'s causal LM on the meta device.

    Parameters are counted once per tensor object (tied embeddings once); a layer is one
    module's own parameters, as in ``deepspeed.runtime.zero.stage3.model_to_params`` (which
    deduplicates by ``data_ptr``: every meta tensor has the same one, hence our own count).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return int(total), int(largest)


def resolve_model(spec: str, vocab: int | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of ``spec`` planned at vocabulary ``max(own, vocab)``."""
    config, source = hf_config(spec, vocab)
    own = int(_get(config, "vocab_size", default=0) or 0)
    if vocab is not None and vocab > own:
        config.vocab_size = vocab  # the job resizes the embedding up to the tokenizer
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(config, key, None)
        if isinstance(tid, int) and tid >= config.vocab_size:
            setattr(config, key, None)  # GPT-2's 50256 at a smaller vocabulary
    params, largest = count_meta(config)
    hidden = int(_get(config, "hidden_size", "n_embd", "d_model"))
    n_head = int(_get(config, "num_attention_heads", "n_head"))
    model_type = str(getattr(config, "model_type", "unknown"))
    gated = model_type in GATED_MLP_TYPES or _get(config, "hidden_act") in ("silu", "swiglu")
    inter = _get(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    return ModelSpec(
        source=source,
        model_type=model_type,
        params=params,
        largest_layer_params=largest,
        n_layer=int(_get(config, "num_hidden_layers", "n_layer")),
        hidden=hidden,
        n_head=n_head,
        n_kv_head=int(_get(config, "num_key_value_heads", default=n_head)),
        intermediate=int(inter),
        vocab=int(config.vocab_size),
        max_positions=int(_get(config, "max_position_embeddings", "n_positions", default=0)),
        gated_mlp=bool(gated),
        dropout=float(_get(config, "resid_pdrop", "hidden_dropout", default=0.0) or 0.0),
        tied=bool(getattr(config, "tie_word_embeddings", True)),
        position_params=int(_get(config, "n_positions", default=0)) * hidden
        if model_type == "gpt2"
        else 0,
    )


def config_vocab(spec: str) -> int | None:
    """The vocabulary that ``spec`` itself declares: a directory's config.json or an
    architecture's ``vocab=`` (None for presets and architectures without one)."""
    spec = spec.strip()
    if spec.removeprefix("preset:") in PRESETS:
        return None
    if not Path(spec).expanduser().exists() and "vocab=" not in spec:
        return None
    config, _ = hf_config(spec)
    return int(getattr(config, "vocab_size", 0)) or None
