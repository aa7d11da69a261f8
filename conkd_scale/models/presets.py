"""Size presets for from-scratch GPT-2-architecture (DialoGPT-like) causal LMs.

One table; parameter counts are exact for ``vocab_size = 16,000`` and ``n_positions = 1024``
with tied input/output embeddings (:func:`approx_params`). CPU speeds for the small ones
are in ``../shared/docs/FINDINGS.md``: keep CPU runs to ``tiny``/``mini``/``small``.

| name   | layers | width | heads | params @ 16k vocab | use                                  |
|--------|-------:|------:|------:|-------------------:|--------------------------------------|
| tiny   |      2 |    64 |     2 |             1.19 M | tests (seconds on a CPU)             |
| mini   |      2 |   128 |     2 |             2.58 M | CPU demo, CPU real-data runs         |
| small  |      4 |   256 |     4 |             7.52 M | CPU real-data runs (minutes)         |
| medium |      8 |   512 |     8 |            33.9 M  | one GPU                              |
| base   |     12 |   768 |    12 |            98.1 M  | GPU; ≈ GPT-2 / DialoGPT-small body   |
| large  |     24 |  1024 |    16 |           319.7 M  | GPU; ≈ DialoGPT-medium body          |
"""

from __future__ import annotations

from dataclasses import dataclass

from conkd_scale.utils.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    approx_params_16k: float  # millions, at vocab 16k, n_positions 1024, tied embeddings


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", 2, 64, 2, 1.19),
        Preset("mini", 2, 128, 2, 2.58),
        Preset("small", 4, 256, 4, 7.52),
        Preset("medium", 8, 512, 8, 33.9),
        Preset("base", 12, 768, 12, 98.1),
        Preset("large", 24, 1024, 16, 319.7),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (use one of {list(PRESETS)})")
    return PRESETS[name]


def approx_params(p: Preset, vocab_size: int = 16_000, n_positions: int = 1024) -> int:
    """Exact GPT-2 parameter count (tied embeddings, biases and layer norms included)."""
    d, L = p.n_embd, p.n_layer
    per_layer = 12 * d * d + 13 * d  # attn (4d² + 4d) + mlp (8d² + 5d) + 2 layer norms (4d)
    return vocab_size * d + n_positions * d + L * per_layer + 2 * d  # + final layer norm
