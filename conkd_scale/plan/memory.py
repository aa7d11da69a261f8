"""Per-device memory and step time of a distillation job, from its sizes alone.

Model states follow DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs``,
``estimate_zero2_model_states_mem_needs``; ``tests/test_plan.py`` checks the agreement): in
mixed precision (bf16) a parameter costs 2 bytes of 16-bit weight, 4 of fp32 gradient and 12
of optimizer state (fp32 master, Adam's two moments), i.e. DeepSpeed's 18; under ZeRO-3 each
rank holds 1/world of them plus the largest layer gathered (16-bit weights and gradients).
In fp32 (the CPU runs) DeepSpeed still keeps the fp32 master as a copy beside the weight
partition (see :func:`student_states`): 4 + 4 + 12 bytes.

The rest is the job's own layout (``conkd_scale/distill/recipe.py``), per micro batch of
``B`` sequences of ``T`` tokens and ``N = loss_rows_fraction·B·T`` loss rows:

- **activations**: what autograd keeps per transformer layer (after Korthikanti et al.
  2022; GPT-2 counted tensor by tensor on Hugging Face's ``GPT2Block``: ``e·B·T·(8h + 5i)``,
  its tanh GeLU keeping four ``[B, T, i]`` tensors, plus two dropout masks, bool on a GPU and
  float on the CPU; a gated MLP ``e·B·T·((7+3r)h + 4i)`` with ``r`` = kv heads / heads; no
  ``T²`` term under a fused SDPA kernel, ``a·T²·B`` bytes per softmax (and its dropout mask
  and output) under eager attention, and under SDPA on the CPU with dropout, which runs
  torch's math path); with activation checkpointing one layer input per layer plus one
  layer recomputed;
- **logits**: the student's ``[B, T, V]`` (transient) and its ``[N, V]`` rows, D's ``[N, V]``
  rows (online) or its top-k rows (offline: ids, log-probs);
- **loss buffers** by ``loss.impl`` (FINDINGS.md / BENCHMARKS.md measured them): reference
  ≈ 8 fp32 ``[N, V]`` temporaries; chunked (the CPU path, gradient written into the logits
  buffer) ≈ 2.5 fp32 ``[C, V]`` scratch rows; fused_linear the same without ``[N, V]``
  student logits; triton none beyond a few ``[N]`` vectors;
- **teacher**: D's ZeRO-3 shard, its gathered layer and prefetch, and the transient of its
  forward (its ``[B, T, V]`` logits, one layer's activations), which is over before the
  student's forward starts;
- **live gathered parameters** (ZeRO-3): with ``stage3_max_reuse_distance`` ≥ the model
  (DeepSpeed's default 1e9) the backward's reuse keeps every gathered student parameter until
  it runs, so the whole student is gathered at the end of the forward, up to
  ``stage3_max_live_parameters``; else the prefetch bucket (:func:`live_gathered`);
- **optimizer step**: the flat fp32 gradient DeepSpeed hands the optimizer and the fp32
  temporaries of AdamW's update (3 copies of the rank's partition on the CPU, 2 on a GPU);
- **communication buckets** from the DeepSpeed JSON (``reduce_bucket_size``, below stage 3
  ``allgather_bucket_size``): allocated whole on a GPU; on the CPU only the pages filled are
  resident, at most the model's own size;
- **overhead**: on the CPU the fixed resident size of a rank (``CPU_OVERHEAD_MIB``,
  measured); on a GPU the CUDA context is outside ``torch.cuda.max_memory_allocated`` and is
  kept out of the usable memory (``reserve``).

On a GPU the phases whose transients never coexist are the student's forward and backward
(activations, logits, loss buffers), D's forward and the optimizer step; the peak is the
states plus the largest. On a CPU rank (where ``peak_mem_mb`` is the resident set) glibc keeps
the heap pages of freed tensors below its 32 MiB mmap threshold: the forward's activations,
logits, loss buffers and gathered student stay resident, or, where they are more, the pages
of D's state dict that every rank reads whole before partitioning it. The transients on top
are ZeRO-3's all-gathers (after the first step a forward's first fetch gathers every live
parameter at once, in blocks mapped afresh, and gloo stages each all-gather in a copy of up
to a prefetch bucket), the gradient reduce-scatter (DeepSpeed's concatenated bucket and
gloo's copy of it), D's forward with its own all-gather, or the optimizer step. Measured by
phase with ``train.memory_trace``, the plan is within 10% of the resident peak for 0.2-86 M
students and a 203 M D (``bench/results/plan_vs_measured.md``, by
``bench/plan_vs_measured.py``).

Step time = FLOPs per device per optimizer step / the stated FLOP rate: the student's
``6·P·tokens`` (8 with activation checkpointing) plus attention ``12·L·T·h`` per token, D's
forward ``2·P·tokens + 4·L·T·h`` per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from conkd_scale.plan.arch import ModelSpec
from conkd_scale.utils.errors import ConfigError

GIB = 2**30
MIB = 2**20
# fixed resident size of a CPU rank: Python, torch, DeepSpeed, transformers, gloo, the
# tokenizer, the corpus, R, and what DeepSpeed's engine and the first steps add whatever the
# model. Measured (bench/plan_vs_measured.py, bench/results/plan_vs_measured.md): the 2-rank
# job with the 0.2 M-parameter `tiny` student peaks at 552 MiB, of which the planner's
# size-dependent terms are 13. A job that first trains its missing teachers in the same
# process (teachers.auto_train) keeps ~100 MiB more.
CPU_OVERHEAD_MIB = 540.0
# achieved FLOP rate per device when none is given: ~40% of an H100/H200's dense bf16 peak
# (989 TFLOP/s) on a GPU; one core of these 2-core VMs in fp32 on the CPU (bench_scale.py)
DEFAULT_FLOPS = {"gpu": 4.0e14, "cpu": 2.0e10}
GPU_RESERVE_GIB = 1.5  # CUDA context, NCCL buffers and allocator fragmentation
LOSS_IMPLS = ("auto", "reference", "chunked", "triton", "fused_linear")


@dataclass(frozen=True)
class ZeroSettings:
    """What the planner reads from a DeepSpeed JSON config."""

    stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    bf16: str | bool = "auto"

    @classmethod
    def from_ds_config(cls, raw: dict[str, Any]) -> ZeroSettings:
        z = raw.get("zero_optimization", {}) or {}

        def offloaded(key: str) -> bool:
            dev = (z.get(key) or {}).get("device", "none")
            return str(dev).lower() in ("cpu", "nvme")

        return cls(
            stage=int(z.get("stage", 0)),
            offload_optimizer=offloaded("offload_optimizer"),
            offload_param=offloaded("offload_param"),
            reduce_bucket_size=int(z.get("reduce_bucket_size", 500_000_000)),
            allgather_bucket_size=int(z.get("allgather_bucket_size", 500_000_000)),
            prefetch_bucket_size=int(z.get("stage3_prefetch_bucket_size", 50_000_000)),
            max_live_parameters=int(z.get("stage3_max_live_parameters", 1_000_000_000)),
            max_reuse_distance=int(z.get("stage3_max_reuse_distance", 1_000_000_000)),
            bf16=(raw.get("bf16") or {}).get("enabled", False),
        )


@dataclass(frozen=True)
class PlanInput:
    """One job to size (every field is a planner flag, see ``python -m conkd_scale.plan -h``)."""

    student: ModelSpec
    teacher: ModelSpec | None  # None: no teacher forward (w_kd = 0)
    zero: ZeroSettings = field(default_factory=ZeroSettings)
    teacher_zero: ZeroSettings = field(default_factory=ZeroSettings)  # D's inference config
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_mem_gib: float = 80.0
    device: Literal["gpu", "cpu"] = "gpu"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seq_len: int = 256
    micro_batch: int = 1
    grad_accum: int = 1
    loss_impl: str = "auto"
    chunk_size: int = 1024
    loss_rows_fraction: float = 1.0  # share of the positions that carry loss (≤ 1)
    activation_checkpointing: bool = False
    attention: Literal["sdpa", "eager"] = "sdpa"
    teacher_mode: Literal["online", "offline"] = "online"
    topk: int = 64  # offline teacher: top-k entries per loss row
    flops_per_s: float | None = None  # achieved per device; None: DEFAULT_FLOPS[device]
    reserve_gib: float | None = None  # kept free; None: GPU_RESERVE_GIB on a GPU, 0 on a CPU
    overhead_mib: float | None = None  # None: CPU_OVERHEAD_MIB on a CPU, 0 on a GPU

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        """Bytes of a weight/activation: 2 in bf16, 4 in fp32 (``auto``: bf16 on a GPU when
        the DeepSpeed config enables or autodetects it, fp32 on the CPU)."""
        if self.precision == "auto":
            bf16 = self.device == "gpu" and self.zero.bf16 in (True, "auto")
            return 2 if bf16 else 4
        return 2 if self.precision == "bf16" else 4

    @property
    def resolved_impl(self) -> str:
        if self.loss_impl != "auto":
            return self.loss_impl
        if self.device == "cpu":
            return "chunked"
        return "fused_linear" if self.teacher is not None else "triton"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag of each invalid field."""
        ints = {
            "--nodes": self.nodes,
            "--gpus-per-node": self.gpus_per_node,
            "--seq-len": self.seq_len,
            "--micro-batch": self.micro_batch,
            "--grad-accum": self.grad_accum,
            "--chunk-size": self.chunk_size,
            "--topk": self.topk,
        }
        for flag, v in ints.items():
            if v < 1:
                raise ConfigError(f"{flag}: expected an integer >= 1, got {v}")
        if not self.gpu_mem_gib > 0:
            raise ConfigError(f"--gpu-mem-gib: expected > 0, got {self.gpu_mem_gib}")
        if not 0 < self.loss_rows_fraction <= 1:
            raise ConfigError(
                f"--loss-rows-fraction: expected in (0, 1], got {self.loss_rows_fraction}"
            )
        if self.loss_impl not in LOSS_IMPLS:
            raise ConfigError(f"--loss-impl: {self.loss_impl!r} is not one of {list(LOSS_IMPLS)}")
        if self.loss_impl == "triton" and self.device == "cpu":
            raise ConfigError("--loss-impl triton needs a CUDA GPU (--device gpu), not the CPU")
        if self.flops_per_s is not None and not self.flops_per_s > 0:
            raise ConfigError(f"--tflops: expected > 0, got {self.flops_per_s / 1e12}")
        if self.zero.stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage: expected 0-3, got {self.zero.stage}")
        if self.zero.offload_param and self.zero.stage != 3:
            raise ConfigError("offload_param needs ZeRO stage 3 (--zero-stage 3)")
        for who, m in (("student", self.student), ("teacher", self.teacher)):
            if m is not None and m.max_positions and self.seq_len > m.max_positions:
                raise ConfigError(
                    f"--seq-len {self.seq_len} exceeds the {who}'s {m.max_positions} positions "
                    f"({m.source}): shorten it or pick a model with a longer context"
                )
        if self.teacher is None and self.teacher_mode == "offline":
            raise ConfigError("--teacher-mode offline needs a --teacher (whose cache it reads)")


@dataclass
class Plan:
    """Per-device bytes by component, the verdict and the step-time estimate."""

    inp: PlanInput
    parts: dict[str, float]  # component -> bytes on one device at the peak
    peak_phase: str  # "student", "teacher forward" or "optimizer step"
    total: float  # bytes per device at the peak
    usable: float  # device memory minus the reserve
    host_per_node: float  # offloaded model states per node (DeepSpeed's estimate / 1.5)
    flops_per_step: float  # per device, one optimizer step
    step_time_s: float
    tokens_per_s: float  # all devices
    max_micro_batch: int  # the largest that fits at this world size (0: none)
    min_world: int | None = None  # the fewest devices (whole nodes) that fit, if not this one

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    @property
    def model_states(self) -> float:
        """Student parameters, gradients, optimizer and gathered layer on one device: the
        figure DeepSpeed's estimator gives (its ``gpu_mem``)."""
        keys = ("params", "gradients", "optimizer", "gathered layer")
        return sum(self.parts[k] for k in keys)


# ------------------------------------------------------------------------- components
def student_states(inp: PlanInput) -> dict[str, float]:
    """Student parameters, gradients, optimizer states and gathered layer per device, and
    the offloaded part per device (``host``)."""
    m, z, G = inp.student, inp.zero, inp.world
    P, L, e = m.params, m.largest_layer_params, inp.dtype_bytes
    mixed = e == 2
    grad_b = 4  # fp32 gradient partitions (DeepSpeed counts them in mixed precision too)
    # fp32 master copy + Adam's moments. In fp32 too: stage 1/2 clone the master, and stage 3
    # reuses the weight partition only if its device equals the string device name, which a
    # torch.device never does (deepspeed 0.19.8, stage3.py _create_fp32_partitions)
    opt_b = 12
    s = {"params": e * P, "gradients": grad_b * P, "optimizer": opt_b * P}
    gathered = 0.0
    if z.stage == 3:
        s = {k: v / G for k, v in s.items()}
        gathered = 2 * e * L  # a gathered layer's 16-bit weights and gradients
    elif z.stage == 2:
        s["gradients"] = (grad_b + e) * P / G  # DeepSpeed: 16-bit + fp32 gradients
        s["optimizer"] /= G
        if not mixed:
            s["gradients"] = grad_b * P / G
    elif z.stage == 1:
        s["optimizer"] /= G
    host = 0.0
    if z.offload_optimizer:
        host += s["gradients"] + s["optimizer"]
        s["gradients"] = s["optimizer"] = 0.0
    if z.offload_param:
        host += s["params"]
        s["params"] = 0.0
    return {**s, "gathered layer": gathered, "host": host}


def comm_buckets(inp: PlanInput) -> float:
    """Reduce (and, below stage 3, gather) buckets of the student's ZeRO config: allocated
    whole on a GPU, only the filled pages resident on a CPU."""
    z, P, e = inp.zero, inp.student.params, inp.dtype_bytes

    def sized(n: int) -> float:
        return e * (min(n, P) if inp.device == "cpu" else n)

    if z.stage == 3:
        return sized(z.reduce_bucket_size)
    if z.stage in (1, 2):
        return sized(z.reduce_bucket_size) + sized(z.allgather_bucket_size)
    return 0.0


def optimizer_step_bytes(inp: PlanInput) -> float:
    """Temporaries of the optimizer step where the optimizer runs (not offloaded, or on the
    CPU rank itself), partition-sized fp32 tensors: DeepSpeed's flat fp32 gradient of the
    partition (``_prepare_fp32_grad_for_sub_group``) and what torch's AdamW builds from it:
    on CPU tensors its single-tensor form keeps two (the square root of the second moment,
    its quotient by the bias correction), on CUDA its foreach form one."""
    if inp.zero.offload_optimizer and inp.device == "gpu":
        return 0.0
    shard = inp.world if inp.zero.stage >= 1 else 1
    copies = 3 if inp.device == "cpu" else 2
    return copies * 4 * inp.student.params / shard


def cpu_gather_bytes(m: ModelSpec, z: ZeroSettings, e: int) -> float:
    """CPU ranks, ZeRO-3, once its first step has recorded the trace: the forward's first
    fetch gathers every parameter the step keeps live (up to ``stage3_max_live_parameters``)
    in flat buffers too large for glibc's heap (mapped afresh, beside the heap pages that
    earlier gathers left), and gloo stages each all-gather call (at most a prefetch bucket)
    in a copy of its output."""
    if z.stage != 3:
        return 0.0
    live = e * min(m.params, z.max_live_parameters)
    return live + e * min(m.params, z.prefetch_bucket_size)


def gather_bytes(inp: PlanInput) -> float:
    """The student's all-gather transient on a CPU rank (:func:`cpu_gather_bytes`)."""
    if inp.device != "cpu":
        return 0.0
    return cpu_gather_bytes(inp.student, inp.zero, inp.dtype_bytes)


def reduce_scatter_bytes(inp: PlanInput) -> float:
    """CPU ranks, ZeRO-3: reducing a full gradient bucket (``reduce_bucket_size`` elements,
    at most the model) copies it twice: DeepSpeed's ``reduce_scatter_coalesced`` concatenates
    the bucket's partitions, and gloo reduces a copy of that."""
    if inp.device != "cpu" or inp.zero.stage != 3:
        return 0.0
    return 2 * inp.dtype_bytes * min(inp.zero.reduce_bucket_size, inp.student.params)


def live_gathered(m: ModelSpec, z: ZeroSettings, e: int, training: bool) -> float:
    """ZeRO-3 parameters gathered at once beyond the largest layer. DeepSpeed releases a
    gathered parameter after its module only if the rest of the step's trace does not use it
    again within ``stage3_max_reuse_distance`` elements; in training the backward reuses every
    parameter of the forward, so with a reuse distance ≥ the model (DeepSpeed's default
    1e9) the whole model stays gathered up to ``stage3_max_live_parameters``. Otherwise (and
    in D's forward-only trace) what is live is the prefetch bucket."""
    if z.stage != 3:
        return 0.0
    prefetch = min(z.prefetch_bucket_size, z.max_live_parameters)
    if training and z.max_reuse_distance >= m.params:
        return e * min(m.params, z.max_live_parameters)
    return e * min(m.params, prefetch)


def layer_activation_bytes(
    m: ModelSpec, b: int, s: int, e: int, attention: str, device: str = "gpu"
) -> float:
    """What autograd keeps for one transformer layer of ``m`` (see the module docstring)."""
    h, i, a = m.hidden, m.intermediate, m.n_head
    if m.gated_mlp:
        r = m.n_kv_head / m.n_head
        per = e * b * s * ((7 + 3 * r) * h + 4 * i)
    else:
        # inputs of the 2 norms and 3 h-wide linears, q/k/v, the MLP's c_proj input, and
        # the 4 [B, T, i] tensors of GPT-2's tanh GeLU (gelu_new, written in torch ops)
        per = e * b * s * (8 * h + 5 * i)
    mask_b = e if device == "cpu" else 1  # torch's CPU dropout keeps a float mask
    if m.dropout > 0:
        per += 2 * mask_b * b * s * h  # residual dropout masks
    # CPU SDPA with dropout runs torch's math path, which keeps the attention probabilities
    if attention == "eager" or (device == "cpu" and m.dropout > 0):
        per += a * s * s * b * (e + (mask_b + e if m.dropout > 0 else 0))
    else:
        per += 4 * a * s * b  # logsumexp of the fused kernel
    return per


def activation_bytes(inp: PlanInput, b: int) -> float:
    m, s, e = inp.student, inp.seq_len, inp.dtype_bytes
    layer = layer_activation_bytes(m, b, s, e, inp.attention, inp.device)
    edges = 2 * e * b * s * m.hidden  # embedding output, final norm input
    if inp.activation_checkpointing:
        return m.n_layer * e * b * s * m.hidden + layer + edges
    return m.n_layer * layer + edges


def loss_rows(inp: PlanInput, b: int) -> int:
    return max(1, math.ceil(inp.loss_rows_fraction * b * (inp.seq_len - 1)))


def logits_and_loss(inp: PlanInput, b: int) -> tuple[float, float]:
    """(logits, loss buffers) bytes at the student's peak."""
    V, e, impl = inp.student.vocab, inp.dtype_bytes, inp.resolved_impl
    N, BTV = loss_rows(inp, b), b * inp.seq_len * V
    C = min(inp.chunk_size, N)
    if inp.teacher is None:
        teacher_rows = 0.0
    elif inp.teacher_mode == "offline":
        teacher_rows = N * inp.topk * (8 + 4) + 4 * N  # ids, log-probs, item mass
    else:
        teacher_rows = N * V * e
    if inp.teacher is None:  # CE only: cross-entropy on the [B, T, V] logits
        return BTV * e + N * V * 4, 0.0
    buffers = {
        "reference": 8.0 * N * V * 4,
        "chunked": 2.5 * C * V * 4,
        "fused_linear": 2.5 * C * V * 4,
        "triton": 16.0 * N,
    }[impl]
    if impl == "fused_linear":  # no student logits: its lm_head runs chunk by chunk
        return teacher_rows, buffers
    student_rows = N * V * e
    # the [B, T, V] logits live while the rows are cut (forward) and again as their
    # gradient (backward); the loss buffers live in between
    transient = max(BTV * e - buffers, 0.0)
    return student_rows + teacher_rows + transient, buffers


def teacher_parts(inp: PlanInput, b: int) -> tuple[float, float, float]:
    """D's (shard, gathered layer and prefetch, transient of its forward) bytes; on a CPU
    rank the transient includes its all-gather (:func:`cpu_gather_bytes`)."""
    t = inp.teacher
    if t is None or inp.teacher_mode == "offline":
        return 0.0, 0.0, 0.0
    e, z = inp.dtype_bytes, inp.teacher_zero
    if z.stage == 3:
        shard = e * t.params / inp.world
        gathered = e * t.largest_layer_params + live_gathered(t, z, e, training=False)
    else:
        shard, gathered = e * t.params, 0.0
    s = inp.seq_len
    transient = e * b * s * t.vocab + e * b * s * (4 * t.hidden + 2 * t.intermediate)
    if inp.device == "cpu":
        transient += cpu_gather_bytes(t, z, e)
    return shard, gathered, transient


def teacher_load_bytes(inp: PlanInput) -> float:
    """CPU ranks: every rank reads D's whole fp32 state dict before partitioning it, tensor
    by tensor on glibc's heap, which keeps those pages; the student's forward reuses them."""
    t = inp.teacher
    if inp.device != "cpu" or t is None or inp.teacher_mode == "offline":
        return 0.0
    return 4.0 * t.params


def flops_per_step(inp: PlanInput) -> float:
    """Model FLOPs per device per optimizer step (student training + D's forward)."""
    tokens = inp.micro_batch * inp.seq_len
    m, s = inp.student, inp.seq_len
    k = 8 if inp.activation_checkpointing else 6
    f = k * m.matmul_params * tokens + (k * 2) * m.n_layer * s * m.hidden * tokens
    t = inp.teacher
    if t is not None and inp.teacher_mode == "online":
        f += 2 * t.matmul_params * tokens + 4 * t.n_layer * s * t.hidden * tokens
    return float(f * inp.grad_accum)


def training_flops_per_token(inp: PlanInput) -> float:
    """The student's 6·P (+ attention) per token: the numerator of model FLOPs utilisation."""
    m = inp.student
    return 6.0 * m.matmul_params + 12.0 * m.n_layer * inp.seq_len * m.hidden


# ------------------------------------------------------------------------- the estimate
def _total(inp: PlanInput, b: int) -> tuple[dict[str, float], str, float]:
    st = student_states(inp)
    t_shard, t_gathered, t_trans = teacher_parts(inp, b)
    logits, loss = logits_and_loss(inp, b)
    overhead = inp.overhead_mib
    if overhead is None:
        overhead = CPU_OVERHEAD_MIB if inp.device == "cpu" else 0.0
    parts = {
        "params": st["params"],
        "gradients": st["gradients"],
        "optimizer": st["optimizer"],
        "gathered layer": st["gathered layer"],
        "live gathered params": live_gathered(inp.student, inp.zero, inp.dtype_bytes, True),
        "activations": activation_bytes(inp, b),
        "logits": logits,
        "loss buffers": loss,
        "teacher shard": t_shard,
        "teacher gathered": t_gathered,
        "teacher forward": t_trans,
        "teacher load (heap kept)": 0.0,
        "comm buckets": comm_buckets(inp),
        "parameter all-gather": gather_bytes(inp),
        "gradient reduce-scatter": reduce_scatter_bytes(inp),
        "optimizer step": optimizer_step_bytes(inp),
        "framework": overhead * MIB,
    }
    # transients that never coexist: the peak is the base plus the largest
    phases: dict[str, tuple[str, ...]] = {
        "student": ("activations", "logits", "loss buffers"),
        "teacher forward": ("teacher forward",),
        "optimizer step": ("optimizer step",),
    }
    if inp.device == "cpu":
        parts["offloaded states"] = st["host"]  # the same process memory
        # glibc keeps the heap pages of the forward's tensors (each below its 32 MiB mmap
        # threshold) after they are freed: activations, logits, loss buffers and the
        # gathered parameters stay resident, under the transients of the later phases; so
        # do the pages of D's state dict where they are more
        del phases["student"]
        heap = sum(parts[k] for k in ("activations", "logits", "loss buffers"))
        heap += parts["live gathered params"]
        parts["teacher load (heap kept)"] = max(0.0, teacher_load_bytes(inp) - heap)
        phases["parameter all-gather"] = ("parameter all-gather",)
        phases["gradient reduce-scatter"] = ("gradient reduce-scatter",)
    size = {k: sum(parts[x] for x in v) for k, v in phases.items()}
    phase = max(size, key=lambda k: size[k])
    for k, v in phases.items():
        if k != phase:
            for x in v:
                parts[x] = 0.0
    return parts, phase, sum(parts.values())


def estimate(inp: PlanInput) -> Plan:
    """The plan of ``inp``; raises :class:`ConfigError` when nothing can fit."""
    inp.validate()
    reserve = inp.reserve_gib
    if reserve is None:
        reserve = GPU_RESERVE_GIB if inp.device == "gpu" else 0.0
    usable = inp.gpu_mem_gib * GIB - reserve * GIB
    if usable <= 0:
        raise ConfigError(
            f"--gpu-mem-gib {inp.gpu_mem_gib} leaves nothing after the {reserve} GiB reserve "
            "(--reserve-gib)"
        )
    parts, phase, total = _total(inp, inp.micro_batch)
    rate = inp.flops_per_s or DEFAULT_FLOPS[inp.device]
    flops = flops_per_step(inp)
    step_s = flops / rate
    tokens = inp.micro_batch * inp.seq_len * inp.grad_accum * inp.world
    plan = Plan(
        inp=inp,
        parts=parts,
        peak_phase=phase,
        total=total,
        usable=usable,
        host_per_node=student_states(inp)["host"] * inp.gpus_per_node,
        flops_per_step=flops,
        step_time_s=step_s,
        tokens_per_s=tokens / step_s,
        max_micro_batch=_max_micro_batch(inp, usable),
    )
    if not plan.fits:
        plan.min_world = _min_world(inp, usable)
    return plan


def _max_micro_batch(inp: PlanInput, usable: float, limit: int = 1 << 16) -> int:
    if _total(inp, 1)[2] > usable:
        return 0
    lo, hi = 1, 2
    while hi <= limit and _total(inp, hi)[2] <= usable:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _total(inp, mid)[2] <= usable else (lo, mid)
    return lo


def _min_world(inp: PlanInput, usable: float, max_nodes: int = 1 << 14) -> int:
    """The fewest whole nodes' devices on which ``inp`` fits; ConfigError when none does."""
    b = inp.micro_batch
    for nodes in _node_counts(max_nodes):
        trial = replace(inp, nodes=nodes)
        if _total(trial, b)[2] <= usable:
            lo = nodes // 2 + 1 if nodes > 1 else 1
            for n in range(lo, nodes + 1):  # the first power of two that fits: refine below it
                if _total(replace(inp, nodes=n), b)[2] <= usable:
                    return n * inp.gpus_per_node
    floor_parts, _, _ = _total(replace(inp, nodes=max_nodes), b)
    big = sorted(floor_parts.items(), key=lambda kv: -kv[1])[:3]
    raise ConfigError(
        f"does not fit on any number of {inp.gpu_mem_gib:g} GiB devices: even sharded over "
        f"{max_nodes * inp.gpus_per_node} of them one needs {sum(floor_parts.values()) / GIB:.1f}"
        f" GiB (largest: {', '.join(f'{k} {v / GIB:.1f} GiB' for k, v in big)}). Change: "
        "--micro-batch or --seq-len (smaller), --activation-checkpointing, --loss-impl "
        "fused_linear/triton, offload (zero3_offload.json), or larger --gpu-mem-gib"
    )


def _node_counts(max_nodes: int) -> list[int]:
    out, n = [], 1
    while n <= max_nodes:
        out.append(n)
        n *= 2
    return out
