"""GPU check of the ConKD loss: correctness against the reference, then speed and peak memory.

    .venv/bin/python bench/bench_loss_gpu.py OUT.json              # on a CUDA machine, < 5 min
    .venv/bin/python bench/bench_loss_gpu.py OUT.json --quick      # tiny shapes; CPU ok (slow
                                                                   # Triton interpreter)

1. Correctness at a realistic shape (N = 512 rows, |U| = 57,181 = 50,257 words + 6,924 items
   scattered over the vocabulary): chunked, triton and fused_linear against the reference,
   bf16 and fp32, hard and soft gates, τ ∈ {1, 2}: loss parts, λ, m and the gradient
   (max error relative to the largest gradient entry). Tolerances: fp32 1e-4, bf16 5e-2.
2. Speed and peak memory, N ∈ {4096, 8192}, bf16 and fp32, hard gate, forward + backward:
   * from logits (student logits needing grad, teacher logits): naive (conkd_scale/loss/
     naive.py), reference, chunked, triton, triton in place;
   * from hidden states (H = 1024, lm_head [V, H] in the same dtype, teacher logits given):
     naive and reference on ``h @ W.T``, triton in place on ``h @ W.T``, fused_linear
     (teacher logits: what the distillation job runs), fused_linear (teacher hidden states +
     lm_head: no [N, V] tensor for either model).
   Time: median of 5 after 2 warm-ups (CUDA events). Memory: peak allocated above the inputs
   (gradients included). A variant that runs out of memory is reported as OOM.
3. Bandwidth: a device-to-device copy's bandwidth (bytes read + written, 2 GiB buffer), and
   the Triton kernel's forward + backward effective bandwidth over its byte floor (read the
   student and teacher logits once, write the gradient once: 3·N·V·bytes), timed around the
   loss call alone (the logits' clone is outside), N ∈ {4096, 8192}, bf16 and fp32.
4. Triton launch configurations (BLOCK_V, num_warps) at N = 4096, bf16.

The loss's GPU targets, checked and printed at the end: Triton forward + backward ≥ 70% of
the copy bandwidth over its byte floor; fused-linear (teacher logits) at N = 8192, H = 1024,
|U| = 57,181, bf16: peak memory ≤ 1/5 of the naive loss's on ``h @ W.T``, time ≤ naive's.

Prints markdown tables and writes everything to the JSON path (``--md`` also writes the
markdown). Nothing is downloaded. Exit status 1 when a correctness check fails (the JSON is
written first). A time budget (``--budget-s``, default 270 s) skips the remaining timings
rather than overrun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():  # before the kernel's first launch (it jits lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conkd_scale.loss import GateConfig, LossConfig, conkd_loss_chunked, conkd_loss_reference  # noqa: E402
from conkd_scale.loss import triton_kernel as tk  # noqa: E402
from conkd_scale.loss.fused_linear import conkd_loss_fused_linear  # noqa: E402
from conkd_scale.loss.naive import conkd_loss_naive  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
BW_TARGET = 0.70  # Triton fwd+bwd effective bandwidth over its floor / D2D copy bandwidth
FUSED_TARGET = {"N": 8192, "dtype": "bfloat16", "mem": 0.2, "time": 1.0}  # vs naive (hidden)


def make_inputs(
    N: int, W: int, I: int, dtype: torch.dtype, dev: torch.device, seed: int = 0, H: int = 0
) -> dict[str, Any]:
    """Logits (or hidden states + lm_heads when H > 0) and the teachers' side inputs."""
    g = torch.Generator(device=dev).manual_seed(seed)
    V = W + I
    items_I = torch.randperm(V, generator=g, device=dev)[:I]  # scattered, unsorted
    S = max(N // 16, 1)
    x: dict[str, Any] = {
        "rec_SI": torch.softmax(torch.randn(S, I, generator=g, device=dev) * 2, -1),
        "rec_row_N": torch.arange(N, device=dev) // 16 % S,
        "items_I": items_I,
        "labels_N": torch.randint(0, V, (N,), generator=g, device=dev),
    }
    x["labels_N"][::7] = items_I[torch.randint(0, I, (len(range(0, N, 7)),), device=dev)]
    x["labels_N"][3::11] = -100
    if H:
        x["h_NH"] = (torch.randn(N, H, generator=g, device=dev)).to(dtype)
        x["W_VH"] = (torch.randn(V, H, generator=g, device=dev) * H**-0.5 * 3).to(dtype)
        x["th_NH"] = (torch.randn(N, H, generator=g, device=dev)).to(dtype)
        tW = torch.randn(V, H, generator=g, device=dev) * H**-0.5 * 3
        tW[items_I[: I // 2]] += 0.5 * H**-0.5  # some item mass
        x["tW_VH"] = tW.to(dtype)
        x["t_NV"] = x["th_NH"] @ x["tW_VH"].t()
    else:
        x["z_NV"] = (torch.randn(N, V, generator=g, device=dev) * 3).to(dtype)
        t = torch.randn(N, V, generator=g, device=dev) * 3
        t[: N // 4, items_I] += 4.0  # a quarter of the rows put most mass on items
        x["t_NV"] = t.to(dtype)
    return x


def loss_from_logits(impl: str, x: dict[str, Any], cfg: LossConfig) -> Callable[[], Any]:
    args = (x["t_NV"], x["rec_SI"], x["rec_row_N"], x["items_I"], x["labels_N"], cfg)

    def run() -> Any:
        z = x["z_NV"].clone().requires_grad_(True)  # stands for the lm_head output: counted
        if impl == "naive":
            out = conkd_loss_naive(z, *args)
        elif impl == "reference":
            out = conkd_loss_reference(z, *args)
        elif impl == "chunked":
            out = conkd_loss_chunked(z, *args)
        else:
            out = tk.conkd_loss_triton(z, *args, inplace=impl == "triton_inplace")
        out.loss.backward()
        return out, z.grad

    return run


def loss_from_hidden(impl: str, x: dict[str, Any], cfg: LossConfig) -> Callable[[], Any]:
    side = (x["rec_SI"], x["rec_row_N"], x["items_I"], x["labels_N"], cfg)

    def run() -> Any:
        h = x["h_NH"].detach().requires_grad_(True)
        W = x["W_VH"].detach().requires_grad_(True)
        if impl == "naive":
            out = conkd_loss_naive(h @ W.t(), x["t_NV"], *side)
        elif impl == "reference":
            out = conkd_loss_reference(h @ W.t(), x["t_NV"], *side)
        elif impl == "triton_inplace":
            out = tk.conkd_loss_triton(h @ W.t(), x["t_NV"], *side, inplace=True)
        elif impl == "fused_linear":
            out = conkd_loss_fused_linear(h, W, x["t_NV"], *side)
        else:  # fused_linear_th: teacher from hidden states too
            out = conkd_loss_fused_linear(
                h, W, None, *side, teacher_hidden=x["th_NH"], teacher_weight_VH=x["tW_VH"]
            )
        out.loss.backward()
        return out, (h.grad, W.grad)

    return run


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], dev: torch.device, warmup: int, repeats: int) -> dict:
    """Median time (ms) and peak memory above the live inputs (MB) of fn()."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times, peaks = [], []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            res = fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            t0 = time.perf_counter()
            res = fn()
            times.append((time.perf_counter() - t0) * 1e3)
            peaks.append(float("nan"))
        del res
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_mb": max(peaks)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return 0.0 if torch.equal(a.isfinite(), b.isfinite()) else float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def correctness(dev: torch.device, quick: bool) -> list[dict]:
    N, W, I = (48, 1_500, 300) if quick else (512, 50_257, 6_924)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = make_inputs(N, W, I, dtype, dev, seed=1)
        xh = make_inputs(N // 2, W, I, dtype, dev, seed=2, H=64)
        for mode, tau in (("hard", 1.0), ("soft", 2.0), ("oracle", 1.0)):
            cfg = LossConfig(gate=GateConfig(mode=mode), tau=tau, chunk_size=128)
            ref, g_ref = loss_from_logits("reference", x, cfg)()
            href, hg_ref = loss_from_hidden("reference", xh, cfg)()
            cands = [
                (impl, loss_from_logits(impl, x, cfg), ref, (g_ref,))
                for impl in ("naive", "chunked", "triton", "triton_inplace")
            ]
            cands += [
                (impl, loss_from_hidden(impl, xh, cfg), href, hg_ref)
                for impl in ("fused_linear", "fused_linear_th")
            ]
            for impl, fn, r, g_r in cands:
                row = {"dtype": str(dtype).split(".")[1], "gate": mode, "tau": tau, "impl": impl}
                try:
                    out, g = fn()
                    g = g if isinstance(g, tuple) else (g,)
                    errs = {
                        k: _rel(getattr(out, k), getattr(r, k))
                        for k in ("loss", "ce", "kd", "kd_dialog", "kd_rec")
                    }
                    errs["lam"] = float((out.lam_N - r.lam_N).abs().max())
                    errs["m"] = float((out.m_N - r.m_N).abs().max())
                    errs["grad"] = max(_rel(a, b) for a, b in zip(g, g_r, strict=True))
                    row.update(
                        errs, max_err=max(errs.values()), ok=max(errs.values()) <= TOL[dtype]
                    )
                except Exception as e:  # report and go on
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
                    traceback.print_exc()
                rows.append(row)
                print(
                    f"  check {row['dtype']} {mode} τ={tau} {impl}: "
                    f"{'ok' if row['ok'] else 'FAIL'} {row.get('max_err', row.get('error'))}",
                    file=sys.stderr,
                    flush=True,
                )
        del x, xh
    return rows


def timings(dev: torch.device, quick: bool, budget_end: float) -> list[dict]:
    Ns = (128, 64) if quick else (8192, 4096)  # the fused-linear target's N first
    W, I, H = (1_500, 300, 64) if quick else (50_257, 6_924, 1024)
    warmup, repeats = (1, 2) if quick else (2, 5)
    cfg = LossConfig(gate=GateConfig(mode="hard"), chunk_size=1024)
    rows = []
    for N in Ns:
        for dtype in (torch.bfloat16, torch.float32):
            for source, impls in (
                ("logits", ("naive", "reference", "chunked", "triton", "triton_inplace")),
                (
                    "hidden",
                    ("naive", "reference", "triton_inplace", "fused_linear", "fused_linear_th"),
                ),
            ):
                x = make_inputs(N, W, I, dtype, dev, H=H if source == "hidden" else 0)
                make = loss_from_logits if source == "logits" else loss_from_hidden
                for impl in impls:
                    row = {
                        "N": N,
                        "V": W + I,
                        "dtype": str(dtype).split(".")[1],
                        "source": source,
                        "impl": impl,
                    }
                    if time.monotonic() > budget_end:
                        row["skipped"] = "time budget"
                    else:
                        try:
                            row.update(measure(make(impl, x, cfg), dev, warmup, repeats))
                        except torch.OutOfMemoryError:
                            row["oom"] = True
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {e}"[:400]
                    rows.append(row)
                    print(f"  time {row}", file=sys.stderr, flush=True)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                del x
    return rows


def _event_ms(fn: Callable[[], Any], prep: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median CUDA-event time (ms) of ``fn(prep())``, ``prep`` (e.g. a clone) not timed."""
    times = []
    for i in range(warmup + repeats):
        arg = prep()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        res = fn(arg)
        b.record()
        torch.cuda.synchronize()
        del res, arg
        if i >= warmup:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(dev: torch.device) -> dict:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) of a 2 GiB buffer."""
    src = torch.ones(2**29, dtype=torch.float32, device=dev)  # 2 GiB
    dst = torch.empty_like(src)
    ms = _event_ms(lambda _: dst.copy_(src), lambda: None, warmup=3, repeats=10)
    nbytes = 2 * src.numel() * src.element_size()
    return {"bytes": nbytes, "ms": ms, "GB_per_s": nbytes / ms / 1e6}


def triton_bandwidth(dev: torch.device, copy_gbps: float, budget_end: float) -> list[dict]:
    """Triton forward + backward effective bandwidth over its byte floor (3·N·V·bytes: the
    student and teacher logits read once, the gradient written once) against ``copy_gbps``."""
    W, I = 50_257, 6_924
    cfg = LossConfig(gate=GateConfig(mode="hard"))
    rows = []
    for N in (4096, 8192):
        for dtype in (torch.bfloat16, torch.float32):
            x = make_inputs(N, W, I, dtype, dev)
            side = (x["t_NV"], x["rec_SI"], x["rec_row_N"], x["items_I"], x["labels_N"], cfg)
            for impl in ("triton_inplace", "triton"):
                row: dict[str, Any] = {"N": N, "V": W + I, "dtype": str(dtype).split(".")[1]}
                row["impl"] = impl
                if time.monotonic() > budget_end:
                    row["skipped"] = "time budget"
                    rows.append(row)
                    continue

                def fn(z: torch.Tensor, impl: str = impl, side: tuple = side) -> Any:
                    out = tk.conkd_loss_triton(z, *side, inplace=impl == "triton_inplace")
                    out.loss.backward()
                    return out

                def prep(x: dict[str, Any] = x) -> torch.Tensor:
                    return x["z_NV"].clone().requires_grad_(True)

                try:
                    ms = _event_ms(fn, prep, warmup=2, repeats=5)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row)
                    continue
                floor = 3 * x["z_NV"].numel() * x["z_NV"].element_size()
                gbps = floor / ms / 1e6
                row.update(ms=ms, floor_bytes=floor, GB_per_s=gbps, frac_of_copy=gbps / copy_gbps)
                rows.append(row)
                print(f"  bandwidth {row}", file=sys.stderr, flush=True)
    torch.cuda.empty_cache()
    return rows


def check_targets(res: dict) -> list[dict]:
    """The GPU targets from the measured rows (``met`` None where not measured)."""
    out = []
    for r in res.get("bandwidth", []):
        if "frac_of_copy" in r:
            out.append({
                "target": f"Triton fwd+bwd ≥ {BW_TARGET:.0%} of copy bandwidth over its floor",
                "case": f"{r['impl']}, N={r['N']}, {r['dtype']}",
                "value": f"{r['frac_of_copy']:.1%} ({r['GB_per_s']:,.0f} GB/s)",
                "met": r["frac_of_copy"] >= BW_TARGET,
            })  # fmt: skip
    cell = {(r["impl"]): r for r in res.get("timings", []) if r["source"] == "hidden"
            and r["N"] == FUSED_TARGET["N"] and r["dtype"] == FUSED_TARGET["dtype"]}  # fmt: skip
    naive = cell.get("naive", {})
    for impl in ("fused_linear", "fused_linear_th"):
        r = cell.get(impl, {})
        case = f"{impl} vs naive on h @ W.T, N={FUSED_TARGET['N']}, H=1024, bf16"
        if "ms" not in r or "ms" not in naive:
            out.append({"target": "fused-linear memory ≤ 1/5 and time ≤ naive's", "case": case,
                        "value": "not measured", "met": None})  # fmt: skip
            continue
        mem, tim = r["peak_mb"] / naive["peak_mb"], r["ms"] / naive["ms"]
        out.append({
            "target": f"fused-linear peak memory ≤ {FUSED_TARGET['mem']:.0%} of naive's",
            "case": case, "value": f"{mem:.1%}", "met": mem <= FUSED_TARGET["mem"],
        })  # fmt: skip
        out.append({
            "target": f"fused-linear time ≤ {FUSED_TARGET['time']}× naive's",
            "case": case, "value": f"{tim:.2f}×", "met": tim <= FUSED_TARGET["time"],
        })  # fmt: skip
    return out


def launch_sweep(dev: torch.device, quick: bool, budget_end: float) -> list[dict]:
    if quick or dev.type != "cuda":
        return []
    x = make_inputs(4096, 50_257, 6_924, torch.bfloat16, dev)
    rows = []
    for gate in ("hard", "soft"):
        cfg = LossConfig(gate=GateConfig(mode=gate))
        for block, warps in ((2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32)):
            if time.monotonic() > budget_end:
                break
            os.environ["CONKD_TRITON_BLOCK_V"], os.environ["CONKD_TRITON_NUM_WARPS"] = (
                str(block),
                str(warps),
            )
            try:
                r = measure(loss_from_logits("triton_inplace", x, cfg), dev, 2, 5)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"[:300]}
            # bytes: z and t read twice (t once where λ = 1), gradient written: ≤ 5 × 2 B
            r.update(gate=gate, block_v=block, num_warps=warps)
            if "ms" in r:
                r["GB_per_s_upper"] = 5 * 2 * x["z_NV"].numel() / r["ms"] / 1e6
            rows.append(r)
            print(f"  sweep {r}", file=sys.stderr, flush=True)
    os.environ.pop("CONKD_TRITON_BLOCK_V", None)
    os.environ.pop("CONKD_TRITON_NUM_WARPS", None)
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def tables(res: dict) -> str:
    out = [
        "### Correctness (max relative error; λ, m absolute)",
        "",
        "| dtype | gate | τ | impl | loss | kd | grad | λ | m | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["correctness"]:
        out.append(
            f"| {r['dtype']} | {r['gate']} | {r['tau']} | {r['impl']} | "
            f"{_fmt(r.get('loss'), '.1e')} | {_fmt(r.get('kd'), '.1e')} | "
            f"{_fmt(r.get('grad'), '.1e')} | {_fmt(r.get('lam'), '.1e')} | "
            f"{_fmt(r.get('m'), '.1e')} | {'yes' if r['ok'] else 'NO ' + r.get('error', '')} |"
        )
    out += [
        "",
        "### Forward + backward, hard gate, τ = 1 (median ms; peak MB above the inputs)",
        "",
        "| N | dtype | from | impl | ms | × naive | peak MB | × naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    refs = {(r["N"], r["dtype"], r["source"]): r for r in res["timings"] if r["impl"] == "naive"}
    for r in res["timings"]:
        ref = refs.get((r["N"], r["dtype"], r["source"]), {})
        if "ms" in r:
            rt = f"{r['ms'] / ref['ms']:.3f}" if "ms" in ref else "–"
            rm = f"{r['peak_mb'] / ref['peak_mb']:.3f}" if ref.get("peak_mb") else "–"
            cells = f"{r['ms']:.2f} | {rt} | {r['peak_mb']:,.0f} | {rm}"
        else:
            why = "OOM" if r.get("oom") else r.get("skipped") or r.get("error", "?")
            cells = f"{why} | | |"
        out.append(f"| {r['N']} | {r['dtype']} | {r['source']} | {r['impl']} | {cells} |")
    if res.get("copy"):
        c = res["copy"]
        out += [
            "",
            f"### Bandwidth (device-to-device copy: {c['GB_per_s']:,.0f} GB/s, read + written)",
            "",
            "Triton forward + backward, hard gate; floor = 3·N·V·bytes (logits of both models "
            "read once, gradient written once); the loss call alone is timed.",
            "",
            "| N | dtype | impl | ms | GB/s over the floor | × copy bandwidth |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["bandwidth"]:
            if "GB_per_s" in r:
                cells = f"{r['ms']:.3f} | {r['GB_per_s']:,.0f} | {r['frac_of_copy']:.1%}"
            else:
                cells = f"{r.get('skipped') or r.get('error', '?')} | |"
            out.append(f"| {r['N']} | {r['dtype']} | {r['impl']} | {cells} |")
    if res.get("targets"):
        out += ["", "### GPU targets", "", "| target | case | measured | met |",
                "|---|---|---|---|"]  # fmt: skip
        for t in res["targets"]:
            met = "–" if t["met"] is None else "yes" if t["met"] else "**NO**"
            out.append(f"| {t['target']} | {t['case']} | {t['value']} | {met} |")
    if res["launch_sweep"]:
        out += [
            "",
            "### Triton launch configurations (N = 4096, bf16, in place)",
            "",
            "| gate | BLOCK_V | warps | ms | GB/s (≤ 10 B/elem) |",
            "|---|---|---|---|---|",
        ]
        for r in res["launch_sweep"]:
            out.append(
                f"| {r['gate']} | {r['block_v']} | {r['num_warps']} | "
                f"{_fmt(r.get('ms'), '.2f')} | {_fmt(r.get('GB_per_s_upper'), ',.0f')} |"
            )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_json", type=Path)
    p.add_argument("--quick", action="store_true", help="tiny shapes (also runs on the CPU)")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip timings after this")
    p.add_argument("--skip-timings", action="store_true")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown tables here")
    args = p.parse_args()
    t0 = time.monotonic()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.quick:
        print("no CUDA device: use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks against an fp32 reference
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "triton": getattr(tk.triton, "__version__", None),
        "quick": args.quick,
        "launch_default": tk.launch_config(57_181, 2) if tk.HAVE_TRITON else None,
    }
    res["correctness"] = correctness(dev, args.quick)
    end = t0 + args.budget_s
    cuda_timed = dev.type == "cuda" and not args.skip_timings and not args.quick
    res["copy"] = copy_bandwidth(dev) if cuda_timed else None
    if cuda_timed:
        torch.cuda.empty_cache()
    res["bandwidth"] = (
        triton_bandwidth(dev, res["copy"]["GB_per_s"], end) if res["copy"] is not None else []
    )
    res["timings"] = [] if args.skip_timings else timings(dev, args.quick, end)
    res["launch_sweep"] = [] if args.skip_timings else launch_sweep(dev, args.quick, end)
    res["targets"] = check_targets(res)
    res["wall_s"] = time.monotonic() - t0
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(res, indent=1))
    text = (
        f"## ConKD loss on {res['device']} (torch {res['torch']}, triton {res['triton']})\n\n"
        f"{tables(res)}\n\nwall {res['wall_s']:.0f} s; JSON: {args.out_json}"
    )
    print(text)
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    return 0 if all(r["ok"] for r in res["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
