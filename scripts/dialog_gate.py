"""D's gate on a split: its item mass ``m_t`` at gold item positions and elsewhere, and the
hard gate ``1[m > η]`` as a detector of gold item positions at η = 0.5 and at ``η = auto``
(METHOD.md "The gate"), teacher-forced on every recommender reply of the split.

    python scripts/dialog_gate.py --model runs/dteach/redial_small/hf --dataset redial \
        --data-dir ../shared/data/redial --split valid --out gate_valid.json

Choose η on ``valid`` only; ``--eta`` applies an η chosen there to another split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from conkd_scale.data.corpus import load_dataset
from conkd_scale.eval.generation import GenerationSettings, build_generator
from conkd_scale.eval.scoring import TeacherForcedScorer
from conkd_scale.loss.gates import choose_eta, gate_detection
from conkd_scale.utils.io import write_json


def dialog_gate(
    model: str, dataset: str, data_dir: str, split: str, eta: float | None = None
) -> dict:
    """The figures above as a dict (``eta``: apply this η instead of choosing one)."""
    corpus = load_dataset(dataset, data_dir, kg="none", splits=(split,))
    turns = corpus.samples(split)
    gen = build_generator(model, GenerationSettings(progress=False), device="cpu")
    scored = TeacherForcedScorer(gen, corpus.catalog.ids, include_mode=True).score(
        turns, gate_trace=True
    )
    m_N = torch.tensor([m for row in scored.item_mass for m in row])  # [N]
    gold_N = torch.zeros(len(m_N), dtype=torch.bool)
    start = 0
    for row, pos in zip(scored.item_mass, scored.gold_item_pos, strict=True):
        gold_N[[start + p for p in pos]] = True
        start += len(row)
    chosen = choose_eta(m_N, gold_N) if eta is None else eta
    return {
        "model": model,
        "split": split,
        "turns": len(turns),
        "tokens": len(m_N),
        "ppl_mode_included": float(torch.tensor(scored.nll_sum / scored.n_tokens).exp()),
        "m_gold_mean": float(m_N[gold_N].mean()),
        "m_gold_max": float(m_N[gold_N].max()),
        "m_other_mean": float(m_N[~gold_N].mean()),
        "eta_source": "auto (this split)" if eta is None else "given",
        "at_eta": gate_detection(m_N, gold_N, chosen),
        "at_0.5": gate_detection(m_N, gold_N, 0.5),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", required=True, help="D's exported HF directory")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", default="valid")
    p.add_argument("--eta", type=float, default=None, help="apply this η (default: choose)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    out = dialog_gate(a.model, a.dataset, a.data_dir, a.split, a.eta)
    if a.out:
        write_json(a.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
