"""launch/evaluate.py end to end: dialog, rec and pipeline systems on the tiny setup, config
errors, and (slow) a two-rank torchrun run against the single-process result."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conkd_scale.config import build_config
from conkd_scale.eval.run import EvalConfig, evaluate
from conkd_scale.utils.errors import ConfigError
from tests.tiny_lm import ensure_tiny_setup

ROOT = Path(__file__).resolve().parents[1]
RANK_KEYS = ["R@1", "R@10", "R@50", "MRR@10", "NDCG@10"]
IN_RESPONSE = [f"{m}@{k}" for k in (1, 3, 5) for m in ("ReR", "PrR", "F1")]
PER_DECODING = [*IN_RESPONSE, *[f"{k}/new" for k in IN_RESPONSE], "rec_turn_item_rate", "R-agree@1"]
LM_KEYS = [
    "PPL",
    *IN_RESPONSE,
    "rec_turn_item_rate",
    "R-agree@1",
    "Dist-2",
    "Dist-3",
    "Dist-4",
    *[f"BLEU-{n}" for n in (1, 2, 3, 4)],
    *[f"{k}[{d}]" for k in PER_DECODING for d in ("class", "token")],
]
PIPE_KEYS = [*LM_KEYS, "discrepancy", "discrepancy[class]", "discrepancy[token]"]
NEW_KEYS = [f"{k}/new" for k in RANK_KEYS + IN_RESPONSE]
EXTRA = ["counts", "definitions", "meta"]
QUICK = ["generation.max_new_tokens=10", "generation.progress=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_tiny_setup(tmp_path_factory.getbasetemp() / "eval_tiny", rec=True)


def _launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "launch" / "evaluate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args: list[str]) -> int:
    return int(_launcher().main(args))


def _read(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    return metrics, rows


def test_dialog_end_to_end(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "dialog"
    rc = _run(
        [
            "--system",
            "dialog",
            "--model",
            str(setup["lm"]),
            "--dataset",
            "synthetic",
            "--data-dir",
            str(setup["data"]),
            "--output-dir",
            str(out),
            "--max-turns",
            "12",
            *QUICK,
        ]
    )
    assert rc == 0
    metrics, rows = _read(out)
    assert sorted(metrics) == sorted(RANK_KEYS + LM_KEYS + NEW_KEYS + EXTRA)
    # a single model has no discrepancy (its greedy item vs its own argmax is 0 by
    # construction): the key is absent, not 0; without R, R-agree@1 is undefined
    assert "discrepancy" not in metrics and "discrepancy" not in metrics["definitions"]
    assert metrics["R-agree@1"] is None and metrics["counts"]["r_agree_turns"] == 0
    assert metrics["PPL"] > 1 and 0 <= metrics["Dist-2"] <= 1
    assert metrics["counts"]["turns"] == len(rows) == 12
    assert "Dist-n" in metrics["definitions"] and "BLEU-n" in metrics["definitions"]
    assert metrics["meta"]["system"] == "dialog"
    for r in rows:
        assert {"context", "gold", "generated", "items", "rendered", "mode"} <= set(r)
        assert "<item_" not in r["rendered"] or not r["items"]
    assert [(r["conv_id"], r["turn_index"]) for r in rows] == sorted(
        [(r["conv_id"], r["turn_index"]) for r in rows], key=rows_order(rows)
    )
    assert json.loads((out / "config.json").read_text())["system"] == "dialog"


def rows_order(rows: list[dict[str, Any]]) -> Any:
    order = {(r["conv_id"], r["turn_index"]): n for n, r in enumerate(rows)}
    return lambda key: order[key]


def test_rec_and_pipeline_with_a_trained_r(setup: dict[str, Path], tmp_path: Path) -> None:
    base = [
        "--dataset",
        "synthetic",
        "--data-dir",
        str(setup["data"]),
        "--rec-teacher",
        str(setup["rec"]),
        *QUICK,
    ]
    assert _run(["--system", "rec", "--output-dir", str(tmp_path / "rec"), *base]) == 0
    rec_m, rec_rows = _read(tmp_path / "rec")
    assert sorted(rec_m) == sorted(RANK_KEYS + [f"{k}/new" for k in RANK_KEYS] + EXTRA)
    assert 0 <= rec_m["R@10"] <= rec_m["R@50"] <= 1
    assert all(len(r["r_top_items"]) == 10 for r in rec_rows)
    # R's numbers agree with R's own training-time test evaluation (same protocol)
    r_train = json.loads((setup["rec"] / "metrics.json").read_text())
    for k in ("R@1", "R@10", "R@50"):
        assert rec_m[k] == pytest.approx(r_train[k])
        assert rec_m[f"{k}/new"] == pytest.approx(r_train[f"new/{k}"])

    out = tmp_path / "pipe"
    rc = _run(
        [
            "--system",
            "pipeline",
            "--model",
            str(setup["lm"]),
            "--output-dir",
            str(out),
            "--decoding",
            "beam",
            *base,
        ]
    )
    assert rc == 0
    pipe_m, rows = _read(out)
    assert sorted(pipe_m) == sorted(RANK_KEYS + PIPE_KEYS + NEW_KEYS + EXTRA)
    assert pipe_m["R@10"] == rec_m["R@10"]  # the pipeline's recommender is R
    assert pipe_m["meta"]["decoding"] == "beam"
    # its first item is R's top item by construction: R-agree@1 is not reported
    assert pipe_m["R-agree@1"] is None and pipe_m["counts"]["r_agree_turns"] == 0
    for r in rows:
        assert r["r_top_item"] == r_top(rec_rows, r)
        assert len(r["items"]) == len(r["d_items"])  # every D item was replaced
        if r["d_items"]:
            assert r["items"][0] == r["r_top_item"]


def r_top(rec_rows: list[dict[str, Any]], r: dict[str, Any]) -> str:
    (match,) = [
        x for x in rec_rows if (x["conv_id"], x["turn_index"]) == (r["conv_id"], r["turn_index"])
    ]
    return str(match["r_top_items"][0])


def test_config_errors(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = _run(
        [
            "--system",
            "pipeline",
            "--model",
            str(setup["lm"]),
            "--data-dir",
            str(setup["data"]),
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert rc == 2 and "--rec-teacher" in capsys.readouterr().err
    rc = _run(
        [
            "--system",
            "dialog",
            "--model",
            str(tmp_path),
            "--data-dir",
            str(setup["data"]),
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "config.json" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config(EvalConfig, None, ["nonsense=1"])
    with pytest.raises(ConfigError, match="decoding"):
        build_config(EvalConfig, None, ["generation.decoding=topk"])


@pytest.mark.slow
def test_two_ranks_match_one(setup: dict[str, Path], tmp_path: Path) -> None:
    """torchrun with 2 CPU ranks (gloo): sharded turns gathered on rank 0 == one process."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not found beside the Python interpreter")
    args = [
        "--system",
        "dialog",
        "--model",
        str(setup["lm"]),
        "--dataset",
        "synthetic",
        "--data-dir",
        str(setup["data"]),
        "--max-turns",
        "9",
        "gate_trace=true",
        *QUICK,
    ]
    one = evaluate(_dialog_trace_config(setup, tmp_path / "one", 9))
    assert one is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "launch" / "evaluate.py"),
        *args,
        "--output-dir",
        str(tmp_path / "two"),
    ]
    # own process group, so that a hang is cleaned up completely (workers included)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    two, rows_two = _read(tmp_path / "two")
    _, rows_one = _read(tmp_path / "one")
    assert two["meta"]["shards"] == 2
    # per-turn NLL: other batch companions, the same value up to float rounding
    nll_two, nll_one = [r.pop("nll") for r in rows_two], [r.pop("nll") for r in rows_one]
    assert nll_two == pytest.approx(nll_one, rel=1e-5)
    assert rows_two == rows_one
    trace_one = _trace(tmp_path / "one")
    assert _trace(tmp_path / "two") == trace_one
    assert len(trace_one) == 9 and "_gate" not in rows_one[0]
    for k, v in one.items():
        if v is None:
            assert two[k] is None, k
        elif not isinstance(v, dict):
            assert two[k] == pytest.approx(v, rel=1e-5), k


def _student_config(setup: dict[str, Path], out: Path, *extra: str) -> EvalConfig:
    return build_config(
        EvalConfig,
        None,
        [
            "system=student",
            f"model={setup['lm']}",
            f"rec_teacher={setup['rec']}",
            f"data_dir={setup['data']}",
            "max_turns=20",
            f"output_dir={out}",
            *QUICK,
            *extra,
        ],
    )


def test_ppl_scores_the_gold_mode_token_and_records_it(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """PPL counts the gold [REC]/[GEN] token by default (METHOD.md: fed without being scored
    it leaks whether the reply has an item); ppl_include_mode=false drops exactly one token
    per turn, and metrics.json records which was used."""
    m = evaluate(_student_config(setup, tmp_path / "with", "both_item_decodings=false"))
    m_no = evaluate(
        _student_config(
            setup, tmp_path / "without", "both_item_decodings=false", "ppl_include_mode=false"
        )
    )
    assert m is not None and m_no is not None
    assert m["meta"]["ppl_include_mode"] is True and m_no["meta"]["ppl_include_mode"] is False
    turns = m["counts"]["turns"]
    assert m["counts"]["ppl_tokens"] == m_no["counts"]["ppl_tokens"] + turns
    _, rows = _read(tmp_path / "with")
    nll, n = sum(r["nll"] for r in rows), sum(r["ppl_tokens"] for r in rows)
    assert n == m["counts"]["ppl_tokens"]
    assert m["PPL"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert m["PPL"] != pytest.approx(m_no["PPL"], rel=1e-9)


def test_r_agree_and_both_item_decodings(setup: dict[str, Path], tmp_path: Path) -> None:
    """R-agree@1 = share of recommendation turns with a written item whose first item is R's
    top-1 (recomputed from generations.jsonl and R's own evaluation); the in-response metrics
    are reported under item_decoding=class (unsuffixed, recorded in meta) and token."""
    from conkd_scale.eval.metrics_lm import in_response_scores

    m = evaluate(_student_config(setup, tmp_path / "s"))
    assert m is not None
    _, rows = _read(tmp_path / "s")
    rec_m = evaluate(
        build_config(
            EvalConfig,
            None,
            [
                "system=rec",
                f"rec_teacher={setup['rec']}",
                f"data_dir={setup['data']}",
                "max_turns=20",
                f"output_dir={tmp_path / 'r'}",
            ],
        )
    )
    assert rec_m is not None
    _, rec_rows = _read(tmp_path / "r")
    assert [r["r_top1"] for r in rows] == [r["r_top_items"][0] for r in rec_rows]
    meta = m["meta"]
    assert meta["item_decoding"] == "class" and meta["item_decodings"] == ["class", "token"]
    assert meta["generation"]["item_decoding"] == "class" and meta["ppl_include_mode"] is True
    for dec in ("class", "token"):
        items = [
            r["items"] if dec == "class" else r["by_item_decoding"]["token"]["items"] for r in rows
        ]
        rec_turns = [(r, it) for r, it in zip(rows, items, strict=True) if r["is_recommendation"]]
        wrote = [(r, it) for r, it in rec_turns if it]
        hits = sum(it[0] == r["r_top1"] for r, it in wrote)
        assert m["counts"][f"r_agree_turns[{dec}]"] == len(wrote)
        assert m["counts"][f"r_agree_hits[{dec}]"] == hits
        expect = hits / len(wrote) if wrote else None
        assert m[f"R-agree@1[{dec}]"] == pytest.approx(expect)
        f1 = [in_response_scores(it, r["gold_items"], 1)[2] for r, it in rec_turns]
        assert m[f"F1@1[{dec}]"] == pytest.approx(sum(f1) / len(f1))
    for k in PER_DECODING:
        assert m[k] == m[f"{k}[class]"], k
    # the token decoding really is a second generation: plain argmax writes no more items
    rate = m["rec_turn_item_rate[class]"]
    assert m["rec_turn_item_rate[token]"] <= rate and m["counts"]["r_agree_turns[class]"] > 0


def _dialog_trace_config(setup: dict[str, Path], out: Path, turns: int) -> EvalConfig:
    """D alone on the first ``turns`` test turns, with its gate trace."""
    return build_config(
        EvalConfig,
        None,
        [
            "system=dialog",
            f"model={setup['lm']}",
            f"data_dir={setup['data']}",
            f"max_turns={turns}",
            "gate_trace=true",
            f"output_dir={out}",
            *QUICK,
        ],
    )


def _trace(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "gate_trace.jsonl").read_text().splitlines()]


def test_gate_trace_is_the_item_mass_of_each_reply_token(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """gate_trace.jsonl: m_t = Σ_items softmax(logits_t) at every scored reply token, and the
    gold item positions, recomputed here from the model's logits for one turn."""
    import torch

    from conkd_scale.data.tokenizer import item_token_ids
    from conkd_scale.eval.generation import GenerationSettings, build_generator
    from conkd_scale.eval.scoring import TeacherForcedScorer

    evaluate(_dialog_trace_config(setup, tmp_path, 6))
    trace = _trace(tmp_path)
    _, rows = _read(tmp_path)
    assert [(t["conv_id"], t["turn_index"]) for t in trace] == [
        (r["conv_id"], r["turn_index"]) for r in rows
    ]
    from conkd_scale.data.corpus import load_dataset

    turns = load_dataset("synthetic", setup["data"], kg="none", splits=("test",)).samples("test")
    n = next(i for i, t in enumerate(trace) if t["gold_item_pos"])  # a turn with an item
    gen = build_generator(setup["lm"], GenerationSettings(progress=False))
    ids = _catalog(setup)
    row = TeacherForcedScorer(gen, ids).row(turns[n])
    items = torch.tensor(item_token_ids(gen.tok, ids))
    with torch.no_grad():
        logits_TV = gen.model(input_ids=torch.tensor([row.ids])).logits[0]  # [T, V]
    p_RV = logits_TV[row.nll_from - 1 : len(row.ids) - 1].softmax(-1)  # [R, V]
    expect_m = p_RV[:, items].sum(-1)
    assert trace[n]["item_mass"] == pytest.approx(expect_m.tolist(), abs=1e-4)
    target = torch.tensor(row.ids[row.nll_from :])
    assert trace[n]["gold_item_pos"] == torch.isin(target, items).nonzero().flatten().tolist()
    assert all(0 <= m <= 1 for t in trace for m in t["item_mass"])


def test_own_top_item_is_the_argmax_over_items_where_the_item_was_written(
    setup: dict[str, Path],
) -> None:
    """Sampled replies (so the written item need not be the top one): the batched, left-padded
    computation equals a plain forward of prompt + mode + reply prefix, one reply at a time."""
    import torch

    from conkd_scale.data.corpus import load_dataset
    from conkd_scale.eval.generation import GenerationSettings, build_generator

    gen = build_generator(
        setup["lm"],
        GenerationSettings(decoding="sample", temperature=1.5, progress=False, batch_size=4),
    )
    turns = load_dataset("synthetic", setup["data"], kg="none", splits=("test",)).samples("test")
    contexts = [t.context for t in turns[:16]]
    replies = gen.generate(contexts, "auto")
    own = gen.own_top_items(contexts, replies, "auto")
    item_ids = sorted(gen.item_of_id)
    checked = 0
    for ctx, g, top in zip(contexts, replies, own, strict=True):
        if not g.items:
            assert top is None
            continue
        pos = next(k for k, t in enumerate(g.token_ids) if t in gen.item_of_id)
        mode = [gen.special[g.mode]] if g.mode else []
        ids = gen.prompt_ids(ctx, "auto") + mode + g.token_ids[:pos]
        with torch.no_grad():
            logits_V = gen.model(input_ids=torch.tensor([ids])).logits[0, -1]  # [V]
        best = item_ids[int(logits_V[item_ids].argmax())]
        assert top == gen.item_of_id[best]
        checked += 1
    assert checked > 0, "no sampled reply had an item: raise the temperature or the turns"


def _catalog(setup: dict[str, Path]) -> list[str]:
    from conkd_scale.data.corpus import load_dataset

    return load_dataset("synthetic", setup["data"], kg="none", splits=("test",)).catalog.ids


def test_forced_mode_and_sampling_in_process(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = build_config(
        EvalConfig,
        None,
        [
            "system=student",
            f"model={setup['lm']}",
            f"data_dir={setup['data']}",
            f"output_dir={tmp_path}",
            "max_turns=5",
            "mode=gen",
            "generation.decoding=sample",
            *QUICK,
        ],
    )
    metrics = evaluate(cfg)
    assert metrics is not None and metrics["counts"]["generated_mode_gen"] == 5
    _, rows = _read(tmp_path)
    assert [r["mode"] for r in rows] == ["gen"] * 5


def test_repeat_system_through_the_cli(setup: dict[str, Path], tmp_path: Path) -> None:
    """``--system repeat``: no model; its ranking is the repeat baseline's, counted on train."""
    from conkd_scale.data.corpus import load_dataset
    from conkd_scale.eval.run import rec_ranking
    from conkd_scale.rec.repeat import RepeatBaseline

    out = tmp_path / "repeat"
    args = ["--system", "repeat", "--dataset", "synthetic", "--data-dir", str(setup["data"])]
    assert _run([*args, "--output-dir", str(out)]) == 0
    m, rows = _read(out)
    assert sorted(m) == sorted(RANK_KEYS + [f"{k}/new" for k in RANK_KEYS] + EXTRA)
    assert m["meta"]["system"] == "repeat" and all(len(r["r_top_items"]) == 10 for r in rows)
    corpus = load_dataset("synthetic", setup["data"], kg="none")
    baseline = RepeatBaseline.from_samples(corpus.samples("train"), corpus.catalog.ids)
    want, want_new = rec_ranking(baseline, corpus.samples("test"), corpus.catalog.ids, 64)
    assert m["R@10"] == pytest.approx(want["R@10"]) and m["counts"]["ranked_gold_items"] > 0
    assert m["R@50/new"] == pytest.approx(want_new["R@50"])
