"""Benchmark the ConKD loss, forward + backward: naive PyTorch vs reference vs chunked (vs GPU).

    .venv/bin/python bench/bench_loss.py                       # N ∈ {1k,4k,16k}, |U| ∈ {57k,152k}
    .venv/bin/python bench/bench_loss.py --ns 4096 --vs 57181  # the CPU target's cell only
    .venv/bin/python bench/bench_loss.py --quick --no-write    # small sizes, a few seconds
    .venv/bin/python bench/bench_loss.py --device cuda --dtype bf16 --ns 4096,8192 --vs 57181

Variants (``--variants``): ``naive`` (conkd_scale/loss/naive.py: log_softmax ×3, R's
distribution as a dense [N, V] table, two full KL terms, the gate, CE, autograd: the baseline
every ratio is taken against), ``reference`` (the tested ground truth), ``chunked:C`` (C rows
per chunk, separate gradient buffer), ``inplace:C`` (the same writing the gradient into the
logits buffer: what the distillation job runs on the CPU), and with ``--device cuda``
``triton``, ``triton_inplace`` and ``fused_linear`` (from hidden states [N, H] and an lm_head
[V, H], ``--hidden``; its extra memory includes the lm_head's logits chunks and the hidden
and weight gradients, where the others start from given logits).

Measurement: every (N, |U|, variant) runs in its own subprocess (one variant's allocator
state cannot hide another's peak). Inputs are built first; each iteration then resets the
peak counter (CPU: /proc/self/clear_refs → VmHWM; CUDA: the allocator's peak) and reports the
peak above the memory before the call as the loss's extra memory, gradient included. Time:
best and median of ``--repeats`` forward + backward calls. A cell whose estimated peak
(inputs plus the variant's live [N, V] temporaries, see ``EXTRA_NV``) exceeds the memory
limit (``--mem-limit-gb``, default: available memory less 1 GiB; on CUDA the free device
memory) is skipped and the table says why. Timings on a shared machine are disturbed by other
jobs; the load average is recorded. Prints a markdown table and appends a dated section
(command, machine, date) to BENCHMARKS.md (``--out``; ``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CPU_VARIANTS = "naive,reference,chunked:1024,inplace:1024"
GPU_VARIANTS = CPU_VARIANTS + ",triton,triton_inplace,fused_linear"
GPU_ONLY = ("triton", "triton_inplace", "fused_linear")
ITEMS = 6_924  # ReDial's items; |U| = words + items (57,181 = DialoGPT's 50,257 + 6,924)
TARGET = {"n": 4096, "v": 57_181, "variant": "inplace:1024", "mem": 0.15, "time": 0.6}
"""The CPU target: at N = 4096, |U| = 57,181, fp32, forward + backward, the distillation
job's path allocates ≤ 15% of the naive loss's extra memory in ≤ 0.6× its time."""

EXTRA_NV = {"naive": 7.5, "reference": 9.0}
"""Estimated extra memory of a variant, in fp32 [N, V] tensors (measured on the CPU at
N = 1024, |U| = 57,181: naive 7.2, reference 8.4; rounded up). Chunked paths: one gradient
buffer (none in place) plus five [C, V] scratch rows per chunk."""


# ------------------------------------------------------------------------- the worker
def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _inputs(N: int, V: int, I: int, H: int, dtype: Any, dev: Any) -> dict[str, Any]:
    """Student logits (or hidden states + lm_head for fused_linear), teacher logits, R."""
    import torch

    g = torch.Generator(device=dev).manual_seed(0)
    W = V - I
    x: dict[str, Any] = {}
    if H:
        x["h_NH"] = torch.randn(N, H, generator=g, device=dev).to(dtype)  # [N, H]
        x["W_VH"] = (torch.randn(V, H, generator=g, device=dev) * (3 / H**0.5)).to(dtype)
    else:
        x["z_NV"] = torch.randn(N, V, generator=g, device=dev).mul_(3.0).to(dtype)  # [N, V]
    t_NV = torch.randn(N, V, generator=g, device=dev).mul_(3.0)  # [N, V] teacher logits
    t_NV[: N // 4, W:] += 4.0  # a quarter of the rows put most mass on items
    x["t_NV"] = t_NV.to(dtype)
    S = max(N // 16, 1)
    x["rec_SI"] = torch.softmax(torch.randn(S, I, generator=g, device=dev) * 2, dim=-1)
    x["rec_row_N"] = torch.arange(N, device=dev) // 16 % S  # [N]
    x["items_I"] = torch.arange(W, V, device=dev)  # [I] item tokens appended after the words
    x["labels_N"] = torch.randint(0, V, (N,), generator=g, device=dev)  # [N] all loss rows
    return x


def worker(args: argparse.Namespace) -> dict[str, object]:
    """Time one variant at one (N, |U|); returns per-iteration times and extra memory."""
    import torch

    sys.path.insert(0, str(ROOT))
    from conkd_scale.loss import GateConfig, LossConfig, conkd_loss_chunked, conkd_loss_reference
    from conkd_scale.loss.naive import conkd_loss_naive

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = dev.type == "cuda"
    name, _, chunk = args.worker.partition(":")
    N, V = args.n, args.v
    x = _inputs(N, V, args.items, args.hidden if name == "fused_linear" else 0, dtype, dev)
    side = (x["t_NV"], x["rec_SI"], x["rec_row_N"], x["items_I"], x["labels_N"])
    cfg = LossConfig(gate=GateConfig(mode="hard"), chunk_size=int(chunk or 1024))

    def leaves() -> tuple[Any, ...]:
        """The inputs that take a gradient (fresh each call; not counted as extra memory)."""
        if name == "fused_linear":
            return x["h_NH"].detach().requires_grad_(True), x["W_VH"].detach().requires_grad_(True)
        return (x["z_NV"].clone().requires_grad_(True),)

    def loss(leaf: tuple[Any, ...]) -> Any:
        if name == "naive":
            return conkd_loss_naive(*leaf, *side, cfg)
        if name == "reference":
            return conkd_loss_reference(*leaf, *side, cfg)
        if name in ("chunked", "inplace"):
            return conkd_loss_chunked(*leaf, *side, cfg, inplace=name == "inplace")
        if name in ("triton", "triton_inplace"):
            from conkd_scale.loss.triton_kernel import conkd_loss_triton

            return conkd_loss_triton(*leaf, *side, cfg, inplace=name == "triton_inplace")
        if name == "fused_linear":
            from conkd_scale.loss.fused_linear import conkd_loss_fused_linear

            return conkd_loss_fused_linear(*leaf, *side, cfg)
        raise SystemExit(f"unknown variant {args.worker!r}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def mem_mb() -> float:
        return torch.cuda.memory_allocated() / 2**20 if cuda else _proc_status_kb("VmRSS") / 1024

    times, extras, value = [], [], float("nan")
    for i in range(args.repeats + (1 if cuda else 0)):  # CUDA: one warm-up (compilation)
        leaf = leaves()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()
        m0 = mem_mb()
        t0 = time.perf_counter()
        out = loss(leaf)
        out.loss.backward()
        sync()
        t = time.perf_counter() - t0
        peak = (
            torch.cuda.max_memory_allocated() / 2**20 if cuda else _proc_status_kb("VmHWM") / 1024
        )
        value = out.loss.item()
        del out, leaf
        if cuda and i == 0:
            continue
        times.append(t)
        extras.append(peak - m0)
    return {"times": times, "extra_mb": extras, "loss": value}


# ------------------------------------------------------------------------ the driver
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _machine() -> str:
    return f"{platform.node()}: {_cpu_name()}, {os.cpu_count()} logical CPUs, {platform.platform()}"


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def _device_info(device: str) -> tuple[str, float]:
    """(description, free memory in GiB) of a CUDA device, from a subprocess (the driver
    process imports no torch)."""
    code = (
        "import json, torch; f, _ = torch.cuda.mem_get_info(); "
        "print(json.dumps([torch.cuda.get_device_name(), f / 2**30, torch.__version__]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"--device {device}: no usable CUDA device\n{res.stderr[-2000:]}")
    name, free, ver = json.loads(res.stdout.strip().splitlines()[-1])
    return f"{name}, torch {ver}", float(free)


def estimate_gb(variant: str, N: int, V: int, H: int, elem: int) -> float:
    """Estimated peak of one cell: inputs, the variant's extra memory, 0.5 GiB of runtime (GiB)."""
    name, _, chunk = variant.partition(":")
    C = min(int(chunk or 1024), N)
    nv4 = N * V * 4  # one fp32 [N, V] tensor
    if name == "fused_linear":
        inputs = (N * H + V * H + N * V) * elem
        extra = 3 * C * V * 4 + V * H * 4 + N * H * elem + V * H * elem
    else:
        inputs = 2 * N * V * elem
        extra = {
            "naive": EXTRA_NV["naive"] * nv4,
            "reference": EXTRA_NV["reference"] * nv4,
            "chunked": N * V * elem + 5 * C * V * 4,
            "inplace": 5 * C * V * 4,
            "triton": N * V * elem,
            "triton_inplace": 0,
        }[name]
    return (inputs + extra) / 2**30 + 0.5


def run_cell(args: argparse.Namespace, N: int, V: int, variant: str) -> dict[str, Any]:
    sub = [sys.executable, __file__, "--worker", variant, "--n", str(N), "--v", str(V),
           "--items", str(args.items), "--threads", str(args.threads), "--repeats",
           str(args.repeats), "--device", args.device, "--dtype", args.dtype, "--hidden",
           str(args.hidden)]  # fmt: skip
    res = subprocess.run(sub, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        err = (res.stderr.strip().splitlines() or ["?"])[-1][:200]
        print(f"  N={N} V={V} {variant} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
        return {"failed": f"failed (exit {res.returncode}): {err}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cell_text(r: dict[str, Any], base: dict[str, Any] | None) -> str:
    if "skipped" in r or "failed" in r:
        return f"{r.get('skipped') or r.get('failed')} | | | | | |"
    t, m = min(r["times"]), max(r["extra_mb"])
    tr = mr = "–"
    if base and "times" in base:
        tr = f"{t / min(base['times']):.3f}"
        mr = f"{m / max(base['extra_mb']):.3f}"
    return (
        f"{t:.3f} | {statistics.median(r['times']):.3f} | {tr} | {m:,.0f} | {mr} | {r['loss']:.6f}"
    )


def target_line(
    results: dict[tuple[int, int, str], dict[str, Any]], args: argparse.Namespace
) -> str:
    """The CPU target's line, when its cell is in the grid."""
    n, v, var = TARGET["n"], TARGET["v"], TARGET["variant"]
    if args.device != "cpu" or args.dtype != "fp32" or (n, v, var) not in results:
        return ""
    base, r = results.get((n, v, "naive"), {}), results[(n, v, var)]
    head = f"**Target (CPU, N = {n}, |U| = {v:,}, fp32, forward + backward):** "
    if "times" not in base or "times" not in r:
        why = base.get("skipped") or base.get("failed") or r.get("skipped") or r.get("failed")
        return head + f"not measured ({why or 'naive not in --variants'})."
    mem = max(r["extra_mb"]) / max(base["extra_mb"])
    tim = min(r["times"]) / min(base["times"])
    ok_m, ok_t = mem <= TARGET["mem"], tim <= TARGET["time"]
    return head + (
        f"`{var}` (the distillation job's CPU path) allocates {mem:.1%} of the naive loss's "
        f"extra memory (target ≤ {TARGET['mem']:.0%}: {'met' if ok_m else 'NOT met'}) in "
        f"{tim:.2f}× its time (target ≤ {TARGET['time']}×: {'met' if ok_t else 'NOT met'})."
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="1024,4096,16384", help="comma list of N (loss rows)")
    p.add_argument("--vs", default="57181,151936", help="comma list of |U| (words + items)")
    p.add_argument("--items", type=int, default=ITEMS, help="item tokens among the |U|")
    p.add_argument("--variants", default=None, help="comma list; default: see the docstring")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per cell")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="logits dtype")
    p.add_argument("--hidden", type=int, default=1024, help="H of the fused_linear variant")
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="skip cells estimated above this (default: available memory − 1 GiB)",
    )
    p.add_argument("--quick", action="store_true", help="N=512, |U|=9,000, 2 repeats")
    p.add_argument("--note", default="", help="free text for the machine line (e.g. load)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.ns, args.vs, args.items, args.repeats = "512", "9000", 1_000, 2
    variants = (args.variants or (GPU_VARIANTS if args.device == "cuda" else CPU_VARIANTS)).split(
        ","
    )
    elem = 4 if args.dtype == "fp32" else 2
    if args.device == "cuda":
        dev_desc, free_gb = _device_info(args.device)
        limit = min(free_gb - 1.0, args.mem_limit_gb or float("inf"))
    else:
        dev_desc, free_gb = _cpu_name(), _mem_available_gb()
        limit = min(free_gb - 1.0, args.mem_limit_gb or float("inf"))

    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    load0 = os.getloadavg()
    results: dict[tuple[int, int, str], dict[str, Any]] = {}
    for V in _ints(args.vs):
        for N in _ints(args.ns):
            for var in variants:
                name = var.partition(":")[0]
                need = estimate_gb(var, N, V, args.hidden, elem)
                if name in GPU_ONLY and args.device != "cuda":
                    r: dict[str, Any] = {"skipped": "skipped: needs --device cuda"}
                elif need > limit:
                    r = {"skipped": f"skipped: needs ≈{need:.1f} GiB, limit {limit:.1f} GiB"}
                else:
                    r = run_cell(args, N, V, var)
                results[(N, V, var)] = r
                shown = [round(t, 2) for t in r["times"]] if "times" in r else r
                print(f"  N={N} |U|={V} {var}: {shown}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    in_what = f"H = {args.hidden} for fused_linear"
    lines = [
        f"{args.device.upper()} ({dev_desc}), {args.dtype} logits, {args.threads} threads, "
        f"hard gate, τ = 1, {args.items:,} item tokens among |U|. Time: forward + backward, best "
        f"and median of {args.repeats}; extra memory: peak above the inputs, gradient "
        f"included; ratios (best time, extra memory) against `naive` in the same (N, |U|). "
        f"`chunked:C` = C rows per chunk, `inplace:C` also writes the gradient into the logits "
        f"buffer (the distillation job's CPU path); {in_what}. Memory limit for a cell "
        f"{limit:.1f} GiB (available at start {free_gb:.1f} GiB).",
        "",
        "| N | \\|U\\| | variant | time best (s) | time median (s) | time / naive | "
        "extra memory (MB) | memory / naive | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (N, V, var), r in results.items():
        base = results.get((N, V, "naive"))
        lines.append(f"| {N} | {V:,} | {var} | {_cell_text(r, base)} |")
    target = target_line(results, args)
    table = "\n".join(lines) + (f"\n\n{target}" if target else "")
    print(table)
    if args.no_write:
        return
    now = dt.datetime.now().astimezone()
    note = f"; {args.note}" if args.note else ""
    section = (
        f"\n## The ConKD loss, naive vs chunked (bench/bench_loss.py) — "
        f"{now.strftime('%Y-%m-%d %H:%M %Z')}\n\n- command: `{cmd}`\n- machine: {_machine()}, "
        f"torch {_torch_version()}{note}\n- load average (1 min) before / after: "
        f"{load0[0]:.2f} / {load1[0]:.2f}\n\n{table}\n"
    )
    with args.out.open("a", encoding="utf-8") as f:
        f.write(section)
    print(f"appended to {args.out}", file=sys.stderr)


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
