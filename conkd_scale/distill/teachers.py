"""The two teachers as the distillation job sees them.

- D, the dialogue teacher, runs **online** as a DeepSpeed ZeRO-3 engine with no optimizer
  (``ds_configs/zero3_inference.json``): its parameters stay sharded across ranks and are
  gathered layer by layer during each forward, so D may be larger than one rank's memory
  share. It runs in eval mode under ``torch.no_grad()``, in lockstep on every rank.
- R, the recommendation teacher, is small: every rank holds a replica (eval, no grad).

Missing teachers are trained first when ``teachers.auto_train`` is set (R on rank 0 while
the others wait outside any collective, so no collective timeout applies; D with the same
DeepSpeed training core on every rank).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from conkd_scale.config import build_config
from conkd_scale.data.tokenizer import load_tokenizer, tokenizer_item_ids
from conkd_scale.distill.config import DistillConfig
from conkd_scale.distributed import barrier, print0
from conkd_scale.models.families import check_pretrained_dir
from conkd_scale.utils.errors import ConfigError


def dialog_model_dir(path: str | Path) -> Path:
    """D's Hugging Face directory: ``<dir>/hf`` of a training run, or ``<dir>`` itself."""
    path = Path(path)
    return path / "hf" if (path / "hf" / "config.json").is_file() else path


def rec_trained(path: str | Path) -> bool:
    """R's training directory (or its checkpoint directory) holds a trained R: a checkpoint
    whose metadata does not say that its training was still going on (interrupted)."""
    from conkd_scale.rec.train import CHECKPOINT_DIR, CHECKPOINT_FILE

    for d in (Path(path), Path(path) / CHECKPOINT_DIR):
        if (d / CHECKPOINT_FILE).is_file():
            meta = d / "rec_teacher.json"
            if not meta.is_file():
                return True  # a bare checkpoint, copied without its metadata
            return bool(json.loads(meta.read_text(encoding="utf-8")).get("complete", True))
    return False


def dialog_trained(path: str | Path) -> bool:
    """``path`` is D's training directory with its export, or a Hugging Face model directory."""
    return (dialog_model_dir(path) / "config.json").is_file()


def rec_ready(cfg: DistillConfig) -> bool:
    return rec_trained(cfg.rec_dir)


def dialog_ready(cfg: DistillConfig) -> bool:
    return dialog_trained(cfg.dialog_dir)


def check_teachers_present(cfg: DistillConfig) -> None:
    """With auto-training off, a missing teacher is an error (raised on every rank).

    The one-hot baseline (``loss.w_kd=0``) runs no teacher but still needs D's tokenizer.
    """
    if cfg.teachers.auto_train:
        return
    needed = [
        ("dialogue", dialog_ready(cfg), cfg.dialog_dir, "dialog", "launch/train_dialog_teacher.py")
    ]
    if cfg.uses_teachers:
        needed.insert(
            0, ("recommendation", rec_ready(cfg), cfg.rec_dir, "rec", "launch/train_rec_teacher.py")
        )
    for name, ready, path, key, how in needed:
        if not ready:
            raise ConfigError(
                f"no trained {name} teacher in {path} and teachers.auto_train=false: train it "
                f"with {how}, point teachers.{key}_dir at it, or set teachers.auto_train=true"
            )


def rec_teacher_overrides(cfg: DistillConfig) -> list[str]:
    """``key=value`` settings of an auto-trained R: the run's data and KG, then
    ``teachers.rec_overrides`` (which win)."""
    return [
        f"dataset={cfg.dataset}",
        f"data_dir={cfg.resolved_data_dir}",
        f"kg={'default' if cfg.kg is None else cfg.kg}",
        f"output_dir={cfg.rec_dir}",
        f"progress={cfg.train.progress}",
        *cfg.teachers.rec_overrides,
    ]


def dialog_teacher_overrides(cfg: DistillConfig) -> list[str]:
    """``key=value`` settings of an auto-trained D: the run's data and sequence layout, the
    size ``teachers.dialog_preset`` or the checkpoint ``teachers.dialog_pretrained``, then
    ``teachers.dialog_overrides`` (which win)."""
    source = [f"model.preset={cfg.teachers.dialog_preset}"]
    if cfg.teachers.dialog_pretrained:
        source.append(f"model.pretrained={cfg.teachers.dialog_pretrained}")
    return [
        f"dataset={cfg.dataset}",
        f"data_dir={cfg.resolved_data_dir}",
        f"output_dir={cfg.dialog_dir}",
        f"max_length={cfg.max_length}",
        f"use_mode_tokens={cfg.use_mode_tokens}",
        f"train.progress={cfg.train.progress}",
        f"max_train_conversations={cfg.max_train_conversations}",
        *source,
        *cfg.teachers.dialog_overrides,
    ]


def train_missing_teachers(cfg: DistillConfig) -> None:
    """Train R and/or D where their directories lack a trained model. Collective."""
    if not rec_ready(cfg) and cfg.uses_teachers:
        from conkd_scale.rec.train import RecTeacherConfig, train_rec_teacher

        print0(f"training the recommendation teacher into {cfg.rec_dir}")
        rec_file = cfg.teachers.rec_config
        t0 = time.monotonic()
        train_rec_teacher(build_config(RecTeacherConfig, rec_file, rec_teacher_overrides(cfg)))
        print0(f"trained the recommendation teacher in {time.monotonic() - t0:.1f} s (rank 0)")
    if not dialog_ready(cfg):
        from conkd_scale.training.dialog_teacher import DialogTeacherConfig, DialogTeacherRecipe
        from conkd_scale.training.ds_config import load_ds_config

        print0(f"training the dialogue teacher into {cfg.dialog_dir}")
        dcfg = build_config(DialogTeacherConfig, None, dialog_teacher_overrides(cfg))
        ds_path = cfg.teachers.dialog_train_ds_config
        recipe = DialogTeacherRecipe(dcfg, load_ds_config(ds_path), ds_path)
        recipe.setup()
        recipe.train()
        recipe.export()
        del recipe  # frees D's training engine; the process group stays for the student
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # D's ZeRO-3 config must not shape the student
        barrier()


def load_teacher_tokenizer(cfg: DistillConfig) -> Any:
    """The vocabulary U of D (the student is trained over the same tokens)."""
    return load_tokenizer(dialog_model_dir(cfg.dialog_dir))


def check_alignment(tok: Any, rec: Any | None, catalog_ids: list[str]) -> list[str]:
    """Item ids of the tokenizer, checked against the dataset's catalog and R's item index."""
    items = tokenizer_item_ids(tok)
    if not items:
        raise ConfigError("the dialogue teacher's tokenizer has no item tokens (<item_ID>)")
    known = set(catalog_ids)
    missing = [i for i in catalog_ids if i not in set(items)]
    extra = [i for i in items if i not in known]
    if missing or extra:
        raise ConfigError(
            f"the tokenizer's item tokens do not match the dataset's items ({len(missing)} "
            f"missing, e.g. {missing[:3]}; {len(extra)} unknown, e.g. {extra[:3]}): D was "
            "trained on another dataset; retrain it or point teachers.dialog_dir elsewhere"
        )
    if rec is not None:
        rec.aligned_index(items)  # raises, naming the first item R does not know
    return items


def build_dialog_engine(
    model_dir: Path, ds_config: dict[str, Any], vocab: int, attn_implementation: str = "sdpa"
) -> Any:
    """D as a ZeRO-3 inference engine (sharded parameters, no optimizer), in eval mode.

    Loaded in fp32; ZeRO-3 creates the partitions in the config's precision (bf16 on a GPU
    that supports it with ``"auto"``, fp32 on the CPU).

    transformers keeps one global DeepSpeed config (a weak reference); D's is registered only
    while D loads, and the previous one (the student's, if any) is put back afterwards, so a
    ZeRO-2 student next to a ZeRO-3 teacher is not created partitioned.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_ds

    check_pretrained_dir(model_dir, "teachers.dialog_dir")
    previous = hf_ds._hf_deepspeed_config_weak_ref
    previous = previous() if previous is not None else None
    try:
        keep = HfDeepSpeedConfig(ds_config)  # from_pretrained loads straight into partitions
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attn_implementation
        )
        del keep
    finally:
        if previous is not None:
            hf_ds.set_hf_deepspeed_config(previous)
        else:
            hf_ds.unset_hf_deepspeed_config()
    rows = int(model.get_input_embeddings().num_embeddings)
    if rows < vocab:
        raise ConfigError(
            f"{model_dir}: the dialogue teacher has {rows} embedding rows but "
            f"its tokenizer has {vocab} tokens"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    return engine
