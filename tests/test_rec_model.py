"""Recommendation teacher R: compact-graph exactness, shapes, popularity, the loading API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_geometric.nn import RGCNConv

from conkd_scale.data.corpus import Corpus, load_dataset
from conkd_scale.data.schema import RECOMMENDER, TurnSample
from conkd_scale.data.synthetic import write_synthetic
from conkd_scale.rec.api import RecTeacher
from conkd_scale.rec.graph import SELF_LOOP, ContextIndex, build_rec_graph
from conkd_scale.rec.model import RecTeacherModel, pad_contexts
from conkd_scale.rec.popularity import Popularity
from conkd_scale.rec.rgcn import BasisRGCNConv
from conkd_scale.rec.train import RecTeacherConfig, RecTeacherTrainer
from conkd_scale.utils.errors import ConfigError


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rec_synth") / "data"
    write_synthetic(d, seed=0, conversations=200, items=60)
    return d


@pytest.fixture(scope="module")
def corpus(synth_dir: Path) -> Corpus:
    return load_dataset("synthetic", synth_dir)


def _turn(context_items: tuple[str, ...] = (), entities: tuple[str, ...] = ()) -> TurnSample:
    return TurnSample("c", 1, (), "", RECOMMENDER, (), context_items, entities)


def _full_graph_outputs(model: RecTeacherModel, corpus: Corpus) -> torch.Tensor:
    """The R-GCN over the whole KG (no pruning), read at R's target nodes: ``[T, d]``."""
    g = model.graph
    gt = corpus.kg.build_graph(min_relation_count=0)
    n_kg = corpus.kg.num_entities
    unlinked = (g.kg_node < 0).nonzero().squeeze(1)
    full_id = g.kg_node.clone()
    full_id[unlinked] = n_kg + torch.arange(len(unlinked))
    x = torch.randn(n_kg + len(unlinked), model.dim)
    x[full_id] = model.node_emb.weight.detach()
    loops = full_id[unlinked]
    ei = torch.cat([gt.edge_index, torch.stack([loops, loops])], 1)
    et = torch.cat([gt.edge_type, torch.full_like(loops, gt.relation_names.index(SELF_LOOP))])
    for l, conv in enumerate(model.convs):
        x = conv(x, ei, et)
        if l < len(model.convs) - 1:
            x = torch.relu(x)
    return x[full_id[: g.num_targets]]


@pytest.mark.parametrize(("layers", "impl"), [(1, "basis"), (2, "basis"), (1, "pyg")])
def test_pruned_graph_is_exact(corpus: Corpus, layers: int, impl: str) -> None:
    torch.manual_seed(0)
    graph = build_rec_graph(corpus, layers=layers, min_relation_count=0)
    assert len(graph.layer_sizes) == layers + 1
    assert graph.layer_sizes == sorted(graph.layer_sizes, reverse=True)
    for l in range(layers):  # layer l reads the first n_l nodes, writes the first n_{l+1}
        assert int(graph.edge_index[l][0].max()) < graph.layer_sizes[l]
        assert int(graph.edge_index[l][1].max()) < graph.layer_sizes[l + 1]
    model = RecTeacherModel(graph, dim=16, num_bases=2, rgcn_impl=impl)
    with torch.no_grad():
        pruned = model.node_embeddings()
        full = _full_graph_outputs(model, corpus)
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bipartite", "bases"), [(True, 3), (False, 5), (True, None)])
def test_basis_rgcn_matches_rgcnconv(bipartite: bool, bases: int | None) -> None:
    """Outputs and gradients (for a gradient output that is not 1) equal RGCNConv's."""
    gen = torch.Generator().manual_seed(0)
    n_src, n_dst, n_rel, d_in, d_out, n_edges = 41, (17 if bipartite else 41), 7, 13, 11, 301
    src = torch.randint(0, n_src, (n_edges,), generator=gen)
    dst = torch.randint(0, n_dst - 3, (n_edges,), generator=gen)  # 3 nodes without in-edges
    edge_index, edge_type = (
        torch.stack([src, dst]),
        torch.randint(0, n_rel, (n_edges,), generator=gen),
    )
    torch.manual_seed(0)
    ref = RGCNConv(d_in, d_out, n_rel, num_bases=bases)
    fast = BasisRGCNConv(d_in, d_out, n_rel, num_bases=bases)
    fast.load_state_dict(ref.state_dict())
    outs, grads = [], []
    for conv in (ref, fast):
        x = torch.randn(n_src, d_in, generator=torch.Generator().manual_seed(1), requires_grad=True)
        x_in = (x, x[:n_dst]) if bipartite else x
        y = conv(x_in, edge_index, edge_type)
        g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)) * 3.0
        grads.append(torch.autograd.grad((y * g_out).sum(), [x, *conv.parameters()]))
        outs.append(y)
    assert outs[1].shape == (n_dst, d_out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_fast, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)


def test_pruning_keeps_only_edges_into_targets(corpus: Corpus) -> None:
    graph = build_rec_graph(corpus, layers=1, min_relation_count=0)
    n_full = corpus.kg.build_graph(min_relation_count=0).edge_index.shape[1]
    assert graph.edge_index[0].shape[1] < n_full
    assert graph.num_targets == len(set(graph.item_node.tolist()) | set(graph.entity_node.tolist()))


def test_items_without_kg_node_get_isolated_nodes(corpus: Corpus) -> None:
    graph = build_rec_graph(corpus, layers=1, min_relation_count=0)
    unlinked = [i for i, u in enumerate(corpus.item_entity) if u is None]
    assert unlinked, "the synthetic corpus has items without a KG node"
    nodes = graph.item_node[unlinked]
    assert (graph.kg_node[nodes] == -1).all()
    ei, et = graph.edge_index[0], graph.edge_type[0]
    into = torch.isin(ei[1], nodes)
    assert torch.equal(ei[0, into], ei[1, into])  # self-loops only
    assert (et[into] == graph.relation_names.index(SELF_LOOP)).all()


def test_model_shapes_and_empty_context(corpus: Corpus) -> None:
    torch.manual_seed(0)
    graph = build_rec_graph(corpus, layers=1, min_relation_count=0)
    model = RecTeacherModel(graph, dim=8, num_bases=2)
    with torch.no_grad():
        model.item_bias.normal_()
    ctx_BC, mask_BC = pad_contexts([[0, 3, 5], [], [2]])
    assert ctx_BC.shape == (3, 3) and mask_BC.sum() == 4
    scores_BI = model(ctx_BC, mask_BC)
    assert scores_BI.shape == (3, len(corpus.catalog))
    assert model.node_embeddings().shape == (graph.num_targets, 8)
    torch.testing.assert_close(scores_BI[1], model.item_bias)  # u = 0: the bias decides
    scores_BI.sum().backward()  # gradients flow to the input embedding and the R-GCN
    assert model.node_emb.weight.grad is not None and model.convs[0].comp.grad is not None


def test_no_kg_model_is_plain_embeddings(corpus: Corpus) -> None:
    graph = build_rec_graph(corpus, use_kg=False)
    assert graph.num_layers == 0 and graph.num_nodes == graph.num_targets
    model = RecTeacherModel(graph, dim=8, use_kg=False)
    assert len(model.convs) == 0
    assert torch.equal(model.node_embeddings(), model.node_emb.weight)
    with pytest.raises(ValueError, match="use_kg=True"):
        RecTeacherModel(graph, dim=8, use_kg=True)


def test_context_index(corpus: Corpus) -> None:
    graph = build_rec_graph(corpus, layers=1, min_relation_count=0)
    index = ContextIndex(graph)
    a, b = graph.item_ids[4], graph.item_ids[9]
    nodes, items = index.encode(_turn((a, "no-such-item", b, a)))
    assert items == [4, 9]
    assert nodes == [int(graph.item_node[4]), int(graph.item_node[9])]


def test_popularity_counts_and_tie_break() -> None:
    turns = [
        TurnSample("c", 1, (), "", RECOMMENDER, g, (), ())
        for g in [("b",), ("b", "c"), ("c",), ("b",), ("zzz",)]
    ]
    pop = Popularity.from_samples(turns, ["a", "b", "c", "d"], seed=3)
    assert pop.counts_I.tolist() == [0, 3, 2, 0]
    s = pop.scores(2)
    assert s.shape == (2, 4) and torch.equal(s[0], s[1])
    assert s[0, 1] > s[0, 2] > max(s[0, 0], s[0, 3])
    assert s[0, 0] != s[0, 3]  # ties broken (seeded), so ranks are strict
    assert torch.equal(pop.score_I, Popularity(pop.counts_I, seed=3).score_I)


# ----------------------------------------------------------------------------- API


@pytest.fixture(scope="module")
def trained(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RecTeacherTrainer:
    out = tmp_path_factory.mktemp("rec_run")
    cfg = RecTeacherConfig(
        dataset="synthetic",
        data_dir=str(synth_dir),
        output_dir=str(out),
        dim=16,
        num_bases=2,
        min_relation_count=0,
        epochs=3,
        lr=1e-2,
        progress=False,
        tau_R=0.7,
        copy_roles=True,  # every reader of the context: the reload must rebuild them all
        copy_words=True,
        copy_item_words=True,
        words="context",
        word_buckets=64,
        select="R@mean",
    )
    trainer = RecTeacherTrainer(cfg)
    trainer.run()
    return trainer


def test_reload_gives_identical_distributions(trained: RecTeacherTrainer) -> None:
    loaded = RecTeacher.load(trained.out)
    in_memory = RecTeacher(trained.model, trained.cfg)
    turns = [t for t in trained.corpus.samples("test") if t.gold_items]
    ids = trained.corpus.catalog.ids
    q = loaded.item_distribution(turns, ids)
    assert q.shape == (len(turns), len(ids))
    assert torch.equal(q, in_memory.item_distribution(turns, ids))
    torch.testing.assert_close(q.sum(1), torch.ones(len(turns)))
    assert loaded.tau == 0.7
    # q_R = softmax(s / tau_R), and the evaluation scores are the API's scores
    torch.testing.assert_close(q, torch.softmax(loaded.scores(turns) / 0.7, -1))
    q2 = loaded.item_distribution(turns, ids, tau=2.0)
    torch.testing.assert_close(q2, torch.softmax(loaded.scores(turns) / 2.0, -1))
    assert RecTeacher.load(trained.out / "checkpoint").item_ids == ids
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_alignment_permuted_subset_missing_and_extra(trained: RecTeacherTrainer) -> None:
    teacher = RecTeacher.load(trained.out)
    turns = [t for t in trained.corpus.samples("valid") if t.gold_items][:5]
    ids = teacher.item_ids
    q = teacher.item_distribution(turns, ids)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    permuted = [ids[i] for i in perm]
    assert torch.equal(teacher.aligned_index(permuted), perm)
    torch.testing.assert_close(teacher.item_distribution(turns, permuted), q[:, perm])
    torch.testing.assert_close(teacher.scores(turns, permuted), teacher.scores(turns)[:, perm])
    # a subset (the student knows fewer items): renormalised over that subset
    sub = ids[5:20]
    q_sub = teacher.item_distribution(turns, sub)
    torch.testing.assert_close(q_sub, q[:, 5:20] / q[:, 5:20].sum(1, keepdim=True))
    # an item R does not know: the error names it and counts the unknown ones
    with pytest.raises(ConfigError, match=r"'999999'.*2 of 4"):
        teacher.item_distribution(turns, [ids[0], "999999", ids[1], "424242"])
    with pytest.raises(ConfigError, match="more than once"):
        teacher.aligned_index([ids[0], ids[1], ids[0]])


def test_unknown_context_is_ignored(trained: RecTeacherTrainer) -> None:
    teacher = RecTeacher.load(trained.out)
    ids = teacher.item_ids
    q_unknown = teacher.item_distribution([_turn(("nope",), ("<http://x>",))], ids)
    q_empty = teacher.item_distribution([_turn()], ids)
    torch.testing.assert_close(q_unknown, q_empty)
    # empty context: u = 0 and no copy (g = 0), so q_R = softmax(b / (T · τ)); T = the copy
    # mixture's calibrated temperature of p_gen
    T = teacher.model.gen_temperature if teacher.model.copy == "recency" else 1.0
    bias = teacher.model.item_bias / (T * teacher.tau)
    torch.testing.assert_close(q_empty[0], torch.softmax(bias, -1))


def test_exclude_seen_zeroes_context_items(trained: RecTeacherTrainer) -> None:
    teacher = RecTeacher.load(trained.out)
    teacher.config.exclude_seen = True
    ids = teacher.item_ids
    q = teacher.item_distribution([_turn((ids[2], ids[7]))], ids)
    assert q[0, 2] == 0 and q[0, 7] == 0
    torch.testing.assert_close(q.sum(), torch.tensor(1.0))
    q_only_seen = teacher.item_distribution([_turn((ids[2],))], [ids[2]])
    assert torch.isfinite(q_only_seen).all()


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        RecTeacher.load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="holds no rec_teacher.pt"):
        RecTeacher.load(tmp_path)
    (tmp_path / "rec_teacher.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load"):
        RecTeacher.load(tmp_path)
