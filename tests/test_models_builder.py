"""Model builder, presets and export, single process (no DeepSpeed engine): from-scratch
models, extending a local pretrained GPT-2 with item/mode tokens (title-mean rows), and a
Hugging Face export that plain transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conkd_scale.data.schema import Item, ItemCatalog, item_token
from conkd_scale.data.tokenizer import MODE_REC, item_token_ids, load_tokenizer
from conkd_scale.models.builder import ModelConfig, build_model, count_params, prepare_tokenizer
from conkd_scale.models.export import EXPORT_META, export_hf
from conkd_scale.models.presets import PRESETS, approx_params, get_preset
from conkd_scale.utils.errors import ConfigError
from tests.helpers_ds import make_tiny_gpt2

TEXTS = [
    "Have you seen Glass Carnival? It is a great horror movie.",
    "I love comedies with Anna Carter, and Burning Frontier was fun.",
    "Hi! What kind of movies do you like? Anything with a good story.",
] * 20
CATALOG = ItemCatalog(
    [Item("101", "Glass Carnival (2017)"), Item("102", "Burning Frontier"), Item("103", "")]
)


def test_presets_table() -> None:
    assert len(PRESETS) >= 4
    sizes = [approx_params(p) for p in PRESETS.values()]
    assert sizes == sorted(sizes)
    assert approx_params(PRESETS["tiny"]) < 1.5e6 and 0.9e8 < approx_params(PRESETS["base"]) < 1.1e8
    for p in PRESETS.values():
        assert approx_params(p) / 1e6 == pytest.approx(p.approx_params_16k, abs=0.06), p.name
        assert p.n_embd % p.n_head == 0
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("gigantic")


def test_scratch_model_over_crs_vocab(tmp_path: Path) -> None:
    cfg = ModelConfig(preset="tiny", vocab_size=200, n_positions=64)
    tok = prepare_tokenizer(cfg, CATALOG, TEXTS, tmp_path / "tok")
    built = build_model(cfg, tok, catalog=CATALOG)
    m = built.model
    assert m.config.vocab_size == len(tok) and m.config.n_layer == 2 and m.config.n_embd == 64
    assert m.config.pad_token_id == tok.pad_token_id and m.config.eos_token_id == tok.eos_token_id
    assert built.item_ids == item_token_ids(tok, CATALOG.ids) and built.new_token_ids == []
    assert built.num_params == count_params(m)
    # reused as is when it exists; refused for another item vocabulary
    assert len(prepare_tokenizer(cfg, CATALOG, [], tmp_path / "tok")) == len(tok)
    other = ItemCatalog([Item("999", "x")])
    with pytest.raises(ConfigError, match="item '999'"):
        prepare_tokenizer(cfg, other, [], tmp_path / "tok")


@pytest.mark.parametrize("tied", [True, False])
def test_pretrained_extension_initialises_new_rows(tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = make_tiny_gpt2(
        tmp_path / "gpt2", TEXTS + [it.title for it in CATALOG], tie_word_embeddings=tied
    )
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    W0_VD = base.get_input_embeddings().weight.detach()
    O0_VD = base.get_output_embeddings().weight.detach()
    cfg = ModelConfig(pretrained=str(base_dir))
    assert cfg.tokenizer_kind == "pretrained"
    tok = prepare_tokenizer(cfg, CATALOG, [], tmp_path / "tok")
    built = build_model(cfg, load_tokenizer(tmp_path / "tok"), catalog=CATALOG)
    W_VD = built.model.get_input_embeddings().weight.detach()
    n_old = W0_VD.shape[0]
    assert W_VD.shape[0] == len(tok) == n_old + 3 + 4  # 3 items, [REC] [GEN] + 2 role tokens
    assert sorted(built.new_token_ids) == list(range(n_old, len(tok)))
    torch.testing.assert_close(W_VD[:n_old], W0_VD, rtol=0, atol=0)  # old rows untouched
    # an item with a title: mean of its title's base-vocabulary token rows
    for item_id, title in [("101", "Glass Carnival (2017)"), ("102", "Burning Frontier")]:
        row = W_VD[tok.convert_tokens_to_ids(item_token(item_id))]
        torch.testing.assert_close(row, W0_VD[base_tok.encode(title)].mean(0))
    # an item without a title and the mode token: mean of all old rows
    mean_D = W0_VD.mean(0)
    torch.testing.assert_close(W_VD[tok.convert_tokens_to_ids(item_token("103"))], mean_D)
    torch.testing.assert_close(W_VD[tok.convert_tokens_to_ids(MODE_REC)], mean_D)
    out_W = built.model.get_output_embeddings().weight
    if tied:  # GPT-2 ties the output embedding: the same rows there
        assert out_W is built.model.get_input_embeddings().weight
    else:  # an untied output embedding gets its own title means
        assert out_W is not built.model.get_input_embeddings().weight
        assert out_W.shape[0] == len(tok)
        torch.testing.assert_close(out_W.detach()[:n_old], O0_VD, rtol=0, atol=0)
        row = out_W.detach()[tok.convert_tokens_to_ids(item_token("101"))]
        torch.testing.assert_close(row, O0_VD[base_tok.encode("Glass Carnival (2017)")].mean(0))
        torch.testing.assert_close(
            out_W.detach()[tok.convert_tokens_to_ids(MODE_REC)], O0_VD.mean(0)
        )


def test_export_loads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(preset="tiny", vocab_size=200, n_positions=64, dropout=0.0)
    tok = prepare_tokenizer(cfg, CATALOG, TEXTS, tmp_path / "tok")
    torch.manual_seed(0)
    model = build_model(cfg, tok, catalog=CATALOG).model.eval()
    out = export_hf(model, tok, tmp_path / "hf", meta={"step": 3})
    assert json.loads((out / EXPORT_META).read_text())["step"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = tok2.encode(
        f"[SEEKER] hi </s> [RECOMMENDER] [REC] {item_token('101')}", return_tensors="pt"
    )
    assert tok2.convert_ids_to_tokens(ids[0])[-1] == item_token("101")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    assert not list(tmp_path.glob(".hf.*"))  # atomic: no temp dir left behind
