"""The training core shared by every DeepSpeed job.

A job supplies a DeepSpeed engine, its data and up to four hooks; :class:`Trainer` runs
the loop (gradient accumulation from the engine's DeepSpeed config), logging, periodic
evaluation, step-numbered checkpoints with the data position, and exact resume.

Hooks (every rank calls every hook the same number of times, in the same order):

- ``loss_step(engine, batch) -> (loss, parts)``: the training objective of one micro batch.
  ``loss`` is a scalar tensor that the trainer passes to ``engine.backward``; ``parts`` are
  logged quantities (floats or 0-d tensors, averaged over micro batches and ranks), e.g.
  ``{"ce": ..., "kd": ..., "gate_mean": ...}``. Same keys on every rank and call.
- ``teacher_forward(batch, training) -> batch``: runs *before* each loss/eval step, on every
  rank, for every micro batch (padded evaluation batches included): the teachers' forwards
  (e.g. a ZeRO-3 teacher under ``torch.no_grad()``), whose outputs it puts into the batch.
  ZeRO-3 forwards are collective, so they must happen the same number of times on every
  rank, which the trainer guarantees by giving every rank the same number of micro batches
  in training (sampler padding) and evaluation (``is_pad`` rows).
- ``eval_step(engine, batch) -> sums``: per-batch *sums* (``{"nll": ..., "tokens": ...}``)
  that are added over batches and all-reduced over ranks; padded rows (``batch["is_pad"]``)
  must contribute nothing (their labels are already ``-100``).
- ``eval_metrics(sums) -> metrics``: turns the global sums into metrics (``val_ppl`` ...).

One optimizer step (:meth:`Trainer.train`): ``grad_accum`` times :meth:`Trainer.micro_step`
(teacher forward, loss, backward), then one all-reduce of three flags (a non-finite loss on
any rank, a pre-emption signal on any rank, ``train.save_every_minutes`` elapsed on any rank)
so that every rank takes the same decisions, then :meth:`Trainer.after_step` (the log row of
the window of steps since the last one, evaluation, checkpoint).

A step with a non-finite loss or gradient norm, or whose update DeepSpeed skipped, does not
count; ``train.max_nonfinite_steps`` of them in a row stop the job (``divergence.py``).

A pre-emption signal (SIGTERM or SIGUSR1 by default, any rank) makes every rank save a
checkpoint at the next step boundary and exit with code 75, for the job script to requeue it
(``preemption.py``).

Dropout randomness is reseeded before every micro batch from ``(seed, rank, micro index)``,
so a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from conkd_scale.data.sequences import IGNORE
from conkd_scale.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    print0,
    run_on_main,
)
from conkd_scale.training import preemption
from conkd_scale.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from conkd_scale.training.config import TrainConfig
from conkd_scale.training.data import Batch, DataPosition, TrainStream, iter_eval
from conkd_scale.training.divergence import (
    DivergenceCounter,
    engine_verdict,
    is_finite,
    nonfinite_params,
)
from conkd_scale.training.memtrace import TRACE, peak_memory_mib
from conkd_scale.training.metrics import JsonlLogger, MetricLogger, NullLogger, monitor_events
from conkd_scale.utils.errors import DivergenceError

LossStep = Callable[[Any, Batch], tuple[torch.Tensor, dict[str, Any]]]
EvalStep = Callable[[Any, Batch], dict[str, float]]
EvalMetrics = Callable[[dict[str, float]], dict[str, float]]
TeacherForward = Callable[[Batch, bool], Batch]
MicroStats = tuple[torch.Tensor, dict[str, Any], float, int]  # loss, parts, tokens, samples


# ----------------------------------------------------------------------------- default steps
def _device_of(engine: Any) -> torch.device:
    return getattr(engine, "device", None) or next(engine.parameters()).device


def lm_logits(engine: Any, batch: Batch) -> torch.Tensor:
    """``[B, T, V]`` logits of a causal LM engine for ``batch`` (one collective forward)."""
    dev = _device_of(engine)
    out = engine(
        input_ids=batch["input_ids"].to(dev),
        attention_mask=batch["attention_mask"].to(dev),
        use_cache=False,
    )
    return out.logits


def token_nll(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over positions whose (shifted) label is not ignored, and count."""
    logits_NV = logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1])
    labels_N = labels_BT[:, 1:].reshape(-1).to(logits_NV.device)
    nll = F.cross_entropy(logits_NV.float(), labels_N, ignore_index=IGNORE, reduction="sum")
    return nll, int((labels_N != IGNORE).sum())


def nll_loss_step(engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean NLL of the response tokens of one micro batch (the dialogue teacher's loss)."""
    logits_BTV = lm_logits(engine, batch)
    nll, n = token_nll(logits_BTV, batch["labels"])
    del logits_BTV
    loss = nll / max(n, 1)
    return loss, {"nll": loss.detach()}


@torch.no_grad()
def nll_eval_step(engine: Any, batch: Batch) -> dict[str, float]:
    logits_BTV = lm_logits(engine, batch)
    nll, n = token_nll(logits_BTV, batch["labels"])
    return {"nll": float(nll), "tokens": float(n)}


def ppl_metrics(sums: dict[str, float]) -> dict[str, float]:
    loss = sums["nll"] / max(sums["tokens"], 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": sums["tokens"]}


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Client optimizer: AdamW, weight decay on matrices only (``ds_shape`` under ZeRO-3)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    betas = (float(cfg.adam_betas[0]), float(cfg.adam_betas[1]))
    if cfg.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` for the update at optimizer step ``s`` (0-based)."""
    warm = cfg.warmup_steps

    def fn(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (s - warm) / max(1, total_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1 - frac
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return fn


def make_scheduler_factory(
    cfg: TrainConfig, total_steps: int
) -> Callable[[torch.optim.Optimizer], Any]:
    """For ``deepspeed.initialize(lr_scheduler=...)``: built on DeepSpeed's wrapped optimizer,
    stepped by the engine at each optimizer step and saved in its checkpoints."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))


def plan_steps(cfg: TrainConfig, n_train: int, world_size: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` worth of micro batches."""
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_train / world_size) / cfg.micro_batch)
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def peak_memory_mb(device: torch.device) -> float:
    """Peak of this rank so far: CUDA allocated bytes on a GPU, resident size on the CPU."""
    return peak_memory_mib(device.type == "cuda")


def _no_mark(phase: str, **extra: Any) -> None:
    pass


def _value(x: Any) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Runs the loop for one DeepSpeed engine; see the module docstring for the hooks."""

    def __init__(
        self,
        engine: Any,
        *,
        train_data: Sequence[Any],
        eval_data: Sequence[Any] | None,
        collate_fn: Callable[[list[Any]], Batch],
        cfg: TrainConfig,
        dist: DistInfo,
        out_dir: str | Path,
        total_steps: int,
        loss_step: LossStep = nll_loss_step,
        eval_step: EvalStep = nll_eval_step,
        eval_metrics: EvalMetrics = ppl_metrics,
        teacher_forward: TeacherForward | None = None,
        logger: MetricLogger | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.run_config = run_config  # saved in every checkpoint (resume_check.py)
        self.cfg = cfg
        self.dist = dist
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.total_steps = total_steps
        self.loss_step, self.eval_step, self.eval_metrics = loss_step, eval_step, eval_metrics
        self.teacher_forward = teacher_forward
        self.collate_fn = collate_fn
        self.eval_data = eval_data
        self.grad_accum = int(engine.gradient_accumulation_steps())
        self.stream = TrainStream(
            train_data,
            collate_fn,
            micro_batch=cfg.micro_batch,
            rank=dist.rank,
            world_size=dist.world_size,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            lengths=[len(x) for x in train_data] if cfg.group_by_length else None,
        )
        if logger is None:
            logger = JsonlLogger(self.out_dir / "metrics.jsonl") if dist.is_main else NullLogger()
        self.logger = logger
        # DeepSpeed's monitors (tensorboard / csv_monitor blocks of its config), rank 0
        monitor = getattr(engine, "monitor", None)
        self.monitor = monitor if dist.is_main and getattr(monitor, "enabled", False) else None
        self.step = 0
        self.samples_seen = 0.0  # global (all ranks), padded duplicates included
        self.tokens_seen = 0.0  # global non-padding input tokens
        self._pending = [0.0, 0.0]  # this rank's samples, tokens not yet added to the above
        self.last_saved = -1
        self.last_eval: dict[str, float] = {}
        self.stopped_early = False
        self.divergence = DivergenceCounter(cfg.max_nonfinite_steps)
        self._last_save_t = time.monotonic()
        preemption.install()  # SIGTERM/SIGUSR1 -> save, exit 75 at a step boundary

    # -- resume / save -------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Load the checkpoint chosen by ``train.resume`` (rank 0 decides). Collective."""
        path = run_on_main(
            resolve_resume,
            self.cfg.resume,
            self.ckpt_dir,
            phase="finding and verifying the checkpoint to resume from",
        )
        if path is None:
            return None
        meta = load_checkpoint(self.engine, path)
        self.step = int(meta["step"])
        self.last_saved = self.step
        pos = DataPosition(int(meta["epoch"]), int(meta["batch_offset"]), meta.get("epoch_done"))
        old_world = int(meta.get("world_size") or self.dist.world_size)
        if old_world != self.dist.world_size:
            # the rest of the epoch: the samples the old ranks had not read, over the new ranks
            pos = DataPosition(pos.epoch, 0, self.stream.used(pos, old_world))
            print0(
                f"resharded from {old_world} to {self.dist.world_size} ranks: epoch {pos.epoch} "
                f"goes on with the {len(self.stream.dataset) - len(pos.done or [])} samples it "
                "has not read yet"
            )
        self.stream.position = pos
        self.samples_seen = float(meta.get("samples_seen", 0))
        self.tokens_seen = float(meta.get("tokens_seen", 0))
        self.divergence.total = int(meta.get("nonfinite_steps", 0))
        if isinstance(self.logger, JsonlLogger):
            self.logger.truncate_after(self.step)
        print0(
            f"resumed from {path} at step {self.step} "
            f"(epoch {meta['epoch']}, batch {meta['batch_offset']})"
        )
        return path

    def _flush_counts(self) -> None:
        samples, tokens = all_reduce_sum(self._pending)
        self.samples_seen += samples
        self.tokens_seen += tokens
        self._pending = [0.0, 0.0]

    def check_finite(self, what: str) -> None:
        """Raise :class:`DivergenceError` on every rank if any rank holds a non-finite
        weight or the last validation loss is non-finite (collective)."""
        bad = nonfinite_params(getattr(self.engine, "module", self.engine))
        (n_bad,) = all_reduce_max([float(len(bad))])
        val = self.last_eval.get("val_loss")
        if n_bad == 0 and is_finite(val):
            return
        why = f"validation loss {val}" if n_bad == 0 else "non-finite weights"
        if bad:
            why += f" (this rank: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
        raise DivergenceError(
            f"training diverged at step {self.step}: {why}; not writing {what}. "
            + self._last_good_hint()
        )

    def _last_good_hint(self) -> str:
        last = latest_checkpoint(self.ckpt_dir)
        if last is None:
            return "No checkpoint was kept; start again with a lower train.lr."
        return (
            f"The last good checkpoint, {last}, is kept: resume from it (train.resume=auto) "
            "with a lower train.lr or another seed."
        )

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step with the data position (collective); refused with
        :class:`DivergenceError` when the weights or the validation loss are non-finite."""
        self.check_finite(f"a checkpoint of step {self.step}")
        self._flush_counts()
        path = save_checkpoint(
            self.engine,
            self.ckpt_dir,
            self.step,
            self.stream.position,
            keep_last=self.cfg.keep_last,
            extra={
                "samples_seen": self.samples_seen,
                "tokens_seen": self.tokens_seen,
                "total_steps": self.total_steps,
                "nonfinite_steps": self.divergence.total,
                **self.last_eval,
                **({"run_config": self.run_config} if self.run_config else {}),
            },
        )
        self.last_saved = self.step
        self._last_save_t = time.monotonic()
        return path

    def _stop_preempted(self) -> None:
        """Save (collective), log, and leave every rank with exit code 75 (preemption.py)."""
        if self.last_saved != self.step:
            self.save_checkpoint()
        self.logger.log({"kind": "preempted", "step": self.step, "total_steps": self.total_steps})
        print0(f"pre-empted: checkpoint saved at step {self.step}/{self.total_steps}; exiting")
        barrier()
        preemption.stop(self.step)  # raises SystemExit(75) on every rank

    def _log(self, row: dict[str, Any]) -> None:
        """A train/eval row to metrics.jsonl, then (as the logger completed it) to the
        DeepSpeed monitors when the config enables one."""
        self.logger.log(row)
        if self.monitor is not None:
            self.monitor.write_events(monitor_events(row))

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation metrics over the whole eval split (every sample once). Collective."""
        if not self.eval_data:
            return {}
        t0 = time.perf_counter()
        self.engine.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for batch in iter_eval(
                self.eval_data,
                self.collate_fn,
                micro_batch=self.cfg.micro_batch,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                max_batches=self.cfg.eval_max_batches,
            ):
                if self.teacher_forward is not None:
                    batch = self.teacher_forward(batch, False)
                for k, v in self.eval_step(self.engine, batch).items():
                    sums[k] = sums.get(k, 0.0) + _value(v)
        self.engine.train()
        keys = sorted(sums)
        total = dict(zip(keys, all_reduce_sum([sums[k] for k in keys]), strict=True))
        metrics = self.eval_metrics(total)
        self.last_eval = metrics
        self._log(
            {
                "kind": "eval",
                "step": self.step,
                **metrics,
                "eval_s": round(time.perf_counter() - t0, 3),
            }
        )
        print0(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    # -- training ------------------------------------------------------------------------
    def _seed_micro(self, micro_index: int) -> None:
        torch.manual_seed(hash((self.cfg.seed, self.dist.rank, micro_index)) & 0x7FFF_FFFF)

    def train(self) -> dict[str, Any]:
        """Train from ``self.step`` to ``total_steps`` (or ``stop_at_step``). Collective."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.engine.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.dist.is_main and cfg.progress),
            mininterval=2.0,
        )
        it = iter(self.stream)
        window = LogWindow(_device_of(self.engine))
        just_evaluated = False
        while self.step < self.total_steps:
            micro = [
                self.micro_step(next(it), self.step * self.grad_accum + i)
                for i in range(self.grad_accum)
            ]
            loss_bad = any(not is_finite(m[0]) for m in micro)
            # one all-reduce: every rank takes the same three decisions at this boundary
            loss_bad, preempted, time_due = (
                x > 0
                for x in all_reduce_max(
                    [float(loss_bad), float(preemption.flag()), float(self._save_time_due())]
                )
            )
            verdict = engine_verdict(self.engine, loss_bad)
            if self.divergence.record(verdict):
                bar.close()
                self._stop_diverged()
            if verdict.bad:
                self._log_nonfinite(verdict)
            else:
                for m in micro:
                    window.add(*m)
                self.step += 1
                bar.update(1)
                just_evaluated = self.after_step(window, bar, save_due=time_due)
            if preempted:  # every rank stops at this step
                bar.close()
                self._stop_preempted()
            if cfg.stop_at_step and self.step >= cfg.stop_at_step:
                self.stopped_early = self.step < self.total_steps
                break
        bar.close()
        if not self.stopped_early and not just_evaluated:
            self.evaluate()
        if self.last_saved != self.step:
            self.save_checkpoint()
        summary = {
            "kind": "final",
            "step": self.step,
            "stopped_early": self.stopped_early,
            "train_wall_s": time.perf_counter() - window.t_start,
            **self.last_eval,
        }
        self.logger.log(summary)
        return summary

    def micro_step(self, batch: Batch, micro_index: int) -> MicroStats:
        """One micro batch: teacher forward, loss, backward; the engine's ``step`` applies the
        update at the gradient-accumulation boundary. Returns what the log window adds."""
        self._seed_micro(micro_index)
        mark = TRACE.mark if self.step < self.cfg.memory_trace else _no_mark
        at = {"step": self.step, "micro": micro_index, "shape": list(batch["input_ids"].shape)}
        if self.teacher_forward is not None:
            batch = self.teacher_forward(batch, True)
            mark("teacher forward", **at)
        loss, parts = self.loss_step(self.engine, batch)
        mark("student forward + loss", **at)
        self.engine.backward(loss)
        mark("backward", **at)
        self.engine.step()
        mark("optimizer step", **at)
        n_tok, n_smp = float(batch["attention_mask"].sum()), batch["input_ids"].shape[0]
        self._pending[0] += n_smp
        self._pending[1] += n_tok
        return loss.detach(), parts, n_tok, n_smp

    def _save_time_due(self) -> bool:
        minutes = self.cfg.save_every_minutes
        return minutes > 0 and time.monotonic() - self._last_save_t >= 60 * minutes

    def _log_nonfinite(self, verdict: Any) -> None:
        d = self.divergence
        self.logger.log(
            {
                "kind": "nonfinite",
                "step": self.step,
                "consecutive": d.consecutive,
                "nonfinite_steps": d.total,
                "loss_nonfinite": verdict.loss_nonfinite,
                "grad_norm": verdict.grad_norm,
                "update_skipped": verdict.update_skipped,
            }
        )
        print0(
            f"warning: step after {self.step}: {verdict.describe()}; not counted "
            f"({d.consecutive} in a row, limit train.max_nonfinite_steps={d.limit})"
        )

    def _stop_diverged(self) -> None:
        """Log and raise :class:`DivergenceError` on every rank (no checkpoint is written)."""
        d = self.divergence
        self._log_nonfinite(d.last)
        self.logger.log({"kind": "diverged", "step": self.step, "nonfinite_steps": d.total})
        raise DivergenceError(
            f"training diverged: {d.consecutive} optimizer steps in a row after step "
            f"{self.step} were not finite (the last: {d.last.describe()}; limit "
            f"train.max_nonfinite_steps={d.limit}). " + self._last_good_hint()
        )

    def after_step(self, window: LogWindow, bar: Any, *, save_due: bool = False) -> bool:
        """At a counted optimizer-step boundary: log the window, evaluate and checkpoint, each
        when due (``save_due``: ``train.save_every_minutes`` elapsed, agreed by every rank).
        Collective; returns whether it evaluated."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            row = self.log_window(window)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        evaluated = bool(cfg.eval_every and self.step % cfg.eval_every == 0)
        if evaluated:
            self.evaluate()
        if save_due or (cfg.save_every and self.step % cfg.save_every == 0):
            self.save_checkpoint()
        return evaluated

    def log_window(self, window: LogWindow) -> dict[str, Any]:
        """The train row of the steps since the last one: every part averaged over micro
        batches and ranks, throughput over the window's wall time. Collective; resets it."""
        keys = sorted(window.parts)
        sums = all_reduce_sum(
            [
                _value(window.loss),
                window.micro,
                window.tokens,
                window.samples,
                *[_value(window.parts[k]) for k in keys],
            ]
        )
        (peak,) = all_reduce_max([peak_memory_mb(window.device)])
        dt = max(time.perf_counter() - window.t_window, 1e-9)
        self._flush_counts()
        row = {
            "kind": "train",
            "step": self.step,
            "epoch": self.stream.position.epoch,
            "loss": sums[0] / sums[1],
            **{k: v / sums[1] for k, v in zip(keys, sums[4:], strict=True)},
            "lr": float(self.engine.get_lr()[0]),
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": sums[2] / dt,
            "samples_per_s": sums[3] / dt,
            "peak_mem_mb": peak,
            "elapsed_s": time.perf_counter() - window.t_start,
            "nonfinite_steps": self.divergence.total,
        }
        self._log(row)
        window.reset()
        return row


class LogWindow:
    """This rank's sums over the micro batches since the last train row."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t_start = time.perf_counter()  # when training started (elapsed_s)
        self.t_window = self.t_start  # when this window started (throughput)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)  # no sync per batch
        self.parts: dict[str, Any] = {}
        self.micro, self.tokens, self.samples = 0, 0.0, 0.0

    def reset(self) -> None:
        self.loss.zero_()
        self.parts, self.micro, self.tokens, self.samples = {}, 0, 0.0, 0.0
        self.t_window = time.perf_counter()

    def add(self, loss: torch.Tensor, parts: dict[str, Any], tokens: float, samples: int) -> None:
        self.loss += loss.detach().double()
        for k, v in parts.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
            self.parts[k] = self.parts.get(k, 0.0) + v
        self.micro += 1
        self.tokens += tokens
        self.samples += samples
