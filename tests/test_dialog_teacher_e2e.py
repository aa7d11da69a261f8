"""End-to-end: the dialogue teacher trained by 2 CPU ranks (gloo) under ZeRO-3, started by the
real DeepSpeed launcher (``deepspeed --num_gpus 2``).

One 24-step run (module fixture) is shared by the loss, logging, checkpoint and export
assertions; a second run restarts from its step-16 checkpoint, stops at step 20 as if
pre-empted, and is resumed again to step 24. A third run extends a locally saved tiny GPT-2
(the DialoGPT stand-in) with item tokens. Total: ~1-2 minutes on 2 idle cores.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers_ds import corpus_texts, make_tiny_gpt2, read_jsonl, run_deepspeed

pytestmark = pytest.mark.slow

SCRIPT = "launch/train_dialog_teacher.py"
STEPS = 24
COMMON = [
    "--deepspeed",
    "ds_configs/zero3.json",
    "model.preset=tiny",
    "model.vocab_size=400",
    "max_length=128",
    "train.micro_batch=4",
    "train.grad_accum=2",
    f"train.max_steps={STEPS}",
    "train.lr=3e-3",
    "train.warmup_steps=4",
    "train.log_every=1",
    "train.eval_every=12",
    "train.save_every=8",
    "train.keep_last=2",
    "train.seed=1",
]


def _train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"}


def _exported_logits(hf_dir: Path, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        return model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits


@pytest.fixture(scope="module")
def zero3_run(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("d_zero3") / "run"
    run_deepspeed(
        SCRIPT,
        [
            *COMMON,
            "dataset=synthetic",
            f"data_dir={synthetic_dir}",
            f"output_dir={out}",
            "save_reference_logits=true",
        ],
        log=out.parent / "log.txt",
    )
    return out


def test_loss_decreases_and_metrics_logged(zero3_run: Path) -> None:
    losses = _train_losses(zero3_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 1.0, (first, last)
    rows = read_jsonl(zero3_run / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    for key in ("step", "loss", "nll", "lr", "tokens_per_s", "samples_per_s", "peak_mem_mb"):
        assert all(key in r for r in train), key
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [12, 24]
    assert evals[1]["val_ppl"] < evals[0]["val_ppl"]
    assert rows[-1]["kind"] == "final" and rows[-1]["val_ppl"] == evals[1]["val_ppl"]
    info = json.loads((zero3_run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    ds = json.loads((zero3_run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["zero_optimization"]["stage"] == 3
    cfg = json.loads((zero3_run / "config.json").read_text())
    assert cfg["train"]["max_steps"] == STEPS


def test_checkpoints_keep_latest_with_data_position(zero3_run: Path) -> None:
    ck = zero3_run / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000016", "step_00000024"]
    meta = json.loads((ck / "step_00000016" / "meta.json").read_text())
    n_train = json.loads((zero3_run / "run_info.json").read_text())["train_sequences"]
    per_epoch = math.ceil(math.ceil(n_train / 2) / 4)  # micro batches per rank per epoch
    micro = 16 * 2  # 16 steps x 2 accumulated micro batches
    assert meta["step"] == 16 and meta["world_size"] == 2
    assert (meta["epoch"], meta["batch_offset"]) == (micro // per_epoch, micro % per_epoch)


def test_export_matches_engine_logits(zero3_run: Path) -> None:
    from transformers import AutoTokenizer

    hf = zero3_run / "hf"
    ref = torch.load(zero3_run / "reference_logits.pt")
    logits_BTV = _exported_logits(hf, ref)
    mask_BT = ref["attention_mask"].bool()
    torch.testing.assert_close(logits_BTV[mask_BT], ref["logits"][mask_BT], rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.convert_tokens_to_ids("[REC]") != tok.unk_token_id
    assert any(t.startswith("<item_") for t in tok.get_vocab())


def test_resume_reproduces_uninterrupted_losses(
    zero3_run: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    """Restart from the shared run's step-16 checkpoint, stop at 20 as if pre-empted, resume
    again: steps 17-24 must repeat the uninterrupted run's losses (fp32, 1e-6)."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(zero3_run / "tokenizer", out / "tokenizer")
    shutil.copytree(
        zero3_run / "checkpoints" / "step_00000016", out / "checkpoints" / "step_00000016"
    )
    args = [*COMMON, "dataset=synthetic", f"data_dir={synthetic_dir}", f"output_dir={out}"]
    run_deepspeed(SCRIPT, [*args, "train.stop_at_step=20"], log=tmp_path / "log1.txt")
    stopped = read_jsonl(out / "metrics.jsonl")
    assert stopped[-1]["kind"] == "final" and stopped[-1]["stopped_early"] is True
    assert (out / "checkpoints" / "step_00000020" / "meta.json").is_file()
    assert not (out / "hf").exists()  # a pre-empted run is not exported
    run_deepspeed(SCRIPT, args, log=tmp_path / "log2.txt")
    full, resumed = _train_losses(zero3_run), _train_losses(out)
    assert sorted(resumed) == list(range(17, STEPS + 1))  # no duplicated rows after resume
    for s in resumed:
        assert abs(resumed[s] - full[s]) <= 1e-6, (s, resumed[s], full[s])
    last_eval = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"][-1]
    full_eval = [r for r in read_jsonl(zero3_run / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert last_eval["step"] == STEPS
    assert abs(last_eval["val_loss"] - full_eval["val_loss"]) <= 1e-6
    assert (out / "hf" / "model.safetensors").is_file()


def test_pretrained_gpt2_extended_trained_and_exported(synthetic_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = make_tiny_gpt2(tmp_path / "gpt2", corpus_texts(synthetic_dir))
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    out = tmp_path / "run"
    run_deepspeed(
        SCRIPT,
        [
            "--deepspeed",
            "ds_configs/zero3.json",
            "dataset=synthetic",
            f"data_dir={synthetic_dir}",
            f"output_dir={out}",
            f"model.pretrained={base_dir}",
            "max_length=128",
            "train.micro_batch=2",
            "train.max_steps=2",
            "train.lr=1e-4",
            "train.warmup_steps=0",
            "train.log_every=1",
            "save_reference_logits=true",
        ],
        log=tmp_path / "log.txt",
    )
    hf = out / "hf"
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    from conkd_scale.data.corpus import load_dataset

    catalog = load_dataset("synthetic", synthetic_dir, kg="none", splits=()).catalog
    assert len(tok) == len(base_tok) + len(catalog) + 4  # items, [REC], [GEN], 2 role tokens
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert len(_train_losses(out)) == 2
    # item rows started at their title's mean embedding (2 small steps moved them a little)
    W_VD = model.get_input_embeddings().weight.detach()
    W0_VD = base.get_input_embeddings().weight.detach()
    for item in list(catalog)[:5]:
        row_D = W_VD[tok.convert_tokens_to_ids(f"<item_{item.item_id}>")]
        title_D = W0_VD[base_tok.encode(item.title)].mean(0)
        assert (row_D - title_D).abs().max() < 2e-3
    ref: dict[str, Any] = torch.load(out / "reference_logits.pt")
    mask_BT = ref["attention_mask"].bool()
    torch.testing.assert_close(
        _exported_logits(hf, ref)[mask_BT], ref["logits"][mask_BT], rtol=0, atol=1e-5
    )


def test_invalid_deepspeed_config_fails_fast_on_every_rank(tmp_path: Path) -> None:
    bad = tmp_path / "broken_zero3.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}\n')
    proc = run_deepspeed(
        SCRIPT, ["--deepspeed", str(bad), f"output_dir={tmp_path / 'o'}"], timeout=120, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(f"error: DeepSpeed config {bad}: not valid JSON") == 2, out[-3000:]
    assert not (tmp_path / "o").exists()  # failed before any work
