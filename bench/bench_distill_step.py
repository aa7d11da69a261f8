"""Step time (and peak memory) of ConKD distillation: online and offline (teacher cache) vs
cross-entropy only, or by loss.impl.

    python bench/bench_distill_step.py [--steps 40] [--rounds 2] [--out BENCHMARKS.md]
    python bench/bench_distill_step.py --impls reference,chunked,fused_linear \
        [--set dataset=redial --set data_dir=../shared/data/redial ...] [--nproc 1]

Runs ``deepspeed launch/distill.py`` jobs (default configuration: synthetic corpus, ZeRO-3
student, sharded ZeRO-3 dialogue teacher, ``--nproc`` CPU ranks; ``--set key=value`` adds
overrides to every job), alternating the variants ``--rounds`` times so that all see the same
machine load. Variants: ConKD (hard gate) with D online, ConKD reading the teacher cache
(``teachers.mode=offline``; the cache is built first by ``launch/cache_teachers.py``, whose
wall time is compared with the teacher-forward time of one online epoch, and whose size per
response token is read from its manifest) and the one-hot baseline (``loss.w_kd=0``: no
teacher at all); or, with ``--impls``, ConKD under each ``loss.impl`` (the same
function: the reference, the chunked CPU path, the lm_head-fused path...). Step time = wall
time of the logged training steps after the first ``--warmup`` steps; teacher-forward and
loss shares come from the job's own per-micro-batch timers (``time_teacher_s``,
``time_loss_s`` in metrics.jsonl; under fused_linear the loss timer includes the student's
forward, which runs inside the loss); peak memory is the job's ``peak_mem_mb`` (the largest
rank's peak RSS over the whole job, setup included, on the CPU). Teachers are trained first
if the configured teacher directories lack them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cache(cache: Path, extra: list[str], nproc: int = 2) -> dict:
    """Build the teacher cache (wall time of the whole job, start-up included)."""
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(_port()),
        "launch/cache_teachers.py",
        "--deepspeed",
        "ds_configs/zero3_inference.json",
        f"teachers.cache_dir={cache}",
        "train.progress=false",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    man = json.loads((cache / "manifest.json").read_text())
    return {
        "wall_s": wall,
        "pass_s": man["wall_s_last_run"],
        **man["stats"],
        "k": man["fingerprint"]["k"],
    }


def run_job(out: Path, steps: int, extra: list[str], nproc: int = 2) -> list[dict]:
    port = _port()
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(port),
        "launch/distill.py",
        "--deepspeed",
        "ds_configs/zero3.json",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.progress=false",
        "export=false",
        "train.resume=none",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


def step_stats(rows: list[dict], warmup: int) -> dict[str, float]:
    rows = [r for r in rows if r["step"] > warmup]
    steps = rows[-1]["step"] - rows[0]["step"]
    step_s = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / steps
    teacher = statistics.mean(r.get("time_teacher_s", 0.0) for r in rows[1:])
    loss = statistics.mean(r.get("time_loss_s", 0.0) for r in rows[1:])
    tps = statistics.mean(r["tokens_per_s"] for r in rows[1:])
    peak = max(r.get("peak_mem_mb", float("nan")) for r in rows)
    return {
        "step_s": step_s,
        "teacher_s": teacher,
        "loss_s": loss,
        "tokens_per_s": tps,
        "peak_mem_mb": peak,
    }


def _table(agg: dict[str, dict[str, float]], labels: dict[str, str]) -> list[str]:
    """Markdown rows, each with its ratios to the first variant."""
    first = agg[next(iter(agg))]
    lines = [
        "| variant | step time (s) | × first | tokens/s | teacher forward (s/step) | "
        "loss (s/step) | peak memory (MB) | × first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in agg.items():
        teacher = (
            f"{a['teacher_s']:.3f} ({a['teacher_s'] / a['step_s']:.0%})" if a["teacher_s"] else "–"
        )
        lines.append(
            f"| {labels[name]} | {a['step_s']:.3f} | {a['step_s'] / first['step_s']:.2f} | "
            f"{a['tokens_per_s']:.0f} | {teacher} | {a['loss_s']:.3f} "
            f"({a['loss_s'] / a['step_s']:.0%}) | {a['peak_mem_mb']:,.0f} | "
            f"{a['peak_mem_mb'] / first['peak_mem_mb']:.2f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks per job")
    p.add_argument(
        "--impls", default=None, help="compare these loss.impl values (e.g. reference,chunked)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every job"
    )
    p.add_argument("--note", default="", help="free text for the machine line")
    p.add_argument("--work", default="runs/bench_distill")
    p.add_argument("--out", default=None, help="append the section to this markdown file")
    args = p.parse_args()
    work = ROOT / args.work
    if args.impls:
        impls = args.impls.split(",")
        variants = {f"impl_{x}": ["loss.gate.mode=hard", f"loss.impl={x}"] for x in impls}
        labels = {f"impl_{x}": f"ConKD, hard gate, `loss.impl={x}`" for x in impls}
    else:
        cache = work / "cache"
        offline = ["loss.gate.mode=hard", "teachers.mode=offline", f"teachers.cache_dir={cache}"]
        variants = {
            "conkd_hard": ["loss.gate.mode=hard"],
            "conkd_offline": offline,
            "ce_only": ["loss.w_kd=0"],
        }
        labels = {
            "conkd_hard": "ConKD, hard gate, D online",
            "conkd_offline": "ConKD, hard gate, teacher cache (offline)",
            "ce_only": "CE only (w_kd = 0, no teacher)",
        }
    first = next(iter(variants.values()))
    # make sure the teachers exist before timing (the first job would train them)
    run_job(work / "warm", 2, [*args.set, *first], args.nproc)
    cache_info = None
    if not args.impls:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        cache_info = run_cache(cache, args.set, args.nproc)
    res: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    for r in range(args.rounds):
        for name, extra in variants.items():
            rows = run_job(work / f"{name}_{r}", args.steps, [*args.set, *extra], args.nproc)
            res[name].append(step_stats(rows, args.warmup))
    load1 = os.getloadavg()[0]
    agg = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in res.items()}
    cmd = shlex.join(["python", "bench/bench_distill_step.py", *sys.argv[1:]])
    what = "loss implementations" if args.impls else "ConKD vs CE only"
    setup = ", ".join(args.set) if args.set else "default config (synthetic corpus, tiny student)"
    note = f"; {args.note}" if args.note else ""
    lines = [
        f"## Distillation step, {what} (bench/bench_distill_step.py) — "
        f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- command: `{cmd}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU{note}; {args.nproc} "
        f"rank(s) (gloo), ZeRO-3 student + ZeRO-3 inference teacher; {setup}; load average "
        f"{load0:.1f} → {load1:.1f}; {time.monotonic() - t0:.0f} s",
        f"- {args.rounds} alternating rounds of {args.steps} steps each; medians; first "
        f"{args.warmup} steps excluded; peak memory = the job's largest per-rank peak RSS "
        "(setup included)",
        "",
        *_table(agg, labels),
        "",
    ]
    if cache_info is not None:
        kd, off, ce = agg["conkd_hard"], agg["conkd_offline"], agg["ce_only"]
        info = json.loads((work / "conkd_hard_0" / "run_info.json").read_text())
        per_rank = math.ceil(info["train_sequences"] / args.nproc)
        per_epoch = math.ceil(per_rank / 8)  # the default micro batch (steps of one epoch)
        epoch_teacher = kd["teacher_s"] * per_epoch
        c = cache_info
        lines += [
            f"**ConKD / CE-only step time: online {kd['step_s'] / ce['step_s']:.2f}×, "
            f"offline (teacher cache) {off['step_s'] / ce['step_s']:.2f}×** (same run, "
            "alternating jobs).",
            "",
            f"Teacher cache (k = {c['k']}, float16, R in full): {c['bytes_per_token']:.1f} "
            f"bytes per response token ({c['d_bytes_per_token']:.1f} for D's top-k and exact "
            f"m_t, {c['r_bytes_per_token']:.1f} for R), {c['rows']:,} response tokens and "
            f"{c['turns']:,} recommender turns of the training and validation splits, "
            f"{c['bytes'] / 2**20:.2f} MiB. The cache job took {c['wall_s']:.0f} s "
            f"(its pass over both splits {c['pass_s']:.1f} s, the rest is start-up); "
            f"the teacher forwards of one online epoch ({per_epoch} steps × "
            f"{kd['teacher_s']:.3f} s) take {epoch_teacher:.1f} s: the cache pays for itself "
            f"after {c['wall_s'] / max(epoch_teacher, 1e-9):.1f} epochs of one student.",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"raw": res, "cache": cache_info}, indent=1))
    if args.out:
        with open(ROOT / args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
