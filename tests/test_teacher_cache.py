"""The offline teacher cache: the cache job (2 CPU ranks, sharded ZeRO-3 D), its resume after
a kill, and distillation with ``teachers.mode=offline`` (equal to online at k = |U|, exact
resume mid-epoch); refusals of a cache that does not fit (in process, files only, and once
through the launcher: every rank exits 2).

The teachers are the session's tiny D and R (``tiny_teachers`` in conftest.py). The cache
keeps D's whole distribution (k = |U|), stored in the default float16.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from conkd_scale.cache import manifest as M
from conkd_scale.config import build_config
from conkd_scale.distill.config import DistillConfig
from conkd_scale.utils.errors import ConfigError, DataError
from tests.helpers_ds import read_jsonl, run_deepspeed

SHARD = 8  # sequences per shard: 12 training and 2 validation shards


def base_args(tiny: dict[str, Path], cache: Path, k: int) -> list[str]:
    return [
        f"data_dir={tiny['data']}",
        f"teachers.rec_dir={tiny['rec']}",
        f"teachers.dialog_dir={tiny['lm']}",
        "teachers.auto_train=false",
        f"teachers.cache_dir={cache}",
        f"teachers.cache_k={k}",
        f"teachers.cache_shard_sequences={SHARD}",
        "max_length=128",
        "train.progress=false",
        "train.micro_batch=4",
        "student.preset=tiny",
        "student.dropout=0",
        "train.log_every=1",
        "train.max_steps=8",
        "train.eval_every=4",
        "train.save_every=4",
        "export=false",
    ]


def vocab_size(tiny: dict[str, Path]) -> int:
    from conkd_scale.data.tokenizer import load_tokenizer

    return len(load_tokenizer(tiny["lm"]))


def shard_shas(cache: Path) -> dict[str, str]:
    return {p.name: M.sha256_file(p) for p in sorted((cache / M.SHARDS).glob("*.safetensors"))}


def shard_tensors(cache: Path) -> dict[str, dict[str, Any]]:
    from safetensors.torch import load_file

    paths = sorted((cache / M.SHARDS).glob("*.safetensors"))
    return {p.name: {k: v.clone() for k, v in load_file(p).items()} for p in paths}  # no mmap


@pytest.fixture(scope="module")
def built(tiny_teachers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The cache job, then a killed job's leftovers (manifest unfinished, shards missing, a
    shard without its sidecar, a damaged shard, a temp file), then the job again."""
    root = tmp_path_factory.mktemp("cache")
    cache = root / "cache"
    k = vocab_size(tiny_teachers)
    args = ["--deepspeed", "ds_configs/zero3_inference.json", *base_args(tiny_teachers, cache, k)]
    first = run_deepspeed("launch/cache_teachers.py", args, log=root / "cache1.log")
    shas = shard_shas(cache)
    tensors = shard_tensors(cache)
    man = json.loads((cache / M.MANIFEST).read_text())
    # what a kill leaves behind
    names = sorted(shas)
    gone, torn, damaged, kept = names[:2], names[2], names[3], names[4:]
    for n in gone:
        M.remove_shard(cache / M.SHARDS / n)
    M.sidecar(cache / M.SHARDS / torn).unlink()
    blob = bytearray((cache / M.SHARDS / damaged).read_bytes())
    blob[-1] ^= 0xFF
    (cache / M.SHARDS / damaged).write_bytes(bytes(blob))
    (cache / M.SHARDS / f".{names[0]}.abc.tmp").write_bytes(b"partial")
    killed = {k2: v for k2, v in man.items() if k2 not in ("shards", "stats")}
    M.write_manifest(cache, {**killed, "complete": False})
    mtimes = {n: (cache / M.SHARDS / n).stat().st_mtime_ns for n in kept}
    second = run_deepspeed("launch/cache_teachers.py", args, log=root / "cache2.log")
    return {
        "root": root,
        "cache": cache,
        "k": k,
        "shas": shas,
        "tensors": tensors,
        "manifest": man,
        "redone": [*gone, torn, damaged],
        "kept_mtimes": mtimes,
        "logs": (first.stdout + first.stderr, second.stdout + second.stderr),
    }


@pytest.mark.slow
def test_cache_job_writes_shards_with_checksums_and_the_exact_gate(built: dict) -> None:
    man = built["manifest"]
    assert man["complete"] and man["fingerprint"]["k"] == built["k"] == man["vocab"]
    assert len(man["shards"]) == len(built["shas"]) == 14
    for name, info in man["shards"].items():
        assert info["sha256"] == built["shas"][name]
    st = man["stats"]
    assert st["rows"] > 0 and st["turns"] > 0
    # k = |U|: uint16 ids + float16 log-probs per kept token, float32 m_t, per-sequence offsets
    assert st["d_bytes_per_token"] == pytest.approx(4 * built["k"] + 4, rel=0.01)
    import torch
    from safetensors.torch import load_file

    t = load_file(built["cache"] / M.SHARDS / "train-00000.safetensors")
    p = t["logp"].float().exp()
    # D's whole distribution is kept: rows sum to 1 and m_t is the item tokens' mass
    assert torch.allclose(p.sum(-1), torch.ones(len(p)), atol=2e-3)
    assert t["ids"].dtype == torch.uint16 and t["item_mass"].dtype == torch.float32
    assert ((t["item_mass"] >= 0) & (t["item_mass"] <= 1)).all()


@pytest.mark.slow
def test_killed_cache_job_resumes_keeping_intact_shards(built: dict) -> None:
    cache = built["cache"]
    _, log = built["logs"]
    n = len(built["shas"])
    assert f"{len(built['redone'])} of {n} shards to write" in log
    # the intact shards were kept as they were; the rest rewritten with the same content
    for name, mtime in built["kept_mtimes"].items():
        assert (cache / M.SHARDS / name).stat().st_mtime_ns == mtime, name
    now = shard_tensors(cache)
    assert set(now) == set(built["tensors"])
    for name, tensors in built["tensors"].items():
        assert set(now[name]) == set(tensors), name
        for key, t in tensors.items():
            assert now[name][key].dtype == t.dtype and now[name][key].equal(t), (name, key)
    man = json.loads((cache / M.MANIFEST).read_text())
    assert man["complete"] and man["fingerprint"] == built["manifest"]["fingerprint"]
    assert not list((cache / M.SHARDS).glob(".*.tmp"))


@pytest.mark.slow
def test_cache_with_tail_draws_sums_to_one_resumes_identically_and_distils(
    tiny_teachers: dict[str, Path], tmp_path: Path
) -> None:
    """k = 16 with 8 slots drawn from D's tail: each row's stored probabilities sum to 1
    (no tail bin) with distinct ids; a shard rewritten after a kill holds the same draws; a
    distillation reads it."""
    import torch
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    base = [*base_args(tiny_teachers, cache, 16), "teachers.cache_tail_samples=8"]
    job = ["--deepspeed", "ds_configs/zero3_inference.json", *base]
    run_deepspeed("launch/cache_teachers.py", job, log=tmp_path / "cache1.log")
    man = json.loads((cache / M.MANIFEST).read_text())
    assert man["fingerprint"]["tail_samples"] == 8
    shard = cache / M.SHARDS / "train-00003.safetensors"
    t = load_file(shard)
    p = t["logp"].float().exp()  # [N, 16]
    assert torch.allclose(p.sum(-1), torch.ones(len(p)), atol=2e-3)
    assert t["logp"][:, 8:].isinf().any()  # repeated draws: zero-mass slots
    assert all(len(set(row.tolist())) == 16 for row in t["ids"])
    before = shard_tensors(cache)[shard.name]
    shard.unlink()
    run_deepspeed("launch/cache_teachers.py", job, log=tmp_path / "cache2.log")
    after = load_file(shard)
    assert all(after[k].equal(v) for k, v in before.items())
    out = tmp_path / "offline"
    distil = ["--deepspeed", "ds_configs/zero3.json", *base, f"output_dir={out}",
              "teachers.mode=offline", "train.max_steps=2", "train.eval_every=2",
              "train.save_every=0"]  # fmt: skip
    run_deepspeed("launch/distill.py", distil, log=tmp_path / "offline.log")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert all(math.isfinite(r["kd_dialog"]) for r in rows if r["kind"] == "train")


@pytest.fixture(scope="module")
def distilled(tiny_teachers: dict[str, Path], built: dict) -> dict[str, Path]:
    """8 steps online (D sharded, ZeRO-3), and offline from the cache, stopped after step 4
    (mid-epoch, a checkpoint) and resumed."""
    root, cache, k = built["root"], built["cache"], built["k"]
    args = ["--deepspeed", "ds_configs/zero3.json", *base_args(tiny_teachers, cache, k)]
    out = {"online": root / "online", "offline": root / "offline"}
    run_deepspeed("launch/distill.py", [*args, f"output_dir={out['online']}"], log=root / "on.log")
    off = [*args, f"output_dir={out['offline']}", "teachers.mode=offline"]
    run_deepspeed("launch/distill.py", [*off, "train.stop_at_step=4"], log=root / "off1.log")
    run_deepspeed("launch/distill.py", off, log=root / "off2.log")
    return out


@pytest.mark.slow
def test_offline_distillation_equals_online_at_k_equal_to_vocab(distilled: dict) -> None:
    """The loss curves agree (float16 storage of the log-probs and of R), the gate exactly; the
    offline run stopped after step 4 and resumed from its checkpoint, so steps 5-8 also
    show that the resume read the cache at the uninterrupted run's data position."""
    on = read_jsonl(distilled["online"] / "metrics.jsonl")
    off = read_jsonl(distilled["offline"] / "metrics.jsonl")
    for kind, keys in (
        ("train", ("loss", "ce", "kd", "kd_dialog", "kd_rec")),
        ("eval", ("val_loss", "val_kd")),
    ):
        a = [r for r in on if r["kind"] == kind]
        b = [r for r in off if r["kind"] == kind]
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert len(a) == (8 if kind == "train" else 2)
        for ra, rb in zip(a, b, strict=True):
            for key in keys:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=2e-4), (kind, ra["step"])
            if kind == "train":
                assert rb["gate_mean"] == pytest.approx(ra["gate_mean"], abs=1e-6)
    info = json.loads((distilled["offline"] / "run_info.json").read_text())
    assert info["teacher_mode"] == "offline" and info["teacher_params"] is None
    assert any(r["kind"] == "train" and r["kd_rec"] > 0 for r in off)  # R's term is used


# ----------------------------------------------------------------------------- refusals
def _cfg(tiny: dict[str, Path], cache: Path, k: int, *extra: str) -> DistillConfig:
    over = [a for a in base_args(tiny, cache, k) if not a.startswith("train.")]
    return build_config(DistillConfig, None, [*over, "teachers.mode=offline", *extra])


def _open(cfg: DistillConfig) -> Any:
    from conkd_scale.distill.recipe import DistillRecipe

    recipe = DistillRecipe(cfg, {})
    recipe._open_cache()  # what every rank runs before any collective
    return recipe.cache


@pytest.mark.slow
def test_a_cache_of_another_run_is_refused_naming_the_field(
    tiny_teachers: dict[str, Path], built: dict, tmp_path: Path
) -> None:
    cache, k = built["cache"], built["k"]
    assert _open(_cfg(tiny_teachers, cache, k)).k == k
    with pytest.raises(ConfigError, match=r"max_length \[max_length\]: cache 128, run 96"):
        _open(_cfg(tiny_teachers, cache, k, "max_length=96"))
    with pytest.raises(ConfigError, match=r"k \[teachers.cache_k\]"):
        _open(_cfg(tiny_teachers, cache, k, "teachers.cache_k=16"))
    with pytest.raises(
        ConfigError, match=r"tail_samples \[teachers.cache_tail_samples\]: cache 0, run 2"
    ):
        _open(_cfg(tiny_teachers, cache, k, "teachers.cache_tail_samples=2"))
    # another D (same tokenizer, other weights): the teacher's files differ
    from conkd_scale.data.corpus import load_dataset
    from tests.tiny_lm import write_tiny_lm

    other = write_tiny_lm(
        load_dataset("synthetic", tiny_teachers["data"], kg="none"), tmp_path / "d2", seed=3
    )
    with pytest.raises(ConfigError, match=r"dialog_teacher \[") as e:
        _open(_cfg(tiny_teachers, cache, k, f"teachers.dialog_dir={other}"))
    assert "tokenizer [" not in str(e.value)


@pytest.mark.slow
def test_damaged_missing_or_unfinished_caches_are_named(
    tiny_teachers: dict[str, Path], built: dict, tmp_path: Path
) -> None:
    k = built["k"]
    bad = tmp_path / "damaged"
    shutil.copytree(built["cache"], bad)
    shard = bad / M.SHARDS / "train-00005.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train-00005.safetensors: checksum mismatch"):
        _open(_cfg(tiny_teachers, bad, k))
    shard.unlink()
    (bad / M.SHARDS / "valid-00001.safetensors").unlink()
    with pytest.raises(DataError, match=r"2 of 14 cache shards are missing: train-00005"):
        _open(_cfg(tiny_teachers, bad, k))
    man = json.loads((bad / M.MANIFEST).read_text())
    M.write_manifest(bad, {**man, "complete": False})
    with pytest.raises(ConfigError, match="is not finished"):
        _open(_cfg(tiny_teachers, bad, k))
    (bad / M.MANIFEST).unlink()
    with pytest.raises(ConfigError, match=r"has no manifest.json: build the cache first"):
        _open(_cfg(tiny_teachers, bad, k))
    with pytest.raises(ConfigError, match=r"does not exist: build the cache first"):
        _open(_cfg(tiny_teachers, tmp_path / "nowhere", k))


@pytest.mark.slow
def test_cache_job_refuses_another_cache_a_foreign_dir_and_k_beyond_vocab(
    tiny_teachers: dict[str, Path], built: dict, tmp_path: Path
) -> None:
    """Checked from files before any collective (the teachers exist), on every rank."""
    from conkd_scale.cache.writer import CacheJob

    k = built["k"]

    def prepare(cache: Path, *extra: str) -> None:
        cfg = _cfg(tiny_teachers, cache, k, *extra)
        M.check_dir_is_cache_or_empty(cache)
        CacheJob(cfg, {}, "ds").prepare()

    with pytest.raises(ConfigError, match=r"holds another teacher cache \(k \[teachers.cache_k"):
        prepare(built["cache"], "teachers.cache_k=16")
    with pytest.raises(ConfigError, match=rf"cache_k={k + 1} exceeds the vocabulary \|U\| = {k} "):
        prepare(tmp_path / "new", f"teachers.cache_k={k + 1}")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"holds files \(notes.txt\) but no manifest.json"):
        prepare(tmp_path / "foreign")


@pytest.mark.slow
def test_mismatch_fails_every_rank_with_exit_2(tiny_teachers: dict[str, Path], built: dict):
    """Through the launcher: both ranks refuse before any collective (no hang)."""
    args = [
        "--deepspeed",
        "ds_configs/zero3.json",
        *base_args(tiny_teachers, built["cache"], built["k"]),
        f"output_dir={built['root'] / 'refused'}",
        "teachers.mode=offline",
        "use_mode_tokens=false",
    ]
    proc = run_deepspeed("launch/distill.py", args, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert text.count("use_mode_tokens [use_mode_tokens]: cache True, run False") == 2
    assert not (built["root"] / "refused").exists()


def test_fingerprint_fields_are_named_with_their_setting() -> None:
    a = {k: 1 for k in M.FIELD_KEYS}
    b = {**a, "data": "f" * 64, "k": 2}
    diff = M.mismatches({**a, "data": "e" * 64}, b)
    assert diff == [
        "k [teachers.cache_k]: cache 1, run 2",
        f"data [{M.FIELD_KEYS['data']}]: cache '{'e' * 12}', run '{'f' * 12}'",
    ]


def test_rec_top_k_is_read_back_with_its_tail_spread_evenly(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    from conkd_scale.cache.reader import TeacherCache
    from conkd_scale.cache.writer import write_shard

    q = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])  # [S=1, I=5]
    top = q.topk(2, dim=-1)
    path = tmp_path / "s.safetensors"
    tensors = {
        "row_offsets": torch.tensor([0, 0]),
        "ids": torch.zeros(0, 1, dtype=torch.uint16),
        "logp": torch.zeros(0, 1, dtype=torch.float16),
        "item_mass": torch.zeros(0),
        "turn_offsets": torch.tensor([0, 1]),
        "rec_ids": top.indices.to(torch.uint16),
        "rec_p": top.values.half(),
        "rec_tail": 1 - top.values.sum(-1),
    }
    write_shard(path, tensors, {"split": "train"})
    man = {"shard_sequences": 1, "items": 5, "fingerprint": {"k": 1, "rec_topk": 2}}
    got = TeacherCache(tmp_path, man)._rec(safe_open(str(path), framework="pt"), 0, 1)
    want = torch.tensor([[0.5, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3]])
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    info = json.loads(M.sidecar(path).read_text())
    assert info["sha256"] == M.sha256_file(path) and info["turns"] == 1


def test_tail_draws_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"cache_tail_samples=9 exceeds teachers.cache_k=8"):
        build_config(DistillConfig, None, ["teachers.cache_k=8", "teachers.cache_tail_samples=9"])
    with pytest.raises(ConfigError, match=r"cache_tail_samples=4 needs loss.tau=1 \(got 2\)"):
        build_config(
            DistillConfig,
            None,
            ["teachers.cache_tail_samples=4", "loss.tau=2", "teachers.mode=offline"],
        )
    with pytest.raises(ConfigError, match=r"teachers.cache_tail_samples: -1 must be an integer"):
        build_config(DistillConfig, None, ["teachers.cache_tail_samples=-1"])
