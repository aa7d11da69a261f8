"""``python -m conkd_scale.data {stats,synth,fetch}``.

python -m conkd_scale.data stats --dataset redial --data-dir ../shared/data/redial --split train
python -m conkd_scale.data synth --out data/synthetic --seed 0
python -m conkd_scale.data fetch --dataset redial --out data/redial
"""

from __future__ import annotations

import argparse
import json
import sys

from conkd_scale.utils.errors import ConkdError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m conkd_scale.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="print counts of one split as one JSON object")
    st.add_argument("--dataset", required=True, choices=["redial", "inspired", "synthetic"])
    st.add_argument("--data-dir", required=True)
    st.add_argument("--split", default="train", choices=["train", "valid", "test"])
    st.add_argument("--kg", default=None, choices=["kbrd", "dbpedia", "none"])
    sy = sub.add_parser("synth", help="write the synthetic ReDial-format dataset")
    sy.add_argument("--out", required=True)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--conversations", type=int, default=600)
    sy.add_argument("--items", type=int, default=120)
    fe = sub.add_parser("fetch", help="download a public dataset and verify its checksums")
    fe.add_argument("--dataset", required=True, choices=["redial", "inspired"])
    fe.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "stats":
            from conkd_scale.data.corpus import corpus_stats, load_dataset

            corpus = load_dataset(args.dataset, args.data_dir, kg=args.kg, splits=[args.split])
            print(json.dumps(corpus_stats(corpus, args.split)))
        elif args.cmd == "synth":
            from conkd_scale.data.synthetic import write_synthetic

            summary = write_synthetic(
                args.out, seed=args.seed, conversations=args.conversations, items=args.items
            )
            print(json.dumps(summary))
        else:
            from conkd_scale.data.fetch import fetch

            for path in fetch(args.dataset, args.out):
                print(path)
    except (ConkdError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
