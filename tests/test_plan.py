"""The job planner (``python -m conkd_scale.plan``): meta-device sizes, agreement with
DeepSpeed's own model-state estimators, the breakdown it prints, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conkd_scale.plan.arch import resolve_model
from conkd_scale.plan.cli import main
from conkd_scale.plan.memory import PlanInput, ZeroSettings, estimate, student_states
from conkd_scale.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LLAMA_70B = {  # Llama-2-70B's shape
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def _zero(name: str) -> ZeroSettings:
    from conkd_scale.training.ds_config import load_ds_config

    return ZeroSettings.from_ds_config(load_ds_config(ROOT / "ds_configs" / f"{name}.json"))


def _write(tmp: Path, name: str, cfg: dict) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_70b_llama_is_planned_on_the_meta_device(tmp_path):
    """A 70 B model (280 GB in fp32) is counted in seconds (imports aside) and with no
    more memory than the imports take."""
    d = _write(tmp_path, "llama70b", LLAMA_70B)
    code = (
        "import resource, time, json, sys\n"
        "import accelerate, transformers.models.llama.modeling_llama  # imports: not timed\n"
        "from conkd_scale.plan.arch import resolve_model\n"
        "t = time.perf_counter()\n"
        f"m = resolve_model({str(d)!r})\n"
        "dt = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'params': m.params, 'largest': m.largest_layer_params, 's': dt, "
        "'rss_mib': rss, 'layers': m.n_layer, 'kv': m.n_kv_head}))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["params"] == 68_976_648_192  # Llama-2-70B's published count
    assert r["largest"] == 32000 * 8192  # an embedding (untied: both count alike)
    assert (r["layers"], r["kv"]) == (80, 8)
    assert r["s"] < 30, f"counting took {r['s']:.1f} s"
    assert r["rss_mib"] < 1500, f"peak RSS {r['rss_mib']:.0f} MiB (imports included)"
    assert time.perf_counter() - t0 < 170


def _real_counts(cfg) -> tuple[int, int]:
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    return model_to_params(AutoModelForCausalLM.from_config(cfg))


def test_meta_counts_equal_deepspeeds_on_the_real_model(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    gpt2 = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=3, n_head=4)
    llama = LlamaConfig(
        vocab_size=900,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for name, cfg in (("gpt2", gpt2), ("llama", llama)):
        cfg.save_pretrained(tmp_path / name)
        m = resolve_model(str(tmp_path / name))
        assert (m.params, m.largest_layer_params) == _real_counts(cfg), name
    arch = resolve_model("llama:layers=2,hidden=64,heads=4,kv_heads=2,intermediate=176,vocab=900")
    assert arch.params == resolve_model(str(tmp_path / "llama")).params


@pytest.mark.parametrize("world", [(1, 1), (1, 8), (2, 8), (4, 4)])
def test_model_states_agree_with_deepspeeds_estimators(world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes, gpn = world
    student = resolve_model("large", 50257)
    P, L = student.params, student.largest_layer_params
    base = PlanInput(student=student, teacher=None, nodes=nodes, gpus_per_node=gpn)
    for offload, (opt, prm) in {
        "none": (False, False),
        "optimizer": (True, False),
        "all": (True, True),
    }.items():
        inp = replace(base, zero=ZeroSettings(stage=3, offload_optimizer=opt, offload_param=prm))
        plan = estimate(inp)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            P, L, gpn, nodes, cpu_offload=opt, cpu_offload_params=prm, zero_init=True
        )
        assert plan.model_states == pytest.approx(gpu, rel=1e-6, abs=8), offload
        if opt:  # DeepSpeed's host figure carries its 1.5 buffer factor
            assert plan.host_per_node * 1.5 == pytest.approx(cpu, rel=1e-6), offload
    z2 = estimate(replace(base, zero=ZeroSettings(stage=2)))
    _, gpu2 = estimate_zero2_model_states_mem_needs(P, gpn, nodes, cpu_offload=False)
    assert z2.model_states == pytest.approx(gpu2, rel=1e-6, abs=8)
    z2o = estimate(replace(base, zero=ZeroSettings(stage=2, offload_optimizer=True)))
    _, gpu2o = estimate_zero2_model_states_mem_needs(P, gpn, nodes, cpu_offload=True)
    assert z2o.model_states == pytest.approx(gpu2o, rel=1e-6)


def test_fp32_states_and_sharding():
    """fp32 (the CPU runs): 20 bytes per parameter (the fp32 master is a copy beside the
    weights, offloaded or not); ZeRO-3 over 2 ranks halves every partition."""
    m = resolve_model("small", 500)
    one = PlanInput(student=m, teacher=None, device="cpu")
    two = replace(one, gpus_per_node=2)
    s1, s2 = student_states(one), student_states(two)
    assert s1["params"] + s1["gradients"] + s1["optimizer"] == 20 * m.params
    assert s2["optimizer"] == pytest.approx(s1["optimizer"] / 2)
    off = student_states(replace(two, zero=ZeroSettings(offload_optimizer=True)))
    assert off["host"] == pytest.approx((4 + 12) * m.params / 2)


def test_deepspeed_keeps_the_fp32_master_as_a_copy():
    """Why fp32 costs 20 B/param: ZeRO-3 reuses the weight partition as the master only if
    ``tensor.device == <the accelerator's device name>``, a torch.device against a str."""
    import torch
    from deepspeed.accelerator import get_accelerator

    assert torch.zeros(1).device != get_accelerator().current_device_name()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activations_are_what_autograd_keeps(dropout):
    """GPT-2's per-layer count against the tensors a real Hugging Face GPT-2 saves for its
    backward on the CPU (SDPA, fp32; with dropout torch's math path keeps the attention
    probabilities): every distinct storage but the weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from conkd_scale.plan.memory import activation_bytes

    cfg = GPT2Config(
        vocab_size=97, n_positions=64, n_embd=64, n_layer=3, n_head=4,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            kept[st.data_ptr()] = st.nbytes()
        return t

    b, s = 2, 48
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=torch.randint(0, 97, (b, s)), use_cache=False)
    spec = replace(resolve_model("gpt2:layers=3,hidden=64,heads=4", 97), dropout=dropout)
    inp = PlanInput(student=spec, teacher=None, device="cpu", seq_len=s)
    planned = activation_bytes(inp, b)
    measured = sum(kept.values()) - out.logits.numel() * 4  # the logits: a separate term
    assert planned == pytest.approx(measured, rel=0.1), (planned, measured)


def test_cpu_ranks_keep_the_forward_resident():
    """On a CPU rank the forward's tensors stay resident (glibc keeps the freed heap), and
    ZeRO-3's all-gather and reduce-scatter are transients on top: twice their bytes."""
    m = resolve_model("medium", 274)
    cpu = PlanInput(student=m, teacher=None, device="cpu", gpus_per_node=2, micro_batch=2,
                    seq_len=128, zero=_zero("zero3"))  # fmt: skip
    plan = estimate(cpu)
    assert plan.parts["activations"] > 0 and plan.parts["live gathered params"] == 4 * m.params
    assert plan.peak_phase in ("parameter all-gather", "gradient reduce-scatter")
    assert plan.parts["parameter all-gather"] == 2 * 4 * m.params
    bucket = min(cpu.zero.reduce_bucket_size, m.params)
    rs = estimate(replace(cpu, zero=replace(cpu.zero, max_live_parameters=0)))
    assert rs.peak_phase == "gradient reduce-scatter"
    assert rs.parts["gradient reduce-scatter"] == 2 * 4 * bucket
    # on a GPU the student's forward is one phase among the others, no communication copies
    gpu = estimate(replace(cpu, device="gpu"))
    assert gpu.parts["parameter all-gather"] == gpu.parts["gradient reduce-scatter"] == 0
    # a large D: its state dict, read whole by every rank, keeps more heap than the forward
    d = resolve_model("gpt2:layers=16,hidden=1024,heads=16", 274)
    big = estimate(replace(cpu, student=resolve_model("tiny", 274), teacher=d))
    heap = sum(big.parts[k] for k in ("activations", "logits", "loss buffers"))
    heap += big.parts["live gathered params"]
    assert big.parts["teacher load (heap kept)"] == pytest.approx(4 * d.params - heap)
    assert big.peak_phase == "teacher forward"  # D's all-gather and gloo's copy of a bucket
    assert big.parts["teacher forward"] > 4 * d.params + 4 * 50_000_000


def test_breakdown_fit_and_largest_micro_batch(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(
        [
            "--student", "large", "--teacher", "gpt2:layers=36,hidden=1280,heads=20",
            "--vocab", "50257", "--gpus-per-node", "8", "--gpu-mem-gib", "80",
            "--seq-len", "1024", "--micro-batch", "4", "--json", str(out),
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    for line in (
        "params",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "loss buffers",
        "teacher shard",
        "comm buckets",
        "fits",
        "largest micro batch that fits",
        "step time",
    ):
        assert line in text, line
    plan = json.loads(out.read_text())
    mb = plan["max_micro_batch"]
    assert mb >= 4 and plan["fits"]
    inp = plan["input"]
    spec = PlanInput(
        student=resolve_model("large", 50257),
        teacher=resolve_model("gpt2:layers=36,hidden=1280,heads=20", 50257),
        zero=_zero("zero3"),
        teacher_zero=_zero("zero3_inference"),
        gpus_per_node=8,
        seq_len=1024,
    )
    assert inp["seq_len"] == 1024
    assert estimate(replace(spec, micro_batch=mb)).fits
    assert not estimate(replace(spec, micro_batch=mb + 1)).fits
    # activation checkpointing and the fused loss shrink what grows with the batch
    ckpt = estimate(replace(spec, micro_batch=mb, activation_checkpointing=True))
    assert ckpt.parts["activations"] < estimate(replace(spec, micro_batch=mb)).parts["activations"]
    ref = estimate(replace(spec, loss_impl="reference"))
    assert ref.parts["loss buffers"] > estimate(spec).parts["loss buffers"]
    # step time from the stated rate: twice the rate, half the time
    fast = estimate(replace(spec, flops_per_s=8e14))
    assert fast.step_time_s == pytest.approx(estimate(spec).step_time_s / 2)


def test_too_few_gpus_names_the_fewest_that_fit(capsys):
    args = ["--student", "llama:layers=80,hidden=8192,heads=64,kv_heads=8,intermediate=28672"]
    rc = main([*args, "--vocab", "32000", "--gpu-mem-gib", "80", "--gpus-per-node", "8"])
    text = capsys.readouterr().out
    assert rc == 1 and "does NOT fit" in text
    # 70 B x 18 bytes of model states = 1.24 TB: a few 8 x 80 GiB nodes
    assert "fits on 24 devices (3 node(s) of 8) at micro batch 1" in text
    inp = PlanInput(
        student=resolve_model(args[1], 32000), teacher=None, gpus_per_node=8, gpu_mem_gib=80
    )
    assert estimate(replace(inp, nodes=3)).fits and not estimate(replace(inp, nodes=2)).fits


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--student", "huge"], "not a preset"),
        (["--student", "preset:huge"], "unknown preset"),
        (["--student", "gpt2:layers=2,hidden=65,heads=2"], "not a multiple of heads"),
        (["--student", "gpt2:layers=2,hidden=64"], "missing ['heads']"),
        (["--student", "gpt2:layers=2,hidden=64,heads=2,width=3"], "not key=value"),
        (["--student", "mlp:layers=2"], "unknown architecture family"),
        (["--student", "tiny", "--seq-len", "4096"], "exceeds the student's 1024 positions"),
        (["--student", "tiny", "--device", "cpu", "--loss-impl", "triton"], "needs a CUDA GPU"),
        (["--student", "tiny", "--micro-batch", "0"], "--micro-batch"),
        (["--student", "tiny", "--loss-rows-fraction", "1.5"], "--loss-rows-fraction"),
        (["--student", "tiny", "--deepspeed", "nope.json"], "does not exist"),
        (
            [
                "--student",
                "llama:layers=80,hidden=8192,heads=64,intermediate=28672",
                "--gpu-mem-gib",
                "2",
                "--seq-len",
                "4096",
            ],
            "does not fit on any number of 2 GiB devices",
        ),
    ],
)
def test_bad_input_is_a_clear_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err


def test_never_fits_names_what_to_change():
    inp = PlanInput(
        student=resolve_model("large", 50257), teacher=None, gpu_mem_gib=3, seq_len=1024,
        micro_batch=64,
    )  # fmt: skip
    with pytest.raises(ConfigError) as e:
        estimate(inp)
    for what in ("--micro-batch", "--activation-checkpointing", "--gpu-mem-gib"):
        assert what in str(e.value)


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ConfigError, match="no model_type"):
        resolve_model(str(tmp_path))
