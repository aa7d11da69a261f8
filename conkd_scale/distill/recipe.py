"""The ConKD distillation job: setup -> train -> export -> cleanup.

Per micro batch, on every rank and in the same order (ZeRO-3 forwards are collective):

1. ``lockstep``: D's forward (sharded inference engine, ``no_grad``) -> its logits at the
   loss rows only, ``[N, V]`` (the ``[B, T, V]`` tensor is freed at once); R's item
   distribution for the batch's recommender turns, ``[S, |I|]`` (one row per turn);
2. ``loss_step``: the student's forward -> logits at the loss rows -> the gated two-teacher
   loss (``conkd_scale.loss.conkd_loss``; chunked on the CPU), whose parts are logged;
   the teacher's rows are freed as soon as the loss has used them. With ``loss.impl``
   resolving to ``fused_linear`` (``auto`` on CUDA) the engine's module is
   ``ConKDFusedLinearLoss`` around the student: one engine call runs the student up to its
   final hidden states and the loss through the lm_head chunk by chunk (no ``[N, V]``
   student logits; ZeRO-3 gathers the partitioned lm_head for the loss's forward and
   backward). Its checkpoints then name the student's parameters ``model.*``; evaluation
   and the exported student are unchanged (the wrapper passes plain forwards through).

Output directory (``output_dir``)::

    config.json, ds_config.json, run_info.json   resolved configs and run facts
    tokenizer/                                   D's tokenizer (the vocabulary U)
    metrics.jsonl                                train rows: step, loss, ce, kd, kd_dialog,
                                                 kd_rec, gate_mean, gate_frac_above_eta,
                                                 gate_precision, gate_recall, tokens_per_s,
                                                 samples_per_s, peak_mem_mb; eval rows
    checkpoints/step_*/                          resumable DeepSpeed checkpoints
    hf/                                          the exported student (Hugging Face dir)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from conkd_scale import distributed as D
from conkd_scale.config import config_to_dict
from conkd_scale.data.corpus import load_dataset
from conkd_scale.data.sequences import IGNORE
from conkd_scale.data.synthetic import ensure_synthetic
from conkd_scale.data.tokenizer import item_token_ids, save_tokenizer
from conkd_scale.distill import teachers as T
from conkd_scale.distill.config import DistillConfig
from conkd_scale.eval.catalog_io import save_item_catalog
from conkd_scale.loss import LossOutput, conkd_loss, resolve_impl
from conkd_scale.loss.fused_linear import ConKDFusedLinearLoss
from conkd_scale.loss.gates import choose_eta, gate_detection, item_mass
from conkd_scale.models.builder import build_model
from conkd_scale.models.export import export_hf
from conkd_scale.training.data import Batch, sequence_collate
from conkd_scale.training.dialog_teacher import encode_split
from conkd_scale.training.ds_config import resolve_ds_config
from conkd_scale.training.metrics import JsonlLogger
from conkd_scale.training.trainer import (
    Trainer,
    lm_logits,
    make_optimizer,
    make_scheduler_factory,
    plan_steps,
)
from conkd_scale.utils.errors import ConfigError
from conkd_scale.utils.io import write_json

GATE_COUNTS = (
    "gate_lam_sum",
    "item_mass_sum",
    "gate_n_tokens",
    "gate_n_pred",
    "gate_n_gold",
    "gate_n_hit",
)


class DistillLogger(JsonlLogger):
    """metrics.jsonl rows with the gate figures derived from pooled counts.

    The trainer averages every logged part over micro batches and ranks; ratios of those
    averages are ratios of the pooled sums, so precision/recall are exact over the window.
    """

    def log(self, row: dict[str, Any]) -> None:
        n = row.get("gate_n_tokens")
        if n:
            row["gate_mean"] = row["gate_lam_sum"] / n
            row["item_mass_mean"] = row["item_mass_sum"] / n
            row["gate_frac_above_eta"] = row["gate_n_pred"] / n
            if row["gate_n_pred"] > 0:
                row["gate_precision"] = row["gate_n_hit"] / row["gate_n_pred"]
            if row["gate_n_gold"] > 0:
                row["gate_recall"] = row["gate_n_hit"] / row["gate_n_gold"]
        for k in ("gate_lam_sum", "item_mass_sum"):
            row.pop(k, None)
        super().log(row)


def loss_rows(batch: Batch) -> torch.Tensor:
    """``[B, T-1]`` mask of the positions whose next token carries loss."""
    return batch["labels"][:, 1:] != IGNORE


class DistillRecipe:
    """ConKD distillation into a DeepSpeed (ZeRO-3 by default) student."""

    def __init__(
        self,
        cfg: DistillConfig,
        ds_config: dict[str, Any],
        ds_config_path: str = "DeepSpeed config",
        inference_ds_config: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.ds_raw = ds_config
        self.ds_path = ds_config_path
        self.ds_inf_raw = inference_ds_config
        self.out = Path(cfg.output_dir)
        self.summary: dict[str, Any] = {}
        self.teacher: Any = None
        self.rec: Any = None
        self.fused = False  # loss.impl resolved to fused_linear (set in setup)
        self._dump_pending = False

    # ---------------------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed

        cfg = self.cfg
        T.check_teachers_present(cfg)  # every rank, before any collective
        self.dist = D.init_distributed()
        if cfg.dataset == "synthetic":
            D.run_on_main(ensure_synthetic, cfg.resolved_data_dir, seed=cfg.synthetic_seed)
        if cfg.teachers.auto_train:
            T.train_missing_teachers(cfg)
        corpus = load_dataset(
            cfg.dataset, cfg.resolved_data_dir, kg=cfg.kg or "none", splits=("train", "valid")
        )
        tok = T.load_teacher_tokenizer(cfg)
        if cfg.uses_teachers:
            from conkd_scale.rec.api import RecTeacher

            self.rec = RecTeacher.load(cfg.rec_dir)
        self.catalog = corpus.catalog
        self.item_ids = T.check_alignment(tok, self.rec, corpus.catalog.ids)
        self.item_tok_I = torch.tensor(item_token_ids(tok, self.item_ids), dtype=torch.long)
        self.vocab = len(tok)
        ds = resolve_ds_config(
            self.ds_raw,
            micro_batch=cfg.train.micro_batch,
            grad_accum=cfg.train.grad_accum,
            world_size=self.dist.world_size,
            where=self.ds_path,
        )

        def prepare() -> None:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", config_to_dict(cfg))
            write_json(self.out / "ds_config.json", ds)
            if not (self.out / "tokenizer").is_dir():
                save_tokenizer(tok, self.out / "tokenizer")

        D.run_on_main(prepare)
        train_convs = corpus.splits["train"]
        if cfg.max_train_conversations:
            train_convs = train_convs[: cfg.max_train_conversations]
        self.train_data = encode_split(train_convs, tok, cfg)  # type: ignore[arg-type]
        self.eval_data = encode_split(corpus.splits["valid"], tok, cfg)  # type: ignore[arg-type]
        if cfg.loss.gate.eta == "auto" and cfg.uses_teachers and not self.eval_data:
            raise ConfigError(
                "loss.gate.eta=auto is chosen on the validation split, and "
                f"{cfg.resolved_data_dir} has no validation conversations: add them or set "
                "loss.gate.eta to a number"
            )
        torch.manual_seed(cfg.train.seed)
        self.built = build_model(cfg.student, tok, ds_config=ds, catalog=corpus.catalog)
        if cfg.uses_teachers:
            inf_raw = self.ds_inf_raw
            if inf_raw is None:
                from conkd_scale.training.ds_config import load_ds_config

                inf_raw = load_ds_config(cfg.teachers.inference_ds_config)
            ds_inf = resolve_ds_config(
                inf_raw,
                micro_batch=cfg.train.micro_batch,
                world_size=self.dist.world_size,
                client_optimizer=False,
                where=cfg.teachers.inference_ds_config,
            )
            self.teacher = T.build_dialog_engine(
                T.dialog_model_dir(cfg.dialog_dir), ds_inf, self.vocab
            )
        self.gate_calibration: dict[str, Any] | None = None
        if self.teacher is not None and cfg.loss.gate.eta == "auto":
            self.gate_calibration = self._resolve_eta(sequence_collate(tok.pad_token_id))
            D.print0(
                f"loss.gate.eta=auto: η = {cfg.loss.gate.eta} (validation F1 of the hard gate)"
            )
        total = plan_steps(cfg.train, len(self.train_data), self.dist.world_size)
        # the student's final hidden states are at hand: auto may pick fused_linear (CUDA)
        impl = None
        if self.teacher is not None:
            impl = resolve_impl(cfg.loss, self.dist.device, hidden_states=True)
        self.fused = impl == "fused_linear"
        module = (
            ConKDFusedLinearLoss(self.built.model, cfg.loss, vocab_size=self.vocab)
            if self.fused
            else self.built.model
        )
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=make_optimizer(self.built.model, cfg.train),
            lr_scheduler=make_scheduler_factory(cfg.train, total),
            config=ds,
        )
        self.collate = sequence_collate(tok.pad_token_id)
        logger = DistillLogger(self.out / "metrics.jsonl") if self.dist.is_main else None
        self.trainer = Trainer(
            self.engine,
            train_data=self.train_data,
            eval_data=self.eval_data,
            collate_fn=self.collate,
            cfg=cfg.train,
            dist=self.dist,
            out_dir=self.out,
            total_steps=total,
            loss_step=self.loss_step,
            eval_step=self.eval_step,
            eval_metrics=self.eval_metrics,
            lockstep=self.lockstep,
            logger=logger,
        )
        info = {
            "world_size": self.dist.world_size,
            "launcher": self.dist.launcher,
            "student_params": self.built.num_params,
            "student": self.built.source,
            "teacher": str(T.dialog_model_dir(cfg.dialog_dir)) if self.teacher else None,
            "teacher_params": _count(self.teacher),
            "teacher_params_this_rank": _count(self.teacher, local=True),
            "rec_teacher": str(cfg.rec_dir) if self.rec else None,
            "vocab": self.vocab,
            "items": len(self.item_ids),
            "train_sequences": len(self.train_data),
            "total_steps": total,
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0),
            "loss_impl": impl,
            "eta": cfg.loss.gate.eta if self.teacher is not None else None,
            "gate_calibration": self.gate_calibration,
        }
        D.run_on_main(write_json, self.out / "run_info.json", info)
        D.print0(json.dumps(info))
        resumed = self.trainer.resume()
        self._dump_pending = cfg.debug_dump_dir is not None and resumed is None
        if self._dump_pending:
            export_hf(self._student(), tok, Path(str(cfg.debug_dump_dir)) / "student0")

    @torch.no_grad()
    def _resolve_eta(self, collate: Any) -> dict[str, Any]:
        """``η = auto``: D's item mass at every loss row of the validation split (every rank
        runs the same forwards, as D is sharded), then the F1-best hard-gate threshold."""
        mb, ms, golds = self.cfg.train.micro_batch, [], []
        for s in range(0, len(self.eval_data), mb):
            batch = collate(self.eval_data[s : s + mb])
            logits_BTV = lm_logits(self.teacher, batch)  # [B, T, V]
            rows_BT = loss_rows(batch).to(logits_BTV.device)
            t_NV = logits_BTV[:, :-1][rows_BT][:, : self.vocab]  # [N, V]
            labels_N = batch["labels"][:, 1:].to(t_NV.device)[rows_BT]  # [N]
            items_I = self.item_tok_I.to(t_NV.device)
            ms.append(item_mass(t_NV, items_I).float().cpu())
            golds.append(torch.isin(labels_N, items_I).cpu())
            del logits_BTV, t_NV
        m_N, gold_N = torch.cat(ms), torch.cat(golds)
        eta = choose_eta(m_N, gold_N)
        self.cfg.loss.gate.eta = eta
        return {
            "split": "valid",
            "eta": eta,
            "m_gold_mean": float(m_N[gold_N].mean()) if gold_N.any() else None,
            "m_other_mean": float(m_N[~gold_N].mean()) if (~gold_N).any() else None,
            "at_eta": gate_detection(m_N, gold_N, eta),
            "at_0.5": gate_detection(m_N, gold_N, 0.5),
        }

    # ---------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def lockstep(self, batch: Batch, training: bool) -> Batch:
        """Teacher outputs for this micro batch (every rank, every micro batch)."""
        if self.teacher is None:
            return batch
        t0 = time.perf_counter()
        logits_BTV = lm_logits(self.teacher, batch)
        rows_BT = loss_rows(batch).to(logits_BTV.device)
        batch["teacher_NV"] = logits_BTV[:, :-1][rows_BT][:, : self.vocab]  # [N, V]
        del logits_BTV
        turns = batch["turns"]
        batch["rec_SI"] = (
            self.rec.item_distribution(turns, self.item_ids)
            if turns
            else torch.zeros(0, len(self.item_ids))
        )  # [S, I]
        batch["time_teacher_s"] = time.perf_counter() - t0
        return batch

    def _student(self) -> Any:
        """What export reads: the engine, or under fused_linear the student LM it wraps."""
        return self.engine.module.model if self.fused else self.engine

    def _loss(
        self, engine: Any, batch: Batch, student_gate: bool = False
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        if self.fused and torch.is_grad_enabled():
            return self._fused_loss(engine, batch)
        logits_BTV = lm_logits(engine, batch)
        dev = logits_BTV.device
        rows_BT = loss_rows(batch).to(dev)
        labels_N = batch["labels"][:, 1:].to(dev)[rows_BT]  # [N]
        student_NV = logits_BTV[:, :-1][rows_BT][:, : self.vocab]  # [N, V]
        del logits_BTV
        sgate = self._student_gate_sums(student_NV, labels_N) if student_gate else {}
        spred_N = sgate.pop("_pred_N", None)  # [N] the student's hard gate
        t0 = time.perf_counter()
        if self.teacher is None:  # one-hot baseline: L = w_ce * CE
            ce = torch.nn.functional.cross_entropy(
                student_NV.float(), labels_N, reduction="sum"
            ) / max(len(labels_N), 1)
            parts = {
                "ce": ce.detach(),
                "kd": 0.0,
                "kd_dialog": 0.0,
                "kd_rec": 0.0,
                "time_loss_s": time.perf_counter() - t0,
                **sgate,
            }
            return cfg.loss.w_ce * ce, parts
        rec_row_N = batch["rec_turn"][:, 1:].to(dev)[rows_BT]  # [N]
        out = conkd_loss(
            student_NV,
            batch.pop("teacher_NV"),
            batch["rec_SI"].to(dev),
            rec_row_N,
            self.item_tok_I.to(dev),
            labels_N,
            # evaluation of a fused_linear run: the same function on the logits
            dataclasses.replace(cfg.loss, impl="auto") if self.fused else cfg.loss,
            inplace=True,  # student_NV is this step's own copy: its buffer takes the gradient
        )
        return out.loss, self._kd_parts(out, labels_N, batch, t0, sgate, spred_N)

    def _fused_loss(self, engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """The training loss under ``loss.impl=fused_linear``: the student's forward and the
        loss in one engine call (``ConKDFusedLinearLoss``, same rows and function as
        :meth:`_loss`). Its ``time_loss_s`` includes the student's forward."""
        dev = self.dist.device
        t0 = time.perf_counter()
        res = engine(
            input_ids=batch["input_ids"].to(dev),
            attention_mask=batch["attention_mask"].to(dev),
            labels=batch["labels"].to(dev),
            rec_row=batch["rec_turn"].to(dev),
            rec_probs_SI=batch["rec_SI"].to(dev),
            item_ids_I=self.item_tok_I.to(dev),
            teacher_logits=batch.pop("teacher_NV"),
        )
        out = LossOutput(
            **{k: res[k] for k in ("loss", "ce", "kd", "kd_dialog", "kd_rec", "lam_N", "m_N")},
            n_tokens=int(res["n_tokens"]),
        )
        labels_N = batch["labels"][:, 1:].to(dev)[loss_rows(batch).to(dev)]  # [N]
        return out.loss, self._kd_parts(out, labels_N, batch, t0, {}, None)

    def _kd_parts(
        self,
        out: LossOutput,
        labels_N: torch.Tensor,  # [N] gold tokens of the loss rows
        batch: Batch,
        t0: float,
        sgate: dict[str, Any],
        spred_N: torch.Tensor | None,  # [N] the student's own hard gate (validation) or None
    ) -> dict[str, Any]:
        """The logged parts of a ConKD loss (gate counts pooled exactly by DistillLogger)."""
        cfg = self.cfg
        dev = labels_N.device
        lam = out.lam_N.detach().float()
        gold = torch.isin(labels_N, self.item_tok_I.to(dev))
        pred = lam > cfg.loss.gate.threshold
        parts = {
            "ce": out.ce,
            "kd": out.kd,
            "kd_dialog": out.kd_dialog,
            "kd_rec": out.kd_rec,
            "gate_lam_sum": lam.sum(),
            "item_mass_sum": out.m_N.detach().float().sum(),
            "gate_n_tokens": float(len(labels_N)),
            "gate_n_pred": float(pred.sum()),
            "gate_n_gold": float(gold.sum()),
            "gate_n_hit": float((pred & gold).sum()),
            "time_teacher_s": batch.get("time_teacher_s", 0.0),
            "time_loss_s": time.perf_counter() - t0,
            **sgate,
        }
        if spred_N is not None:  # the student's hard gate against the teacher's (both at η)
            parts["sgate_n_agree"] = float((spred_N == pred).sum())
        return parts

    @torch.no_grad()
    def _student_gate_sums(
        self, student_NV: torch.Tensor, labels_N: torch.Tensor
    ) -> dict[str, Any]:
        """The gate the student itself would compute (its item mass m^S, METHOD.md "The
        gate"), as sums over the rows: m^S at gold item tokens and elsewhere, and its hard
        gate's hits against the gold item positions (for precision and recall)."""
        m_N = item_mass(student_NV.detach(), self.item_tok_I.to(student_NV.device)).float()
        gold_N = torch.isin(labels_N, self.item_tok_I.to(labels_N.device))
        pred_N = m_N > self.cfg.loss.gate.threshold
        return {
            "sgate_m_gold_sum": float(m_N[gold_N].sum()),
            "sgate_m_other_sum": float(m_N[~gold_N].sum()),
            "sgate_n_gold": float(gold_N.sum()),
            "sgate_n_other": float((~gold_N).sum()),
            "sgate_n_pred": float(pred_N.sum()),
            "sgate_n_hit": float((pred_N & gold_N).sum()),
            "_pred_N": pred_N,
        }

    def loss_step(self, engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        rec_SI = batch.get("rec_SI")
        loss, parts = self._loss(engine, batch)
        if self._dump_pending:
            self._dump_pending = False
            dump = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "rec_turn")}
            dump.update(
                rec_SI=rec_SI,
                loss=float(loss),
                parts={k: float(v) for k, v in parts.items()},
                item_tok_I=self.item_tok_I,
            )
            path = Path(str(self.cfg.debug_dump_dir)) / f"rank{self.dist.rank}.pt"
            torch.save(dump, path)
        return loss, parts

    @torch.no_grad()
    def eval_step(self, engine: Any, batch: Batch) -> dict[str, float]:
        loss, parts = self._loss(engine, batch, student_gate=True)
        n = float(loss_rows(batch).sum())
        return {
            "ce_sum": float(parts["ce"]) * n,
            "kd_sum": float(parts["kd"]) * n,
            "loss_sum": float(loss) * n,
            "tokens": n,
            **{k: float(v) for k, v in parts.items() if k.startswith("sgate_")},
        }

    @staticmethod
    def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
        """Validation loss parts and PPL, and the student's own gate (``val_sgate_*``: its
        item mass at gold item positions and elsewhere, its hard gate's precision, recall
        and agreement with D's hard gate), which the scaling study follows over training."""
        n = max(sums["tokens"], 1.0)
        ce = sums["ce_sum"] / n
        out = {
            "val_loss": sums["loss_sum"] / n,
            "val_ce": ce,
            "val_kd": sums["kd_sum"] / n,
            "val_ppl": math.exp(min(ce, 50.0)),
            "val_tokens": sums["tokens"],
        }
        if sums.get("sgate_n_gold", 0) > 0:
            out["val_sgate_m_gold"] = sums["sgate_m_gold_sum"] / sums["sgate_n_gold"]
            out["val_sgate_recall"] = sums["sgate_n_hit"] / sums["sgate_n_gold"]
        if sums.get("sgate_n_other", 0) > 0:
            out["val_sgate_m_other"] = sums["sgate_m_other_sum"] / sums["sgate_n_other"]
        if sums.get("sgate_n_pred", 0) > 0:
            out["val_sgate_precision"] = sums["sgate_n_hit"] / sums["sgate_n_pred"]
        if "sgate_n_agree" in sums:
            out["val_sgate_agree"] = sums["sgate_n_agree"] / n
        return out

    # ---------------------------------------------------------------------------- run
    def train(self) -> dict[str, Any]:
        self.summary = self.trainer.train()
        return self.summary

    def save_checkpoint(self) -> Path:
        return self.trainer.save_checkpoint()

    def export(self) -> Path | None:
        """OUT/hf: the student as a Hugging Face directory (completed runs). Collective."""
        if self.trainer.stopped_early or not self.cfg.export:
            return None
        path = export_hf(
            self._student(),
            self.built.tokenizer,
            self.out / "hf",
            meta={
                "step": self.trainer.step,
                "source": self.built.source,
                "use_mode_tokens": self.cfg.use_mode_tokens,
                "loss": config_to_dict(self.cfg.loss),
                **self.trainer.last_eval,
            },
        )
        D.run_on_main(save_item_catalog, path, self.catalog)
        D.print0(f"exported the student to {path}")
        return path

    def cleanup(self, success: bool = True) -> None:
        """Release the engines and the process group (barrier first after a success)."""
        for engine in (getattr(self, "engine", None), self.teacher):
            if engine is not None and success and hasattr(engine, "destroy"):
                engine.destroy()
        D.teardown(barrier=success)


def _count(engine: Any, local: bool = False) -> int | None:
    """Parameters of an engine's model: all of them, or those held by this rank (ZeRO-3)."""
    if engine is None:
        return None
    if local:
        return sum(
            int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
            for p in engine.module.parameters()
        )
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
