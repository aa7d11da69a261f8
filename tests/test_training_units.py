"""Single-process unit tests of the training core: DeepSpeed config handling, sharded
resumable data order, evaluation padding, checkpoint bookkeeping, schedules, launcher
detection and the run config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conkd_scale import distributed as dist_utils
from conkd_scale.config import build_config
from conkd_scale.data.sequences import IGNORE, EncodedSequence
from conkd_scale.training.checkpoint import (
    META,
    checkpoint_tag,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume,
)
from conkd_scale.training.config import TrainConfig
from conkd_scale.training.data import (
    DataPosition,
    TrainStream,
    eval_batches,
    iter_eval,
    sequence_collate,
)
from conkd_scale.training.dialog_teacher import DialogTeacherConfig
from conkd_scale.training.ds_config import FILLED_KEYS, load_ds_config, resolve_ds_config
from conkd_scale.training.metrics import JsonlLogger, read_metrics
from conkd_scale.training.trainer import lr_lambda, make_optimizer, plan_steps, token_nll
from conkd_scale.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("**/*.json"))


# ----------------------------------------------------------------------------- DeepSpeed configs
def test_shipped_ds_configs_load_and_resolve() -> None:
    names = {p.name for p in DS_CONFIGS}
    assert {"zero3.json", "zero2.json", "zero3_offload.json", "zero3_inference.json"} <= names
    for p in DS_CONFIGS:
        raw = load_ds_config(p)
        assert not set(FILLED_KEYS) & set(raw), f"{p}: batch sizes are filled by the code"
        cfg = resolve_ds_config(raw, micro_batch=4, grad_accum=2, world_size=3, on_gpu=False)
        assert cfg["train_batch_size"] == 24
        assert cfg["train_micro_batch_size_per_gpu"] == 4
        assert cfg["gradient_accumulation_steps"] == 2
        assert cfg.get("bf16", {}).get("enabled", False) is False  # fp32 on the CPU
    off = load_ds_config(ROOT / "ds_configs" / "zero3_offload.json")["zero_optimization"]
    assert off["offload_optimizer"]["device"] == "cpu" and off["offload_param"]["device"] == "cpu"


def test_ds_config_precision_auto_on_gpu() -> None:
    raw = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    a = resolve_ds_config(raw, micro_batch=1, on_gpu=True, bf16_supported=True)
    assert a["bf16"]["enabled"] is True and a["fp16"]["enabled"] is False
    b = resolve_ds_config(raw, micro_batch=1, on_gpu=True, bf16_supported=False)
    assert b["bf16"]["enabled"] is False and b["fp16"]["enabled"] is True
    assert raw["bf16"]["enabled"] == "auto"  # the input is not modified


def test_ds_config_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON \(line 1"):
        load_ds_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_config(tmp_path / "missing.json")
    for body, msg in [
        ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
        ({"zero_optimization": {"stage": 4}}, "stage must be"),
        ([1, 2], "JSON object"),
        ({"train_batch_size": "big"}, "positive integer"),
        ({"bf16": {"enabled": "yes"}}, "bf16.enabled"),
    ]:
        f = tmp_path / "c.json"
        f.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=msg) as e:
            load_ds_config(f)
        assert "c.json" in str(e.value)


def test_ds_config_batch_conflicts() -> None:
    ok = resolve_ds_config(
        {"train_micro_batch_size_per_gpu": 4, "train_batch_size": "auto"},
        micro_batch=4,
        world_size=2,
    )
    assert ok["train_batch_size"] == 8
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps is 4 .* gives 2"):
        resolve_ds_config({"gradient_accumulation_steps": 4}, micro_batch=1, grad_accum=2)


# ----------------------------------------------------------------------------- data order
def _seqs(n: int, length: int = 5) -> list[EncodedSequence]:
    return [
        EncodedSequence(
            str(i), [i + 3] * length, [IGNORE] + [i + 3] * (length - 1), [-1] * length, []
        )
        for i in range(n)
    ]


def _flat(xss: list[list[int]]) -> list[int]:
    return [x for xs in xss for x in xs]


def _ids(batch: dict) -> list[int]:
    return [int(x) - 3 for x in batch["input_ids"][:, 0]]


def test_train_stream_shards_evenly_and_deterministically() -> None:
    data = _seqs(11)
    collate = sequence_collate(pad_id=0)
    streams = [
        TrainStream(data, collate, micro_batch=2, rank=r, world_size=3, seed=5) for r in range(3)
    ]
    counts = {s.batches_per_epoch for s in streams}
    assert counts == {2}  # ceil(11 / 3) = 4 samples -> 2 micro batches on every rank
    ep0 = [_flat(s.epoch_batches(0)) for s in streams]
    assert sorted(set(_flat(ep0))) == list(range(11))  # all samples (1 padded duplicate)
    assert ep0 == [_flat(s.epoch_batches(0)) for s in streams]  # deterministic
    assert ep0 != [_flat(s.epoch_batches(1)) for s in streams]  # reshuffled per epoch


def test_train_stream_length_grouping() -> None:
    import random

    rng = random.Random(0)
    data = [_seqs(1, rng.randint(2, 60))[0] for _ in range(200)]
    lengths = [len(x) for x in data]
    collate = sequence_collate(pad_id=0)
    kw = dict(micro_batch=4, rank=0, world_size=2, seed=3)
    plain = TrainStream(data, collate, **kw)
    grouped = TrainStream(data, collate, lengths=lengths, group_size=8, **kw)
    for ep in (0, 1):
        a, b = plain.epoch_batches(ep), grouped.epoch_batches(ep)
        assert len(a) == len(b) and sorted(_flat(a)) == sorted(_flat(b))  # same samples
        assert b == grouped.epoch_batches(ep)  # deterministic

        def padded(bs: list[list[int]]) -> int:
            return sum(len(x) * max(lengths[i] for i in x) for x in bs)

        assert padded(b) < 0.8 * padded(a)
    assert grouped.epoch_batches(0) != grouped.epoch_batches(1)


def test_train_stream_resumes_at_position() -> None:
    data = _seqs(9)
    collate = sequence_collate(pad_id=0)
    a = TrainStream(data, collate, micro_batch=2, rank=1, world_size=2, seed=0)
    it = iter(a)
    full = [_ids(next(it)) for _ in range(8)]  # crosses two epoch boundaries (3 per epoch)
    b = TrainStream(data, collate, micro_batch=2, rank=1, world_size=2, seed=0)
    it = iter(b)
    for _ in range(4):
        next(it)
    pos = b.position
    assert pos == DataPosition(epoch=1, batch_offset=1)
    c = TrainStream(data, collate, micro_batch=2, rank=1, world_size=2, seed=0)
    c.position = pos
    it = iter(c)
    assert [_ids(next(it)) for _ in range(4)] == full[4:]


def test_eval_batches_cover_each_sample_once_with_padding() -> None:
    n, world = 7, 3
    per_rank = [eval_batches(n, 2, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
    real = sorted(i for b in per_rank for mb in b for i, pad in mb if not pad)
    assert real == list(range(n))
    pads = [pad for b in per_rank for mb in b for _, pad in mb]
    assert sum(pads) == 3 * world - n
    batches = list(
        iter_eval(_seqs(n), sequence_collate(0), micro_batch=2, rank=2, world_size=world)
    )
    last = batches[-1]
    assert last["is_pad"].tolist() == [True]
    assert (last["labels"] == IGNORE).all()


# ----------------------------------------------------------------------------- checkpoints
def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    p = root / checkpoint_tag(step)
    p.mkdir(parents=True)
    if complete:
        (p / META).write_text(json.dumps({"step": step, "epoch": 0, "batch_offset": step}))
    return p


def test_checkpoint_listing_pruning_and_resume(tmp_path: Path) -> None:
    for s in (5, 10, 15):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 12, complete=False)  # cut short
    _fake_ckpt(tmp_path, 20, complete=False)  # being written
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10, 15]
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_tag(15)
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [checkpoint_tag(5), checkpoint_tag(12)]
    assert (tmp_path / checkpoint_tag(20)).is_dir()
    assert resolve_resume("auto", tmp_path) == tmp_path / checkpoint_tag(15)
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "nothing") is None
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / checkpoint_tag(20)), tmp_path)


def test_jsonl_truncate_after(tmp_path: Path) -> None:
    log = JsonlLogger(tmp_path / "m.jsonl")
    for s in (1, 2, 3):
        log.log({"kind": "train", "step": s, "loss": float("nan") if s == 3 else 1.0})
    log.log({"kind": "final", "step": 2})
    log.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2]
    assert read_metrics(tmp_path / "m.jsonl", "final") == []


# ----------------------------------------------------------------------------- schedule, loss
def test_lr_schedule_warmup_and_cosine_floor() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, lr_schedule="cosine")
    fn = lr_lambda(cfg, total_steps=20)
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(4) == pytest.approx(1.0)
    assert fn(20) == pytest.approx(0.1) and fn(100) == pytest.approx(0.1)
    assert all(fn(s) >= fn(s + 1) for s in range(4, 30))
    const = lr_lambda(TrainConfig(warmup_steps=0, lr_schedule="constant"), 10)
    assert const(0) == const(9) == 1.0


def test_plan_steps() -> None:
    cfg = TrainConfig(micro_batch=4, grad_accum=2, epochs=2.0, max_steps=0)
    # 21 sequences on 2 ranks: 11 per rank, 3 micro batches per epoch, 6 in 2 epochs -> 3 steps
    assert plan_steps(cfg, 21, 2) == 3
    assert plan_steps(TrainConfig(max_steps=7), 21, 2) == 7


def test_token_nll_matches_hf_shifted_loss() -> None:
    torch.manual_seed(0)
    logits_BTV = torch.randn(2, 6, 11)
    labels_BT = torch.randint(0, 11, (2, 6))
    labels_BT[0, :3] = IGNORE
    nll, n = token_nll(logits_BTV, labels_BT)
    ref = torch.nn.functional.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, 11), labels_BT[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    assert n == 8
    assert float(nll / n) == pytest.approx(float(ref), abs=1e-6)


def test_optimizer_decays_matrices_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 3


# ----------------------------------------------------------------------------- launchers
def test_detect_launcher_and_slurm_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dist_utils.detect_launcher({"RANK": "1", "WORLD_SIZE": "2"}) == "env"
    assert dist_utils.detect_launcher({"OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0"}) == "mpi"
    assert (
        dist_utils.detect_launcher({"PMIX_RANK": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "0"})
        == "mpi"
    )
    assert dist_utils.detect_launcher({"SLURM_PROCID": "1", "SLURM_STEPID": "0"}) == "slurm"
    # the batch script itself (no step) is a single process, not rank 0 of SLURM_NTASKS
    assert dist_utils.detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == "single"
    assert dist_utils.detect_launcher({}) == "single"
    monkeypatch.setattr(
        dist_utils, "_first_slurm_host", lambda nl: dist_utils.expand_nodelist(nl)[0]
    )
    env = dist_utils.slurm_env(
        {
            "SLURM_PROCID": "3",
            "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
            "SLURM_JOB_ID": "123",
        }
    )
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "20123",
    }
    assert dist_utils.expand_nodelist("a[1-3,10],b") == ["a1", "a2", "a3", "a10", "b"]


def test_rank0_helpers_without_process_group(capsys: pytest.CaptureFixture[str]) -> None:
    dist_utils.print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    assert dist_utils.run_on_main(lambda x: x + 1, 1) == 2
    with pytest.raises(ValueError, match="boom"):
        dist_utils.run_on_main(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert dist_utils.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]


# ----------------------------------------------------------------------------- run config
def test_dialog_teacher_config_overrides_and_checks(tmp_path: Path) -> None:
    cfg = build_config(
        DialogTeacherConfig,
        None,
        ["model.preset=small", "train.lr=3e-4", "train.adam_betas=0.9,0.99"],
    )
    assert cfg.model.preset == "small" and cfg.train.lr == 3e-4
    assert cfg.train.adam_betas == (0.9, 0.99)
    assert cfg.resolved_data_dir == "runs/data/synthetic"
    f = tmp_path / "c.json"
    from conkd_scale.config import config_to_dict

    f.write_text(json.dumps(config_to_dict(cfg)))  # config.json round-trips as --config
    assert build_config(DialogTeacherConfig, f) == cfg
    for ov, msg in [
        (["model.preset=huge"], "unknown preset"),
        (["dataset=redial"], "data_dir is required"),
        (["max_length=2048"], "exceeds model.n_positions"),
        (["train.micro_batch=0"], "micro_batch"),
        (["train.max_steps=0", "train.epochs=0"], "epochs"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            build_config(DialogTeacherConfig, None, ov)
    assert math.isclose(TrainConfig().min_lr_ratio, 0.1)
