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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from conkd_scale import distributed as D
from conkd_scale.config import config_to_dict
from conkd_scale.data.corpus import load_dataset
from conkd_scale.data.sequences import EncodedSequence, encode_conversation
from conkd_scale.data.synthetic import DEFAULT_DIR as DEFAULT_SYNTHETIC_DIR
from conkd_scale.data.synthetic import ensure_synthetic
from conkd_scale.data.tokenizer import load_tokenizer
from conkd_scale.models.builder import BuiltModel, ModelConfig, build_model, prepare_tokenizer
from conkd_scale.models.export import export_hf
from conkd_scale.training.config import TrainConfig, check_sequence_run
from conkd_scale.training.data import sequence_collate
from conkd_scale.training.ds_config import resolve_ds_config
from conkd_scale.training.trainer import (
    Trainer,
    lm_logits,
    make_optimizer,
    make_scheduler_factory,
    plan_steps,
)
from conkd_scale.utils.io import write_json


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


def encode_split(convs: list[Any], tok: Any, cfg: DialogTeacherConfig) -> list[EncodedSequence]:
    """Whole-conversation sequences; windows without any loss token are dropped."""
    out = []
    for c in convs:
        for s in encode_conversation(
            c,
            tok,
            max_length=cfg.max_length,
            use_mode_tokens=cfg.use_mode_tokens,
            context_budget=cfg.context_budget,
        ):
            if any(lab != -100 for lab in s.labels[1:]):
                out.append(s)
    return out


class DialogTeacherRecipe:
    """setup -> train -> export -> cleanup (``launch/train_dialog_teacher.py``)."""

    def __init__(
        self,
        cfg: DialogTeacherConfig,
        ds_config: dict[str, Any],
        ds_config_path: str = "DeepSpeed config",
    ) -> None:
        self.cfg = cfg
        self.ds_raw = ds_config
        self.ds_path = ds_config_path
        self.out = Path(cfg.output_dir)
        self.summary: dict[str, Any] = {}

    # ---------------------------------------------------------------------------- setup
    def _prepare_output(self, ds: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", config_to_dict(self.cfg))
        write_json(self.out / "ds_config.json", ds)
        if self.cfg.dataset == "synthetic":
            ensure_synthetic(self.cfg.resolved_data_dir, seed=self.cfg.synthetic_seed)

    def setup(self) -> None:
        import deepspeed

        cfg = self.cfg
        self.dist = D.init_distributed()
        ds = resolve_ds_config(
            self.ds_raw,
            micro_batch=cfg.train.micro_batch,
            grad_accum=cfg.train.grad_accum,
            world_size=self.dist.world_size,
            where=self.ds_path,
        )
        D.run_on_main(self._prepare_output, ds)
        corpus = load_dataset(
            cfg.dataset, cfg.resolved_data_dir, kg=cfg.kg, splits=("train", "valid")
        )
        train_convs = corpus.splits["train"]
        if cfg.max_train_conversations:
            train_convs = train_convs[: cfg.max_train_conversations]
        texts = [t.text for c in train_convs for t in c.turns]
        D.run_on_main(prepare_tokenizer, cfg.model, corpus.catalog, texts, self.out / "tokenizer")
        tok = load_tokenizer(self.out / "tokenizer")
        self.train_data = encode_split(train_convs, tok, cfg)
        self.eval_data = encode_split(corpus.splits["valid"], tok, cfg)
        torch.manual_seed(cfg.train.seed)
        self.built: BuiltModel = build_model(cfg.model, tok, ds_config=ds, catalog=corpus.catalog)
        total = plan_steps(cfg.train, len(self.train_data), self.dist.world_size)
        engine, *_ = deepspeed.initialize(
            model=self.built.model,
            optimizer=make_optimizer(self.built.model, cfg.train),
            lr_scheduler=make_scheduler_factory(cfg.train, total),
            config=ds,
        )
        self.engine = engine
        self.collate = sequence_collate(tok.pad_token_id)
        self.trainer = Trainer(
            engine,
            train_data=self.train_data,
            eval_data=self.eval_data,
            collate_fn=self.collate,
            cfg=cfg.train,
            dist=self.dist,
            out_dir=self.out,
            total_steps=total,
        )
        info = {
            "world_size": self.dist.world_size,
            "launcher": self.dist.launcher,
            "backend": self.dist.backend,
            "num_params": self.built.num_params,
            "source": self.built.source,
            "vocab": len(tok),
            "items": len(corpus.catalog),
            "train_sequences": len(self.train_data),
            "valid_sequences": len(self.eval_data),
            "total_steps": total,
            "versions": _versions(),
        }
        D.run_on_main(write_json, self.out / "run_info.json", info)
        D.print0(json.dumps(info))
        self.trainer.resume()

    # ---------------------------------------------------------------------------- run
    def train(self) -> dict[str, Any]:
        self.summary = self.trainer.train()
        return self.summary

    def save_checkpoint(self) -> Path:
        return self.trainer.save_checkpoint()

    def export(self) -> Path | None:
        """OUT/hf (fp32) for a completed run; and the reference logits if asked. Collective."""
        if self.trainer.stopped_early or not self.cfg.export:
            return None
        path = export_hf(
            self.engine,
            self.built.tokenizer,
            self.out / "hf",
            meta={"step": self.trainer.step, "source": self.built.source, **self.trainer.last_eval},
        )
        if self.cfg.save_reference_logits:
            self._reference_logits()
        D.print0(f"exported {path}")
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
        D.barrier()

    def cleanup(self, success: bool = True) -> None:
        """Release the engine and the process group (barrier first after a success)."""
        engine = getattr(self, "engine", None)
        if engine is not None and success and hasattr(engine, "destroy"):
            engine.destroy()
        D.teardown(barrier=success)


def _versions() -> dict[str, str]:
    import deepspeed
    import transformers

    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
    }
