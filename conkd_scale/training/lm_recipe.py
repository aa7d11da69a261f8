"""What the two language-model recipes share: :class:`LMRecipe`, the base of
``DialogTeacherRecipe`` (``training/dialog_teacher.py``) and ``DistillRecipe``
(``distill/recipe.py``).

Lifecycle (``conkd_scale/launching.py`` drives it): ``setup() -> train() -> export() ->
cleanup(success)``. A recipe's ``setup`` runs its own steps in its own order and uses the
helpers here for the common ones: the DeepSpeed config resolved for this world size, the
output directory's config files, the encoded training and validation sequences, the
DeepSpeed engine with its :class:`~conkd_scale.training.trainer.Trainer`, and
``run_info.json``. Training, checkpoints, the Hugging Face export and the release of the
engines and the process group are the same for both.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Protocol

from conkd_scale.config import config_to_dict
from conkd_scale.data.corpus import Corpus
from conkd_scale.data.schema import RECOMMENDER, Conversation
from conkd_scale.data.sequences import encode_split
from conkd_scale.data.synthetic import ensure_synthetic
from conkd_scale.distributed import DistInfo, print0, rank_hosts, run_on_main, teardown
from conkd_scale.models.builder import BuiltModel, enable_activation_checkpointing
from conkd_scale.models.export import export_hf
from conkd_scale.training.config import TrainConfig
from conkd_scale.training.data import sequence_collate
from conkd_scale.training.ds_config import apply_monitors, resolve_ds_config
from conkd_scale.training.resume_check import check_resume_drift
from conkd_scale.training.trainer import (
    Trainer,
    make_optimizer,
    make_scheduler_factory,
    plan_steps,
)
from conkd_scale.utils.errors import DataError
from conkd_scale.utils.io import write_json


class LMRunConfig(Protocol):
    """The run-config fields the base reads (``DialogTeacherConfig``, ``DistillConfig``)."""

    output_dir: str
    dataset: str
    synthetic_seed: int
    max_length: int
    use_mode_tokens: bool
    context_budget: int | None
    max_train_conversations: int
    export: bool
    train: TrainConfig

    @property
    def resolved_data_dir(self) -> str: ...


class LMRecipe:
    """A causal LM trained by one DeepSpeed engine: the shared setup helpers and lifecycle."""

    cfg: LMRunConfig
    dist: DistInfo
    built: BuiltModel
    engine: Any
    trainer: Trainer

    def __init__(
        self,
        cfg: LMRunConfig,
        ds_config: dict[str, Any],
        ds_config_path: str = "DeepSpeed config",
    ) -> None:
        self.cfg = cfg
        self.ds_raw = ds_config
        self.ds_path = ds_config_path
        self.out = Path(cfg.output_dir)
        self.summary: dict[str, Any] = {}
        self.run_config = config_to_dict(cfg)  # as given (before e.g. eta=auto is resolved)
        self.ds_resolved: dict[str, Any] = {}

    # ---------------------------------------------------------------------------- setup
    def _resolve_ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config with batch sizes (and precision) filled in for this world."""
        train = self.cfg.train
        ds = resolve_ds_config(
            self.ds_raw,
            micro_batch=train.micro_batch,
            grad_accum=train.grad_accum,
            world_size=self.dist.world_size,
            where=self.ds_path,
        )
        apply_monitors(ds, self.out, tensorboard=train.tensorboard, csv_monitor=train.csv_monitor)
        self.ds_resolved = copy.deepcopy(ds)
        return ds

    def _check_resume(self) -> None:
        """Refuse a resume whose settings differ from its checkpoint's (every rank, files
        only: call it before anything is written to the output directory)."""
        check_resume_drift(
            self.run_config,
            self.ds_resolved,
            self.dist.world_size,
            self.out,
            self.cfg.train.resume,
        )

    def _write_run_configs(self, ds: dict[str, Any]) -> None:
        """OUT/config.json and OUT/ds_config.json (rank 0: call it through ``run_on_main``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", config_to_dict(self.cfg))
        write_json(self.out / "ds_config.json", ds)

    def _ensure_synthetic(self) -> None:
        """Generate the synthetic corpus on rank 0 when it is the dataset and missing
        (collective: the other ranks wait for it)."""
        cfg = self.cfg
        if cfg.dataset == "synthetic":
            run_on_main(
                ensure_synthetic,
                cfg.resolved_data_dir,
                seed=cfg.synthetic_seed,
                phase="generating the synthetic corpus",
            )

    def _train_conversations(self, corpus: Corpus) -> list[Conversation]:
        """The training split, or its first ``max_train_conversations`` (quick runs)."""
        convs = corpus.splits["train"]
        n = self.cfg.max_train_conversations
        return convs[:n] if n else convs

    def _require_training_split(self, corpus: Corpus) -> None:
        """A clear error (every rank, before the output directory is written) when the
        training split is empty or has no recommender turn to learn."""
        convs = self._train_conversations(corpus)
        if not convs:
            raise DataError(
                corpus.data_dir,
                "the training split has no conversations",
                hint="check its train split file and data_dir",
            )
        if not any(t.role == RECOMMENDER for c in convs for t in c.turns):
            raise DataError(
                corpus.data_dir,
                "the training split has no recommender turn to learn",
                hint="check its train split file, data_dir and max_train_conversations",
            )

    def _encode_splits(self, corpus: Corpus, tok: Any) -> None:
        """``train_data`` and ``eval_data``: whole-conversation sequences with loss."""
        cfg = self.cfg
        kw = {
            "max_length": cfg.max_length,
            "use_mode_tokens": cfg.use_mode_tokens,
            "context_budget": cfg.context_budget,
        }
        self.train_data = encode_split(self._train_conversations(corpus), tok, **kw)
        self.eval_data = encode_split(corpus.splits["valid"], tok, **kw)
        if not self.train_data:
            raise DataError(
                corpus.data_dir,
                "the training split has no conversations with a recommender turn to learn",
                hint="check its train split file, data_dir and max_train_conversations",
            )

    def _start_training(
        self, module: Any, ds: dict[str, Any], tok: Any, collate: Any = None, **hooks: Any
    ) -> None:
        """The DeepSpeed engine around ``module`` (optimizer over the LM's parameters, the LR
        schedule of ``total_steps``) and its :class:`Trainer` with the recipe's ``hooks``;
        ``collate`` (default: :func:`sequence_collate`) makes the micro batches."""
        import deepspeed

        train = self.cfg.train
        self.total_steps = plan_steps(train, len(self.train_data), self.dist.world_size)
        if train.activation_checkpointing:
            enable_activation_checkpointing(self.built.model)
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=make_optimizer(self.built.model, train),
            lr_scheduler=make_scheduler_factory(train, self.total_steps),
            config=ds,
        )
        self.collate = collate or sequence_collate(tok.pad_token_id)
        self.trainer = Trainer(
            self.engine,
            train_data=self.train_data,
            eval_data=self.eval_data,
            collate_fn=self.collate,
            cfg=train,
            dist=self.dist,
            out_dir=self.out,
            total_steps=self.total_steps,
            run_config={"config": self.run_config, "ds_config": self.ds_resolved},
            **hooks,
        )

    def _write_run_info(self, info: dict[str, Any]) -> None:
        """OUT/run_info.json (rank 0), also printed; with every rank's host and the
        rendezvous address. Called on every rank (it gathers the host names)."""
        master = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
        info = {**info, "hosts": rank_hosts(), "master": master}
        run_on_main(write_json, self.out / "run_info.json", info, phase="writing run_info.json")
        print0(json.dumps(info))

    # ---------------------------------------------------------------------------- run
    def train(self) -> dict[str, Any]:
        self.summary = self.trainer.train()
        return self.summary

    def save_checkpoint(self) -> Path:
        return self.trainer.save_checkpoint()

    def _student(self) -> Any:
        """What the export reads: the engine (or the LM inside a wrapper module)."""
        return self.engine

    def _export_hf(self, **meta: Any) -> Path | None:
        """OUT/hf, the model as a Hugging Face directory, for a completed run with
        ``export=true`` (else None); ``meta`` goes into its conkd_export.json. Collective."""
        if self.trainer.stopped_early or not self.cfg.export:
            return None
        self.trainer.check_finite(f"the export {self.out / 'hf'}")  # a diverged model is not kept
        return export_hf(
            self._student(),
            self.built.tokenizer,
            self.out / "hf",
            meta={
                "step": self.trainer.step,
                "source": self.built.source,
                **meta,
                **self.trainer.last_eval,
            },
        )

    def _engines(self) -> list[Any]:
        return [getattr(self, "engine", None)]

    def cleanup(self, success: bool = True) -> None:
        """Release the engines and the process group (barrier first after a success)."""
        for engine in self._engines():
            if engine is not None and success and hasattr(engine, "destroy"):
                engine.destroy()
        teardown(barrier=success)
