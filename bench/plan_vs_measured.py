"""The planner's CPU-rank peak against the peak a small distillation job measures, by phase.

    python bench/plan_vs_measured.py [--students tiny,medium,base] [--steps 3] \
        [--big-teacher gpt2:layers=16,hidden=1024,heads=16] [--work runs/plan_vs_measured] \
        [--out bench/results/plan_vs_measured]

Runs the configuration of ``tests/test_scale_e2e.py::test_monitors_and_planned_memory``
(``deepspeed --num_gpus 2 launch/distill.py``, ZeRO-3 on 2 CPU ranks, the synthetic corpus,
a tiny D and R, 128 tokens, micro batch 2) once per student preset, then a ``tiny`` student
with a random-weight D of ``--big-teacher`` (its tokenizer: the small D's), with
``train.memory_trace`` on (``conkd_scale/training/memtrace.py``). When the work directory
has no teachers yet, a first ``medium`` run trains them in its own process (as the test
does); the other runs find them trained. Measured: the job's ``peak_mem_mb`` (the largest
resident peak of its ranks at its train rows) and each phase's resident peak (the larger of
the two ranks); planned: ``conkd_scale.plan`` with the same sizes. The ``tiny`` run (a
0.2 M-parameter student) is the source of the planner's fixed per-rank baseline,
``CPU_OVERHEAD_MIB``: its measured peak less the planner's size-dependent terms for it.
Writes ``OUT.md`` and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conkd_scale.plan.arch import resolve_model  # noqa: E402
from conkd_scale.plan.memory import MIB, PlanInput, ZeroSettings, estimate  # noqa: E402
from conkd_scale.training.ds_config import load_ds_config  # noqa: E402
from conkd_scale.utils.io import write_json  # noqa: E402

SEQ, MB = 128, 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(work: Path, name: str, preset: str, steps: int, dialog: Path) -> Path:
    """One traced job of the ``preset`` student and the D in ``dialog`` into ``work/name``;
    returns that directory."""
    out = work / name
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus", "2", "--master_port", str(_port()),
        str(ROOT / "launch/distill.py"), "--deepspeed", "ds_configs/zero3.json",
        f"data_dir={work / 'data'}", f"teachers.rec_dir={work / 'rec'}",
        f"teachers.dialog_dir={dialog}", "teachers.rec_overrides=epochs=1",
        "teachers.dialog_overrides=model.preset=tiny,model.vocab_size=500,train.max_steps=2,"
        "train.eval_every=0",
        f"max_length={SEQ}", "max_train_conversations=40", f"student.preset={preset}",
        f"train.micro_batch={MB}", f"train.max_steps={steps}", "train.log_every=1",
        "train.eval_every=0", "train.eval_max_batches=1", "train.progress=false",
        f"train.memory_trace={steps}", "export=false", f"output_dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (work / f"{name}.log").write_text(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): see {work / f'{name}.log'}")
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def plan_for(preset: str, vocab: int, dialog: Path, overhead_mib: float | None) -> Any:
    return estimate(
        PlanInput(
            student=resolve_model(preset, vocab),
            teacher=resolve_model(str(dialog), vocab),
            zero=ZeroSettings.from_ds_config(load_ds_config(ROOT / "ds_configs/zero3.json")),
            teacher_zero=ZeroSettings.from_ds_config(
                load_ds_config(ROOT / "ds_configs/zero3_inference.json")
            ),
            gpus_per_node=2, device="cpu", gpu_mem_gib=64, seq_len=SEQ, micro_batch=MB,
            overhead_mib=overhead_mib,
        )
    )  # fmt: skip


def phase_peaks(out: Path) -> list[dict[str, Any]]:
    """Per traced phase (in order), the larger resident peak of the ranks and rank 0's
    resident size at its end, in MiB."""
    per_rank = [
        [json.loads(x) for x in f.read_text().splitlines()]
        for f in sorted((out / "memory_trace").glob("rank_*.jsonl"))
    ]
    rows = []
    for marks in zip(*per_rank, strict=True):
        r0 = marks[0]
        rows.append(
            {
                "phase": r0["phase"],
                "step": r0.get("step"),
                "shape": r0.get("shape"),
                "peak_mib": max(m["peak_mib"] for m in marks),
                "rss_mib": r0["rss_mib"],
                "anon_mib": r0["anon_mib"],
                "malloc_free_mib": r0.get("malloc_free_mib"),
            }
        )
    return rows


def measure(out: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((out / "run_info.json").read_text())
    return {
        "peak_mib": max(r["peak_mem_mb"] for r in rows if r["kind"] == "train"),
        "student_params": info["student_params"],
        "teacher_params": info["teacher_params"],
        "vocab": info["vocab"],
        "phases": phase_peaks(out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", default="tiny,medium,base")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--big-teacher",
        default="gpt2:layers=16,hidden=1024,heads=16",
        help="also a tiny student with a random D of this shape ('': none)",
    )
    ap.add_argument("--work", default="runs/plan_vs_measured")
    ap.add_argument("--out", default="bench/results/plan_vs_measured")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from conkd_scale.data.synthetic import write_synthetic

    if not (work / "data").is_dir():
        write_synthetic(work / "data", seed=0, conversations=200, items=60)
    dialog = work / "dialog"
    # label, student preset, run directory, D
    jobs = [(p, p, p, dialog) for p in args.students.split(",")]
    if not dialog.exists():  # trains the teachers in its process, as the test does
        jobs.insert(0, ("medium, teachers trained in the job", "medium", "medium_teachers", dialog))
    if args.big_teacher:
        jobs.append((f"tiny, D {args.big_teacher}", "tiny", "tiny_big_d", work / "big_d"))
    runs = []
    for name, preset, dirname, d in jobs:
        if d.name == "big_d":  # a random-weight D over the small D's tokenizer
            from bench.bench_scale import make_random_lm

            make_random_lm(args.big_teacher, dialog / "hf", d)
        out = run_job(work, dirname, preset, args.steps, d)
        runs.append({"name": name, "preset": preset, "dialog": str(d), **measure(out)})
    baseline = {}
    for r in runs:
        if r["name"] == "tiny":  # the source of the planner's fixed baseline
            sized = plan_for("tiny", r["vocab"], dialog, 0.0).total / MIB
            baseline = {"tiny_peak_mib": r["peak_mib"], "tiny_size_terms_mib": sized}
    for r in runs:
        plan = plan_for(r["preset"], r["vocab"], Path(r["dialog"]), None)
        r["planned_mib"] = plan.total / MIB
        r["planned_phase"] = plan.peak_phase
        r["planned_parts_mib"] = {k: v / MIB for k, v in plan.parts.items() if v}
        r["error"] = r["planned_mib"] / r["peak_mib"] - 1
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res = {
        "command": shlex.join([sys.argv[0], *sys.argv[1:]]),
        "date": when,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}",
        "baseline": baseline,
        "runs": runs,
    }
    write_json(f"{args.out}.json", res)
    md = [
        f"# bench/plan_vs_measured.py — {when}",
        "",
        f"- command: `python {res['command']}`",
        f"- machine: {res['machine']}; 2 CPU ranks (gloo), fp32, OMP 1 thread per rank",
        "- job: the configuration of tests/test_scale_e2e.py (ZeRO-3, synthetic corpus, tiny D"
        f" and R, {SEQ} tokens, micro batch {MB}; the last run: a random-weight D of "
        f"`{args.big_teacher}`); `train.memory_trace` on",
        "",
        "| run | student params | D params | measured peak (MiB) | planned (MiB) |"
        " planned − measured | planned peak phase |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        md.append(
            f"| {r['name']} | {r['student_params'] / 1e6:.1f} M | "
            f"{r['teacher_params'] / 1e6:.1f} M | {r['peak_mib']:,.0f} | "
            f"{r['planned_mib']:,.0f} | {r['error']:+.1%} | {r['planned_phase']} |"
        )
    if baseline:
        md += [
            "",
            f"Fixed per-rank baseline (`CPU_OVERHEAD_MIB`): the `tiny` run's peak "
            f"{baseline['tiny_peak_mib']:.0f} MiB less the planner's size-dependent terms for "
            f"it ({baseline['tiny_size_terms_mib']:.0f} MiB) = "
            f"{baseline['tiny_peak_mib'] - baseline['tiny_size_terms_mib']:.0f} MiB.",
        ]
    for r in runs:
        md += [
            "",
            f"## {r['name']}: resident memory by phase (MiB; peak: the larger of the ranks' "
            "peaks within the phase; rss, anon, glibc free: rank 0 at its end)",
            "",
            "| phase | step | batch | peak | rss | anon | glibc free |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in r["phases"]:
            step = "" if p["step"] is None else p["step"]
            shape = "" if p["shape"] is None else "×".join(map(str, p["shape"]))
            md.append(
                f"| {p['phase']} | {step} | {shape} | {p['peak_mib']:,.0f} | "
                f"{p['rss_mib']:,.0f} | {p['anon_mib']:,.0f} | {p['malloc_free_mib'] or 0:,.0f} |"
            )
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in r["planned_parts_mib"].items())
        md += ["", f"Planned parts (MiB): {parts}."]
    Path(f"{args.out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[: 12 + len(runs)]))


if __name__ == "__main__":
    main()
