"""A tiny causal LM directory for the evaluation, generation and chat tests.

``write_tiny_lm(corpus, out_dir)`` trains a SentencePiece tokenizer on the corpus's training
turns, builds a 1-layer GPT-2 (``n_embd=32``) over it and saves model, tokenizer and
``items.json`` exactly as an export does. The weights are random: replies are noise, but every
code path (prompting, batching, item parsing, metrics, files) runs as with a trained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conkd_scale.data.corpus import Corpus
from conkd_scale.data.tokenizer import train_sentencepiece_tokenizer
from conkd_scale.eval.catalog_io import save_item_catalog
from conkd_scale.utils.io import atomic_dir, write_json


def write_tiny_lm(
    corpus: Corpus,
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_positions: int = 256,
    train_steps: int = 0,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the tiny model directory (atomically) and return its path.

    ``train_steps > 0``: that many AdamW steps (batch 8, lr 1e-2) on the training sequences,
    enough for the model to write mode tokens, words and item tokens in the right places.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = [t.text for c in corpus.splits.get("train", []) for t in c.turns]
    tok = train_sentencepiece_tokenizer(texts or ["hello"], corpus.catalog.ids, vocab_size=4000)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=len(tok),
        n_positions=n_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    if train_steps:
        _train(model, corpus, tok, train_steps, n_positions, seed)
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_item_catalog(tmp, corpus.catalog)
        write_json(Path(tmp) / "conkd_export.json", {"source": "tiny", **(meta or {})})
    return Path(out_dir)


def _train(model: Any, corpus: Corpus, tok: Any, steps: int, max_length: int, seed: int) -> None:
    import torch

    from conkd_scale.data.sequences import encode_conversation

    seqs = [
        s
        for c in corpus.splits["train"]
        for s in encode_conversation(c, tok, max_length=max_length)
    ]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and fair on a shared CPU
    try:
        _steps(model, opt, seqs, tok, steps, g)
    finally:
        torch.set_num_threads(threads)


def _steps(model: Any, opt: Any, seqs: list[Any], tok: Any, steps: int, g: Any) -> None:
    import torch

    from conkd_scale.data.sequences import collate

    for _ in range(steps):
        pick = torch.randint(0, len(seqs), (8,), generator=g).tolist()
        batch = collate([seqs[i] for i in pick], tok.pad_token_id)
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def ensure_tiny_setup(
    base: str | Path, *, rec: bool = False, train_steps: int = 100
) -> dict[str, Path]:
    """Synthetic data (60 conversations, 30 items), the tiny LM (``train_steps`` steps) and,
    with ``rec=True``, a tiny R trained for one epoch, under ``base`` (each built once, reused
    when present).

    Returns ``{"data": ..., "lm": ...[, "rec": ...]}``.
    """
    from conkd_scale.data.corpus import load_dataset
    from conkd_scale.data.synthetic import write_synthetic

    base = Path(base)
    paths = {"data": base / "data", "lm": base / "lm"}
    if not paths["data"].is_dir():
        write_synthetic(paths["data"], seed=0, conversations=60, items=30)
    if not paths["lm"].is_dir():
        corpus = load_dataset("synthetic", paths["data"], kg="none")
        write_tiny_lm(corpus, paths["lm"], train_steps=train_steps)
    if rec:
        paths["rec"] = base / "rec"
        if not (paths["rec"] / "metrics.json").is_file():
            from conkd_scale.rec.train import RecTeacherConfig, train_rec_teacher

            train_rec_teacher(
                RecTeacherConfig(
                    data_dir=str(paths["data"]),
                    output_dir=str(paths["rec"]),
                    dim=8,
                    num_bases=2,
                    epochs=1,
                    patience=1,
                    progress=False,
                )
            )
    return paths
