"""``python -m conkd_scale.plan``: per-device memory, fit and step time of a distillation job.

    python -m conkd_scale.plan --student large --teacher gpt2:layers=36,hidden=1280,heads=20 \\
        --vocab 50257 --deepspeed ds_configs/zero3.json --nodes 2 --gpus-per-node 8 \\
        --gpu-mem-gib 80 --seq-len 1024 --micro-batch 8

Models (``--student``, ``--teacher``): a preset (tiny … large), a local Hugging Face
directory (or its config.json), or ``gpt2:layers=L,hidden=H,heads=A`` /
``llama:layers=L,hidden=H,heads=A,kv_heads=K,intermediate=I,vocab=V``; instantiated on the
meta device, so a 70 B model costs nothing to plan. ZeRO stage, offload and bucket sizes come
from the DeepSpeed JSON (``--zero-stage``/``--offload`` override them). Exit code 0: fits;
1: does not fit on this many devices (the fewest that fit is printed); 2: bad input, or fits
on no number of these devices (the message names what to change).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from typing import Any

from conkd_scale.plan.arch import config_vocab, resolve_model
from conkd_scale.plan.memory import (
    CPU_OVERHEAD_MIB,
    DEFAULT_FLOPS,
    GIB,
    GPU_RESERVE_GIB,
    LOSS_IMPLS,
    Plan,
    PlanInput,
    ZeroSettings,
    estimate,
    training_flops_per_token,
)
from conkd_scale.training.ds_config import load_ds_config
from conkd_scale.utils.errors import ConfigError, ConkdError
from conkd_scale.utils.io import write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m conkd_scale.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--student", required=True, help="preset, HF directory or architecture")
    p.add_argument("--teacher", default=None, help="D (same forms); omit for CE only")
    p.add_argument("--vocab", type=int, default=None, help="tokenizer size (default: D's)")
    p.add_argument("--deepspeed", default="ds_configs/zero3.json", help="student's DS JSON")
    p.add_argument("--teacher-deepspeed", default="ds_configs/zero3_inference.json")
    p.add_argument("--zero-stage", type=int, default=None, help="override the JSON's stage")
    p.add_argument("--offload", choices=["none", "optimizer", "all"], default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one device")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--seq-len", type=int, default=256, help="max_length")
    p.add_argument("--micro-batch", type=int, default=1, help="train.micro_batch")
    p.add_argument("--grad-accum", type=int, default=1, help="train.grad_accum")
    p.add_argument("--loss-impl", choices=LOSS_IMPLS, default="auto")
    p.add_argument("--chunk-size", type=int, default=1024, help="loss.chunk_size")
    p.add_argument(
        "--loss-rows-fraction",
        type=float,
        default=1.0,
        help="share of positions with loss (default 1: an upper bound; ReDial ≈ 0.4)",
    )
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--teacher-mode", choices=["online", "offline"], default="online")
    p.add_argument("--topk", type=int, default=64, help="offline teacher: entries per row")
    p.add_argument(
        "--tflops",
        type=float,
        default=None,
        help=f"achieved TFLOP/s per device (default: {DEFAULT_FLOPS['gpu'] / 1e12:g} on a GPU, "
        f"{DEFAULT_FLOPS['cpu'] / 1e12:g} on a CPU rank)",
    )
    p.add_argument(
        "--reserve-gib",
        type=float,
        default=None,
        help=f"kept free per device (default {GPU_RESERVE_GIB} on a GPU, 0 on a CPU)",
    )
    p.add_argument(
        "--overhead-mib",
        type=float,
        default=None,
        help=f"framework memory per rank (default {CPU_OVERHEAD_MIB:g} on a CPU, 0 on a GPU)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    return p


def _zero(path: str, stage: int | None, offload: str | None) -> ZeroSettings:
    z = ZeroSettings.from_ds_config(load_ds_config(path))
    if stage is not None:
        z = replace(z, stage=stage)
    if offload is not None:
        z = replace(z, offload_optimizer=offload != "none", offload_param=offload == "all")
    return z


def input_from_args(a: argparse.Namespace) -> PlanInput:
    """A validated :class:`PlanInput` from the parsed flags (``ConfigError`` if bad)."""
    vocab = a.vocab
    if vocab is not None and vocab < 2:
        raise ConfigError(f"--vocab: expected >= 2, got {vocab}")
    if vocab is None and a.teacher:
        vocab = config_vocab(a.teacher)
    if vocab is None:
        vocab = config_vocab(a.student)
    teacher = resolve_model(a.teacher, vocab) if a.teacher else None
    student = resolve_model(a.student, vocab if vocab else None)
    inp = PlanInput(
        student=student,
        teacher=teacher,
        zero=_zero(a.deepspeed, a.zero_stage, a.offload),
        teacher_zero=_zero(a.teacher_deepspeed, None, None),
        nodes=a.nodes,
        gpus_per_node=a.gpus_per_node,
        gpu_mem_gib=a.gpu_mem_gib,
        device=a.device,
        precision=a.precision,
        seq_len=a.seq_len,
        micro_batch=a.micro_batch,
        grad_accum=a.grad_accum,
        loss_impl=a.loss_impl,
        chunk_size=a.chunk_size,
        loss_rows_fraction=a.loss_rows_fraction,
        activation_checkpointing=a.activation_checkpointing,
        attention=a.attention,
        teacher_mode=a.teacher_mode,
        topk=a.topk,
        flops_per_s=None if a.tflops is None else a.tflops * 1e12,
        reserve_gib=a.reserve_gib,
        overhead_mib=a.overhead_mib,
    )
    inp.validate()
    return inp


def _model_line(role: str, m: Any) -> str:
    heads = f"{m.n_head} heads" + (f" ({m.n_kv_head} kv)" if m.n_kv_head != m.n_head else "")
    return (
        f"{role:<8} {m.source}: {m.model_type}, {m.n_layer} layers, width {m.hidden}, {heads}, "
        f"vocab {m.vocab:,}: {m.params / 1e6:,.1f} M parameters"
    )


def render(plan: Plan) -> str:
    """The plan as the text the command prints."""
    inp = plan.inp
    z = inp.zero
    off = "all" if z.offload_param else ("optimizer" if z.offload_optimizer else "none")
    dev = "GPU" if inp.device == "gpu" else "CPU rank"
    dtype = "bf16" if inp.dtype_bytes == 2 else "fp32"
    lines = [_model_line("student", inp.student)]
    if inp.teacher is not None:
        lines.append(_model_line("teacher", inp.teacher) + f" ({inp.teacher_mode})")
    lines += [
        f"job      {inp.nodes} node(s) × {inp.gpus_per_node} {dev}(s) of {inp.gpu_mem_gib:g} GiB;"
        f" ZeRO-{z.stage}, offload {off}; {dtype}; seq {inp.seq_len}, micro batch "
        f"{inp.micro_batch} × accumulation {inp.grad_accum}; loss {inp.resolved_impl}; "
        f"activation checkpointing {'on' if inp.activation_checkpointing else 'off'}",
        "",
        f"per-{dev} memory at the peak ({plan.peak_phase} phase):",
    ]
    for k, v in plan.parts.items():
        lines.append(f"  {k:<18} {v / GIB:9.3f} GiB")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += [
        f"  {'total':<18} {plan.total / GIB:9.3f} GiB of {plan.usable / GIB:.2f} usable: {verdict}",
        f"model states (DeepSpeed's estimator's figure): {plan.model_states / GIB:.3f} GiB",
    ]
    if plan.host_per_node:
        lines.append(f"offloaded states per node (host memory): {plan.host_per_node / GIB:.2f} GiB")
    lines.append(f"largest micro batch that fits: {plan.max_micro_batch}")
    if plan.min_world is not None:
        lines.append(
            f"fits on {plan.min_world} devices ({plan.min_world // inp.gpus_per_node} node(s) "
            f"of {inp.gpus_per_node}) at micro batch {inp.micro_batch}"
        )
    rate = (inp.flops_per_s or DEFAULT_FLOPS[inp.device]) / 1e12
    lines.append(
        f"step time ≈ {plan.step_time_s:.3g} s: {plan.flops_per_step / 1e12:.3g} TFLOP per "
        f"device per step at {rate:g} TFLOP/s; {plan.tokens_per_s:,.0f} tokens/s in all"
    )
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict (bytes, seconds)."""
    inp = asdict(plan.inp)
    return {
        "input": inp,
        "parts_bytes": plan.parts,
        "peak_phase": plan.peak_phase,
        "total_bytes": plan.total,
        "usable_bytes": plan.usable,
        "fits": plan.fits,
        "model_states_bytes": plan.model_states,
        "host_per_node_bytes": plan.host_per_node,
        "max_micro_batch": plan.max_micro_batch,
        "min_world": plan.min_world,
        "flops_per_step": plan.flops_per_step,
        "student_training_flops_per_token": training_flops_per_token(plan.inp),
        "step_time_s": plan.step_time_s,
        "tokens_per_s": plan.tokens_per_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = estimate(input_from_args(args))
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(render(plan))
    if args.json:
        write_json(args.json, plan_json(plan))
    return 0 if plan.fits else 1
