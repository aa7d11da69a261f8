"""ConKD distillation end to end on 2 CPU ranks (gloo) through the real DeepSpeed launcher.

One module-scoped run trains tiny teachers (auto-train) and distils a ZeRO-3 student with a
sharded ZeRO-3 dialogue teacher; the other tests reuse its teachers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers_ds import run_deepspeed

pytestmark = pytest.mark.slow
HAS_TB = importlib.util.find_spec("tensorboard") is not None
SCRIPT = "launch/distill.py"
FINITE = ("loss", "ce", "kd", "kd_dialog", "kd_rec", "gate_mean")


def base_args(root: Path) -> list[str]:
    return [
        f"data_dir={root}/data",
        f"teachers.rec_dir={root}/rec",
        f"teachers.dialog_dir={root}/dialog",
        "teachers.rec_overrides=epochs=4",
        "teachers.dialog_overrides=model.preset=tiny,model.vocab_size=500,train.max_steps=40,"
        "train.eval_every=0,train.lr=5e-3",
        "max_length=128",
        "max_train_conversations=120",
        "train.progress=false",
        "train.log_every=1",
        "train.micro_batch=4",
        "train.grad_accum=2",  # every run accumulates: checked against a reference below
        "student.preset=tiny",
        "student.dropout=0",
        "train.eval_every=0",
    ]


def read_rows(out: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    out = root / "a"
    run_deepspeed(
        SCRIPT,
        [
            "--deepspeed",
            "ds_configs/zero3.json",
            *base_args(root),
            f"output_dir={out}",
            "train.max_steps=6",
            "train.save_every=3",
            f"debug_dump_dir={root}/dump",
        ],
        timeout=900,
        log=root / "a.log",
    )
    return root, out


def test_zero3_run_with_sharded_teacher(run_a):
    _, out = run_a
    info = json.loads((out / "run_info.json").read_text())
    assert info["zero_stage"] == 3 and info["world_size"] == 2
    # D is an inference-only ZeRO-3 engine: each rank holds only part of its parameters
    assert info["teacher_params_this_rank"] < info["teacher_params"]
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in (
        "loss",
        "ce",
        "kd",
        "kd_dialog",
        "kd_rec",
        "gate_mean",
        "gate_frac_above_eta",
        "tokens_per_s",
        "samples_per_s",
        "peak_mem_mb",
    ):
        assert key in rows[-1], key
    # finite numbers (a NaN/inf is logged as null, which fails here)
    assert all(isinstance(r[k], float) and math.isfinite(r[k]) for r in rows for k in FINITE)
    # R's term is exercised: the hard gate opened and KL(q_R || p_S) entered the loss
    assert any(r["gate_frac_above_eta"] > 0 for r in rows)
    assert all(r["kd_rec"] > 0 for r in rows if r["gate_frac_above_eta"] > 0)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = tok("[RECOMMENDER] [REC]", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] >= len(tok)
    from conkd_scale.eval.catalog_io import load_item_catalog

    assert (
        len(load_item_catalog(out / "hf"))
        == json.loads((out / "run_info.json").read_text())["items"]
    )
    meta = json.loads((out / "hf" / "conkd_export.json").read_text())
    assert meta["use_mode_tokens"] is True and meta["loss"]["gate"]["mode"] == "hard"


def _reference_loss(student, teacher, d: dict, loss_cfg):
    """The plain-PyTorch reference loss of one dumped micro batch ``d`` (the student's
    forward keeps its graph unless the caller turns gradients off; D's never does)."""
    from conkd_scale.loss import conkd_loss_reference

    s = student(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    rows = d["labels"][:, 1:] != -100
    V = int(d["item_tok_I"].max()) + 1
    return conkd_loss_reference(
        s[:, :-1][rows][:, :V],
        t[:, :-1][rows][:, :V],
        d["rec_SI"],
        d["rec_turn"][:, 1:][rows],
        d["item_tok_I"],
        d["labels"][:, 1:][rows],
        loss_cfg,
    )


def test_distributed_loss_equals_reference(run_a):
    """Each rank's first loss equals the reference loss from the gathered weights."""
    from transformers import AutoModelForCausalLM

    from conkd_scale.config import build_config
    from conkd_scale.distill.config import DistillConfig

    root, out = run_a
    cfg = build_config(DistillConfig, out / "config.json")
    student = AutoModelForCausalLM.from_pretrained(root / "dump" / "student0").eval()
    teacher = AutoModelForCausalLM.from_pretrained(root / "dialog" / "hf").eval()
    for rank in (0, 1):
        d = torch.load(root / "dump" / f"rank{rank}.pt", weights_only=False)
        with torch.no_grad():
            ref = _reference_loss(student, teacher, d, cfg.loss)
        assert float(ref.loss) == pytest.approx(d["loss"], rel=1e-5)
        assert float(ref.ce) == pytest.approx(d["parts"]["ce"], rel=1e-5)


def test_accumulated_gradient_equals_reference(run_a):
    """The first optimizer step accumulates 2 micro batches on each of 2 ranks (ZeRO-3): the
    student's gradient before the update equals that of the plain-PyTorch reference loss
    averaged over the 4 micro batches, ∇ (1/4) Σ_{rank, micro} L_ref (DeepSpeed averages over
    ranks and divides by grad_accum)."""
    from transformers import AutoModelForCausalLM

    from conkd_scale.config import build_config
    from conkd_scale.distill.config import DistillConfig

    root, out = run_a
    cfg = build_config(DistillConfig, out / "config.json")
    assert cfg.train.grad_accum == 2
    student = AutoModelForCausalLM.from_pretrained(root / "dump" / "student0").train()
    teacher = AutoModelForCausalLM.from_pretrained(root / "dialog" / "hf").eval()
    dumps = [
        torch.load(root / "dump" / f"rank{r}_micro{m}.pt", weights_only=False)
        for r in (0, 1)
        for m in (0, 1)
    ]
    assert all(d["grad_accum"] == 2 for d in dumps)
    assert not torch.equal(dumps[0]["input_ids"], dumps[1]["input_ids"])  # two micro batches
    total = torch.zeros(())
    for d in dumps:
        ref = _reference_loss(student, teacher, d, cfg.loss)
        assert float(ref.loss) == pytest.approx(d["loss"], rel=1e-5)
        total = total + ref.loss
    (total / len(dumps)).backward()
    grads = torch.load(root / "dump" / "grads_step1.pt", weights_only=False)
    params = dict(student.named_parameters())
    assert set(grads) == set(params)
    for name, p in params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_gives_identical_losses(run_a):
    root, out_a = run_a
    out = root / "b"
    common = [
        "--deepspeed",
        "ds_configs/zero3.json",
        *base_args(root),
        f"output_dir={out}",
        "train.max_steps=6",
        "train.save_every=3",
    ]
    run_deepspeed(SCRIPT, [*common, "train.stop_at_step=3"], log=root / "b1.log")
    assert not (out / "hf").exists()  # stopped early: no export
    run_deepspeed(SCRIPT, common, log=root / "b2.log")
    a = {r["step"]: r["loss"] for r in read_rows(out_a)}
    b = {r["step"]: r["loss"] for r in read_rows(out)}
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_zero2_student(run_a):
    root, _ = run_a
    out = root / "z2"
    run_deepspeed(
        SCRIPT,
        [
            "--deepspeed",
            "ds_configs/zero2.json",
            *base_args(root),
            f"output_dir={out}",
            "train.max_steps=2",
            "loss.gate.mode=soft",
            "loss.gate.eta=auto",
            "train.eval_every=2",
            "train.eval_max_batches=2",
            f"train.tensorboard={str(HAS_TB).lower()}",
        ],
        log=root / "z2.log",
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["zero_stage"] == 2
    if HAS_TB:  # DeepSpeed's TensorBoard monitor got the rows (test_scale_e2e: csv_monitor)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (events,) = (out / "tensorboard").rglob("events.out.tfevents.*")
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"Train/loss", "Train/kd_rec", "Eval/val_ppl"} <= tags, tags
        assert [e.step for e in acc.Scalars("Train/loss")] == [1, 2]
    # η = auto was chosen on the validation split: the best F1 of the grid, 0.5 included
    cal = info["gate_calibration"]
    assert cal["split"] == "valid" and info["eta"] == cal["eta"] and 0.0 <= info["eta"] < 1.0
    assert cal["at_eta"]["f1"] >= cal["at_0.5"]["f1"] and cal["at_eta"]["n_gold"] > 0
    assert (out / "hf" / "config.json").is_file() and len(read_rows(out)) == 2
    # the soft gate λ = m_t > 0 always lets R's term in
    assert all(r["kd_rec"] > 0 and r["gate_mean"] > 0 for r in read_rows(out))
    # validation rows carry the student's own gate (followed by the scaling study)
    ev = read_rows(out, "eval")[-1]
    for key in ("val_sgate_m_gold", "val_sgate_m_other", "val_sgate_recall", "val_sgate_agree"):
        assert 0.0 <= ev[key] <= 1.0, (key, ev)


def _fails(root: Path, name: str, args: list[str], needle: str) -> None:
    proc = run_deepspeed(SCRIPT, args, timeout=240, check=False, log=root / f"{name}.log")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # the clear error, printed by each of the two ranks
    assert text.count(needle) >= 2, text[-3000:]


def test_bad_inputs_fail_fast_on_every_rank(run_a, tmp_path):
    root, _ = run_a
    common = [*base_args(root), f"output_dir={tmp_path}/out"]
    zero3 = ["--deepspeed", "ds_configs/zero3.json"]
    _fails(tmp_path, "eta", [*zero3, *common, "loss.gate.eta=1.5"], "loss.gate.eta")
    # η = auto is chosen on the validation split: a corpus without one is refused
    shutil.copytree(root / "data", tmp_path / "novalid")
    (tmp_path / "novalid" / "valid_data.jsonl").write_text("")
    no_valid = [a for a in common if not a.startswith("data_dir=")]
    _fails(
        tmp_path,
        "eta_auto",
        [*zero3, *no_valid, f"data_dir={tmp_path}/novalid", "loss.gate.eta=auto"],
        "has no validation conversations",
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}')
    _fails(tmp_path, "json", ["--deepspeed", str(bad), *common], "not valid JSON")
    _fails(
        tmp_path,
        "missing",
        [*zero3, *common, f"teachers.rec_dir={tmp_path}/none", "teachers.auto_train=false"],
        "no trained recommendation",
    )
    # an R trained on another item vocabulary
    from conkd_scale.config import build_config
    from conkd_scale.data.synthetic import write_synthetic
    from conkd_scale.rec.train import RecTeacherConfig, train_rec_teacher

    write_synthetic(tmp_path / "other", seed=1, conversations=40, items=25)
    train_rec_teacher(
        build_config(
            RecTeacherConfig,
            None,
            [
                "dataset=synthetic",
                f"data_dir={tmp_path}/other",
                f"output_dir={tmp_path}/rec_other",
                "epochs=1",
                "progress=false",
            ],
        )
    )
    _fails(
        tmp_path,
        "align",
        [*zero3, *common, f"teachers.rec_dir={tmp_path}/rec_other"],
        "does not know item",
    )
