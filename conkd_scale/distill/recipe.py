"""The ConKD distillation job: setup -> train -> export -> cleanup.

One distillation step: for every micro batch, on every rank and in the same order (ZeRO-3
forwards are collective), ``Trainer.micro_step`` (``training/trainer.py``) calls

1. :meth:`DistillRecipe.teacher_forward`: D's forward (sharded inference engine, ``no_grad``)
   -> its logits at the loss rows only, ``[N, V]`` (the ``[B, T, V]`` tensor is freed at
   once); R's item distribution for the batch's recommender turns, ``[S, |I|]`` (one row per
   turn). With ``teachers.mode=offline`` it is :meth:`DistillRecipe.cached_teachers`: both
   are read from the teacher cache (``conkd_scale/cache``), D as a ``SparseTeacher`` (top-k
   and the exact gate), and D is never built;
2. the loss step chosen once in setup, which returns ``(loss, parts)``:
   :meth:`DistillRecipe.kd_loss_step`: the student's forward -> logits at the loss rows ->
   the gated two-teacher loss (``conkd_scale.loss.conkd_loss``; chunked on the CPU), whose
   parts are logged; the teacher's rows are freed as soon as the loss has used them. With
   ``loss.impl`` resolving to ``fused_linear`` (``auto`` on CUDA) it is
   :meth:`DistillRecipe.fused_kd_loss_step`: the engine's module is ``ConKDFusedLinearLoss``
   around the student, and one engine call runs the student up to its final hidden states
   and the loss through the lm_head chunk by chunk (no ``[N, V]`` student logits; ZeRO-3
   gathers the partitioned lm_head for the loss's forward and backward). Its checkpoints
   then name the student's parameters ``model.*``; evaluation and the exported student are
   unchanged (the wrapper passes plain forwards through). With ``loss.w_kd=0`` (no teacher
   at all) it is :meth:`DistillRecipe.ce_loss_step`;

then ``engine.backward(loss)`` and ``engine.step()``.

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
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from conkd_scale.cache.manifest import run_fingerprint
from conkd_scale.cache.reader import TeacherCache, cached_collate, cached_sequences
from conkd_scale.config import config_to_dict
from conkd_scale.data.corpus import load_dataset
from conkd_scale.data.sequences import IGNORE
from conkd_scale.data.tokenizer import item_token_ids, save_tokenizer
from conkd_scale.distill import teachers as T
from conkd_scale.distill.config import DistillConfig
from conkd_scale.distributed import init_distributed, print0, run_on_main
from conkd_scale.eval.catalog_io import save_item_catalog
from conkd_scale.loss import LossOutput, conkd_loss, resolve_impl
from conkd_scale.loss.fused_linear import ConKDFusedLinearLoss
from conkd_scale.loss.gates import choose_eta, gate_counts, gate_detection, gate_rates, item_mass
from conkd_scale.models.builder import build_model
from conkd_scale.models.export import export_hf
from conkd_scale.training.data import Batch, sequence_collate
from conkd_scale.training.ds_config import load_ds_config, resolve_ds_config, zero_stage
from conkd_scale.training.lm_recipe import LMRecipe
from conkd_scale.training.memtrace import TRACE
from conkd_scale.training.metrics import JsonlLogger
from conkd_scale.training.trainer import LossStep, lm_logits
from conkd_scale.utils.errors import ConfigError


class DistillLogger(JsonlLogger):
    """metrics.jsonl rows with the gate figures derived from pooled counts.

    The trainer averages every logged part over micro batches and ranks; ratios of those
    averages are ratios of the pooled sums, so precision/recall are exact over the window.
    """

    def log(self, row: dict[str, Any]) -> None:
        row.update(gate_rates(row))
        for k in ("gate_lam_sum", "item_mass_sum"):
            row.pop(k, None)
        super().log(row)


def loss_rows(batch: Batch) -> Tensor:
    """``[B, T-1]`` mask of the positions whose next token carries loss."""
    return batch["labels"][:, 1:] != IGNORE


class DistillRecipe(LMRecipe):
    """ConKD distillation into a DeepSpeed (ZeRO-3 by default) student."""

    cfg: DistillConfig

    def __init__(
        self,
        cfg: DistillConfig,
        ds_config: dict[str, Any],
        ds_config_path: str = "DeepSpeed config",
        *,
        inference_ds_config: dict[str, Any] | None = None,  # None: teachers.inference_ds_config
    ) -> None:
        super().__init__(cfg, ds_config, ds_config_path)
        self.ds_inf_raw = inference_ds_config
        self.teacher: Any = None
        self.rec: Any = None
        self.cache: Any = None  # the teacher cache (teachers.mode=offline)
        self.fused = False  # loss.impl resolved to fused_linear (set in setup)

    # ---------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.memory_trace:
            TRACE.start()
        T.check_teachers_present(cfg)  # every rank, before any collective
        if cfg.offline:  # the cache is checked against this run, also before any collective
            corpus, tok = self._open_cache()
        self.dist = init_distributed(
            timeout_minutes=cfg.train.collective_timeout_minutes,
            rank0_timeout_minutes=cfg.train.rank0_timeout_minutes,
        )
        ds = self._resolve_ds_config()
        self._check_resume()  # before anything is written
        TRACE.set_output(self.out, self.dist.rank)
        TRACE.mark("distributed init")
        if not cfg.offline:
            corpus, tok = self._load_online()
            TRACE.mark("corpus, tokenizer, R (teachers trained if missing)")
        self.catalog = corpus.catalog

        def prepare() -> None:
            self._write_run_configs(ds)
            if not (self.out / "tokenizer").is_dir():
                save_tokenizer(tok, self.out / "tokenizer")

        run_on_main(prepare, phase="writing the run configs and tokenizer")
        if not cfg.offline:
            self._encode_splits(corpus, tok)
        TRACE.mark("configs written, splits encoded")
        if cfg.loss.gate.eta == "auto" and cfg.uses_teachers and not self.eval_data:
            raise ConfigError(
                "loss.gate.eta=auto is chosen on the validation split, and "
                f"{cfg.resolved_data_dir} has no validation conversations: add them or set "
                "loss.gate.eta to a number"
            )
        torch.manual_seed(cfg.train.seed)
        self.built = build_model(cfg.student, tok, ds_config=ds, catalog=corpus.catalog)
        TRACE.mark("student built")
        if cfg.uses_teachers and not cfg.offline:
            self.teacher = self._build_teacher()
            TRACE.mark("D built and partitioned")
        collate = sequence_collate(tok.pad_token_id)
        if self.cache is not None:
            collate = cached_collate(collate)
        self.gate_calibration: dict[str, Any] | None = None
        if self.has_teachers and cfg.loss.gate.eta == "auto":
            self.gate_calibration = self._resolve_eta(collate)
            print0(f"loss.gate.eta=auto: η = {cfg.loss.gate.eta} (validation F1 of the hard gate)")
            TRACE.mark("eta=auto calibrated")
        # the student's final hidden states are at hand: auto may pick fused_linear (CUDA)
        impl = None
        if self.has_teachers:
            impl = resolve_impl(cfg.loss, self.dist.device, hidden_states=True)
        self.fused = impl == "fused_linear"
        # the loss on logits: training (unless fused) and every validation step
        self.logits_loss_cfg = cfg.loss
        # the loss step, chosen once: the student's forward and the loss of one micro batch
        loss_step: LossStep = self.ce_loss_step
        module = self.built.model
        if self.fused:
            self.logits_loss_cfg = dataclasses.replace(cfg.loss, impl="auto")
            loss_step = self.fused_kd_loss_step
            module = ConKDFusedLinearLoss(self.built.model, cfg.loss, vocab_size=self.vocab)
        elif self.has_teachers:
            loss_step = self.kd_loss_step
        teacher_forward = None
        if self.has_teachers:
            teacher_forward = self.teacher_forward if self.cache is None else self.cached_teachers
        self._start_training(
            module,
            ds,
            tok,
            collate=collate,
            loss_step=loss_step,
            eval_step=self.eval_step,
            eval_metrics=self.eval_metrics,
            teacher_forward=teacher_forward,
            logger=DistillLogger(self.out / "metrics.jsonl") if self.dist.is_main else None,
        )
        TRACE.mark("student engine initialised")
        self._write_run_info(
            {
                "world_size": self.dist.world_size,
                "launcher": self.dist.launcher,
                "student_params": self.built.num_params,
                "student_params_this_rank": self.built.num_params_local,
                "student": self.built.source,
                "teacher": str(T.dialog_model_dir(cfg.dialog_dir)) if self.has_teachers else None,
                "teacher_mode": cfg.teachers.mode if self.has_teachers else None,
                "teacher_cache": str(cfg.cache_dir) if self.cache is not None else None,
                "teacher_params": _count(self.teacher),
                "teacher_params_this_rank": _count(self.teacher, local=True),
                "rec_teacher": str(cfg.rec_dir) if self.has_teachers else None,
                "vocab": self.vocab,
                "items": len(self.item_ids),
                "train_sequences": len(self.train_data),
                "total_steps": self.total_steps,
                "zero_stage": zero_stage(ds),
                "loss_impl": impl,
                "eta": cfg.loss.gate.eta if self.has_teachers else None,
                "gate_calibration": self.gate_calibration,
            }
        )
        resumed = self.trainer.resume()
        TRACE.mark("run_info written, resumed" if resumed else "run_info written")
        if cfg.debug_dump_dir is not None and resumed is None:
            export_hf(self._student(), tok, Path(str(cfg.debug_dump_dir)) / "student0")
            self.trainer.loss_step = self._dump_first_step(loss_step)

    @property
    def has_teachers(self) -> bool:
        """The teachers are used: D online (an engine) or offline (the cache)."""
        return self.teacher is not None or self.cache is not None

    def _load_online(self) -> tuple[Any, Any]:
        """Online mode: the corpus (generated when synthetic and missing), the teachers
        (trained when missing), D's tokenizer and R. Collective."""
        cfg = self.cfg
        self._ensure_synthetic()
        corpus = self._load_corpus()  # before a missing teacher is trained on it
        if cfg.teachers.auto_train:
            T.train_missing_teachers(cfg)
        tok = T.load_teacher_tokenizer(cfg)
        if cfg.uses_teachers:
            from conkd_scale.rec.api import RecTeacher

            self.rec = RecTeacher.load(cfg.rec_dir)
        self._set_items(tok, corpus)
        return corpus, tok

    def _load_corpus(self) -> Any:
        cfg = self.cfg
        corpus = load_dataset(
            cfg.dataset, cfg.resolved_data_dir, kg=cfg.kg or "none", splits=("train", "valid")
        )
        self._require_training_split(corpus)
        return corpus

    def _set_items(self, tok: Any, corpus: Any) -> None:
        self.item_ids = T.check_alignment(tok, self.rec, corpus.catalog.ids)
        self.item_tok_I = torch.tensor(item_token_ids(tok, self.item_ids), dtype=torch.long)
        self.vocab = len(tok)

    def _open_cache(self) -> tuple[Any, Any]:
        """Offline mode: the corpus, D's tokenizer, the encoded splits and the teacher cache,
        refused unless its fingerprint is this run's and its shards are intact. Files only,
        on every rank, before any collective (so every rank raises the same error)."""
        cfg = self.cfg
        corpus = self._load_corpus()
        tok = T.load_teacher_tokenizer(cfg)
        self._set_items(tok, corpus)
        self._encode_splits(corpus, tok)
        splits = {"train": self.train_data, "valid": self.eval_data}
        fp = run_fingerprint(cfg, tok, self.item_ids, splits)
        self.cache = TeacherCache.open(cfg.cache_dir, fp)
        self.train_data = cached_sequences(self.train_data, "train")
        self.eval_data = cached_sequences(self.eval_data, "valid")
        print0(f"teachers.mode=offline: D and R from the teacher cache {cfg.cache_dir}")
        return corpus, tok

    def _build_teacher(self) -> Any:
        """D as a ZeRO-3 inference engine (no optimizer): sharded across the ranks."""
        cfg = self.cfg
        inf_raw = self.ds_inf_raw
        if inf_raw is None:
            inf_raw = load_ds_config(cfg.teachers.inference_ds_config)
        ds_inf = resolve_ds_config(
            inf_raw,
            micro_batch=cfg.train.micro_batch,
            world_size=self.dist.world_size,
            client_optimizer=False,
            where=cfg.teachers.inference_ds_config,
        )
        return T.build_dialog_engine(
            T.dialog_model_dir(cfg.dialog_dir),
            ds_inf,
            self.vocab,
            cfg.teachers.dialog_attn_implementation,
        )

    @torch.no_grad()
    def _resolve_eta(self, collate: Any) -> dict[str, Any]:
        """``η = auto``: D's item mass at every loss row of the validation split (every rank
        runs the same forwards, as D is sharded), then the F1-best hard-gate threshold."""
        mb, ms, golds = self.cfg.train.micro_batch, [], []
        for s in range(0, len(self.eval_data), mb):
            batch = collate(self.eval_data[s : s + mb])
            labels_N = batch["labels"][:, 1:][loss_rows(batch)]  # [N]
            if self.cache is not None:
                ms.append(self.cache.item_mass(batch))  # [N] exact m_t, as cached
            else:
                logits_BTV = lm_logits(self.teacher, batch)  # [B, T, V]
                t_NV = self._at_rows(logits_BTV, loss_rows(batch).to(logits_BTV.device))
                del logits_BTV
                ms.append(item_mass(t_NV, self.item_tok_I.to(t_NV.device)).float().cpu())
                del t_NV
            golds.append(torch.isin(labels_N, self.item_tok_I))
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

    # ------------------------------------------------------------ one distillation step
    def _at_rows(self, logits_BTV: Tensor, rows_BT: Tensor) -> Tensor:
        """``[N, V]``: the logits that predict the loss tokens, cut to D's vocabulary U."""
        return logits_BTV[:, :-1][rows_BT][:, : self.vocab]

    @torch.no_grad()
    def teacher_forward(self, batch: Batch, training: bool) -> Batch:
        """Both teachers on this micro batch (every rank, every micro batch): D's logits at
        the loss rows (``teacher_NV``) and R's item distribution per turn (``rec_SI``)."""
        t0 = time.perf_counter()
        logits_BTV = lm_logits(self.teacher, batch)  # [B, T, V]
        rows_BT = loss_rows(batch).to(logits_BTV.device)
        batch["teacher_NV"] = self._at_rows(logits_BTV, rows_BT)  # [N, V]
        del logits_BTV
        turns = batch["turns"]
        batch["rec_SI"] = (
            self.rec.item_distribution(turns, self.item_ids)
            if turns
            else torch.zeros(0, len(self.item_ids))
        )  # [S, I]
        batch["time_teacher_s"] = time.perf_counter() - t0
        return batch

    @torch.no_grad()
    def cached_teachers(self, batch: Batch, training: bool) -> Batch:
        """Offline mode's teacher "forward": D at the loss rows as a ``SparseTeacher``
        (top-k, exact m_t) in ``teacher_NV`` and R per turn (``rec_SI``), from the cache."""
        t0 = time.perf_counter()
        batch["teacher_NV"], batch["rec_SI"] = self.cache.teachers(batch)
        batch["time_teacher_s"] = time.perf_counter() - t0
        return batch

    def _student_rows(self, engine: Any, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The student's logits at the loss rows ``[N, V]`` (its own copy; the ``[B, T, V]``
        tensor is freed at once), their gold tokens ``[N]`` and R's turn index ``[N]``."""
        logits_BTV = lm_logits(engine, batch)  # [B, T, V]
        dev = logits_BTV.device
        rows_BT = loss_rows(batch).to(dev)
        labels_N = batch["labels"][:, 1:].to(dev)[rows_BT]  # [N]
        rec_row_N = batch["rec_turn"][:, 1:].to(dev)[rows_BT]  # [N]
        student_NV = self._at_rows(logits_BTV, rows_BT)  # [N, V]
        del logits_BTV
        return student_NV, labels_N, rec_row_N

    def _conkd(
        self, student_NV: Tensor, labels_N: Tensor, rec_row_N: Tensor, batch: Batch
    ) -> LossOutput:
        """The gated two-teacher loss on the student's rows; D's rows leave the batch."""
        dev = student_NV.device
        return conkd_loss(
            student_NV,  # [N, V] this step's own copy: its buffer takes the gradient
            batch.pop("teacher_NV"),  # [N, V]
            batch["rec_SI"].to(dev),  # [S, I]
            rec_row_N,  # [N]
            self.item_tok_I.to(dev),  # [I]
            labels_N,  # [N]
            self.logits_loss_cfg,
            inplace=True,
        )

    def kd_loss_step(self, engine: Any, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        """The ConKD loss of one micro batch: the student's logits at the loss rows, then the
        gated two-teacher loss; its terms and the gate's counts are logged."""
        student_NV, labels_N, rec_row_N = self._student_rows(engine, batch)
        t0 = time.perf_counter()
        out = self._conkd(student_NV, labels_N, rec_row_N, batch)
        return out.loss, self._kd_parts(out, labels_N, batch, t0)

    def fused_kd_loss_step(self, engine: Any, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        """The ConKD loss under ``loss.impl=fused_linear``: the student's forward and the
        loss in one engine call (``ConKDFusedLinearLoss``, same rows and function as
        :meth:`kd_loss_step`). Its ``time_loss_s`` includes the student's forward."""
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
        return out.loss, self._kd_parts(out, labels_N, batch, t0)

    def ce_loss_step(self, engine: Any, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        """The one-hot baseline (``loss.w_kd=0``, no teacher): ``L = w_ce · CE``."""
        student_NV, labels_N, _ = self._student_rows(engine, batch)
        t0 = time.perf_counter()
        ce = _mean_ce(student_NV, labels_N)
        parts = {
            "ce": ce.detach(),
            "kd": 0.0,
            "kd_dialog": 0.0,
            "kd_rec": 0.0,
            "time_loss_s": time.perf_counter() - t0,
        }
        return self.cfg.loss.w_ce * ce, parts

    def _kd_parts(
        self,
        out: LossOutput,
        labels_N: Tensor,  # [N] gold tokens of the loss rows
        batch: Batch,
        t0: float,
    ) -> dict[str, Any]:
        """The logged parts of a ConKD loss: its terms and the gate's counts (pooled exactly,
        then turned into ratios by :class:`DistillLogger`)."""
        gold_N = torch.isin(labels_N, self.item_tok_I.to(labels_N.device))  # [N]
        return {
            "ce": out.ce,
            "kd": out.kd,
            "kd_dialog": out.kd_dialog,
            "kd_rec": out.kd_rec,
            **gate_counts(out.lam_N, out.m_N, gold_N, self.cfg.loss.gate.threshold),
            "time_teacher_s": batch.get("time_teacher_s", 0.0),
            "time_loss_s": time.perf_counter() - t0,
        }

    def _dump_first_step(self, loss_step: LossStep) -> LossStep:
        """``loss_step`` that also saves, for every micro batch of the first optimizer step,
        the batch, R's distribution and the loss to ``debug_dump_dir`` (``rank{r}_micro{i}.pt``;
        ``rank{r}.pt`` is micro batch 0), and the student's full accumulated gradient just
        before that step's update (``grads_step1.pt``, rank 0; gathered on every rank under
        ZeRO-3). The tests check them against the reference loss and its gradient."""
        out = Path(str(self.cfg.debug_dump_dir))
        grad_accum = self.trainer.grad_accum
        micro = 0

        def step(engine: Any, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
            nonlocal micro
            rec_SI = batch.get("rec_SI")
            loss, parts = loss_step(engine, batch)
            if micro < grad_accum:
                keys = ("input_ids", "attention_mask", "labels", "rec_turn")
                dump = {k: batch[k] for k in keys}
                dump.update(
                    rec_SI=rec_SI,
                    loss=float(loss),
                    parts={k: float(v) for k, v in parts.items()},
                    item_tok_I=self.item_tok_I,
                    grad_accum=grad_accum,
                )
                torch.save(dump, out / f"rank{self.dist.rank}_micro{micro}.pt")
                if micro == 0:
                    torch.save(dump, out / f"rank{self.dist.rank}.pt")
            micro += 1
            return loss, parts

        engine = self.engine
        engine_step = engine.step
        saved = False

        def step_with_dump(*args: Any, **kwargs: Any) -> Any:
            nonlocal saved
            if not saved and engine.is_gradient_accumulation_boundary():
                saved = True
                from deepspeed.utils import safe_get_full_grad

                grads = {}
                for name, p in engine.module.named_parameters():
                    g = safe_get_full_grad(p)  # collective under ZeRO-3
                    if g is not None:
                        grads[name] = g.detach().float().cpu().clone()
                if self.dist.is_main:
                    torch.save(grads, out / "grads_step1.pt")
            return engine_step(*args, **kwargs)

        engine.step = step_with_dump
        return step

    # ---------------------------------------------------------------------- validation
    @torch.no_grad()
    def _student_gate(
        self, student_NV: Tensor, labels_N: Tensor
    ) -> tuple[dict[str, float], Tensor]:
        """The gate the student itself would compute (its item mass m^S, METHOD.md "The
        gate"), as sums over the rows: m^S at gold item positions and elsewhere, and its hard
        gate's counts against the gold item positions; with that hard gate, ``[N]``."""
        thr = self.cfg.loss.gate.threshold
        m_N = item_mass(student_NV.detach(), self.item_tok_I.to(student_NV.device)).float()
        gold_N = torch.isin(labels_N, self.item_tok_I.to(labels_N.device))  # [N]
        c = gate_counts(m_N, m_N, gold_N, thr)
        sums = {
            "sgate_m_gold_sum": float(m_N[gold_N].sum()),
            "sgate_m_other_sum": float(m_N[~gold_N].sum()),
            "sgate_n_gold": c["gate_n_gold"],
            "sgate_n_other": c["gate_n_tokens"] - c["gate_n_gold"],
            "sgate_n_pred": c["gate_n_pred"],
            "sgate_n_hit": c["gate_n_hit"],
        }
        return sums, m_N > thr

    @torch.no_grad()
    def eval_step(self, engine: Any, batch: Batch) -> dict[str, float]:
        """Validation sums of one micro batch, on the student's logits (in a fused_linear
        run too): the loss terms times the rows, and the student's own gate."""
        student_NV, labels_N, rec_row_N = self._student_rows(engine, batch)
        sums, spred_N = self._student_gate(student_NV, labels_N)  # before the loss reuses
        # student_NV's buffer for its gradient
        if not self.has_teachers:
            ce = _mean_ce(student_NV, labels_N)
            loss, kd = self.cfg.loss.w_ce * ce, 0.0
        else:
            out = self._conkd(student_NV, labels_N, rec_row_N, batch)
            loss, ce, kd = out.loss, out.ce, out.kd
            # the student's hard gate against the teacher's (both at η)
            pred_N = out.lam_N.detach().float() > self.cfg.loss.gate.threshold
            sums["sgate_n_agree"] = float((spred_N == pred_N).sum())
        n = float(loss_rows(batch).sum())
        return {
            "ce_sum": float(ce) * n,
            "kd_sum": float(kd) * n,
            "loss_sum": float(loss) * n,
            "tokens": n,
            **sums,
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
    def _student(self) -> Any:
        """What export reads: the engine, or under fused_linear the student LM it wraps."""
        return self.engine.module.model if self.fused else self.engine

    def export(self) -> Path | None:
        """OUT/hf: the student as a Hugging Face directory with its item catalog (completed
        runs). Collective."""
        path = self._export_hf(
            use_mode_tokens=self.cfg.use_mode_tokens, loss=config_to_dict(self.cfg.loss)
        )
        if path is not None:
            run_on_main(save_item_catalog, path, self.catalog, phase="writing the item catalog")
            print0(f"exported the student to {path}")
        return path

    def _engines(self) -> list[Any]:
        return [*super()._engines(), self.teacher]


def _mean_ce(student_NV: Tensor, labels_N: Tensor) -> Tensor:
    """Cross-entropy of the rows, averaged over them (0 without rows)."""
    ce_sum = torch.nn.functional.cross_entropy(student_NV.float(), labels_N, reduction="sum")
    return ce_sum / max(len(labels_N), 1)


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
