"""Step time of ConKD distillation vs the same student trained with cross-entropy only.

    python bench/bench_distill_step.py [--steps 40] [--rounds 2] [--out BENCHMARKS.md]

Runs the default configuration (synthetic corpus, ZeRO-3 student, sharded ZeRO-3 dialogue
teacher, 2 CPU ranks) as ``deepspeed launch/distill.py`` jobs, alternating ConKD (hard gate)
and the one-hot baseline (``loss.w_kd=0``: no teacher forward at all) ``--rounds`` times, so
both see the same machine load. Step time = wall time of the logged training steps after
the first ``--warmup`` steps; teacher-forward and loss shares come from the job's own
per-micro-batch timers (``time_teacher_s``, ``time_loss_s`` in metrics.jsonl). Teachers are
trained first if ``runs/teachers/synthetic`` lacks them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(out: Path, steps: int, extra: list[str]) -> list[dict]:
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(_port()),
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
    return {"step_s": step_s, "teacher_s": teacher, "loss_s": loss, "tokens_per_s": tps}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="runs/bench_distill")
    p.add_argument("--out", default=None, help="append the section to this markdown file")
    args = p.parse_args()
    work = ROOT / args.work
    variants = {"conkd_hard": ["loss.gate.mode=hard"], "ce_only": ["loss.w_kd=0"]}
    # make sure the teachers exist before timing (the first job would train them)
    run_job(work / "warm", 2, variants["conkd_hard"])
    res: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for name, extra in variants.items():
            rows = run_job(work / f"{name}_{r}", args.steps, extra)
            res[name].append(step_stats(rows, args.warmup))
    load1 = os.getloadavg()[0]
    agg = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in res.items()}
    kd, ce = agg["conkd_hard"], agg["ce_only"]
    lines = [
        f"## Distillation step time (bench/bench_distill_step.py) — "
        f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- command: `python bench/bench_distill_step.py --steps {args.steps} "
        f"--rounds {args.rounds}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU; 2 ranks (gloo), "
        f"ZeRO-3 student (tiny) + ZeRO-3 inference teacher (mini), default config; "
        f"load average {load0:.1f} → {load1:.1f}",
        f"- {args.rounds} alternating rounds of {args.steps} steps each; medians; first "
        f"{args.warmup} steps excluded",
        "",
        "| variant | step time (s) | tokens/s | teacher forward (s/step) | loss (s/step) |",
        "|---|---|---|---|---|",
        f"| ConKD, hard gate | {kd['step_s']:.3f} | {kd['tokens_per_s']:.0f} | "
        f"{kd['teacher_s']:.3f} ({kd['teacher_s'] / kd['step_s']:.0%}) | "
        f"{kd['loss_s']:.3f} ({kd['loss_s'] / kd['step_s']:.0%}) |",
        f"| CE only (w_kd = 0, no teacher) | {ce['step_s']:.3f} | {ce['tokens_per_s']:.0f} | – "
        f"| {ce['loss_s']:.3f} ({ce['loss_s'] / ce['step_s']:.0%}) |",
        "",
        f"**ConKD / CE-only step time: {kd['step_s'] / ce['step_s']:.2f}×** (same run, "
        "alternating jobs).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"raw": res}, indent=1))
    if args.out:
        with open(ROOT / args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
