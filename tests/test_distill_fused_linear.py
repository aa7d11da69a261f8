"""``loss.impl=fused_linear`` in the distillation job: 2 CPU ranks (gloo), ZeRO-3 student.

The fused path runs the student to its final hidden states and the loss through the
partitioned lm_head inside the engine's forward (``ConKDFusedLinearLoss``; on the CPU its
per-chunk loss is the chunked math). Two 3-step jobs from the same seed, chunked and fused:
each rank's first loss, every logged step loss, the validation loss (logits path in both)
and the exported students agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers_ds import run_deepspeed
from tests.test_distill_e2e import SCRIPT, base_args, read_rows

pytestmark = pytest.mark.slow


def _job(root: Path, name: str, impl: str) -> Path:
    out = root / name
    run_deepspeed(
        SCRIPT,
        [
            "--deepspeed",
            "ds_configs/zero3.json",
            *base_args(root),
            f"output_dir={out}",
            f"loss.impl={impl}",
            "loss.chunk_size=64",  # several chunks per micro batch
            "train.max_steps=3",
            "train.eval_every=3",
            "train.eval_max_batches=1",
            f"debug_dump_dir={root}/dump_{name}",
        ],
        timeout=900,
        log=root / f"{name}.log",
    )
    return out


def test_fused_linear_equals_chunked_under_zero3(tmp_path: Path) -> None:
    chunked = _job(tmp_path, "chunked", "chunked")  # also trains the tiny teachers
    fused = _job(tmp_path, "fused", "fused_linear")
    info_c = json.loads((chunked / "run_info.json").read_text())
    info_f = json.loads((fused / "run_info.json").read_text())
    assert (info_c["loss_impl"], info_f["loss_impl"]) == ("chunked", "fused_linear")
    assert info_f["zero_stage"] == 3 and info_f["world_size"] == 2

    # each rank's first micro batch: same batch, same loss and parts
    for rank in (0, 1):
        dc = torch.load(tmp_path / "dump_chunked" / f"rank{rank}.pt", weights_only=False)
        df = torch.load(tmp_path / "dump_fused" / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(dc["input_ids"], df["input_ids"])
        assert df["loss"] == pytest.approx(dc["loss"], rel=1e-5)
        for key in ("ce", "kd", "kd_dialog", "kd_rec", "gate_lam_sum", "gate_n_tokens"):
            assert df["parts"][key] == pytest.approx(dc["parts"][key], rel=1e-5, abs=1e-7), key

    # the steps after the first also agree: the fused gradients (lm_head included) are right
    rc, rf = read_rows(chunked), read_rows(fused)
    assert [r["step"] for r in rf] == [1, 2, 3]
    for a, b in zip(rc, rf, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["gate_mean"] == pytest.approx(a["gate_mean"], abs=1e-6)
    ec, ef = read_rows(chunked, "eval")[-1], read_rows(fused, "eval")[-1]
    assert ef["val_loss"] == pytest.approx(ec["val_loss"], rel=1e-5)
    assert ef["val_sgate_m_other"] == pytest.approx(ec["val_sgate_m_other"], rel=1e-3)

    # the exported students (the wrapped LM, not the wrapper) are the same model: 3 Adam
    # steps move the weights by ~6e-4, the two runs differ by ~1e-7
    from transformers import AutoModelForCausalLM

    mc = AutoModelForCausalLM.from_pretrained(chunked / "hf")
    mf = AutoModelForCausalLM.from_pretrained(fused / "hf")
    sc, sf = mc.state_dict(), mf.state_dict()
    assert sc.keys() == sf.keys()
    for k in sc:
        torch.testing.assert_close(sf[k], sc[k], rtol=0, atol=1e-5, msg=k)
