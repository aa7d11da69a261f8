"""Benchmark the ConKD loss on the CPU: reference vs chunked, forward + backward.

    .venv/bin/python bench/bench_loss.py            # N=4096, |U|=57,181, fp32, 2 threads
    .venv/bin/python bench/bench_loss.py --quick    # small sizes, a few seconds

Timings on a shared machine are disturbed by other jobs (with 2 threads, one busy core stalls
every OpenMP region); the table gives the best and the median and the load average.
Each variant runs in its own subprocess (so one variant's allocator state cannot hide
another's peak): inputs are built, then each iteration resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and reports VmHWM − VmRSS-before as the loss's extra memory
(gradient included). Prints a markdown table with ratios to the reference and appends a dated
section to docs/bench_loss.md (``--no-write`` to skip).
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = "reference,chunked:1024,inplace:1024,chunked:64,inplace:64"


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def worker(args: argparse.Namespace) -> dict[str, object]:
    """Time one variant; returns the per-iteration times and extra memory."""
    import torch

    sys.path.insert(0, str(ROOT))
    from conkd_scale.loss import GateConfig, LossConfig, conkd_loss_chunked, conkd_loss_reference

    torch.set_num_threads(args.threads)
    name, _, chunk = args.worker.partition(":")
    N, W, I = args.n, args.words, args.items
    V = W + I
    g = torch.Generator().manual_seed(0)
    base_NV = torch.randn(N, V, generator=g).mul_(3.0)  # [N, V] student logits
    t_NV = torch.randn(N, V, generator=g).mul_(3.0)  # [N, V] teacher logits
    item_ids_I = torch.arange(W, W + I)  # item tokens appended after the words
    t_NV[: N // 4, W:] += 4.0  # a quarter of the rows put most mass on items
    S = max(N // 16, 1)
    rec_probs_SI = torch.softmax(torch.randn(S, I, generator=g) * 2, dim=-1)  # [S, I]
    rec_row_N = torch.arange(N) // 16 % S  # [N]
    labels_N = torch.randint(0, V, (N,), generator=g)  # [N] all loss rows
    cfg = LossConfig(gate=GateConfig(mode="hard"), chunk_size=int(chunk or 1024))

    times, extras, loss = [], [], float("nan")
    for _ in range(args.repeats):
        z_NV = base_NV.clone().requires_grad_(True)
        _reset_peak()
        rss0 = _proc_status_kb("VmRSS")
        t0 = time.perf_counter()
        if name == "reference":
            out = conkd_loss_reference(z_NV, t_NV, rec_probs_SI, rec_row_N, item_ids_I,
                                       labels_N, cfg)  # fmt: skip
        else:
            out = conkd_loss_chunked(z_NV, t_NV, rec_probs_SI, rec_row_N, item_ids_I, labels_N,
                                     cfg, inplace=name == "inplace")  # fmt: skip
        out.loss.backward()
        times.append(time.perf_counter() - t0)
        extras.append((_proc_status_kb("VmHWM") - rss0) / 1024)
        loss = out.loss.item()
        del out, z_NV
    return {"variant": args.worker, "times": times, "extra_mb": extras, "loss": loss}


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} logical CPUs, {platform.platform()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (rows)")
    p.add_argument("--words", type=int, default=50_257, help="word tokens in U")
    p.add_argument("--items", type=int, default=6_924, help="item tokens in U")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="iterations per variant (median)")
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma list of reference | chunked:C | inplace:C (C = chunk rows)",
    )
    p.add_argument("--quick", action="store_true", help="N=512, |U|=9,000, 2 repeats")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_loss.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n, args.words, args.items, args.repeats = 512, 8_000, 1_000, 2
    if args.worker:
        print(json.dumps(worker(args)))
        return

    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    load0 = os.getloadavg()
    results = []
    for variant in args.variants.split(","):
        sub = [sys.executable, __file__, "--worker", variant, "--n", str(args.n),
               "--words", str(args.words), "--items", str(args.items),
               "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
        res = subprocess.run(sub, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{res.stderr}")
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  {variant}: {[round(t, 2) for t in results[-1]['times']]} s", file=sys.stderr)
    load1 = os.getloadavg()

    ref = next((r for r in results if r["variant"] == "reference"), results[0])
    t_ref, m_ref = min(ref["times"]), max(ref["extra_mb"])
    in_mb = 2 * args.n * (args.words + args.items) * 4 / 2**20
    lines = [
        f"N = {args.n}, |U| = {args.words + args.items:,} ({args.words:,} words + "
        f"{args.items:,} items), fp32, {args.threads} threads, hard gate, τ = 1; inputs "
        f"(student + teacher logits) {in_mb:,.0f} MB. Time: forward + backward, best and "
        f"median of {args.repeats} (ratios use the best: least disturbed by other load); "
        "extra memory: peak RSS above the inputs, gradient included. `chunked:C` = C rows "
        "per chunk; `inplace:C` writes the gradient into the logits buffer.",
        "",
        "| variant | time best (s) | time median (s) | time / reference | extra memory (MB) "
        "| memory / reference | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, m = min(r["times"]), max(r["extra_mb"])
        lines.append(
            f"| {r['variant']} | {t:.2f} | {statistics.median(r['times']):.2f} | "
            f"{t / t_ref:.3f} | {m:,.0f} | {m / m_ref:.3f} | {r['loss']:.6f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    now = dt.datetime.now().astimezone().isoformat(timespec="minutes")
    section = (
        f"\n## {now}\n\n- command: `{cmd}`\n- machine: {_machine()}, torch "
        f"{_torch_version()}\n- load average (1 min) before / after: {load0[0]:.2f} / "
        f"{load1[0]:.2f}\n\n{table}\n"
    )
    if not args.out.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# ConKD loss on the CPU (bench/bench_loss.py)\n\n"
            "Appended by each run; the lead folds the figures into BENCHMARKS.md.\n"
        )
    with args.out.open("a", encoding="utf-8") as f:
        f.write(section)
    print(f"appended to {args.out}", file=sys.stderr)


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
