"""The dialogue teacher D: a causal LM over ``U`` trained with NLL on response tokens.

Launch (CPU or GPU; see docs/dialog_teacher.md)::

    deepspeed --num_gpus 2 launch/train_dialog_teacher.py --deepspeed ds_configs/zero3.json \\
        [--config configs/dialog_teacher_redial.json] [key=value ...]

Outputs under ``output_dir``:

    config.json            the resolved run config (usable again as ``--config``)
    ds_config.json         the resolved DeepSpeed config (batch sizes, precision filled in)
    run_info.json          world size, launcher, library versions, parameter count
    tokenizer/             the CRS tokenizer (built once, reused on resume)
    metrics.jsonl          kind=train rows (step, loss, nll, lr, tokens_per_s, samples_per_s,
                           peak_mem_mb), kind=eval rows (val_loss, val_ppl), one kind=final row
    checkpoints/step_*/    DeepSpeed checkpoints + meta.json (data position), newest k kept
    hf/                    the exported Hugging Face model + tokenizer (fp32)
    reference_logits.pt    (``save_reference_logits=true``) engine logits on one validation
                           batch, to check the export against
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from conkd_scale.data.corpus import load_dataset
from conkd_scale.data.synthetic import DEFAULT_DIR as DEFAULT_SYNTHETIC_DIR
from conkd_scale.data.tokenizer import load_tokenizer
from conkd_scale.distributed import barrier, init_distributed, print0, run_on_main
from conkd_scale.models.builder import ModelConfig, build_model, prepare_tokenizer
from conkd_scale.training.config import TrainConfig, check_sequence_run
from conkd_scale.training.lm_recipe import LMRecipe
from conkd_scale.training.trainer import lm_logits


def _default_train() -> TrainConfig:
    return TrainConfig(
        micro_batch=8,
        lr=2e-3,
        warmup_steps=20,
        epochs=5.0,
        eval_every=50,
        save_every=100,
        log_every=10,
    )


@dataclass
class DialogTeacherConfig:
    """Run config of ``launch/train_dialog_teacher.py`` (``key=value`` / ``--config FILE``)."""

    dataset: Literal["redial", "inspired", "synthetic"] = "synthetic"
    data_dir: str | None = None  # None: runs/data/synthetic (generated if missing) for synthetic
    kg: Literal["kbrd", "dbpedia", "none"] = "none"  # D does not use the KG: skip loading it
    synthetic_seed: int = 0  # seed of the generated synthetic corpus
    output_dir: str = "runs/dialog_teacher"
    max_length: int = 256  # tokens per training sequence (longer conversations are windowed)
    context_budget: int | None = None  # context tokens carried into a later window (max_len/4)
    use_mode_tokens: bool = True  # [REC]/[GEN] at the start of every recommender turn
    max_train_conversations: int = 0  # 0: all; else the first N (quick runs)
    export: bool = True  # write OUT/hf at the end of a completed run
    save_reference_logits: bool = False  # write OUT/reference_logits.pt (export check)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        check_sequence_run(self.dataset, self.data_dir, self.max_length, self.model, "model")

    @property
    def resolved_data_dir(self) -> str:
        return self.data_dir or DEFAULT_SYNTHETIC_DIR


class DialogTeacherRecipe(LMRecipe):
    """setup -> train -> export -> cleanup (``launch/train_dialog_teacher.py``)."""

    cfg: DialogTeacherConfig

    # ---------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(
            timeout_minutes=cfg.train.collective_timeout_minutes,
            rank0_timeout_minutes=cfg.train.rank0_timeout_minutes,
        )
        ds = self._resolve_ds_config()
        # the checks that read files only come before anything is written to output_dir
        self._check_resume()
        self._ensure_synthetic()
        corpus = load_dataset(
            cfg.dataset, cfg.resolved_data_dir, kg=cfg.kg, splits=("train", "valid")
        )
        self._require_training_split(corpus)
        run_on_main(self._write_run_configs, ds, phase="writing the run configs")
        texts = [t.text for c in self._train_conversations(corpus) for t in c.turns]
        run_on_main(
            prepare_tokenizer,
            cfg.model,
            corpus.catalog,
            texts,
            self.out / "tokenizer",
            phase="building the tokenizer",
        )
        tok = load_tokenizer(self.out / "tokenizer")
        self._encode_splits(corpus, tok)
        torch.manual_seed(cfg.train.seed)
        self.built = build_model(cfg.model, tok, ds_config=ds, catalog=corpus.catalog)
        self._start_training(self.built.model, ds, tok)  # NLL: the trainer's default steps
        self._write_run_info(
            {
                "world_size": self.dist.world_size,
                "launcher": self.dist.launcher,
                "backend": self.dist.backend,
                "num_params": self.built.num_params,
                "num_params_this_rank": self.built.num_params_local,
                "source": self.built.source,
                "vocab": len(tok),
                "items": len(corpus.catalog),
                "train_sequences": len(self.train_data),
                "valid_sequences": len(self.eval_data),
                "total_steps": self.total_steps,
                "versions": _versions(),
            }
        )
        self.trainer.resume()

    # ---------------------------------------------------------------------------- run
    def export(self) -> Path | None:
        """OUT/hf (fp32) for a completed run; and the reference logits if asked. Collective."""
        path = self._export_hf()
        if path is None:
            return None
        if self.cfg.save_reference_logits:
            self._reference_logits()
        print0(f"exported {path}")
        return path

    @torch.no_grad()
    def _reference_logits(self) -> None:
        batch = self.collate(self.eval_data[: self.cfg.train.micro_batch])
        self.engine.eval()
        logits_BTV = lm_logits(self.engine, batch).float().cpu()
        self.engine.train()
        if self.dist.is_main:
            torch.save(
                {
                    "input_ids": batch["input_ids"],
                    "attention_mask": batch["attention_mask"],
                    "logits": logits_BTV,
                },
                self.out / "reference_logits.pt",
            )
        barrier()


def _versions() -> dict[str, str]:
    import deepspeed
    import transformers

    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
    }
