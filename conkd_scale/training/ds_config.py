"""DeepSpeed JSON configs: read, validate, and fill in what the project computes.

``ds_configs/*.json`` hold only DeepSpeed settings (ZeRO stage, offload, precision, clipping,
communication buckets). The code fills, at start-up (see ``ds_configs/README.md``):

- ``train_micro_batch_size_per_gpu`` = ``train.micro_batch``,
  ``gradient_accumulation_steps`` = ``train.grad_accum``,
  ``train_batch_size`` = micro batch × accumulation × world size: these depend on the run
  config and the number of ranks, so one JSON serves every cluster size. A value given in the
  JSON must be ``"auto"`` or equal what the code computes (else a ConfigError names both);
- ``bf16.enabled`` / ``fp16.enabled`` = ``"auto"``: bf16 on a GPU that supports it, fp16 on
  an older GPU (only where the JSON has an ``fp16`` block), fp32 on the CPU;
- ``zero_allow_untested_optimizer`` = true: the optimizer is a *client* optimizer built by the
  code (``torch.optim.AdamW`` by default; ``train.optimizer=cpu_adam`` for DeepSpeedCPUAdam),
  with the learning-rate schedule a client ``LambdaLR``. The JSON must not contain
  ``optimizer`` or ``scheduler``: learning rate, warm-up and decay are run-config fields
  (``train.lr`` ...), one source of truth each.

Validation runs on every rank before ``init_distributed`` (no collective), so a broken file
fails every rank the same way, at once, with the file named and nothing left hanging.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from conkd_scale.utils.errors import ConfigError

FILLED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
FORBIDDEN_KEYS = ("optimizer", "scheduler")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a DeepSpeed JSON config; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist (see ds_configs/README.md)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path}: not UTF-8 text ({e})") from None
    validate_ds_config(raw, str(path))
    return raw


def validate_ds_config(raw: Any, where: str = "DeepSpeed config") -> None:
    """Structural checks of a DeepSpeed config mapping (see the module docstring)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object at the top level")
    for k in FORBIDDEN_KEYS:
        if k in raw:
            raise ConfigError(
                f"{where}: remove {k!r}: the optimizer and learning-rate schedule are built by "
                "the code from the run config (train.lr, train.warmup_steps, train.lr_schedule, "
                "train.optimizer); see ds_configs/README.md"
            )
    zero = raw.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for k in FILLED_KEYS:
        v = raw.get(k, "auto")
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f'{where}: {k} must be a positive integer or "auto", got {v!r}')
    for block in ("bf16", "fp16"):
        b = raw.get(block)
        if b is None:
            continue
        if not isinstance(b, dict) or b.get("enabled", False) not in (True, False, "auto"):
            raise ConfigError(f'{where}: {block}.enabled must be true, false or "auto"')
    if raw.get("bf16", {}).get("enabled") is True and raw.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{where}: bf16 and fp16 cannot both be enabled")


def _fill(cfg: dict[str, Any], key: str, value: Any, where: str, source: str) -> None:
    have = cfg.get(key, "auto")
    if have != "auto" and have != value:
        raise ConfigError(
            f"{where}: {key} is {have} but the run config gives {value} ({source}); "
            f'set it to "auto" or remove it'
        )
    cfg[key] = value


def resolve_ds_config(
    raw: dict[str, Any],
    *,
    micro_batch: int,
    grad_accum: int = 1,
    world_size: int = 1,
    on_gpu: bool | None = None,
    bf16_supported: bool | None = None,
    client_optimizer: bool = True,
    where: str = "DeepSpeed config",
) -> dict[str, Any]:
    """A copy of ``raw`` with the code-computed keys filled (see the module docstring)."""
    import torch

    validate_ds_config(raw, where)
    cfg = copy.deepcopy(raw)
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    if bf16_supported is None:
        bf16_supported = bool(on_gpu and torch.cuda.is_bf16_supported())
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch, where, "train.micro_batch")
    _fill(cfg, "gradient_accumulation_steps", grad_accum, where, "train.grad_accum")
    _fill(
        cfg,
        "train_batch_size",
        micro_batch * grad_accum * world_size,
        where,
        "micro_batch × grad_accum × world size",
    )
    bf16 = cfg.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        bf16["enabled"] = bool(on_gpu and bf16_supported)
    fp16 = cfg.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") == "auto":
        fp16["enabled"] = bool(on_gpu and not (isinstance(bf16, dict) and bf16["enabled"]))
    if client_optimizer:
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


MONITOR_BLOCKS = ("tensorboard", "csv_monitor")


def apply_monitors(
    cfg: dict[str, Any],
    out_dir: str | Path,
    *,
    tensorboard: bool = False,
    csv_monitor: bool = False,
) -> dict[str, Any]:
    """Enable DeepSpeed's ``tensorboard`` / ``csv_monitor`` blocks (``train.tensorboard``,
    ``train.csv_monitor``) in the resolved ``cfg``, in place; an enabled block without an
    ``output_path`` (the JSON's own, too) writes under the run dir: ``OUT/<block>``."""
    for block, on in (("tensorboard", tensorboard), ("csv_monitor", csv_monitor)):
        if on:
            cfg[block] = {**(cfg.get(block) or {}), "enabled": True}
        b = cfg.get(block)
        if not (isinstance(b, dict) and b.get("enabled")):
            continue
        if not b.get("output_path"):
            b["output_path"] = str(out_dir)
            b["job_name"] = block
    if (cfg.get("tensorboard") or {}).get("enabled"):
        try:
            import tensorboard  # torch.utils.tensorboard needs it
        except ImportError:
            raise ConfigError(
                "the tensorboard monitor (train.tensorboard=true or an enabled 'tensorboard' "
                "block in the DeepSpeed config) needs the tensorboard package: "
                "pip install tensorboard, or use train.csv_monitor=true"
            ) from None
    return cfg


def precision(cfg: dict[str, Any]) -> str:
    """The training precision of a *resolved* DeepSpeed config: ``bfloat16``, ``float16`` or
    ``float32`` (the dtype ZeRO-3 creates the partitioned parameters in, and the one a
    ZeRO-0/1/2 engine casts the model to; the optimizer keeps fp32 master weights)."""
    for block, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        enabled = cfg.get(block, {}).get("enabled", False)
        if enabled == "auto":
            raise ValueError(f"{block}.enabled is still 'auto': resolve the config first")
        if enabled is True:
            return name
    return "float32"


def zero_stage(cfg: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without ``zero_optimization``)."""
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
