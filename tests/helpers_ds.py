"""Helpers for the multi-rank (CPU, gloo) DeepSpeed tests: launch a job, make tiny models.

Launcher: the real DeepSpeed launcher, ``deepspeed --num_gpus 2 SCRIPT ...``; on a machine
without GPUs it starts 2 CPU ranks (DeepSpeed's CPU accelerator, gloo). The first start on a
machine compiles DeepSpeed's shared-memory op (~80 s, cached in ~/.cache/torch_extensions or
``$TORCH_EXTENSIONS_DIR``); later starts take ~10 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_bin() -> str:
    """The ``deepspeed`` launcher of the running interpreter's environment."""
    cand = Path(sys.executable).parent / "deepspeed"
    return str(cand) if cand.exists() else (shutil.which("deepspeed") or "deepspeed")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_deepspeed(
    script: str,
    args: Sequence[str],
    *,
    nproc: int = 2,
    timeout: float = 600,
    log: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus nproc ROOT/script args`` from ROOT; output kept in ``log``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [
        deepspeed_bin(),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(ROOT / script),
        *args,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n# {time.perf_counter() - t0:.1f} s\n{out}")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}")
    if check:  # the job released DeepSpeed's /dev/shm buffers (distributed.release_shm_buffer)
        assert not shm_buffers(proc), f"left in /dev/shm: {shm_buffers(proc)}"
    return proc


def shm_buffers(proc: subprocess.CompletedProcess) -> list[Path]:
    """DeepSpeed CPU allreduce buffers in /dev/shm that belong to this launcher run."""
    args = [str(a) for a in proc.args]
    port = args[args.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def make_tiny_gpt2(
    out_dir: Path,
    texts: Sequence[str],
    *,
    vocab_size: int = 400,
    n_embd: int = 32,
    tie_word_embeddings: bool = True,
    dropout: float | None = None,
) -> Path:
    """A tiny GPT-2 (2 layers) with a byte-level BPE ``GPT2TokenizerFast`` trained on
    ``texts``, saved with ``save_pretrained`` (a local stand-in for DialoGPT); ``dropout``:
    resid/embd/attn dropout (None: GPT-2's 0.1)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(texts),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.save_model(str(out_dir))  # vocab.json + merges.txt, as in the DialoGPT repos
    tok = GPT2TokenizerFast.from_pretrained(out_dir)
    assert len(tok) == len(bpe.get_vocab()), "BPE files not picked up"
    tok.save_pretrained(out_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=n_embd,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        **(
            {}
            if dropout is None
            else dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), dropout)
        ),
    )
    GPT2LMHeadModel(cfg).save_pretrained(out_dir)
    return out_dir


def make_tiny_llama(
    out_dir: Path,
    texts: Sequence[str],
    *,
    vocab_size: int = 600,
    hidden_size: int = 32,
    tie_word_embeddings: bool = False,
) -> Path:
    """A tiny Llama (2 layers, RoPE, RMSNorm, grouped-query attention, untied lm_head) with
    a SentencePiece BPE tokenizer (byte fallback) trained on ``texts`` and loaded as
    ``LlamaTokenizer``, saved with ``save_pretrained`` (a local stand-in for Llama-2 /
    TinyLlama)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    spm_dir = out_dir / "spm"
    spm_dir.mkdir(exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_prefix=str(spm_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    tok = LlamaTokenizer.from_pretrained(spm_dir)  # tokenizer.model, as in the Llama-2 repos
    shutil.rmtree(spm_dir)
    tok.save_pretrained(out_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


def corpus_texts(data_dir: Path) -> list[str]:
    """Plain texts of the synthetic corpus (item tokens replaced by titles) for the BPE."""
    from conkd_scale.data.corpus import load_dataset

    c = load_dataset("synthetic", data_dir, kg="none", splits=("train",))
    texts = [c.catalog.render(t.text) for conv in c.splits["train"] for t in conv.turns]
    return texts + [it.title for it in c.catalog]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
