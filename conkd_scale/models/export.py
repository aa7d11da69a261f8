"""Export a (ZeRO-partitioned) model and its tokenizer as a plain Hugging Face directory.

:func:`export_hf` is collective: every rank calls it. Parameters are gathered one at a time
(peak extra memory: one full parameter per rank, the whole state dict on rank 0 in CPU
memory). With an optimizer, the fp32 master weights are exported
(``deepspeed.utils.safe_get_full_fp32_param``), so a bf16 run still exports exact fp32
weights; without one (inference engines, plain modules) the module's own weights are used,
through ``deepspeed.zero.GatheredParameters`` for partitioned ones. Rank 0 writes the
directory atomically (temp dir + rename): ``config.json``, ``generation_config.json``,
``model.safetensors``, the tokenizer files (with item and mode tokens) and
``conkd_export.json`` (source, step, dtype). ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it with no project code.

Offline alternative for a DeepSpeed checkpoint directory: DeepSpeed's ``zero_to_fp32.py``
(copied into every checkpoint directory) consolidates it into an fp32 state dict.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from conkd_scale.distributed import is_main, run_on_main
from conkd_scale.utils.io import atomic_dir, write_json

EXPORT_META = "conkd_export.json"


def _unwrap(model_or_engine: Any) -> torch.nn.Module:
    return getattr(model_or_engine, "module", model_or_engine)


@torch.no_grad()
def gather_state_dict(
    model_or_engine: Any, *, dtype: torch.dtype | None = torch.float32, master_weights: bool = True
) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (empty dict elsewhere). Collective under ZeRO-3.

    Shared (tied) parameters appear once, under their first name; persistent buffers are
    included. ``dtype=None`` keeps each tensor's own dtype.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = _unwrap(model_or_engine)
    main = is_main()
    sd: dict[str, torch.Tensor] = OrderedDict()
    for name, p in module.named_parameters():
        full = None
        if master_weights and (hasattr(p, "_z3_optimizer") or hasattr(p, "_hp_mapping")):
            full = safe_get_full_fp32_param(p)  # collective for ZeRO-3
        if full is None:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.data.detach().clone() if main else None
        if main:
            t = full.detach().cpu()
            sd[name] = (t.to(dtype) if dtype is not None else t).clone()
        del full
    if main:
        for mod_name, mod in module.named_modules():
            for b_name, b in mod._buffers.items():
                if b is not None and b_name not in mod._non_persistent_buffers_set:
                    sd[f"{mod_name}.{b_name}" if mod_name else b_name] = b.detach().cpu().clone()
    return sd


def export_hf(
    model_or_engine: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    master_weights: bool = True,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write model + tokenizer to ``out_dir`` as a Hugging Face directory. Collective.

    Returns ``out_dir`` on every rank once rank 0 has finished (an error on rank 0 is raised
    on every rank, so no rank is left waiting).
    """
    out_dir = Path(out_dir)
    module = _unwrap(model_or_engine)
    sd = gather_state_dict(model_or_engine, dtype=dtype, master_weights=master_weights)

    def write() -> None:
        with atomic_dir(out_dir) as tmp:
            old_dtype = getattr(module.config, "dtype", None)
            module.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            module.config.dtype = old_dtype
            cfg_path = Path(tmp) / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["dtype"] = str(dtype).removeprefix("torch.")
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(tmp)
            write_json(
                Path(tmp) / EXPORT_META,
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "master_weights": master_weights,
                    "num_tensors": len(sd),
                    **(meta or {}),
                },
            )

    run_on_main(write, phase=f"writing the export {out_dir}")
    return out_dir
