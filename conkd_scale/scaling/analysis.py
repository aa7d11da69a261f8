"""Gate analysis of a scaling study, from gate traces and training logs.

A gate trace (``gate_trace.jsonl`` of ``launch/evaluate.py ... gate_trace=true``) holds, per
recommender turn of the test split, an LM's item mass ``m_t = Σ_{i∈I} p(i | x, y_<t)`` at each
reply token and which of those tokens are gold items. For D this *is* ConKD's gate
(hard: ``λ_t = 1[m_t > η]``, soft: ``λ_t = m_t``); for a student it is the gate the student
would compute itself, i.e. how far it has learnt *when* to recommend. Everything here is a
pure function of such traces (tested on hand-made ones).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conkd_scale.utils.errors import DataError


@dataclass(frozen=True)
class TurnTrace:
    """One recommender turn: item mass per reply token [T] and gold-item flags [T]."""

    conv_id: str
    turn_index: int
    is_recommendation: bool
    m_T: np.ndarray  # [T] float
    gold_T: np.ndarray  # [T] bool

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> TurnTrace:
        m_T = np.asarray(rec["item_mass"], dtype=np.float64)
        gold_T = np.zeros(len(m_T), dtype=bool)
        gold_T[np.asarray(rec["gold_item_pos"], dtype=np.int64)] = True
        return cls(str(rec["conv_id"]), int(rec["turn_index"]), bool(rec["is_recommendation"]),
                   m_T, gold_T)  # fmt: skip


def load_trace(path: str | Path) -> list[TurnTrace]:
    """Read a ``gate_trace.jsonl``; a bad line raises :class:`DataError` naming it."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                out.append(TurnTrace.from_record(json.loads(line)))
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise DataError(
                    path,
                    f"not a gate-trace record ({type(e).__name__}: {e})",
                    line=n,
                    hint="write it with launch/evaluate.py ... gate_trace=true",
                ) from e
    return out


def pooled(traces: Sequence[TurnTrace]) -> tuple[np.ndarray, np.ndarray]:
    """All tokens: item masses [N] and gold flags [N]."""
    if not traces:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate([t.m_T for t in traces]), np.concatenate([t.gold_T for t in traces])


def gate_values(m_N: np.ndarray, mode: str, eta: float = 0.5) -> np.ndarray:
    """λ from item masses: ``hard`` 1[m > η], ``soft`` m."""
    if mode == "hard":
        return (m_N > eta).astype(np.float64)
    if mode == "soft":
        return m_N.astype(np.float64)
    raise ValueError(f"gate_values: mode {mode!r} is not hard/soft")


def histogram(m_N: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    """Fraction of tokens per equal-width bin of [0, 1] (``edges`` has bins + 1 values)."""
    counts, edges = np.histogram(np.clip(m_N, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    total = max(int(counts.sum()), 1)
    return {"edges": edges.tolist(), "fraction": (counts / total).tolist()}


def gold_vs_other(traces: Sequence[TurnTrace]) -> dict[str, float | int | None]:
    """Mean item mass at gold item tokens and at all other tokens, with their counts."""
    m_N, gold_N = pooled(traces)
    n_gold, n_other = int(gold_N.sum()), int((~gold_N).sum())
    return {
        "m_gold": float(m_N[gold_N].mean()) if n_gold else None,
        "m_other": float(m_N[~gold_N].mean()) if n_other else None,
        "n_gold": n_gold,
        "n_other": n_other,
    }


def precision_recall(traces: Sequence[TurnTrace], eta: float = 0.5) -> dict[str, float | None]:
    """The hard gate 1[m > η] as a detector of gold item tokens: precision, recall, F1."""
    m_N, gold_N = pooled(traces)
    pred_N = m_N > eta
    hit, n_pred, n_gold = int((pred_N & gold_N).sum()), int(pred_N.sum()), int(gold_N.sum())
    p = hit / n_pred if n_pred else None
    r = hit / n_gold if n_gold else None
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else None
    return {"precision": p, "recall": r, "f1": f1, "fires": n_pred / max(len(m_N), 1)}


def conversation_profiles(
    traces: Sequence[TurnTrace], mode: str = "soft", eta: float = 0.5, max_turns: int = 12
) -> dict[str, Any]:
    """Gate over the turns of a conversation.

    Each recommender turn gets its turn gate ``max_t λ_t`` (did the gate open anywhere in the
    reply). Per conversation, its recommender turns are numbered 1, 2, ... in order; returned:
    the mean turn gate per ordinal (up to ``max_turns``), separately for recommendation turns
    (a gold item in the reply) and chit-chat turns, with counts; the pooled means of the two
    kinds; and ``conversations``: each conversation's turn gates in order with their kinds.
    """
    by_conv: dict[str, list[TurnTrace]] = defaultdict(list)
    for t in traces:
        by_conv[t.conv_id].append(t)
    sums = {k: np.zeros(max_turns) for k in ("rec", "chat")}
    counts = {k: np.zeros(max_turns, dtype=np.int64) for k in ("rec", "chat")}
    pooled_turns: dict[str, list[float]] = {"rec": [], "chat": []}
    convs = {}
    for cid, turns in by_conv.items():
        turns = sorted(turns, key=lambda t: t.turn_index)
        seq = []
        for k, t in enumerate(turns):
            lam = float(gate_values(t.m_T, mode, eta).max()) if len(t.m_T) else 0.0
            kind = "rec" if t.is_recommendation else "chat"
            pooled_turns[kind].append(lam)
            seq.append((t.turn_index, kind, lam))
            if k < max_turns:
                sums[kind][k] += lam
                counts[kind][k] += 1
        convs[cid] = seq
    by_ordinal = {
        k: [float(s / c) if c else None for s, c in zip(sums[k], counts[k], strict=True)]
        for k in sums
    }
    return {
        "mode": mode,
        "by_ordinal": by_ordinal,
        "counts": {k: counts[k].tolist() for k in counts},
        "mean_rec_turn": float(np.mean(pooled_turns["rec"])) if pooled_turns["rec"] else None,
        "mean_chat_turn": float(np.mean(pooled_turns["chat"])) if pooled_turns["chat"] else None,
        "conversations": convs,
    }


def summarise_trace(traces: Sequence[TurnTrace], eta: float = 0.5) -> dict[str, Any]:
    """Every gate statistic of one trace (JSON-ready; conversations left out)."""
    m_N, _ = pooled(traces)
    prof = conversation_profiles(traces, "soft", eta)
    prof.pop("conversations")
    return {
        "tokens": len(m_N),
        "turns": len(traces),
        "m_mean": float(m_N.mean()) if len(m_N) else None,
        "hard_gate_mean": float(gate_values(m_N, "hard", eta).mean()) if len(m_N) else None,
        **gold_vs_other(traces),
        **precision_recall(traces, eta),
        "histogram": histogram(m_N),
        "profile": prof,
    }


def training_curves(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """From a run's ``metrics.jsonl`` rows: the validation series (``val_*`` against step,
    the student's own gate included) and the training series of D's gate on the batches
    (``gate_mean``, ``gate_precision``, ``gate_recall``)."""
    val: dict[str, list[float]] = defaultdict(list)
    train: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("kind") == "eval":
            val["step"].append(r["step"])
            for k, v in r.items():
                if k.startswith("val_") and isinstance(v, (int, float)):
                    val[k].append(float(v))
        elif r.get("kind") == "train" and "gate_mean" in r:
            train["step"].append(r["step"])
            for k in ("gate_mean", "gate_precision", "gate_recall"):
                v = r.get(k)  # null (logged NaN) or absent: nan here
                train[k].append(math.nan if v is None else float(v))
    return {"val": dict(val), "train": dict(train)}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (an absent file: no rows)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def size_trend(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """Slope of y against log10(x) by least squares (None with fewer than 2 points)."""
    pts = [(math.log10(x), y) for x, y in zip(xs, ys, strict=True) if y is not None and x > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if np.ptp(lx) == 0:
        return None
    return float(np.polyfit(lx, ly, 1)[0])


def rate_stderr(p: float | None, n: int) -> float | None:
    """Binomial standard error of a rate ``p`` measured on ``n`` cases."""
    if p is None or n <= 0:
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)
