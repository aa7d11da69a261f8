"""Reply generation with a trained causal LM (student or dialogue teacher D), and the
two-module pipeline (D writes, R picks the items).

Prompt layout, exactly the training layout of :mod:`conkd_scale.data.sequences`::

    [SEEKER] text </s> [RECOMMENDER] [REC] text <item_1> </s> ... [RECOMMENDER] (mode)

The model continues after the last role token: with ``mode="auto"`` it writes the mode token
itself (``[REC]``/``[GEN]``), with ``mode="rec"``/``"gen"`` the mode token is part of the
prompt. Generation stops at EOS or at a role token. Prompts are left-padded into batches
(sorted by length), and the context is cut at turn boundaries (oldest turns first) to
``max_context_tokens`` and to the model's position limit; a single turn too long for that
budget keeps its last tokens.

Pipeline **[decision]**: each *distinct* item that D writes is replaced, in order of first
appearance, by R's best item not yet used in the reply (a repeated mention of one D item gets
the same replacement). R's ranking is over the dataset's catalog; with
``exclude_context=True`` items already mentioned in the context are skipped too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from conkd_scale.data.schema import (
    ITEM_TOKEN_RE,
    RECOMMENDER,
    ItemCatalog,
    TurnSample,
    items_in_text,
    space_items,
)
from conkd_scale.data.sequences import _turn_ids
from conkd_scale.data.tokenizer import MODE_GEN, MODE_REC, ROLE_TOKENS, special_ids
from conkd_scale.utils.errors import ConfigError

Decoding = Literal["greedy", "beam", "sample"]
Mode = Literal["auto", "rec", "gen"]
DECODINGS = ("greedy", "beam", "sample")
MODES = ("auto", "rec", "gen")
EXPORT_META = "conkd_export.json"


@dataclass
class GenerationSettings:
    """How replies are decoded (fields are ``key=value`` options of evaluate/chat)."""

    decoding: Decoding = "greedy"
    max_new_tokens: int = 64  # reply budget (the mode token included)
    max_context_tokens: int = 448  # prompt budget (role token included)
    num_beams: int = 4  # decoding=beam
    top_p: float = 0.9  # decoding=sample (nucleus)
    temperature: float = 1.0  # decoding=sample
    batch_size: int = 16
    seed: int = 0  # decoding=sample: torch seed set once before generating
    use_mode_tokens: bool | None = None  # trained with [REC]/[GEN]? None: conkd_export.json's
    # use_mode_tokens when loaded from a directory, else true
    item_decoding: Literal["class", "token"] = "class"  # greedy/beam: see ItemClassLogits
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ConfigError(f"decoding: {self.decoding!r} is not one of {list(DECODINGS)}")
        for name in ("max_new_tokens", "max_context_tokens", "num_beams", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: expected > 0, got {self.temperature}")
        if self.item_decoding not in ("class", "token"):
            raise ConfigError(f"item_decoding: {self.item_decoding!r} is not class/token")


class ItemClassLogits:
    """**[decision]** Greedy and beam decoding see the item tokens as one class.

    At each step the class "an item" scores ``logsumexp`` of the item logits — its
    probability is the model's item mass ``m_t``, the quantity ConKD's gate reads — and stands
    for the class's best item; the other item tokens drop out. So a model writes an item where
    it puts more mass on items than on any single word, and then its top item. With plain
    per-token argmax (``item_decoding=token``) the mass of a model unsure *which* of thousands
    of items to name is spread thin, and it may never write one (a 2-layer D on ReDial wrote
    no item in any of 3,937 test replies). Sampling needs no change: drawing a token from the
    full distribution already picks an item with probability ``m_t``. A Hugging Face
    ``LogitsProcessor``: ``scores`` [B, V] in, [B, V] out.
    """

    def __init__(self, item_ids: Sequence[int]) -> None:
        self.item_ids_I = torch.tensor(sorted(item_ids), dtype=torch.long)  # [I]

    def __call__(self, input_ids: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        items_I = self.item_ids_I.to(scores_BV.device)
        if len(items_I) == 0:
            return scores_BV
        item_BI = scores_BV[:, items_I]  # [B, I]
        best_B = items_I[item_BI.argmax(-1)]  # [B] vocabulary id of each row's top item
        out_BV = scores_BV.clone()
        out_BV[:, items_I] = float("-inf")
        rows_B = torch.arange(len(out_BV), device=out_BV.device)
        out_BV[rows_B, best_B] = item_BI.logsumexp(-1).to(out_BV.dtype)
        return out_BV


@dataclass
class Generated:
    """One generated reply."""

    reply: str  # decoded text, item tokens kept, mode/role tokens removed
    mode: str | None  # "rec"/"gen" (generated or forced), None if the model wrote neither
    items: list[str]  # item ids of the item tokens written, distinct, in order
    token_ids: list[int] = field(default_factory=list)  # generated ids up to the stop token


_GLUED_LEFT = re.compile(r"(?<=[^\s(\[\"'])(<item_[^<>\s]+>)")
_GLUED_RIGHT = re.compile(r"(<item_[^<>\s]+>)(?=[^\s.,!?;:)\]\"'])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")


def display_text(text: str, catalog: ItemCatalog) -> str:
    """A reply for people: item tokens as titles, a space between a title and an adjacent
    word (BPE tokenizers may decode ``seen<item_1>``), no space before punctuation.

    >>> from conkd_scale.data.schema import Item
    >>> cat = ItemCatalog([Item("1", "Alien (1979)")])
    >>> display_text("Have you seen<item_1> ? It is  great", cat)
    'Have you seen Alien (1979)? It is great'
    """
    text = _GLUED_RIGHT.sub(r"\1 ", _GLUED_LEFT.sub(r" \1", text))
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", catalog.render(text))
    return " ".join(text.split())


def read_export_meta(model_dir: str | Path) -> dict[str, Any]:
    """``conkd_export.json`` of an exported model directory (``{}`` if absent)."""
    path = Path(model_dir) / EXPORT_META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def build_generator(
    model_dir: str | Path,
    settings: GenerationSettings,
    *,
    device: str | torch.device = "auto",
    dtype: str = "float32",
) -> LMGenerator:
    """Load an exported LM; ``settings.use_mode_tokens=None`` is read from its export meta."""
    if settings.use_mode_tokens is None:
        use = bool(read_export_meta(model_dir).get("use_mode_tokens", True))
        settings = dataclasses.replace(settings, use_mode_tokens=use)
    model, tok = load_lm(model_dir, device=device, dtype=dtype)
    return LMGenerator(model, tok, settings)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_lm(
    model_dir: str | Path, *, device: str | torch.device = "auto", dtype: str = "float32"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a Hugging Face directory, model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"{model_dir} is not a Hugging Face model directory (no config.json): pass the "
            "exported model, e.g. runs/dialog_teacher/hf"
        )
    dev = resolve_device(device) if isinstance(device, str) else device
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.to(dev).eval()
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        raise ConfigError(
            f"{model_dir}: the model has {model.get_input_embeddings().weight.shape[0]} "
            f"embedding rows but the tokenizer {len(tok)} tokens"
        )
    return model, tok


def _max_positions(model: Any) -> int | None:
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class LMGenerator:
    """Generates replies (and formats prompts) for one causal LM and its CRS tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, settings: GenerationSettings) -> None:
        self.model = model
        self.tok = tokenizer
        if settings.use_mode_tokens is None:
            settings = dataclasses.replace(settings, use_mode_tokens=True)
        self.settings = settings
        self.special = special_ids(tokenizer)
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.stop_ids = sorted(
            {self.eos_id, *(tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS.values())))}
        )
        self.mode_ids = {self.special["rec"]: "rec", self.special["gen"]: "gen"}
        vocab = tokenizer.get_vocab()
        self.item_of_id: dict[int, str] = {}
        for t, i in vocab.items():
            m = ITEM_TOKEN_RE.fullmatch(t)
            if m:
                self.item_of_id[i] = m.group(1)
        self.max_positions = _max_positions(model)
        self._seeded = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ prompts
    def context_ids(self, context: Sequence[tuple[str, str]], budget: int) -> list[int]:
        """Token ids of the context turns, the oldest dropped first to fit ``budget``."""
        out: list[int] = []
        for role, text in reversed(context):
            ids, _ = _turn_ids(
                self.tok, role, text, bool(items_in_text(text)), self.settings.use_mode_tokens
            )
            if len(out) + len(ids) > budget:
                if not out:  # the last turn alone is too long: keep its tail
                    out = ids[len(ids) - budget :] if budget > 0 else []
                break
            out = ids + out
        return out

    def prompt_ids(self, context: Sequence[tuple[str, str]], mode: Mode = "auto") -> list[int]:
        """The prompt: context, ``[RECOMMENDER]``, and the mode token when forced."""
        if mode not in MODES:
            raise ConfigError(f"mode: {mode!r} is not one of {list(MODES)}")
        tail = [self.special[RECOMMENDER]]
        if mode != "auto":
            if not self.settings.use_mode_tokens:
                raise ConfigError(
                    f"mode={mode!r} needs a model trained with mode tokens "
                    "(use_mode_tokens=false for this model)"
                )
            tail.append(self.special[mode])
        budget = self.settings.max_context_tokens - len(tail)
        if self.max_positions is not None:
            budget = min(budget, self.max_positions - self.settings.max_new_tokens - len(tail))
        if budget < 0:
            raise ConfigError(
                f"max_new_tokens={self.settings.max_new_tokens} leaves no room for a prompt "
                f"within the model's {self.max_positions} positions"
            )
        return self.context_ids(context, budget) + tail

    # ------------------------------------------------------------------ decoding
    def parse(self, new_ids: Sequence[int], mode: Mode = "auto") -> Generated:
        """Split generated ids into mode, reply text and items (stops at EOS/role tokens)."""
        ids = list(new_ids)
        got_mode: str | None = None if mode == "auto" else mode
        if mode == "auto" and ids and ids[0] in self.mode_ids:
            got_mode = self.mode_ids[ids[0]]
            ids = ids[1:]
        cut = next((n for n, i in enumerate(ids) if i in self.stop_ids), len(ids))
        ids = ids[:cut]
        items = list(dict.fromkeys(self.item_of_id[i] for i in ids if i in self.item_of_id))
        text = space_items(self.tok.decode(ids, skip_special_tokens=True)).strip()
        return Generated(text, got_mode, items, ids)

    def _hf_generation_config(self) -> Any:
        from transformers import GenerationConfig

        s = self.settings
        kw: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
        }
        if s.decoding == "greedy":
            kw.update(do_sample=False, num_beams=1)
        elif s.decoding == "beam":
            kw.update(do_sample=False, num_beams=s.num_beams, early_stopping=True)
        else:
            kw.update(do_sample=True, top_p=s.top_p, temperature=s.temperature, top_k=0)
        return GenerationConfig(**kw)

    def _logits_processors(self) -> Any:
        from transformers import LogitsProcessorList

        s = self.settings
        if s.item_decoding == "class" and s.decoding != "sample":
            return LogitsProcessorList([ItemClassLogits(list(self.item_of_id))])
        return LogitsProcessorList()

    def _left_padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` [B, T] of ``seqs``, padded on the left."""
        T = max(len(x) for x in seqs)
        input_ids_BT = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        attention_mask_BT = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, x in enumerate(seqs):
            input_ids_BT[b, T - len(x) :] = torch.tensor(list(x), dtype=torch.long)
            attention_mask_BT[b, T - len(x) :] = 1
        return input_ids_BT, attention_mask_BT

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Generated ids (prompt excluded) for each prompt, batched with left padding."""
        order = sorted(range(len(prompts)), key=lambda n: len(prompts[n]))
        out: list[list[int]] = [[] for _ in prompts]
        gen_cfg = self._hf_generation_config()
        bs = self.settings.batch_size
        with _progress(len(prompts), "generate", self.settings.progress) as bar:
            for s in range(0, len(order), bs):
                idx = order[s : s + bs]
                input_ids_BT, attention_mask_BT = self._left_padded([prompts[n] for n in idx])
                T = input_ids_BT.shape[1]
                seq_BL = self.model.generate(
                    input_ids=input_ids_BT.to(self.device),
                    attention_mask=attention_mask_BT.to(self.device),
                    generation_config=gen_cfg,
                    logits_processor=self._logits_processors(),
                )  # [B, T + new]
                for b, n in enumerate(idx):
                    out[n] = seq_BL[b, T:].tolist()
                bar.update(len(idx))
        return out

    @torch.no_grad()
    def own_top_items(
        self,
        contexts: Sequence[Sequence[tuple[str, str]]],
        replies: Sequence[Generated],
        mode: Mode = "auto",
    ) -> list[str | None]:
        """Per reply, the model's own top item (argmax of its logits over the item tokens) at
        the position where the reply's first item token was written; ``None`` for replies
        without an item. The unified model's counterpart of the pipeline's "R's top item"."""
        out: list[str | None] = [None] * len(replies)
        item_ids = sorted(self.item_of_id)
        item_tok_I = torch.tensor(item_ids, dtype=torch.long, device=self.device)  # [I]
        todo = []  # (reply index, ids up to the first item token)
        for n, (ctx, g) in enumerate(zip(contexts, replies, strict=True)):
            pos = next((k for k, t in enumerate(g.token_ids) if t in self.item_of_id), None)
            if pos is None:
                continue
            written_mode = [self.special[g.mode]] if mode == "auto" and g.mode else []
            todo.append((n, self.prompt_ids(ctx, mode) + written_mode + g.token_ids[:pos]))
        bs = self.settings.batch_size
        for s in range(0, len(todo), bs):
            chunk = todo[s : s + bs]
            # left padding: every row's last token is at [-1]
            input_ids_BT, attention_mask_BT = self._left_padded([ids for _, ids in chunk])
            # positions count from each row's first real token, as in generate()
            position_ids_BT = (attention_mask_BT.cumsum(-1) - 1).clamp(min=0)
            logits_BV = self.model(
                input_ids=input_ids_BT.to(self.device),
                attention_mask=attention_mask_BT.to(self.device),
                position_ids=position_ids_BT.to(self.device),
            ).logits[:, -1]  # [B, V]
            top_B = logits_BV[:, item_tok_I].argmax(-1)  # [B] index into item_ids
            for (n, _), k in zip(chunk, top_B.tolist(), strict=True):
                out[n] = self.item_of_id[item_ids[k]]
        return out

    def generate(
        self, contexts: Sequence[Sequence[tuple[str, str]]], mode: Mode = "auto"
    ) -> list[Generated]:
        """One reply per context (a context is a sequence of ``(role, text)`` turns)."""
        if self.settings.decoding == "sample" and not self._seeded:
            torch.manual_seed(self.settings.seed)  # once: later calls continue the stream
            self._seeded = True
        prompts = [self.prompt_ids(c, mode) for c in contexts]
        return [self.parse(ids, mode) for ids in self.generate_ids(prompts)]


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


# ---------------------------------------------------------------------- pipeline


class ItemScorer(Protocol):
    """What the pipeline and the ``rec`` evaluation need of R (conkd_scale.rec.api)."""

    def item_distribution(
        self, turns: Sequence[TurnSample], item_ids: Sequence[str]
    ) -> torch.Tensor:  # [S, len(item_ids)]
        ...


def rec_item_scores(
    rec: ItemScorer, turns: Sequence[TurnSample], item_ids: Sequence[str]
) -> torch.Tensor:
    """R's ranking scores over ``item_ids``: ``[S, I]``, higher is better.

    ``q_R = softmax(s / tau)`` is monotone in R's raw scores ``s``, but in fp32 near-equal
    scores round to equal probabilities (ties, which the pessimistic ranking counts against
    the gold item). So when R exposes ``scores(turns, item_ids)`` the ranking uses ``s``, with
    the items R masks (``q_R = 0``, e.g. ``exclude_seen``) set to ``-inf``; otherwise ``q_R``.
    """
    q_SI = rec.item_distribution(turns, item_ids).float()  # [S, I]
    scores_fn = getattr(rec, "scores", None)
    if scores_fn is None:
        return q_SI.cpu()
    s_SI = scores_fn(turns, item_ids).float()  # [S, I]
    return s_SI.masked_fill(q_SI == 0, float("-inf")).cpu()


def top_indices(scores_SI: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the indices of the ``k`` best scores; ties go to the lower index (unlike
    ``torch.topk``, whose tie order depends on ``k`` and the backend)."""
    order_SI = torch.sort(scores_SI, dim=1, descending=True, stable=True).indices  # [S, I]
    return order_SI[:, :k].tolist()


def replace_items(reply: str, ranking: Sequence[str]) -> tuple[str, list[str]]:
    """Replace each distinct item token of ``reply`` by the next unused item of ``ranking``.

    Returns the new reply and its items (distinct, in order).

    >>> replace_items("see <item_a> or <item_b>, <item_a>!", ["x", "y", "z"])
    ('see <item_x> or <item_y>, <item_x>!', ['x', 'y'])
    """
    assigned: dict[str, str] = {}
    pool = iter(ranking)

    def sub(m: Any) -> str:
        d_item = m.group(1)
        if d_item not in assigned:
            nxt = next(pool, None)
            if nxt is None:  # R has no unused item left: keep D's
                assigned[d_item] = d_item
            else:
                assigned[d_item] = nxt
        return f"<item_{assigned[d_item]}>"

    new = ITEM_TOKEN_RE.sub(sub, reply)
    return new, list(dict.fromkeys(items_in_text(new)))


@dataclass
class PipelineReply:
    reply: str  # after R's replacement
    items: list[str]
    mode: str | None
    d_reply: str  # D's own reply
    d_items: list[str]
    r_top_item: str  # R's best item for this context


class Pipeline:
    """The classic two-module CRS: D writes the reply, R chooses every item in it."""

    def __init__(
        self,
        generator: LMGenerator,
        rec: ItemScorer,
        item_ids: Sequence[str],
        *,
        exclude_context: bool = False,
        rec_batch_size: int = 256,
    ) -> None:
        self.generator = generator
        self.rec = rec
        self.item_ids = list(item_ids)
        self.exclude_context = exclude_context
        self.rec_batch_size = rec_batch_size

    def rankings(self, turns: Sequence[TurnSample], depth: int = 16) -> list[list[str]]:
        """R's top ``depth`` items per turn (context items skipped if ``exclude_context``)."""
        out: list[list[str]] = []
        for s in range(0, len(turns), self.rec_batch_size):
            chunk = turns[s : s + self.rec_batch_size]
            s_SI = rec_item_scores(self.rec, chunk, self.item_ids)  # [S, I]
            k = min(len(self.item_ids), depth + max(len(t.context_items) for t in chunk))
            top_SK = top_indices(s_SI, k)  # [S][K]
            for t, row in zip(chunk, top_SK, strict=True):
                seen = set(t.context_items) if self.exclude_context else set()
                out.append([self.item_ids[i] for i in row if self.item_ids[i] not in seen])
        return out

    def generate(self, turns: Sequence[TurnSample], mode: Mode = "auto") -> list[PipelineReply]:
        d_out = self.generator.generate([t.context for t in turns], mode)
        rankings = self.rankings(turns, depth=1 + max((len(g.items) for g in d_out), default=0))
        out = []
        for g, ranking in zip(d_out, rankings, strict=True):
            reply, items = replace_items(g.reply, ranking)
            out.append(
                PipelineReply(reply, items, g.mode, g.reply, g.items, ranking[0] if ranking else "")
            )
        return out


__all__ = [
    "DECODINGS",
    "MODES",
    "MODE_GEN",
    "MODE_REC",
    "Generated",
    "GenerationSettings",
    "ItemScorer",
    "LMGenerator",
    "Pipeline",
    "PipelineReply",
    "build_generator",
    "display_text",
    "load_lm",
    "read_export_meta",
    "rec_item_scores",
    "replace_items",
    "top_indices",
]
