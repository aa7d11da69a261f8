"""Memory and time of the distillation job at GPT-2-medium/large shapes on 2 CPU ranks.

    python bench/bench_scale.py [--configs zero3,zero3_offload] [--seq-len 128] \
        [--micro-batch 1] [--steps 3] [--rec-dir DIR] [--out bench/results/scale]

Builds, once, under ``--work``: a ReDial tokenizer (the project's SentencePiece + item
tokens) and a random-weight GPT-2-large-shaped D (``--teacher``, default 36 layers, width
1280, 20 heads) saved as a Hugging Face directory; R is ``--rec-dir`` (trained for one epoch
into the work dir when absent). Then, per DeepSpeed config, runs the product itself,
``deepspeed --num_gpus 2 launch/distill.py`` on real ReDial batches with a from-scratch
GPT-2-medium-shaped student (``--student``, default the ``large`` preset: 24 layers, width
1024, 16 heads), for ``--steps`` optimizer steps, its final checkpoint and its HF export.

Measured per rank: the peak resident set (the kernel's ``VmHWM``, polled from /proc; and
the largest ``RssAnon``, without mapped files) and the model-state bytes (the student's fp32
weight partition and Adam moments read back from the rank's ZeRO checkpoint, its gradient
partition of the same size, the weights' own partition beside the master, D's shard from
``run_info.json``), against the unsharded requirement (16 bytes per student parameter, 4 per
D parameter); step time and D's share of it from metrics.jsonl. Beside each, the planner's
prediction (``python -m conkd_scale.plan`` with the same sizes). Writes ``OUT.json`` and
``OUT.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conkd_scale.plan.arch import resolve_model  # noqa: E402
from conkd_scale.plan.measure import RankMemoryPoller, checkpoint_state_bytes  # noqa: E402
from conkd_scale.plan.memory import GIB, MIB, PlanInput, ZeroSettings, estimate  # noqa: E402
from conkd_scale.utils.io import write_json  # noqa: E402

MIB_F = float(MIB)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def make_tokenizer(dataset: str, data_dir: Path, out: Path) -> Path:
    """The project's tokenizer for ``dataset`` (SentencePiece over the training texts + item
    tokens); the synthetic corpus is generated first if missing."""
    if out.is_dir():
        return out
    from conkd_scale.data.corpus import load_dataset
    from conkd_scale.data.synthetic import ensure_synthetic
    from conkd_scale.models.builder import ModelConfig, prepare_tokenizer

    if dataset == "synthetic":
        ensure_synthetic(data_dir, seed=0)
    corpus = load_dataset(dataset, data_dir, kg="none", splits=("train",))
    texts = [t.text for c in corpus.splits["train"] for t in c.turns]
    prepare_tokenizer(ModelConfig(), corpus.catalog, texts, out)
    return out


def make_random_lm(spec: str, tok_dir: Path, out: Path) -> Path:
    """A random-weight causal LM of architecture ``spec`` over the tokenizer, saved with it
    as an HF directory (built in a child process, so that this one stays small while the
    jobs run): D, or a student for ``student.pretrained``."""
    if (out / "config.json").is_file():
        return out
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from transformers import AutoModelForCausalLM
from conkd_scale.data.tokenizer import load_tokenizer, save_tokenizer
from conkd_scale.plan.arch import hf_config
tok = load_tokenizer({str(tok_dir)!r})
cfg, _ = hf_config({spec!r}, len(tok))
cfg.vocab_size = len(tok)
cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
cfg.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg)
model.save_pretrained({str(out)!r})
save_tokenizer(tok, {str(out / "tok")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    for f in (out / "tok").iterdir():  # the tokenizer beside the weights
        f.rename(out / f.name)
    (out / "tok").rmdir()
    return out


def ensure_rec(data_dir: Path, rec_dir: Path) -> Path:
    from conkd_scale.distill.teachers import rec_trained

    if not rec_trained(rec_dir):
        cmd = [
            sys.executable, "launch/train_rec_teacher.py", "--config",
            "configs/rec_teacher_redial.json", "--dataset", "redial", "--data-dir",
            str(data_dir), "--output-dir", str(rec_dir), "epochs=1",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT)
    return rec_dir


def run_job(args: argparse.Namespace, ds: str, out: Path, teacher: Path, rec: Path) -> dict:
    """One distillation job under the rank-memory poller; its measurements."""
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.nproc),
        "--master_port", str(_free_port()), "launch/distill.py",
        "--deepspeed", f"ds_configs/{ds}.json",
        "dataset=redial", f"data_dir={args.data_dir}", "kg=kbrd",
        f"output_dir={out}", f"teachers.dialog_dir={teacher}", f"teachers.rec_dir={rec}",
        "teachers.auto_train=false", f"student.preset={args.student}",
        f"max_length={args.seq_len}", f"max_train_conversations={args.max_conversations}",
        f"train.micro_batch={args.micro_batch}", f"train.max_steps={args.steps}",
        "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
        "train.eval_max_batches=1", "train.save_every=0", "train.progress=false",
        "train.resume=none", "loss.gate.eta=0.5", "export=true",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(":")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        poller = RankMemoryPoller(proc.pid).start()
        low = None
        while proc.poll() is None:
            time.sleep(0.5)
            avail = _mem_available_gib()
            if avail < args.min_available_gib:  # a shared machine: stop before the OOM killer
                low = (avail, dict(poller.hwm_kib))
                os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        ranks = poller.stop()
    wall = time.monotonic() - t0
    if low is not None:
        raise SystemExit(
            f"stopped {ds}: the machine had {low[0]:.1f} GiB available (--min-available-gib "
            f"{args.min_available_gib}); ranks' peak RSS so far (MiB): "
            + ", ".join(f"{r}: {m['peak_rss_mib']:,.0f}" for r, m in ranks.items())
        )
    if rc != 0:
        tail = (out.parent / f"{out.name}.log").read_text()[-4000:]
        raise SystemExit(f"{shlex.join(cmd)} failed ({rc}):\n{tail}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    info = json.loads((out / "run_info.json").read_text())
    step_dir = sorted((out / "checkpoints").glob("step_*"))[-1]
    ckpt = checkpoint_state_bytes(step_dir)
    timed = train[1:] or train  # the first step includes warm-up work
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(train)]
    step_s = statistics.median(gaps) if gaps else train[0]["elapsed_s"]
    teacher_s = statistics.median(r["time_teacher_s"] for r in timed)
    per_rank = {}
    for r, c in ckpt.items():
        n = c["partition_numel"]
        # the fp32 master and, beside it, the weights' own partition (a second fp32 copy,
        # offloaded or not: conkd_scale/plan/memory.py student_states)
        states = c["master_bytes"] * 2 + 4 * n + c["moments_bytes"]
        per_rank[r] = {
            **ranks.get(r, {}),
            "student_partition_params": n,
            "student_state_bytes": states,
            "teacher_shard_bytes": 4 * info["teacher_params_this_rank"],
            "model_state_bytes": states + 4 * info["teacher_params_this_rank"],
        }
    unsharded = 16 * info["student_params"] + 4 * info["teacher_params"]
    return {
        "ds_config": f"ds_configs/{ds}.json",
        "wall_s": wall,
        "student_params": info["student_params"],
        "teacher_params": info["teacher_params"],
        "vocab": info["vocab"],
        "unsharded_model_state_bytes": unsharded,
        "ranks": per_rank,
        "step_s": step_s,
        "teacher_s_per_step": teacher_s,
        "teacher_share": teacher_s / step_s,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "job_peak_mem_mb": max(r["peak_mem_mb"] for r in train),
        "export": (out / "hf" / "config.json").is_file(),
    }


def predict(args: argparse.Namespace, ds: str, vocab: int, teacher_dir: Path) -> dict[str, Any]:
    from conkd_scale.training.ds_config import load_ds_config

    inp = PlanInput(
        student=resolve_model(args.student, vocab),
        teacher=resolve_model(str(teacher_dir), vocab),
        zero=ZeroSettings.from_ds_config(load_ds_config(ROOT / f"ds_configs/{ds}.json")),
        teacher_zero=ZeroSettings.from_ds_config(
            load_ds_config(ROOT / "ds_configs/zero3_inference.json")
        ),
        gpus_per_node=args.nproc, gpu_mem_gib=24.0, device="cpu", seq_len=args.seq_len,
        micro_batch=args.micro_batch,
    )  # fmt: skip
    plan = estimate(inp)
    return {
        "total_bytes": plan.total,
        "parts_bytes": plan.parts,
        # as measured: the student's partitions (no gathered layer) and D's shard
        "model_state_bytes": plan.model_states - plan.parts["gathered layer"]
        + plan.parts.get("offloaded states", 0.0) + plan.parts["teacher shard"],
        "step_time_s": plan.step_time_s,
    }  # fmt: skip


def gpu_report(out: Path, peak_tflops: float) -> dict[str, Any]:
    """``scripts/gpu_scale.sh``'s summary: throughput, model FLOPs utilisation and peak
    memory of its run beside the planner's prediction (``OUT/gpu_scale.{json,md}``)."""
    plan = json.loads((out / "plan.json").read_text())
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    timed = train[1:] or train
    inp = plan["input"]
    tokens_per_step = inp["micro_batch"] * inp["seq_len"] * inp["grad_accum"]
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    peak = max(r["peak_mem_mb"] for r in train)
    all_flops_per_token = plan["flops_per_step"] / tokens_per_step
    res = {
        "tokens_per_s": tps,
        "mfu_student": tps * plan["student_training_flops_per_token"] / (peak_tflops * 1e12),
        "mfu_with_teacher": tps * all_flops_per_token / (peak_tflops * 1e12),
        "peak_mem_mib": peak,
        "planned_mib": plan["total_bytes"] / MIB_F,
        "planned_tokens_per_s": plan["tokens_per_s"],
        "peak_tflops": peak_tflops,
        "run_info": json.loads((out / "run" / "run_info.json").read_text()),
    }
    write_json(out / "gpu_scale.json", res)
    (out / "gpu_scale.md").write_text(
        "| tokens/s | MFU (student 6P) | MFU (with D's forward) | peak memory (MiB, "
        "max_memory_allocated) | planned (MiB) | planned tokens/s |\n|---|---|---|---|---|---|\n"
        f"| {tps:,.0f} | {res['mfu_student']:.1%} | {res['mfu_with_teacher']:.1%} | {peak:,.0f}"
        f" | {res['planned_mib']:,.0f} | {plan['tokens_per_s']:,.0f} |\n"
    )
    return res


def table(res: dict[str, Any]) -> list[str]:
    lines = [
        "| config | rank | peak RSS (MiB) | peak anon RSS (MiB) | planned peak (MiB) | "
        "model states (MiB) | planned (MiB) | × unsharded | step (s) | D's share | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        p = r["plan"]
        for rank, m in r["ranks"].items():
            lines.append(
                f"| `{r['ds_config']}` | {rank} | {m.get('peak_rss_mib', float('nan')):,.0f} | "
                f"{m.get('peak_anon_mib', float('nan')):,.0f} | {p['total_bytes'] / MIB_F:,.0f} | "
                f"{m['model_state_bytes'] / MIB_F:,.0f} | {p['model_state_bytes'] / MIB_F:,.0f} | "
                f"{m['model_state_bytes'] / r['unsharded_model_state_bytes']:.3f} | "
                f"{r['step_s']:.1f} | {r['teacher_share']:.0%} | {r['tokens_per_s']:.0f} |"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", default="zero3,zero3_offload", help="ds_configs/<name>.json")
    p.add_argument("--student", default="large", help="student preset or HF dir")
    p.add_argument("--teacher", default="gpt2:layers=36,hidden=1280,heads=20")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "redial"))
    p.add_argument("--rec-dir", default=None, help="a trained R (default: WORK/rec, trained)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--max-conversations", type=int, default=64)
    p.add_argument("--work", default="runs/bench_scale")
    p.add_argument("--dataset", default="redial", choices=["redial", "synthetic"])
    p.add_argument("--prepare-only", action="store_true", help="only build the models")
    p.add_argument("--student-arch", default=None, help="with --prepare-only: WORK/student")
    p.add_argument("--gpu-report", default=None, metavar="DIR", help="summarise gpu_scale.sh")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense peak")
    p.add_argument(
        "--min-available-gib",
        type=float,
        default=2.0,
        help="kill a job when the machine's available memory falls below this",
    )
    p.add_argument("--note", default="")
    p.add_argument("--out", default="bench/results/scale", help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if args.gpu_report:
        gpu_report(Path(args.gpu_report), args.peak_tflops)
        return
    work = (ROOT / args.work).resolve()
    data = Path(args.data_dir)
    if args.prepare_only:  # scripts/gpu_scale.sh: the models for one GPU run
        tok = make_tokenizer(args.dataset, data, work / "tokenizer")
        make_random_lm(args.teacher, tok, work / "teacher")
        if args.student_arch:
            make_random_lm(args.student_arch, tok, work / "student")
        return
    if not data.is_dir():
        raise SystemExit(f"ReDial not found at {data} (--data-dir)")
    tok = make_tokenizer(args.dataset, data, work / "tokenizer")
    teacher = make_random_lm(args.teacher, tok, work / "teacher")
    rec = ensure_rec(data, Path(args.rec_dir) if args.rec_dir else work / "rec")
    load0, t0 = os.getloadavg()[0], time.monotonic()
    runs = []
    for ds in args.configs.split(","):
        r = run_job(args, ds, work / ds, teacher, rec)
        r["plan"] = predict(args, ds, r["vocab"], teacher)
        runs.append(r)
        print(json.dumps(r, indent=1), flush=True)
    res = {
        "command": shlex.join(["python", "bench/bench_scale.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB, no GPU"
        + (f"; {args.note}" if args.note else ""),
        "load_average": [load0, os.getloadavg()[0]],
        "wall_s": time.monotonic() - t0,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
        "runs": runs,
    }
    out = ROOT / args.out
    write_json(out.with_suffix(".json"), res)
    md = [
        f"# bench/bench_scale.py — {res['date']}",
        "",
        f"- command: `{res['command']}`",
        f"- machine: {res['machine']}; load average {load0:.1f} → {os.getloadavg()[0]:.1f}",
        f"- student `{args.student}` ({runs[0]['student_params'] / 1e6:.1f} M), D "
        f"`{args.teacher}` ({runs[0]['teacher_params'] / 1e6:.1f} M, random weights), vocab "
        f"{runs[0]['vocab']:,} (ReDial); {args.nproc} CPU ranks (gloo), fp32; seq "
        f"{args.seq_len}, micro batch {args.micro_batch}, {args.steps} steps, final "
        "checkpoint and HF export",
        "",
        *table(res),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
