"""Pretrained students and teachers from local checkpoints of the two supported families:
GPT-2 (DialoGPT stand-in: byte-level BPE, tied lm_head) and Llama (RoPE, RMSNorm, grouped-query
attention, SentencePiece-BPE tokenizer, untied lm_head), built tiny and random here.

- single process: new item rows from titles (input and untied output embeddings), the
  attention kernel reaching the model config, every bad-input error (no directory, no
  config.json, no weights, no tokenizer, another architecture, a tokenizer of another model,
  a student of another tokenizer family than D's, a context too short, a half dtype DeepSpeed
  does not train in), the shipped configs and the pretrained sizes of the scaling study and
  results table;
- 2 ranks, ZeRO-3 (``--zero3-worker``, one launch): each family built from its directory
  with every parameter partitioned (each rank ≈ 1/2 of them), item rows from titles, the
  fused-linear loss through the sharded (tied or untied) lm_head against the logits path,
  and activation checkpointing against none (loss and every gradient);
- 2 ranks, end to end: ``configs/distill_dialogpt.yaml`` and ``configs/distill_llama.yaml``
  with the tiny directories overridden in: D trained from its checkpoint, then a ZeRO-3
  distillation into the pretrained student (activation checkpointing on, as shipped).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # the worker, started by the DeepSpeed launcher
    sys.path.insert(0, str(ROOT))

from conkd_scale.config import build_config  # noqa: E402
from conkd_scale.data.schema import item_token  # noqa: E402
from conkd_scale.models.builder import (  # noqa: E402
    ModelConfig,
    build_model,
    load_dtype,
    prepare_tokenizer,
)
from conkd_scale.utils.errors import ConfigError  # noqa: E402
from tests.helpers_ds import (  # noqa: E402
    corpus_texts,
    make_tiny_gpt2,
    make_tiny_llama,
    read_jsonl,
    run_deepspeed,
)

FAMILIES = ("gpt2", "llama")


# ----------------------------------------------------------------------------- fixtures
def _make(family: str, out: Path, texts: list[str], width: int) -> Path:
    if family == "gpt2":
        return make_tiny_gpt2(out, texts, n_embd=width, dropout=0.0)
    return make_tiny_llama(out, texts, hidden_size=width)


@pytest.fixture(scope="module")
def ckpts(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family a teacher (width 64) and a student (width 32) checkpoint with one
    tokenizer, as DialoGPT-large/-small or Llama-2-7B/TinyLlama share theirs."""
    root = tmp_path_factory.mktemp("ckpts")
    texts = corpus_texts(synthetic_dir)
    out = {}
    for fam in FAMILIES:
        out[f"{fam}_D"] = _make(fam, root / f"{fam}_D", texts, 64)
        out[f"{fam}_S"] = _make(fam, root / f"{fam}_S", texts, 32)
        d, s = (json.loads((out[f"{fam}_{r}"] / "tokenizer.json").read_text()) for r in "DS")
        assert d["model"]["vocab"] == s["model"]["vocab"], "tokenizer training not deterministic"
    return out


@pytest.fixture(scope="module")
def catalog(synthetic_dir: Path) -> Any:
    from conkd_scale.data.corpus import load_dataset

    return load_dataset("synthetic", synthetic_dir, kg="none", splits=()).catalog


def _crs_tokenizer(ckpt: Path, catalog: Any, out: Path) -> Any:
    from conkd_scale.data.tokenizer import load_tokenizer

    cfg = ModelConfig(pretrained=str(ckpt))
    prepare_tokenizer(cfg, catalog, [], out)
    return load_tokenizer(out)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _base_rows(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's input and output embedding ``[V, D]`` (the same tensor when tied)."""
    w = _weights(ckpt)
    if "transformer.wte.weight" in w:
        return w["transformer.wte.weight"], w.get("lm_head.weight", w["transformer.wte.weight"])
    return w["model.embed_tokens.weight"], w.get("lm_head.weight", w["model.embed_tokens.weight"])


def _title_rows(ckpt: Path, tok: Any, catalog: Any, n: int = 4) -> dict[int, list[int]]:
    """Token id -> base-vocabulary ids of its title, for the first ``n`` items."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(ckpt)
    items = [it for it in catalog if it.title][:n]
    return {
        tok.convert_tokens_to_ids(item_token(it.item_id)): base.encode(
            it.title, add_special_tokens=False
        )
        for it in items
    }


# ----------------------------------------------------------------------------- single process
@pytest.mark.parametrize("family", FAMILIES)
def test_extension_rows_and_attention(family, ckpts, catalog, tmp_path: Path) -> None:
    """New item rows are their title's mean in the input and (untied) output embeddings; old
    rows are untouched; the attention kernel of the config reaches the model."""
    ckpt = ckpts[f"{family}_S"]
    tok = _crs_tokenizer(ckpt, catalog, tmp_path / "tok")
    W0_VD, O0_VD = _base_rows(ckpt)
    for attn in ("sdpa", "eager"):
        built = build_model(
            ModelConfig(pretrained=str(ckpt), attn_implementation=attn), tok, catalog=catalog
        )
        assert built.model.config._attn_implementation == attn
    m = built.model
    assert m.config.model_type == family and built.source == f"pretrained:{ckpt}"
    tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert tied == (family == "gpt2")
    n_old = W0_VD.shape[0]
    assert m.get_input_embeddings().weight.shape[0] == len(tok) > n_old
    assert built.new_token_ids == list(range(n_old, len(tok)))
    for W_VD, W0 in ((m.get_input_embeddings().weight, W0_VD), (m.lm_head.weight, O0_VD)):
        W_VD = W_VD.detach()
        torch.testing.assert_close(W_VD[:n_old], W0, rtol=0, atol=0)
        for tid, ids in _title_rows(ckpt, tok, catalog).items():
            torch.testing.assert_close(W_VD[tid], W0[ids].mean(0))
        torch.testing.assert_close(W_VD[tok.convert_tokens_to_ids("[REC]")], W0.mean(0))
    assert built.num_params_local == built.num_params  # not partitioned without ZeRO-3


def test_bad_attention_implementation(ckpts, catalog, tmp_path: Path) -> None:
    from conkd_scale.training.dialog_teacher import DialogTeacherConfig

    with pytest.raises(ConfigError, match=r"model.attn_implementation: 'flash' is not one of"):
        build_config(DialogTeacherConfig, None, ["model.attn_implementation=flash"])
    # flash_attention_2 without the flash-attn package (or a GPU): the field is named
    ckpt = ckpts["llama_S"]
    tok = _crs_tokenizer(ckpt, catalog, tmp_path / "tok")
    cfg = ModelConfig(pretrained=str(ckpt), attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash_attention_2 cannot"):
        build_model(cfg, tok, catalog=catalog)


def _copy_without(src: Path, dst: Path, *drop: str) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_bad_checkpoint_directories(ckpts, tmp_path: Path) -> None:
    from conkd_scale.distill.config import DistillConfig

    good = ckpts["gpt2_S"]
    cases = [
        (tmp_path / "nowhere", r"student.pretrained=.*nowhere: no such directory"),
        (_copy_without(good, tmp_path / "nocfg", "config.json"), "has no config.json"),
        (
            _copy_without(good, tmp_path / "noweights", "model.safetensors"),
            r"has config.json but no weights \(expected one of model.safetensors",
        ),
        (
            _copy_without(
                good,
                tmp_path / "notok",
                "tokenizer.json",
                "vocab.json",
                "merges.txt",
                "tokenizer_config.json",
            ),
            r"no tokenizer files .*or set student.tokenizer_path to it",
        ),
    ]
    other = shutil.copytree(good, tmp_path / "opt")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "opt"}))
    cases.append((other, r"architecture 'opt' .* supported families: gpt2, llama"))
    broken = shutil.copytree(good, tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "gpt2",')
    cases.append((broken, "config.json is not valid JSON"))
    for path, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            build_config(DistillConfig, None, [f"student.pretrained={path}"])
    # a model directory without a tokenizer is fine when tokenizer_path gives one
    cfg = build_config(
        DistillConfig,
        None,
        [f"student.pretrained={tmp_path / 'notok'}", f"student.tokenizer_path={good}"],
    )
    assert cfg.student.pretrained == str(tmp_path / "notok")
    # D still to be trained from a checkpoint: checked when the config is read
    with pytest.raises(ConfigError, match=r"teachers.dialog_pretrained=.*nocfg.*no config.json"):
        build_config(
            DistillConfig,
            None,
            [
                f"teachers.dialog_dir={tmp_path / 'D'}",
                f"teachers.dialog_pretrained={tmp_path / 'nocfg'}",
            ],
        )
    # max_length beyond the checkpoint's context (256)
    with pytest.raises(ConfigError, match="exceeds student.pretrained's context length 256"):
        build_config(DistillConfig, None, [f"student.pretrained={good}", "max_length=512"])


def test_tokenizer_that_does_not_fit_the_model(ckpts, catalog, tmp_path: Path) -> None:
    """Two precise rules (families.check_vocab_matches): base ids must index existing rows,
    and the tokenizer in use must keep every base token at its id."""
    from transformers import AutoTokenizer

    gpt2, llama = ckpts["gpt2_S"], ckpts["llama_S"]
    assert len(AutoTokenizer.from_pretrained(llama)) > len(AutoTokenizer.from_pretrained(gpt2))
    # 1. the Llama tokenizer (600 tokens) for the GPT-2 checkpoint (400 rows)
    cfg = ModelConfig(pretrained=str(gpt2), tokenizer_path=str(llama))
    tok = prepare_tokenizer(cfg, catalog, [], tmp_path / "t1")
    with pytest.raises(
        ConfigError,
        match=r"model: the tokenizer at .* token ids up to \d+ but "
        r"the model has only \d+ embedding rows",
    ):
        build_model(cfg, tok, catalog=catalog)
    # 2. a student of another tokenizer family than D's: D's (Llama) tokenizer, GPT-2 student
    d_tok = _crs_tokenizer(llama, catalog, tmp_path / "t2")
    student = ModelConfig.for_key("student")
    student.pretrained = str(gpt2)
    with pytest.raises(
        ConfigError,
        match=r"student: the tokenizer in use does not extend the "
        r"model's own vocabulary .*must share the dialogue teacher's",
    ):
        build_model(student, d_tok, catalog=catalog)
    # the same family's student fits D's tokenizer (the distillation case)
    student.pretrained = str(ckpts["llama_D"])
    assert build_model(student, d_tok, catalog=catalog).model.config.model_type == "llama"


def test_precision_story() -> None:
    """model.dtype is the dtype a checkpoint is read in; training runs in the DeepSpeed
    precision (bf16 with "auto" on a GPU that supports it, fp32 on the CPU)."""
    from conkd_scale.training.ds_config import load_ds_config, precision, resolve_ds_config

    raw = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    gpu = resolve_ds_config(raw, micro_batch=2, on_gpu=True, bf16_supported=True)
    old_gpu = resolve_ds_config(raw, micro_batch=2, on_gpu=True, bf16_supported=False)
    cpu = resolve_ds_config(raw, micro_batch=2, on_gpu=False)
    assert (precision(gpu), precision(old_gpu), precision(cpu)) == (
        "bfloat16",
        "float32",
        "float32",
    )
    with pytest.raises(ValueError, match="still 'auto'"):
        precision(raw)
    assert load_dtype(ModelConfig(), gpu) == torch.bfloat16  # auto: read in bf16 on the GPU
    assert load_dtype(ModelConfig(), cpu) == torch.float32
    assert load_dtype(ModelConfig(dtype="float32"), gpu) == torch.float32
    assert load_dtype(ModelConfig(dtype="bfloat16"), gpu) == torch.bfloat16
    for dtype, ds in (("bfloat16", cpu), ("float16", gpu)):
        with pytest.raises(
            ConfigError, match=f"model.dtype={dtype}, but the DeepSpeed config trains in"
        ):
            load_dtype(ModelConfig(dtype=dtype), ds)


def test_a_resume_may_switch_the_memory_levers() -> None:
    """The levers compute the same function: a checkpoint written without them (or before
    they existed) resumes with them; the model itself may not change."""
    import copy

    from conkd_scale.config import config_to_dict
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.training.resume_check import config_drift

    now = config_to_dict(
        build_config(
            DistillConfig,
            None,
            ["train.activation_checkpointing=true", "student.attn_implementation=eager"],
        )
    )
    old = copy.deepcopy(now)
    del old["train"]["activation_checkpointing"], old["student"]["attn_implementation"]
    del old["teachers"]["dialog_pretrained"], old["teachers"]["dialog_attn_implementation"]
    old["student"]["dtype"] = "float32"
    assert config_drift(old, now) == []
    old["student"]["preset"] = "mini"
    assert [k for k, *_ in config_drift(old, now)] == ["student.preset"]


def _shipped(name: str, ckpts: dict[str, Path], family: str, extra: list[str] = ()) -> Any:
    from conkd_scale.distill.config import DistillConfig

    return build_config(
        DistillConfig,
        ROOT / "configs" / name,
        [
            f"student.pretrained={ckpts[f'{family}_S']}",
            f"teachers.dialog_pretrained={ckpts[f'{family}_D']}",
            "max_length=96",  # the tiny checkpoints' context is 256
            *extra,
        ],
    )


def test_shipped_configs(ckpts, tmp_path: Path) -> None:
    from conkd_scale.distill.teachers import dialog_teacher_overrides

    for name, family in (("distill_dialogpt.yaml", "gpt2"), ("distill_llama.yaml", "llama")):
        text = (ROOT / "configs" / name).read_text()
        assert text.startswith(
            f"# deepspeed --num_gpus 8 launch/distill.py --deepspeed ds_configs/zero3.json "
            f"--config configs/{name} student.pretrained=/path/to/"
        )
        with pytest.raises(ConfigError, match="student.pretrained=/path/to/.*no such directory"):
            _shipped(
                name,
                {
                    "gpt2_S": "/path/to/x",
                    "gpt2_D": "/path/to/y",
                    "llama_S": "/path/to/x",
                    "llama_D": "/path/to/y",
                },
                family,
            )
        # the teacher's placeholder is named too (when D still has to be trained)
        with pytest.raises(ConfigError, match="teachers.dialog_pretrained=/path/to/y"):
            _shipped(
                name,
                {**ckpts, f"{family}_D": "/path/to/y"},
                family,
                [f"teachers.dialog_dir={tmp_path / 'D'}"],
            )
        cfg = _shipped(name, ckpts, family, [f"teachers.dialog_dir={tmp_path / 'D'}"])
        assert cfg.train.activation_checkpointing and cfg.student.attn_implementation == "sdpa"
        assert f"model.pretrained={ckpts[f'{family}_D']}" in dialog_teacher_overrides(cfg)


def test_pretrained_sizes_in_the_study_and_the_table(ckpts, tmp_path: Path) -> None:
    from conkd_scale.results.table import ResultsConfig, ResultsTable
    from conkd_scale.scaling.config import StudyConfig
    from conkd_scale.scaling.sweep import Study

    s, d = ckpts["gpt2_S"], ckpts["gpt2_D"]
    cfg = build_config(
        StudyConfig,
        None,
        [f'sizes=["pretrained:{d}","tiny","{s}"]', "gates=hard", f"output_dir={tmp_path / 'o'}"],
    )
    assert [r.name for r in cfg.runs()] == ["tiny-hard", "gpt2_D-hard", "gpt2_S-hard"]
    job = Study(cfg).jobs()[1]
    assert f"student.pretrained={d}" in job.distill and "student.preset=gpt2_D" not in job.distill
    assert "student.preset=tiny" in Study(cfg).jobs()[0].distill
    bad = [
        (
            f"sizes=pretrained:{tmp_path / 'none'}",
            r"sizes: 'pretrained:.*none', directory=.*no such",
        ),
        ("sizes=pretrained:", "names no directory"),
        ("sizes=huge", "unknown preset 'huge'.*pretrained:DIR"),
        (f'sizes=["{s}","pretrained:{s}"]', "two sizes share a run name"),
    ]
    for ov, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            build_config(StudyConfig, None, [ov])
    # the results table: one student size for every row, and D / student overrides checked
    rc = build_config(ResultsConfig, None, [f"student=pretrained:{s}", f"work_dir={tmp_path}"])
    args = ResultsTable(rc)._distill_args(next(r for r in rc.rows() if r.key == "hard"))
    assert f"student.pretrained={s}" in args
    for ov, needle in [
        ("student=pretrained:/path/to/x", r"student: 'pretrained:/path/to/x'.*no such directory"),
        ("distill=student.pretrained=/path/to/x", "distill: student.pretrained=/path/to/x: no"),
        ("dialog=model.pretrained=/path/to/y", "dialog: model.pretrained=/path/to/y: no such"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            build_config(ResultsConfig, None, [ov])


# ----------------------------------------------------------------------------- 2 ranks, ZeRO-3
@pytest.mark.slow
def test_zero3_partitioned_fused_and_checkpointed(ckpts, catalog, synthetic_dir, tmp_path):
    spec = {"data": str(synthetic_dir), "out": str(tmp_path / "res.json"), "families": {}}
    for fam in FAMILIES:
        ckpt = ckpts[f"{fam}_S"]
        tok = _crs_tokenizer(ckpt, catalog, tmp_path / f"tok_{fam}")
        W0_VD, O0_VD = _base_rows(ckpt)
        rows = _title_rows(ckpt, tok, catalog)
        expect = {
            str(t): (W0_VD[ids].mean(0).tolist(), O0_VD[ids].mean(0).tolist())
            for t, ids in rows.items()
        }
        spec["families"][fam] = {
            "ckpt": str(ckpt),
            "tok": str(tmp_path / f"tok_{fam}"),
            "rows": expect,
        }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_deepspeed(
        "tests/test_pretrained_families.py",
        ["--zero3-worker", str(tmp_path / "spec.json")],
        timeout=600,
        log=tmp_path / "log.txt",
    )
    res = json.loads((tmp_path / "res.json").read_text())
    for fam in FAMILIES:
        r = res[fam]
        # built partitioned from the checkpoint: no parameter whole on a rank, each rank
        # holding half of them (up to the padding of each partition)
        assert r["whole"] == [] and r["n_params"] > 0
        for local in r["local"]:
            assert abs(local - r["n_params"] / 2) <= r["n_tensors"], (fam, r)
        assert r["untied"] == (fam == "llama")
        assert r["row_err"] < 1e-6, (fam, r["row_err"])
        # the fused-linear loss through the sharded lm_head = the logits path
        assert r["fused_loss"] == pytest.approx(r["ref_loss"], rel=1e-5), fam
        assert r["fused_grad_err"] < 1e-4, (fam, r)
        # activation checkpointing: each block ran again in the backward, same numbers
        assert r["calls"] == {"plain": 1, "ckpt": 2, "fused_ckpt": 2}, (fam, r["calls"])
        assert r["ckpt_loss"] == pytest.approx(r["ref_loss"], rel=1e-6), fam
        assert r["ckpt_grad_err"] < 1e-5, (fam, r)
        assert r["fused_ckpt_loss"] == pytest.approx(r["ref_loss"], rel=1e-5), fam
        assert r["fused_ckpt_grad_err"] < 1e-4, (fam, r)


def _zero3_worker(spec_path: str) -> None:
    from conkd_scale.data.corpus import load_dataset
    from conkd_scale.distributed import init_distributed, teardown

    spec = json.loads(Path(spec_path).read_text())
    dist = init_distributed()
    torch.set_num_threads(1)
    catalog = load_dataset("synthetic", spec["data"], kg="none", splits=()).catalog
    res = {fam: _family_checks(dist, catalog, f) for fam, f in spec["families"].items()}
    if dist.is_main:
        Path(spec["out"]).write_text(json.dumps(res))
    teardown(barrier=True)


def _lm_batch(V: int, items: list[int], rank: int) -> tuple:
    g = torch.Generator().manual_seed(100 + rank)
    B, T, S = 2, 12, 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, -3:] = -100
    rec_row = torch.randint(0, S, (B, T), generator=g)
    rec_row[labels == -100] = -1
    q_SI = torch.softmax(torch.randn(S, len(items), generator=g), -1)
    t_NV = torch.randn(int((labels[:, 1:] != -100).sum()), V, generator=g) * 2
    return ids, mask, labels, rec_row, q_SI, torch.tensor(items), t_NV


def _family_checks(dist: Any, catalog: Any, spec: dict[str, Any]) -> dict[str, Any]:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from conkd_scale.data.tokenizer import load_tokenizer
    from conkd_scale.distributed import all_reduce_max
    from conkd_scale.loss import LossConfig, conkd_loss_reference
    from conkd_scale.loss.config import GateConfig
    from conkd_scale.loss.fused_linear import ConKDFusedLinearLoss
    from conkd_scale.models.builder import count_params, enable_activation_checkpointing

    world = dist.world_size
    tok = load_tokenizer(spec["tok"])
    V = len(tok)
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    lcfg = LossConfig(gate=GateConfig(mode="soft"), tau=1.3, chunk_size=5)
    cfg = ModelConfig(pretrained=spec["ckpt"])
    res: dict[str, Any] = {"calls": {}}

    torch.manual_seed(0)
    built = build_model(cfg, tok, ds_config=ds, catalog=catalog)
    m = built.model
    params = list(m.parameters())
    res["n_params"], res["n_tensors"] = built.num_params, len(params)
    res["whole"] = [n for n, p in m.named_parameters() if p.numel() > 0]
    res["local"] = [0] * world
    res["local"][dist.rank] = count_params(m, local=True)
    res["local"] = [int(x) for x in all_reduce_max([float(x) for x in res["local"]])]
    w_in, w_out = m.get_input_embeddings().weight, m.get_output_embeddings().weight
    res["untied"] = w_out is not w_in
    err = 0.0
    with deepspeed.zero.GatheredParameters([w_in, w_out]):
        for tid, (row_in, row_out) in spec["rows"].items():
            err = max(err, float((w_in[int(tid)].detach() - torch.tensor(row_in)).abs().max()))
            err = max(err, float((w_out[int(tid)].detach() - torch.tensor(row_out)).abs().max()))
    res["row_err"] = err

    # one engine on the fused-loss wrapper: with labels it is the fused loss, without them
    # the LM's own forward (the logits path); SGD with lr 0 only clears the gradients
    ids, mask, labels, rec_row, q_SI, items_I, t_NV = _lm_batch(V, built.item_ids, dist.rank)
    module = ConKDFusedLinearLoss(m, lcfg, vocab_size=V, backend="chunked")
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds)
    engine.train()
    layers = getattr(m.base_model, "h", None) or m.base_model.layers
    calls = [0]  # calls of the first block's MLP: 2 per step when it is recomputed (a pre-hook:
    # the recomputation stops once it has what the backward needs, before the MLP returns)
    layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def step(fused: bool) -> tuple[float, dict[str, torch.Tensor], int]:
        calls[0] = 0
        if fused:
            loss = engine(ids, mask, labels, rec_row, q_SI, items_I, teacher_logits=t_NV)["loss"]
        else:
            logits = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
            rows = labels[:, 1:] != -100
            loss = conkd_loss_reference(
                logits[:, :-1][rows][:, :V],
                t_NV,
                q_SI,
                rec_row[:, 1:][rows],
                items_I,
                labels[:, 1:][rows],
                lcfg,
            ).loss
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in m.named_parameters()}
        engine.step()
        return float(loss), grads, calls[0]

    def grad_err(g: dict, ref: dict) -> float:
        return max(
            float((g[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref
        )

    res["ref_loss"], ref, res["calls"]["plain"] = step(fused=False)
    res["fused_loss"], g, _ = step(fused=True)
    res["fused_grad_err"] = grad_err(g, ref)
    enable_activation_checkpointing(m)
    res["ckpt_loss"], g, res["calls"]["ckpt"] = step(fused=False)
    res["ckpt_grad_err"] = grad_err(g, ref)
    res["fused_ckpt_loss"], g, res["calls"]["fused_ckpt"] = step(fused=True)
    res["fused_ckpt_grad_err"] = grad_err(g, ref)
    engine.destroy()
    return res


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def rec_dir(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """R, trained once (1 epoch) and shared by the two distillations."""
    from conkd_scale.rec.train import RecTeacherConfig, train_rec_teacher

    out = tmp_path_factory.mktemp("rec") / "rec"
    train_rec_teacher(
        RecTeacherConfig(
            data_dir=str(synthetic_dir),
            output_dir=str(out),
            dim=8,
            num_bases=2,
            epochs=1,
            patience=1,
            progress=False,
        )
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "family"), [("distill_dialogpt.yaml", "gpt2"), ("distill_llama.yaml", "llama")]
)
def test_shipped_config_distils_pretrained(config, family, ckpts, rec_dir, synthetic_dir, tmp_path):
    """The shipped config with the tiny checkpoints: D trained from its checkpoint (2 ranks,
    ZeRO-3), then a ZeRO-3 student from its own checkpoint, D sharded beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, dialog = tmp_path / "run", tmp_path / "dialog"
    run_deepspeed(
        "launch/distill.py",
        [
            "--deepspeed",
            "ds_configs/zero3.json",
            "--config",
            f"configs/{config}",
            f"student.pretrained={ckpts[f'{family}_S']}",
            f"teachers.dialog_pretrained={ckpts[f'{family}_D']}",
            "dataset=synthetic",
            f"data_dir={synthetic_dir}",
            "kg=null",
            f"output_dir={out}",
            f"teachers.rec_dir={rec_dir}",
            f"teachers.dialog_dir={dialog}",
            "teachers.rec_config=null",
            'teachers.dialog_overrides=["train.max_steps=4","train.micro_batch=4",'
            '"train.lr=1e-3","train.activation_checkpointing=true","train.eval_every=0",'
            '"train.eval_max_batches=2"]',
            "max_length=96",
            "max_train_conversations=40",
            "train.micro_batch=4",
            "train.max_steps=3",
            "train.lr=1e-3",
            "train.warmup_steps=0",
            "train.eval_every=0",
            "train.eval_max_batches=2",
            "train.save_every=0",
            "train.save_every_minutes=0",
            "train.log_every=1",
            "train.progress=false",
        ],
        timeout=600,
        log=tmp_path / "log.txt",
    )
    # D: trained from its checkpoint, its vocabulary the checkpoint's plus the CRS tokens
    d_info = json.loads((dialog / "run_info.json").read_text())
    assert d_info["source"] == f"pretrained:{ckpts[f'{family}_D']}"
    assert 0 < d_info["num_params_this_rank"] < d_info["num_params"]
    base = AutoTokenizer.from_pretrained(ckpts[f"{family}_D"]).get_vocab()
    d_vocab = AutoTokenizer.from_pretrained(dialog / "hf").get_vocab()
    assert all(d_vocab[t] == i for t, i in base.items()) and len(d_vocab) > len(base)
    assert read_jsonl(dialog / "metrics.jsonl")[-1]["step"] == 4
    # the student: from its checkpoint, partitioned, distilled with finite losses, exported
    info = json.loads((out / "run_info.json").read_text())
    assert info["student"] == f"pretrained:{ckpts[f'{family}_S']}" and info["zero_stage"] == 3
    assert (
        abs(info["student_params_this_rank"] - info["student_params"] / 2)
        < 0.1 * info["student_params"]
    )
    assert info["teacher_params_this_rank"] < info["teacher_params"]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(isinstance(r[k], float) and r[k] == r[k] for r in rows for k in ("loss", "kd"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["activation_checkpointing"] is True
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.model_type == family
    assert model.get_input_embeddings().weight.shape[0] == len(d_vocab)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (
        family == "gpt2"
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if args[:1] == ["--zero3-worker"]:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        _zero3_worker(args[1])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --zero3-worker SPEC.json ({args})")
