"""Size of the offline teacher cache per response token on a dataset, without running D.

    python bench/bench_cache_size.py --dataset redial --data-dir ../shared/data/redial \
        --tokenizer runs/results/redial/teachers/dialog/hf [--max-length 256] [--out FILE]

Encodes the training and validation splits as the distillation job does (whole
conversations, ``--max-length``), counts response tokens (loss rows), recommender turns and
sequences, and prices them with the cache writer's packing (``conkd_scale/cache/writer.py``:
ids in uint16 when |U| <= 65,536 else int32, log-probs and R's probabilities in
float16, m_t in float32, int64 offsets), for several k and R's top-k (0: R in full). The
synthetic corpus's cache in BENCHMARKS.md is measured from a written cache instead; both
use the same packing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from conkd_scale.data.corpus import load_dataset
    from conkd_scale.data.sequences import IGNORE, encode_split
    from conkd_scale.data.tokenizer import load_tokenizer, tokenizer_item_ids

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="redial")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tokenizer", required=True, help="D's Hugging Face directory")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--k", default="32,64,128")
    p.add_argument("--rec-topk", default="0,64,256")
    p.add_argument("--rec-dir", default=None, help="R: report its top-k mass (validation turns)")
    p.add_argument("--out", default=None, help="write the markdown section to this file")
    args = p.parse_args()
    tok = load_tokenizer(ROOT / args.tokenizer)
    corpus = load_dataset(args.dataset, ROOT / args.data_dir, kg="none", splits=("train", "valid"))
    V, n_items = len(tok), len(tokenizer_item_ids(tok))
    rows = turns = seqs = 0
    for split in ("train", "valid"):
        for s in encode_split(corpus.splits[split], tok, max_length=args.max_length):
            rows += sum(1 for lab in s.labels[1:] if lab != IGNORE)
            turns += len(s.turns)
            seqs += 1
    id_bytes = 2 if V <= 65536 else 4
    offsets = 2 * 8 * (seqs + 1)  # row_offsets and turn_offsets
    lines = [
        f"## Teacher-cache size on {args.dataset} (bench/bench_cache_size.py) — "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- command: `{shlex.join(['python', 'bench/bench_cache_size.py', *sys.argv[1:]])}`",
        f"- machine: {platform.machine()}, {platform.system()} (no D forward: counts and the "
        "writer's packing)",
        f"- training + validation splits, max_length {args.max_length}: {seqs:,} sequences, "
        f"{rows:,} response tokens, {turns:,} recommender turns "
        f"({rows / max(turns, 1):.1f} tokens per turn); |U| = {V:,}, |I| = {n_items:,}",
        "",
        "| k | D: bytes / token | R | R: bytes / token | total bytes / token | total MiB |",
        "|---|---|---|---|---|---|",
    ]
    for k in [int(x) for x in args.k.split(",")]:
        d = rows * (k * id_bytes + k * 2 + 4)
        for kr in [int(x) for x in args.rec_topk.split(",")]:
            if kr == 0:
                r, what = turns * n_items * 2, "full (float16)"
            else:
                rid = 2 if n_items <= 65536 else 4
                r, what = turns * (kr * rid + kr * 2 + 4), f"top-{kr} + tail"
            total = d + r + offsets
            lines.append(
                f"| {k} | {d / rows:.1f} | {what} | {r / rows:.1f} | {total / rows:.1f} | "
                f"{total / 2**20:.1f} |"
            )
    if args.rec_dir:
        lines += ["", *rec_coverage(ROOT / args.rec_dir, tok, corpus, args.rec_topk)]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(ROOT / args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


def rec_coverage(rec_dir: Path, tok: object, corpus: object, topk: str) -> list[str]:
    """How much of R's probability its top-k holds, over the validation split's turns."""
    import torch

    from conkd_scale.data.tokenizer import tokenizer_item_ids
    from conkd_scale.rec.api import RecTeacher

    rec = RecTeacher.load(rec_dir)
    items = tokenizer_item_ids(tok)
    turns = corpus.samples("valid")
    q = torch.cat(
        [rec.item_distribution(turns[i : i + 200], items) for i in range(0, len(turns), 200)]
    )
    cum = q.sort(-1, descending=True).values.cumsum(-1)  # [S, I]
    ks = [int(x) for x in topk.split(",") if int(x) > 0]
    cells = [f"top-{k}: mean {cum[:, k - 1].mean():.3f}, min {cum[:, k - 1].min():.3f}" for k in ks]
    return [
        f"R's probability held by its top-k ({rec_dir.name}, τ_R = {rec.tau}, "
        f"{len(turns):,} validation turns): " + "; ".join(cells) + "."
    ]


if __name__ == "__main__":
    main()
