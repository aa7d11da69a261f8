"""Generation, prompts, teacher-forced scoring and the pipeline, with a tiny untrained GPT-2."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from conkd_scale.data.corpus import Corpus, load_dataset
from conkd_scale.data.schema import RECOMMENDER, TurnSample, item_token, items_in_text
from conkd_scale.data.sequences import IGNORE, encode_conversation
from conkd_scale.eval.generation import (
    Generated,
    GenerationSettings,
    LMGenerator,
    Pipeline,
    build_generator,
)
from conkd_scale.eval.scoring import TeacherForcedScorer
from conkd_scale.utils.errors import ConfigError
from tests.tiny_lm import ensure_tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_tiny_setup(tmp_path_factory.getbasetemp() / "eval_tiny")


@pytest.fixture(scope="module")
def corpus(setup: dict[str, Path]) -> Corpus:
    return load_dataset("synthetic", setup["data"], kg="none")


@pytest.fixture(scope="module")
def gen(setup: dict[str, Path]) -> LMGenerator:
    settings = GenerationSettings(max_new_tokens=8, max_context_tokens=200, progress=False)
    return build_generator(setup["lm"], settings)


def _with(gen: LMGenerator, **kw: object) -> LMGenerator:
    return LMGenerator(gen.model, gen.tok, dataclasses.replace(gen.settings, **kw))


def test_prompt_and_gold_reply_match_training_sequences(gen: LMGenerator, corpus: Corpus) -> None:
    """prompt_ids + gold reply == the training sequence of the whole conversation, turn by turn."""
    scorer = TeacherForcedScorer(gen, corpus.catalog.ids)
    checked = 0
    for conv in corpus.splits["test"][:3]:
        (seq,) = encode_conversation(conv, gen.tok, max_length=10_000)
        samples = [s for s in corpus.samples("test") if s.conv_id == conv.conv_id]
        for s in samples:
            prompt = gen.prompt_ids(s.context)
            assert seq.input_ids[: len(prompt)] == prompt
            row = scorer.row(s)
            assert row.ids == seq.input_ids[: len(row.ids)]
            # the reply is exactly the loss span of this turn in training (mode, text, EOS)
            loss_pos = [p for p in range(len(prompt), len(row.ids))]
            assert all(seq.labels[p] != IGNORE for p in loss_pos)
            assert row.ids[-1] == gen.eos_id and row.start == len(prompt)
            mode = gen.special["rec" if s.gold_items else "gen"]
            # the mode token is a response token: PPL scores it (METHOD.md)
            assert row.ids[row.start] == mode and row.nll_from == row.start
            for pos, idx, _ in row.items:
                assert row.ids[pos] == gen.tok.convert_tokens_to_ids(
                    item_token(corpus.catalog.ids[idx])
                )
            checked += 1
    assert checked >= 6


def test_context_truncation_at_turn_boundaries(gen: LMGenerator, corpus: Corpus) -> None:
    s = max(corpus.samples("test"), key=lambda t: len(t.context))
    full = gen.prompt_ids(s.context)
    small = _with(gen, max_context_tokens=40)
    cut = small.prompt_ids(s.context)
    assert len(cut) <= 40 and cut[-1] == gen.special[RECOMMENDER] and cut == full[-len(cut) :]
    role_ids = {gen.special["seeker"], gen.special[RECOMMENDER]}
    assert cut[0] in role_ids  # starts at a turn boundary
    # a single turn longer than the budget keeps its tail
    tail = _with(gen, max_context_tokens=4).prompt_ids([("seeker", "a b c d e f g h i j k l")])
    assert len(tail) == 4 and tail[-2] == gen.eos_id
    with pytest.raises(ConfigError, match="max_new_tokens"):
        _with(gen, max_new_tokens=1000).prompt_ids(s.context)


def test_forced_mode_is_in_prompt_and_reported(gen: LMGenerator, corpus: Corpus) -> None:
    contexts = [s.context for s in corpus.samples("test")[:3]]
    for mode in ("rec", "gen"):
        assert gen.prompt_ids(contexts[0], mode)[-2:] == [
            gen.special[RECOMMENDER],
            gen.special[mode],
        ]
        out = gen.generate(contexts, mode)
        assert [g.mode for g in out] == [mode] * 3
    with pytest.raises(ConfigError):
        gen.prompt_ids(contexts[0], "bogus")  # type: ignore[arg-type]
    no_mode = _with(gen, use_mode_tokens=False)
    with pytest.raises(ConfigError, match="mode tokens"):
        no_mode.prompt_ids(contexts[0], "rec")


def test_parse_mode_items_and_stop(gen: LMGenerator, corpus: Corpus) -> None:
    tok = gen.tok
    a, b = corpus.catalog.ids[:2]
    ids_a, ids_b = tok.convert_tokens_to_ids([item_token(a), item_token(b)])
    words = tok.encode("try", add_special_tokens=False)
    seq = [gen.special["rec"], *words, ids_a, ids_b, ids_a, gen.eos_id, ids_b, 5]
    g = gen.parse(seq)
    assert g.mode == "rec" and g.items == [a, b]
    assert item_token(a) in g.reply and g.reply.startswith("try")
    assert g.token_ids == [*words, ids_a, ids_b, ids_a]
    # a role token also ends the reply; no mode token in auto mode -> None
    g2 = gen.parse([*words, gen.special["seeker"], ids_a])
    assert g2.mode is None and g2.items == [] and g2.reply == "try"
    # forced mode: the first generated token is text
    assert gen.parse([ids_b], "gen").mode == "gen"


def test_left_padded_batches_equal_one_by_one(gen: LMGenerator, corpus: Corpus) -> None:
    contexts = [s.context for s in corpus.samples("test")[:5]]
    lens = {len(gen.prompt_ids(c)) for c in contexts}
    assert len(lens) > 1  # really padded
    batched = _with(gen, batch_size=5, max_new_tokens=6).generate(contexts)
    single = _with(gen, batch_size=1, max_new_tokens=6).generate(contexts)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_beam_and_sampling(gen: LMGenerator, corpus: Corpus) -> None:
    contexts = [s.context for s in corpus.samples("test")[:3]]
    beam = _with(gen, decoding="beam", num_beams=3, max_new_tokens=5).generate(contexts)
    assert len(beam) == 3 and all(isinstance(g, Generated) for g in beam)
    s1 = _with(gen, decoding="sample", seed=3, max_new_tokens=6).generate(contexts)
    s2 = _with(gen, decoding="sample", seed=3, max_new_tokens=6).generate(contexts)
    assert [g.token_ids for g in s1] == [g.token_ids for g in s2]
    with pytest.raises(ConfigError):
        GenerationSettings(decoding="topk")  # type: ignore[arg-type]


def test_teacher_forced_nll_matches_hf_loss(gen: LMGenerator, corpus: Corpus) -> None:
    turns = [s for s in corpus.samples("test") if s.gold_items][:3]
    scorer = TeacherForcedScorer(gen, corpus.catalog.ids, batch_size=2)
    out = scorer.score(turns)
    nll, n = 0.0, 0
    for t in turns:
        row = scorer.row(t)
        ids = torch.tensor([row.ids])
        labels = ids.clone()
        labels[0, : row.nll_from] = IGNORE
        with torch.no_grad():
            loss = gen.model(input_ids=ids, labels=labels).loss
        k = len(row.ids) - row.nll_from
        nll += float(loss) * k
        n += k
    assert out.n_tokens == n
    assert out.nll_sum == pytest.approx(nll, rel=1e-5)
    assert out.ranking[0]["n"] == sum(len(set(t.gold_items)) for t in turns)
    assert 0.0 <= out.ranking[0]["R@10"] <= 1.0 and out.items_not_found == 0
    assert out.turn_tokens == [len(scorer.row(t).ids) - scorer.row(t).start for t in turns]
    assert sum(out.turn_nll) == pytest.approx(out.nll_sum, rel=1e-6)
    no_mode = TeacherForcedScorer(gen, corpus.catalog.ids, include_mode=False).score(turns)
    assert no_mode.n_tokens == n - len(turns)  # the mode token dropped, one per turn


def test_teacher_forced_item_ranks(gen: LMGenerator, corpus: Corpus) -> None:
    """Ranked scores = the LM's logits at the item position, restricted to the item tokens."""
    t = next(s for s in corpus.samples("test") if len(set(s.gold_items)) == 1)
    scorer = TeacherForcedScorer(gen, corpus.catalog.ids)
    row = scorer.row(t)
    ((pos, idx, _),) = row.items
    with torch.no_grad():
        logits_TV = gen.model(input_ids=torch.tensor([row.ids])).logits[0]  # [T, V]
    item_logits_I = logits_TV[pos - 1, scorer.item_tok_I]  # [I]
    rank = int((item_logits_I >= item_logits_I[idx]).sum())  # pessimistic
    res = scorer.score([t]).ranking[0]
    assert res["n"] == 1
    assert res["R@1"] == float(rank <= 1) and res["R@10"] == float(rank <= 10)
    assert res["MRR@50"] == pytest.approx(1 / rank)
    assert res["MRR@10"] == pytest.approx(1 / rank if rank <= 10 else 0.0)


class _FixedRec:
    """A stand-in R: the same fixed ranking for every turn (scores descending by position)."""

    def __init__(self, order: Sequence[str]) -> None:
        self.order = list(order)

    def item_distribution(
        self, turns: Sequence[TurnSample], item_ids: Sequence[str]
    ) -> torch.Tensor:
        rank = {i: n for n, i in enumerate(self.order)}
        s_I = torch.tensor([-float(rank.get(i, len(self.order))) for i in item_ids])  # [I]
        return torch.softmax(s_I, 0).expand(len(turns), -1)  # [S, I]


class _ScriptedGenerator:
    """Stand-in D: returns scripted replies."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies

    def generate(self, contexts: Sequence[object], mode: str = "auto") -> list[Generated]:
        return [
            Generated(r, "rec", list(dict.fromkeys(items_in_text(r))))
            for r in self.replies[: len(contexts)]
        ]


def test_pipeline_replaces_items_with_r_choices(corpus: Corpus) -> None:
    ids = corpus.catalog.ids
    turns = [s for s in corpus.samples("test") if s.context_items][:2]
    seen = turns[0].context_items[0]
    x, y, z, d1, d2 = [i for i in ids if i not in turns[0].context_items][:5]
    order = [seen, x, y, z]
    d = _ScriptedGenerator([f"try {item_token(d1)} or {item_token(d2)}", "no items"])
    pipe = Pipeline(d, _FixedRec(order), ids)  # type: ignore[arg-type]
    out = pipe.generate(turns)
    assert out[0].reply == f"try {item_token(seen)} or {item_token(x)}"
    assert out[0].items == [seen, x] and out[0].d_items == [d1, d2]
    assert out[0].r_top_item == seen and out[1].items == [] and out[1].d_reply == "no items"
    # exclude_context: R's choices skip the items already mentioned
    pipe_x = Pipeline(d, _FixedRec(order), ids, exclude_context=True)  # type: ignore[arg-type]
    out_x = pipe_x.generate(turns[:1])
    assert out_x[0].items == [x, y] and out_x[0].r_top_item == x


def test_real_generator_output_fields(gen: LMGenerator, corpus: Corpus) -> None:
    out = _with(gen, max_new_tokens=12).generate([s.context for s in corpus.samples("test")[:4]])
    for g in out:
        assert g.mode in (None, "rec", "gen")
        assert len(g.token_ids) <= 12 and not any(i in gen.stop_ids for i in g.token_ids)
        assert g.items == list(dict.fromkeys(g.items))
        assert all(item_token(i) in g.reply for i in g.items)
        # the reply is the decoded text of its token ids (mode/role/EOS removed)
        assert g.reply == gen.parse(g.token_ids, "gen").reply
    assert any(g.reply for g in out)


def test_model_without_mode_tokens(gen: LMGenerator, corpus: Corpus) -> None:
    """The no-mode-token ablation: prompts and gold replies carry no [REC]/[GEN] at all."""
    no_mode = _with(gen, use_mode_tokens=False)
    t = next(s for s in corpus.samples("test") if s.gold_items and s.context)
    row = TeacherForcedScorer(no_mode, corpus.catalog.ids).row(t)
    modes = {gen.special["rec"], gen.special["gen"]}
    assert not modes & set(row.ids) and row.nll_from == row.start
    (seq,) = encode_conversation(
        next(c for c in corpus.splits["test"] if c.conv_id == t.conv_id),
        gen.tok,
        max_length=10_000,
        use_mode_tokens=False,
    )
    assert row.ids == seq.input_ids[: len(row.ids)]


def test_item_class_logits_lets_the_item_mass_compete_as_one_class() -> None:
    """Words 0-2, items 3-5: each item is less likely than word 0, their sum is not."""
    from conkd_scale.eval.generation import ItemClassLogits

    probs_BV = torch.tensor(
        [
            [0.30, 0.10, 0.10, 0.15, 0.20, 0.15],  # item mass 0.50 > 0.30: item 4 (its best)
            [0.60, 0.10, 0.05, 0.10, 0.05, 0.10],  # item mass 0.25 < 0.60: word 0
        ]
    )
    scores_BV = probs_BV.log()
    out_BV = ItemClassLogits([5, 3, 4])(torch.zeros(2, 1, dtype=torch.long), scores_BV)
    assert out_BV.argmax(-1).tolist() == [4, 0]
    assert out_BV[0, 4].exp().item() == pytest.approx(0.50)  # the class's probability
    assert torch.isinf(out_BV[0, [3, 5]]).all()  # the class's other items drop out
    assert out_BV[1, 3].exp().item() == pytest.approx(0.25) and torch.isinf(out_BV[1, [4, 5]]).all()
    assert torch.equal(out_BV[:, :3], scores_BV[:, :3])  # words untouched
    assert scores_BV.argmax(-1).tolist() == [0, 0]  # per-token argmax: never an item


def test_class_decoding_writes_the_models_top_item(gen: LMGenerator, corpus: Corpus) -> None:
    """Greedy with item_decoding=class: wherever an item is written it is the model's own
    top item there (its argmax over items), and no fewer replies have items than with
    per-token argmax (an item token that wins alone also wins as the class)."""
    contexts = [s.context for s in corpus.samples("test")[:12]]
    by_class = _with(gen, item_decoding="class", max_new_tokens=12)
    replies = by_class.generate(contexts, "rec")
    own = by_class.own_top_items(contexts, replies, "rec")
    assert all(top == (g.items[0] if g.items else None) for g, top in zip(replies, own))
    plain = _with(gen, item_decoding="token", max_new_tokens=12).generate(contexts, "rec")
    first = [next((t for t in g.token_ids if t in gen.item_of_id), None) for g in replies]
    first_plain = [next((t for t in g.token_ids if t in gen.item_of_id), None) for g in plain]
    assert sum(f is not None for f in first) >= sum(f is not None for f in first_plain)
    with pytest.raises(ConfigError, match="item_decoding"):
        GenerationSettings(item_decoding="words")  # type: ignore[arg-type]
