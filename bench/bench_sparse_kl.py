"""Error of the sparse dialogue teacher (D's top-k + tail bin + exact m_t) against D's full
distribution, on real ReDial validation positions, and the bytes it takes per token.

    nice -n 5 .venv/bin/python bench/bench_sparse_kl.py            # 400 positions, k=8,32,64,128
    nice -n 5 .venv/bin/python bench/bench_sparse_kl.py --positions 200 --no-write

D is the trained dialogue teacher (``--teacher``, an HF dir with its tokenizer); the student
``--student`` an HF dir of a trained student of the same vocabulary (default: the ConKD
hard-gate student of the results run), or ``fresh`` (a freshly initialised model of D's
config and vocabulary) or ``teacher@τ`` (D itself with its logits divided by τ). R is the
trained recommendation teacher (``--rec``; for the total loss). Sequences are built as the
distillation job builds them (conkd_scale/data/sequences.py, ``max_length`` 256); the loss
rows are the first ``--positions`` response tokens of the validation split.

For each k the stored log-probs are rounded to ``--logp-dtype`` (fp16 by default), as the
cache would store them, and every loss is the reference implementation's. Reported per k:
mean tail mass, the mean dialogue KL (λ = 0: the ungated KL(p_D‖p_S)) and the total loss
under the run's config (hard gate η = 0.5, τ = 1, w_ce = w_kd = 0.5) and under τ = 2, dense
vs sparse (absolute and relative error), and the bytes per response token of int32 (or
uint16, |U| ≤ 65,536) ids + logp + fp32 m_t; and the error of the dialogue KL's gradient
for the top-k and for the top-k/2 with k/2 slots drawn from D's tail. Writes
bench/results/sparse_kl.{json,md} and a dated section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conkd_scale.data.corpus import load_dataset  # noqa: E402
from conkd_scale.data.sequences import IGNORE, collate, encode_split  # noqa: E402
from conkd_scale.data.tokenizer import (  # noqa: E402
    item_token_ids,
    load_tokenizer,
    tokenizer_item_ids,
)
from conkd_scale.loss import (  # noqa: E402
    GateConfig,
    LossConfig,
    SparseTeacher,
    conkd_loss_reference,
)
from conkd_scale.utils.io import atomic_open, write_json  # noqa: E402

RESULTS = Path("/work/main/runs/results/redial")
DTYPES = {"fp16": (torch.float16, 2), "bf16": (torch.bfloat16, 2), "fp32": (torch.float32, 4)}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default=str(RESULTS / "teachers/dialog/hf"))
    p.add_argument("--student", default=str(RESULTS / "hard/seed0/hf"))
    p.add_argument("--rec", default=str(RESULTS / "teachers/rec"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/redial"))
    p.add_argument("--positions", type=int, default=400)
    p.add_argument("--ks", default="8,32,64,128")
    p.add_argument("--logp-dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--draws", type=int, default=16, help="draw sets per k for the gradient")
    p.add_argument("--out-dir", default=str(ROOT / "bench/results"))
    p.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args()


def _models(args: argparse.Namespace, V: int) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """D, the student and the temperature applied to the student's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    if args.student == "fresh":
        torch.manual_seed(0)
        return teacher, AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
            args.teacher)).eval(), 1.0  # fmt: skip
    if args.student.startswith("teacher@"):
        return teacher, teacher, float(args.student.split("@", 1)[1])
    student = AutoModelForCausalLM.from_pretrained(args.student).eval()
    if student.get_output_embeddings().weight.shape[0] < V:
        raise SystemExit(f"{args.student}: vocabulary smaller than D's ({V})")
    return teacher, student, 1.0


@torch.no_grad()
def _rows(args: argparse.Namespace) -> dict[str, object]:
    """D's and the student's logits at the first ``--positions`` loss rows, with labels,
    R's item distribution per turn and the turn index."""
    tok = load_tokenizer(args.teacher)
    V = len(tok)
    item_ids = tokenizer_item_ids(tok)
    items_I = torch.tensor(item_token_ids(tok, item_ids), dtype=torch.long)
    corpus = load_dataset("redial", args.data, kg="none", splits=("valid",))
    seqs = encode_split(corpus.splits["valid"], tok, max_length=args.max_length)
    teacher, student, s_tau = _models(args, V)
    from conkd_scale.rec.api import RecTeacher

    rec = RecTeacher.load(args.rec)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("t", "z", "y", "r")}
    q_parts: list[torch.Tensor] = []
    n, n_turns = 0, 0
    for s in range(0, len(seqs), 4):
        b = collate(seqs[s : s + 4], tok.pad_token_id)
        ids, mask = b["input_ids"], b["attention_mask"]
        keep = b["labels"][:, 1:] != IGNORE  # [B, T-1]
        t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][keep][:, :V]
        z = student(input_ids=ids, attention_mask=mask).logits[:, :-1][keep][:, :V] / s_tau
        rows["t"].append(t.float())
        rows["z"].append(z.float())
        rows["y"].append(b["labels"][:, 1:][keep])
        rows["r"].append(b["rec_turn"][:, 1:][keep] + n_turns)
        q_parts.append(rec.item_distribution(b["turns"], item_ids).float())
        n_turns += len(b["turns"])
        n += int(keep.sum())
        if n >= args.positions:
            break
    P = args.positions
    out = {k: torch.cat(v)[:P] for k, v in rows.items()}
    out["q"] = torch.cat(q_parts)
    out["items"] = items_I
    out["V"] = V
    return out


def _as_stored(st: SparseTeacher, dtype: torch.dtype) -> SparseTeacher:
    """``st`` with its log-probs rounded to the cache's storage dtype."""
    st.logp_NK = st.logp_NK.to(dtype).float()
    return st


def _kl_grad(z, teacher, q, r, items, y) -> torch.Tensor:
    """``[N, V]`` gradient of the ungated dialogue KL (λ = 0, τ = 1) in the student logits."""
    zz = z.clone().requires_grad_(True)
    cfg = LossConfig(gate=GateConfig(mode="dialog"), w_ce=0.0, w_kd=1.0)
    conkd_loss_reference(zz, teacher, q, r, items, y, cfg).loss.backward()
    return zz.grad


def _grad_errors(z, t, q, r, items, y, k, g_dense, dtype, draws) -> dict[str, float]:
    """Relative error ‖g − g_dense‖/‖g_dense‖ of the KL gradient: D's top-k; its top-k/2 and
    k/2 slots drawn from its tail (one draw set, and the mean of ``draws`` sets: the bias)."""

    def rel(g: torch.Tensor) -> float:
        return float((g - g_dense).norm() / g_dense.norm())

    top = _kl_grad(z, _as_stored(SparseTeacher.from_logits(t, items, k), dtype), q, r, items, y)
    S = k // 2
    sampled = []
    for i in range(draws):
        g = torch.Generator().manual_seed(i)
        st = _as_stored(SparseTeacher.sampled_from_logits(t, items, k, S, g), dtype)
        sampled.append(_kl_grad(z, st, q, r, items, y))
    return {
        "tail_samples": S,
        "topk": rel(top),
        "sampled_one": sum(rel(g) for g in sampled) / draws,
        "sampled_mean": rel(sum(sampled) / draws),
    }


def _bytes_per_token(k: int, V: int, logp_bytes: int) -> dict[str, int]:
    return {
        "int32_ids": k * (4 + logp_bytes) + 4,
        "uint16_ids": k * (2 + logp_bytes) + 4 if V <= 65536 else None,
    }


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    d = _rows(args)
    t, z, y, r, q, items, V = d["t"], d["z"], d["y"], d["r"], d["q"], d["items"], d["V"]
    logp_dtype, logp_bytes = DTYPES[args.logp_dtype]
    N = int(y.numel())
    cfgs = {
        "kl": LossConfig(gate=GateConfig(mode="dialog")),  # λ = 0: the ungated KL
        "run": LossConfig(),  # the results run: hard gate η = 0.5, τ = 1
        "tau2": LossConfig(tau=2.0),
    }
    dense = {n: conkd_loss_reference(z, t, q, r, items, y, c) for n, c in cfgs.items()}
    logp_full = torch.log_softmax(t, -1)
    g_dense = _kl_grad(z, t, q, r, items, y)
    res: list[dict[str, object]] = []
    for k in [int(x) for x in args.ks.split(",")]:
        st = _as_stored(SparseTeacher.from_logits(t, items, k), logp_dtype)
        row: dict[str, object] = {
            "k": k,
            "tail_mass_mean": float(st.tail_mass().mean()),
            "tail_mass_p90": float(st.tail_mass().quantile(0.9)),
            "bytes_per_token": _bytes_per_token(k, V, logp_bytes),
            "logp_max_abs_rounding": float(
                (st.logp_NK - logp_full.gather(1, st.ids_NK)).abs().max()
            ),
        }
        for name, c in cfgs.items():
            sp = conkd_loss_reference(z, st, q, r, items, y, c)
            de = dense[name]
            for part in ("kd_dialog", "loss"):
                a, b = float(getattr(de, part)), float(getattr(sp, part))
                row[f"{name}.{part}"] = {"dense": a, "sparse": b, "abs_err": b - a,
                                         "rel_err": (b - a) / a if a else None}  # fmt: skip
        row["grad"] = _grad_errors(z, t, q, r, items, y, k, g_dense, logp_dtype, args.draws)
        res.append(row)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "date": stamp,
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), "
        f"{args.threads} torch threads, CPU",
        "command": " ".join(["nice -n 5 .venv/bin/python bench/bench_sparse_kl.py", *sys.argv[1:]]),
        "teacher": args.teacher,
        "student": args.student,
        "rec": args.rec,
        "positions": N,
        "vocab": V,
        "items": int(items.numel()),
        "logp_dtype": args.logp_dtype,
        "seconds": round(time.perf_counter() - t0, 1),
        "draws": args.draws,
    }
    md = _markdown(meta, res)
    print(md)
    if not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "sparse_kl.json", {"meta": meta, "results": res})
        with atomic_open(out / "sparse_kl.md") as f:
            f.write(md)
        bench = Path(args.benchmarks)
        text = bench.read_text() if bench.exists() else "# Benchmarks\n"
        with atomic_open(bench) as f:
            f.write(text.rstrip("\n") + "\n\n" + md)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.2f}%"


def _markdown(meta: dict[str, object], res: list[dict[str, object]]) -> str:
    lines = [
        f"## Sparse dialogue teacher vs D's full distribution (bench/bench_sparse_kl.py) — "
        f"{meta['date']}",
        "",
        f"`{meta['command']}`; {meta['machine']}; {meta['seconds']} s. ReDial validation, "
        f"first {meta['positions']} response positions; |U| = {meta['vocab']:,} "
        f"({meta['items']:,} items); D = `{meta['teacher']}`, student = `{meta['student']}`, "
        f"R = `{meta['rec']}`; stored log-probs in {meta['logp_dtype']}, m_t exact (fp32). "
        "Reference implementation; error = sparse − dense.",
        "",
        "| k | tail mass mean (p90) | KL(p_D‖p_S) dense | sparse | rel. err | kd_dialog rel. "
        "err (run cfg) | loss abs. err (run cfg) | loss rel. err | loss rel. err τ=2 | "
        "B/token int32 ids | B/token uint16 ids |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        kl, run, tau2 = r["kl.kd_dialog"], r["run.kd_dialog"], r["tau2.loss"]
        loss = r["run.loss"]
        b = r["bytes_per_token"]
        lines.append(
            f"| {r['k']} | {r['tail_mass_mean']:.4f} ({r['tail_mass_p90']:.4f}) | "
            f"{kl['dense']:.4f} | {kl['sparse']:.4f} | {_pct(kl['rel_err'])} | "
            f"{_pct(run['rel_err'])} | {loss['abs_err']:+.5f} | {_pct(loss['rel_err'])} | "
            f"{_pct(tau2['rel_err'])} | {b['int32_ids']} | {b['uint16_ids'] or '–'} |"
        )
    lines += [
        "",
        "Gradient of the dialogue KL (λ = 0, τ = 1) in the student logits against the dense "
        "one, relative L2 error ‖g − g_dense‖ / ‖g_dense‖ over all positions: D's top-k "
        "(tail bin), and D's top-k/2 with k/2 slots drawn from its tail "
        "(`teachers.cache_tail_samples`; one draw set: the mean error over "
        f"{meta['draws']} sets; the mean of those sets: what is left is "
        "the bias plus the Monte-Carlo error of the mean).",
        "",
        "| k | top-k | top-k/2 + k/2 draws: one set | mean of the sets |",
        "|---|---|---|---|",
    ]
    for r in res:
        g = r["grad"]
        lines.append(
            f"| {r['k']} | {g['topk']:.3f} | {g['sampled_one']:.3f} | {g['sampled_mean']:.3f} |"
        )
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
