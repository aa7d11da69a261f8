"""Run config of ``launch/distill.py`` (``--config FILE`` and ``key=value`` overrides).

With no config at all the job runs the built-in default: the synthetic corpus (generated if
missing), teachers trained first if their directories are missing, a ``tiny`` student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conkd_scale.data.synthetic import DEFAULT_DIR as DEFAULT_SYNTHETIC_DIR
from conkd_scale.loss.config import LossConfig
from conkd_scale.models.builder import ModelConfig
from conkd_scale.models.families import check_pretrained_dir, looks_like_path
from conkd_scale.training.config import TrainConfig, check_sequence_run
from conkd_scale.utils.errors import ConfigError


def _default_train() -> TrainConfig:
    return TrainConfig(
        micro_batch=8,
        lr=2e-3,
        warmup_steps=20,
        epochs=4.0,
        eval_every=50,
        save_every=50,
        log_every=5,
    )


@dataclass
class TeacherConfig:
    """Where the two teachers live and how to get them (``teachers.<field>``)."""

    rec_dir: str | None = None  # R's training dir; None: runs/teachers/<dataset>/rec
    dialog_dir: str | None = None  # D's training dir (uses <dir>/hf) or any HF model dir;
    # None: runs/teachers/<dataset>/dialog
    auto_train: bool = True  # train a missing teacher first (False: a clear error instead)
    rec_config: str | None = None  # JSON/YAML file of R's settings (e.g.
    # configs/rec_teacher_redial.json, chosen on validation); the run's data and rec_overrides win
    rec_overrides: list[str] = field(default_factory=list)  # key=value for R's training
    dialog_preset: str = "mini"  # D's size preset when auto-trained (a larger D than the student)
    dialog_pretrained: str | None = None  # or the local checkpoint an auto-trained D starts
    # from (model.pretrained of D's training, e.g. DialoGPT-large); the preset is then unused
    dialog_overrides: list[str] = field(default_factory=list)  # key=value for D's training
    # (e.g. train.epochs=8,model.vocab_size=8000)
    dialog_train_ds_config: str = "ds_configs/zero3.json"  # DeepSpeed config to train D
    inference_ds_config: str = "ds_configs/zero3_inference.json"  # D's frozen, sharded engine
    dialog_attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # D's
    # attention kernel in the distillation job (its training uses model.attn_implementation)
    mode: Literal["online", "offline"] = "online"  # online: D runs in lockstep with the
    # student; offline: D's top-k, its exact gate and R's distributions are read from the
    # teacher cache in cache_dir (written by launch/cache_teachers.py), and D is never built
    cache_dir: str | None = None  # the teacher cache; None: runs/cache/<dataset>
    cache_k: int = 64  # D's top-k tokens kept per response token (the gate m_t stays exact;
    # at τ = 1, k = 64 changes the ReDial loss by -1.5%: bench/results/sparse_kl.md)
    cache_tail_samples: int = 0  # of the cache_k slots, how many hold draws from D's tail
    # (with replacement, each draw r/S of mass) rather than the next top tokens: the sparse
    # loss's gradient is then unbiased for the full distribution at τ = 1 (loss/sparse.py);
    # for a flat D use cache_k / 2 (ReDial: top-k students lose ~1 PPL, these do not)
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage of D's
    # top-k log-probabilities and R's probabilities (ids: uint16 when |U| <= 65,536, else int32)
    cache_rec_topk: int = 0  # R per recommender turn: 0 = its full item distribution; k > 0:
    # its top-k and the tail mass, spread evenly over the other items when read
    cache_shard_sequences: int = 256  # sequences per shard file of the cache

    def __post_init__(self) -> None:
        for key, lo in (
            ("cache_k", 1),
            ("cache_tail_samples", 0),
            ("cache_rec_topk", 0),
            ("cache_shard_sequences", 1),
        ):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"teachers.{key}: {v!r} must be an integer >= {lo}")
        if self.cache_tail_samples > self.cache_k:
            raise ConfigError(
                f"teachers.cache_tail_samples={self.cache_tail_samples} exceeds "
                f"teachers.cache_k={self.cache_k}: the draws fill some of the k slots; set it "
                f"<= {self.cache_k}"
            )


@dataclass
class DistillConfig:
    """ConKD distillation: student ← gated (D, R) KD + CE (METHOD.md, "The student loss")."""

    dataset: Literal["redial", "inspired", "synthetic"] = "synthetic"
    data_dir: str | None = None  # None: runs/data/synthetic (generated if missing)
    synthetic_seed: int = 0  # seed of the generated synthetic corpus
    kg: Literal["kbrd", "dbpedia", "none"] | None = None  # R's KG (None: the dataset's default)
    output_dir: str = "runs/distill"
    max_length: int = 256  # tokens per training sequence (whole conversations, windowed)
    use_mode_tokens: bool = True  # [REC]/[GEN] mode tokens (ablation: false)
    context_budget: int | None = None  # context tokens carried into a later window (max/4)
    max_train_conversations: int = 0  # 0: all
    export: bool = True  # write OUT/hf (Hugging Face directory) at the end
    debug_dump_dir: str | None = None  # write the initial student (gathered), each rank's
    # micro batches of the first optimizer step with their losses, and the accumulated
    # gradient before that step there, to check against the reference loss and gradient
    student: ModelConfig = field(default_factory=lambda: ModelConfig.for_key("student"))
    # a preset or a pretrained directory; the tokenizer is always D's, so a pretrained student
    # must share D's base vocabulary (models/families.py)
    teachers: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        check_sequence_run(self.dataset, self.data_dir, self.max_length, self.student, "student")
        self._check_dialog_source()
        t = self.teachers
        if t.mode == "offline" and t.cache_tail_samples and self.loss.tau != 1.0:
            raise ConfigError(
                f"teachers.cache_tail_samples={t.cache_tail_samples} needs "
                f"loss.tau=1 (got {self.loss.tau:g}): drawn tail slots estimate D's "
                "untempered distribution; set loss.tau=1 or teachers.cache_tail_samples=0"
            )

    def _check_dialog_source(self) -> None:
        """A D still to be trained from a local checkpoint (``teachers.dialog_pretrained``,
        or ``model.pretrained=DIR`` in ``teachers.dialog_overrides``) is checked now, on every
        rank, not after the first collective."""
        from conkd_scale.distill.teachers import dialog_trained

        if not self.teachers.auto_train or dialog_trained(self.dialog_dir):
            return
        sources = [("teachers.dialog_pretrained", self.teachers.dialog_pretrained)]
        for ov in self.teachers.dialog_overrides:
            key, _, value = ov.partition("=")
            if key.strip() == "model.pretrained":
                sources.append(("teachers.dialog_overrides: model.pretrained", value.strip()))
        for key, value in sources:
            if value and (Path(value).expanduser().is_dir() or looks_like_path(value)):
                check_pretrained_dir(value, key)

    @property
    def resolved_data_dir(self) -> str:
        return self.data_dir or DEFAULT_SYNTHETIC_DIR

    @property
    def rec_dir(self) -> Path:
        return Path(self.teachers.rec_dir or f"runs/teachers/{self.dataset}/rec")

    @property
    def dialog_dir(self) -> Path:
        return Path(self.teachers.dialog_dir or f"runs/teachers/{self.dataset}/dialog")

    @property
    def cache_dir(self) -> Path:
        return Path(self.teachers.cache_dir or f"runs/cache/{self.dataset}")

    @property
    def offline(self) -> bool:
        """D (and R) are read from the teacher cache; only when a teacher is used at all."""
        return self.teachers.mode == "offline" and self.uses_teachers

    @property
    def uses_teachers(self) -> bool:
        """False for the one-hot multi-task baseline (w_kd = 0): no teacher forward at all."""
        return self.loss.w_kd > 0
