"""The graph layers on plain tensors (pipeline/graph_layers.py) against DGL's, op by op and in the whole model.

Graphs: dialogue graphs of random speakers for both relation schemes (including one-utterance dialogues),
batched with ``dgl.batch`` / ``collate``, plus a hand-written edge list with nodes that receive no edge.
Each torch op must equal the DGL op (outputs and gradients w.r.t. inputs and parameters, 1e-5); the whole
ERCModel must give the same outputs and gradients with either backend and the same state dict; a
checkpoint made with one backend must predict the same with the other.
"""

from __future__ import annotations

import random

import pytest
import torch

from pipeline import graph_layers
from pipeline.config import GraphParams, parse_params
from pipeline.data import MODALITIES, Dialogue, collate
from pipeline.dgl_compat import GraphConv as DGLGraphConv
from pipeline.dgl_compat import RelGraphConv as DGLRelGraphConv
from pipeline.dgl_compat import dgl, dgl_supports_device, resolve_graph_backend
from pipeline.dgl_compat import edge_softmax as dgl_edge_softmax
from pipeline.graphs import build_dialogue_graph, dialogue_edges, num_relations
from pipeline.inference import build_model, run_model
from pipeline.losses import erc_loss
from pipeline.modeling import ERCModel
from pipeline.train import train

ATOL = 1e-5
SCHEMES = ["same_other", "speaker_pair"]
SIZES = {"text": 10, "audio": 6, "visual": 8}
EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
LABELS = {"emotions": EMOTIONS, "sentiments": ["negative", "neutral", "positive"]}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def graph_params(scheme: str, window_past: int = 3, window_future: int = 2) -> GraphParams:
    return GraphParams(relations=scheme, window_past=window_past, window_future=window_future, max_speakers=3)


def random_speakers(n: int, rng: random.Random) -> list[str]:
    return [rng.choice("ABC") for _ in range(n)]


def dangling_graph(num_rels: int, seed: int) -> dgl.DGLGraph:
    """A hand-written graph of 6 nodes where nodes 0, 3 and 5 receive no edge (node 5 has no edge at all)."""
    src = torch.tensor([0, 1, 2, 3, 0, 4, 1, 2])
    dst = torch.tensor([1, 1, 2, 2, 4, 4, 4, 1])
    g = dgl.graph((src, dst), num_nodes=6)
    g.edata["rel_type"] = torch.randint(0, num_rels, (len(src),), generator=torch.Generator().manual_seed(seed))
    g.ndata["speaker"] = torch.zeros(6, dtype=torch.int64)
    return g


def batched_graph(scheme: str, seed: int) -> tuple[dgl.DGLGraph, torch.Tensor, torch.Tensor, int]:
    """Dialogue graphs of random speakers and lengths (1 to 9 utterances) and a dangling graph, batched.

    Returns the DGL graph, ``edge_index`` ``[2, E]``, ``rel_type`` ``[E]`` and the relation count.
    """
    rng = random.Random(seed)
    params = graph_params(scheme, rng.randint(0, 4), rng.randint(0, 4))
    graphs = [build_dialogue_graph(random_speakers(n, rng), params) for n in (1, 4, rng.randint(2, 9), 1, 7)]
    graphs.insert(2, dangling_graph(num_relations(params), seed))
    g = dgl.batch(graphs)
    src, dst = g.edges()
    return g, torch.stack([src, dst]), g.edata["rel_type"], num_relations(params)


@pytest.fixture(params=["dense", "sparse"])
def aggregation(request, monkeypatch):
    """Run the test with both aggregation forms of :mod:`pipeline.graph_layers` (dense adjacency matmul for
    small graphs, gather / scatter-add otherwise), forced by its size threshold."""
    monkeypatch.setattr(graph_layers, "DENSE_ENTRIES_PER_EDGE", 10**9 if request.param == "dense" else 0)
    return request.param


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} > {atol}"


def grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.grad.clone() for t in tensors]


# ------------------------------------------------------------------------------------------------ the graphs


@pytest.mark.parametrize("scheme", SCHEMES)
def test_test_graphs_have_isolated_and_single_nodes(scheme):
    g, edge_index, rel_type, num_rels = batched_graph(scheme, 0)
    assert (g.in_degrees() == 0).sum() == 3  # the dangling graph's nodes 0, 3 and 5
    assert g.batch_num_nodes()[0] == 1 and g.batch_num_edges()[0] == 1  # one utterance: its self loop
    assert torch.equal(graph_layers.in_degrees(edge_index, g.num_nodes()), g.in_degrees())
    assert torch.equal(graph_layers.out_degrees(edge_index, g.num_nodes()), g.out_degrees())
    assert int(rel_type.max()) < num_rels
    src, dst, rel = dialogue_edges(["A", "B", "A"], graph_params(scheme))
    assert len(src) == len(dst) == len(rel) == 9


# ------------------------------------------------------------------------------------------------ edge_softmax


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(), (1,), (3,), (2, 2)])
def test_edge_softmax_matches_dgl(scheme, shape):
    g, edge_index, _, _ = batched_graph(scheme, 1)
    logits = (torch.randn(g.num_edges(), *shape) * 3).requires_grad_()
    upstream = torch.randn(g.num_edges(), *shape)
    ours = graph_layers.edge_softmax(edge_index, logits, g.num_nodes())
    (ours * upstream).sum().backward()
    ours_grad = grads(logits)
    logits.grad = None
    theirs = dgl_edge_softmax(g, logits if shape else logits.unsqueeze(-1))
    theirs = theirs if shape else theirs.squeeze(-1)
    (theirs * upstream).sum().backward()
    assert_close(ours, theirs, "edge_softmax")
    assert_close(ours_grad[0], logits.grad, "edge_softmax gradient")
    sums = torch.zeros(g.num_nodes(), *shape).index_add_(0, edge_index[1], ours.detach())
    receives = g.in_degrees() > 0
    assert_close(sums[receives], torch.ones_like(sums[receives]), "incoming weights sum to 1")


def test_edge_softmax_is_stable_for_large_scores():
    edge_index = torch.tensor([[0, 1, 2], [1, 1, 1]])
    out = graph_layers.edge_softmax(edge_index, torch.tensor([[1000.0], [1001.0], [-1000.0]]), 3)
    assert torch.isfinite(out).all()
    assert_close(out[:2, 0], torch.tensor([1000.0, 1001.0]).softmax(0), "large scores")


def test_edge_softmax_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        graph_layers.edge_softmax(torch.zeros(3, 4, dtype=torch.long), torch.zeros(4), 3)
    with pytest.raises(ValueError, match="one row per edge"):
        graph_layers.edge_softmax(torch.zeros(2, 4, dtype=torch.long), torch.zeros(5), 3)


# ------------------------------------------------------------------------------------------------ RelGraphConv


def twin_rel_convs(in_feat, out_feat, num_rels, regularizer, num_bases, bias=True, self_loop=True):
    torch.manual_seed(7)
    theirs = DGLRelGraphConv(
        in_feat, out_feat, num_rels, regularizer=regularizer, num_bases=num_bases, bias=bias, self_loop=self_loop
    )
    torch.manual_seed(7)
    ours = graph_layers.RelGraphConv(
        in_feat, out_feat, num_rels, regularizer=regularizer, num_bases=num_bases, bias=bias, self_loop=self_loop
    )
    return ours, theirs


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    ("regularizer", "num_bases", "bias", "self_loop", "with_norm"),
    [
        ("basis", 4, True, True, True),  # the model's configuration
        ("basis", 2, False, False, True),
        ("basis", None, True, True, False),  # as many bases as relations
        (None, None, True, True, True),
    ],
)
def test_rel_graph_conv_matches_dgl(scheme, regularizer, num_bases, bias, self_loop, with_norm, aggregation):
    g, edge_index, rel_type, num_rels = batched_graph(scheme, 2)
    ours, theirs = twin_rel_convs(12, 10, num_rels, regularizer, num_bases, bias, self_loop)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():  # same names, shapes and seeded initial values
        assert torch.equal(ours.state_dict()[key], value), key
    feat = torch.randn(g.num_nodes(), 12, requires_grad=True)
    norm = torch.rand(g.num_edges(), 1, requires_grad=True) if with_norm else None
    inputs = [feat] + ([norm] if with_norm else [])
    upstream = torch.randn(g.num_nodes(), 10)

    out_ours = ours(feat, edge_index, rel_type, norm=norm)
    (out_ours * upstream).sum().backward()
    input_grads = grads(*inputs)
    for t in inputs:
        t.grad = None
    out_theirs = theirs(g, feat, rel_type, norm=norm)
    (out_theirs * upstream).sum().backward()

    assert_close(out_ours, out_theirs, "RelGraphConv output")
    for name, ours_grad, t in zip(["feat", "norm"], input_grads, inputs):
        assert_close(ours_grad, t.grad, f"RelGraphConv d/d{name}")
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, their_params[name].grad, f"RelGraphConv d/d{name}")
    # nodes that receive no edge get only the bias and self loop
    lonely = g.in_degrees() == 0
    expected = (ours.h_bias if bias else 0) + (feat @ ours.loop_weight if self_loop else 0)
    expected = torch.as_tensor(expected).expand(g.num_nodes(), 10)
    assert_close(out_ours[lonely], expected[lonely], "RelGraphConv without incoming edges")


def test_typed_linear_matches_dgl_per_row():
    from dgl.nn.pytorch import TypedLinear as DGLTypedLinear

    for regularizer, num_bases in (("basis", 3), (None, None)):
        torch.manual_seed(3)
        theirs = DGLTypedLinear(8, 5, 6, regularizer=regularizer, num_bases=num_bases)
        torch.manual_seed(3)
        ours = graph_layers.TypedLinear(8, 5, 6, regularizer=regularizer, num_bases=num_bases)
        x, types = torch.randn(20, 8), torch.randint(0, 6, (20,))
        assert_close(ours(x, types), theirs(x, types), f"TypedLinear {regularizer}")
        assert_close(ours.get_weight(), theirs.get_weight(), f"TypedLinear weights {regularizer}")


def test_rel_graph_conv_rejects_bad_input():
    with pytest.raises(ValueError, match="bdd"):
        graph_layers.RelGraphConv(4, 4, 3, regularizer="bdd", num_bases=2)
    conv = graph_layers.RelGraphConv(4, 4, 3, regularizer="basis", num_bases=2)
    edge_index = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="etypes"):
        conv(torch.randn(2, 4), edge_index, torch.tensor([0]))
    with pytest.raises(ValueError, match="norm"):
        conv(torch.randn(2, 4), edge_index, torch.tensor([0, 1]), norm=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        conv(torch.randn(2, 4), torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------ GraphConv


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("norm", ["none", "right", "left", "both"])
@pytest.mark.parametrize(("in_feats", "out_feats"), [(12, 12), (12, 6), (6, 12)])
@pytest.mark.parametrize("with_edge_weight", [True, False])
def test_graph_conv_matches_dgl(scheme, norm, in_feats, out_feats, with_edge_weight, aggregation):
    g, edge_index, _, _ = batched_graph(scheme, 3)
    torch.manual_seed(5)
    theirs = DGLGraphConv(in_feats, out_feats, norm=norm, allow_zero_in_degree=True)
    torch.manual_seed(5)
    ours = graph_layers.GraphConv(in_feats, out_feats, norm=norm, allow_zero_in_degree=True)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    feat = torch.randn(g.num_nodes(), in_feats, requires_grad=True)
    edge_weight = torch.rand(g.num_edges(), requires_grad=True) if with_edge_weight else None
    inputs = [feat] + ([edge_weight] if with_edge_weight else [])
    upstream = torch.randn(g.num_nodes(), out_feats)

    out_ours = ours(feat, edge_index, edge_weight=edge_weight)
    (out_ours * upstream).sum().backward()
    input_grads = grads(*inputs)
    for t in inputs:
        t.grad = None
    out_theirs = theirs(g, feat, edge_weight=edge_weight)
    (out_theirs * upstream).sum().backward()

    assert_close(out_ours, out_theirs, "GraphConv output")
    for name, ours_grad, t in zip(["feat", "edge_weight"], input_grads, inputs):
        assert_close(ours_grad, t.grad, f"GraphConv d/d{name}")
    assert_close(ours.weight.grad, theirs.weight.grad, "GraphConv d/dweight")
    assert_close(ours.bias.grad, theirs.bias.grad, "GraphConv d/dbias")
    assert_close(out_ours[g.in_degrees() == 0], ours.bias.expand(3, -1), "GraphConv without incoming edges")


def test_graph_conv_refuses_zero_in_degree_unless_allowed():
    g = dangling_graph(3, 0)
    edge_index = torch.stack(g.edges())
    with pytest.raises(ValueError, match="allow_zero_in_degree"):
        graph_layers.GraphConv(4, 4, norm="none")(torch.randn(6, 4), edge_index)
    with pytest.raises(ValueError, match="norm"):
        graph_layers.GraphConv(4, 4, norm="sym")
    with pytest.raises(ValueError, match="edge_weight"):
        graph_layers.GraphConv(4, 4, allow_zero_in_degree=True)(torch.randn(6, 4), edge_index, torch.ones(3))


# ------------------------------------------------------------------------------------------------ backend choice


def test_resolve_graph_backend():
    assert resolve_graph_backend("auto", torch.device("cpu")) == "dgl"  # every DGL build has CPU kernels
    assert resolve_graph_backend("torch", "cpu") == "torch"
    assert resolve_graph_backend("dgl", "cpu") == "dgl"
    assert resolve_graph_backend("auto", "meta") == "torch"  # a device DGL has no kernels for
    with pytest.raises(ValueError, match="set model.graph_backend to torch or auto"):
        resolve_graph_backend("dgl", "meta")
    with pytest.raises(ValueError, match="graph_backend must be one of"):
        resolve_graph_backend("scatter", "cpu")
    cuda_dgl = dgl_supports_device("cuda")  # must answer, not crash, with or without a GPU
    assert resolve_graph_backend("auto", "cuda") == ("dgl" if cuda_dgl else "torch")
    if not cuda_dgl:
        with pytest.raises(ValueError, match="torch or auto"):
            resolve_graph_backend("dgl", "cuda:0")


# ------------------------------------------------------------------------------------------------ the model


def small_params(graph: str = "adaptive", scheme: str = "same_other", backend: str = "auto", **train):
    return parse_params(
        {
            "model": {"hidden_size": 16, "num_heads": 2, "dropout": 0.1, "graph": graph, "graph_backend": backend},
            "graph": {"relations": scheme, "max_speakers": 3, "window_past": 3, "window_future": 2},
            "train": {"epochs": 2, "batch_dialogues": 3, "lr": 3e-3, **train},
        }
    )


def make_dialogues(n: int, seed: int, params, dangling: bool = False) -> list[Dialogue]:
    """Random dialogues of 1 to 7 utterances (the first one has a single utterance); with ``dangling``, the
    second one has the 6 nodes of :func:`dangling_graph` (three receive no edge)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for d in range(n):
        t = 1 if d == 0 else 6 if dangling and d == 1 else rng.randint(2, 7)
        emotion = torch.randint(0, len(EMOTIONS), (t,), generator=g)
        features = {m: torch.randn(t, s, generator=g) for m, s in SIZES.items()}
        masks = {m: torch.rand(t, generator=g) > 0.2 for m in MODALITIES}
        masks["text"][:] = True
        out.append(
            Dialogue(
                f"x/{d}",
                [f"x/dia{d}_utt{i}" for i in range(t)],
                features,
                masks,
                emotion,
                torch.div(emotion, 3, rounding_mode="floor"),
                build_dialogue_graph(random_speakers(t, rng), params.graph),
            )
        )
    if dangling:
        out[1].graph = dangling_graph(num_relations(params.graph), seed)
    return out


def make_model(params, backend: str, seed: int = 0) -> ERCModel:
    torch.manual_seed(seed)
    return ERCModel(SIZES, len(EMOTIONS), 3, num_relations(params.graph), params.model, graph_backend=backend)


def forward_backward(model: ERCModel, batch, params, seed: int = 1):
    """Outputs and parameter gradients of one training step (dropout on, seeded)."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(batch)
    loss, _ = erc_loss(
        out.emotion_logits, out.sentiment_logits, out.projections, batch.emotion, batch.sentiment, params.loss, None
    )
    loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("graph", ["adaptive", "gcn"])
def test_model_backends_agree(graph, scheme, aggregation):
    params = small_params(graph, scheme)
    dgl_model = make_model(params, "dgl")
    torch_model = make_model(params, "torch")
    assert (dgl_model.graph_backend_used, torch_model.graph_backend_used) == ("dgl", "torch")
    assert isinstance(torch_model.graph.relational, graph_layers.RelGraphConv)
    # the same seed gives the same parameters; load them anyway, as a checkpoint would
    for key, value in dgl_model.state_dict().items():
        assert torch.equal(torch_model.state_dict()[key], value), key
    torch_model.load_state_dict(dgl_model.state_dict())
    batch = collate(make_dialogues(5, seed=3, params=params, dangling=True))
    assert (batch.graph.in_degrees() == 0).sum() == 3
    for mode in ("train", "eval"):
        dgl_model.train(mode == "train")
        torch_model.train(mode == "train")
        out_dgl, grads_dgl = forward_backward(dgl_model, batch, params)
        out_torch, grads_torch = forward_backward(torch_model, batch, params)
        for field in ("emotion_logits", "sentiment_logits", "projections"):
            assert_close(getattr(out_torch, field), getattr(out_dgl, field), f"{mode} {field}")
        assert set(grads_torch) == set(grads_dgl) == {n for n, _ in dgl_model.named_parameters()}
        for name, value in grads_dgl.items():
            assert_close(grads_torch[name], value, f"{mode} d/d{name}")


def test_model_graph_none_ignores_backend():
    params = small_params("none", backend="torch")
    model = make_model(params, None)
    assert model.graph is None and model.graph_backend_used == "torch"
    assert model(collate(make_dialogues(2, seed=1, params=params))).emotion_logits.shape[1] == len(EMOTIONS)


def test_set_graph_backend_keeps_the_parameters():
    params = small_params()
    model = make_model(params, None)
    assert model.graph_backend_used == "dgl"  # auto on the CPU
    before = [(name, id(p)) for name, p in model.named_parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert model.set_graph_backend("torch") == "torch"
    assert [(name, id(p)) for name, p in model.named_parameters()] == before  # the optimizer still holds them
    batch = collate(make_dialogues(3, seed=2, params=params))
    out = model(batch)
    out.emotion_logits.sum().backward()
    weight_before = model.graph.relational.loop_weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.graph.relational.loop_weight, weight_before)
    assert model.set_graph_backend("auto", "cpu") == "dgl"
    with pytest.raises(ValueError, match="torch or auto"):
        model.set_graph_backend("dgl", "meta")


def test_explicit_dgl_backend_refused_where_dgl_cannot_run():
    params = small_params(backend="dgl")
    with pytest.raises(ValueError, match="set model.graph_backend to torch or auto"):
        ERCModel(SIZES, len(EMOTIONS), 3, num_relations(params.graph), params.model, device="meta")


@pytest.mark.parametrize(("trained_with", "loaded_with"), [("torch", "dgl"), ("dgl", "torch")])
def test_checkpoint_moves_between_backends(trained_with, loaded_with, monkeypatch):
    monkeypatch.setattr("pipeline.train.default_device", lambda: torch.device("cpu"))  # where DGL runs
    params = small_params("adaptive", "speaker_pair", backend=trained_with)
    splits = {"train": make_dialogues(8, seed=4, params=params), "dev": make_dialogues(5, seed=5, params=params)}
    checkpoint = train(params, splits, num_relations(params.graph), LABELS)
    assert checkpoint["model"]["graph_backend"] == trained_with
    model = build_model(checkpoint)
    assert model.graph_backend_used == trained_with
    expected = run_model(model, splits["dev"], params, torch.device("cpu"))
    # switch the rebuilt model, or build one for the other backend and load the state dict
    model.set_graph_backend(loaded_with)
    other = ERCModel(
        checkpoint["input_sizes"],
        len(EMOTIONS),
        3,
        checkpoint["num_relations"],
        params.model,
        graph_backend=loaded_with,
    )
    other.load_state_dict(checkpoint["state_dict"])
    for rebuilt in (model, other):
        assert rebuilt.graph_backend_used == loaded_with
        got = run_model(rebuilt, splits["dev"], params, torch.device("cpu"))
        assert got["utterance_ids"] == expected["utterance_ids"]
        for key in ("emotion_prob", "sentiment_prob"):
            assert_close(got[key], expected[key], key)
        assert got["loss"] == pytest.approx(expected["loss"], abs=ATOL)


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("graph", ["adaptive", "gcn"])
def test_torch_backend_on_cuda_matches_dgl_on_cpu(graph):
    params = small_params(graph, "speaker_pair")
    reference = make_model(params, "dgl")
    batch = collate(make_dialogues(6, seed=6, params=params))
    out_cpu, grads_cpu = forward_backward(reference.eval(), batch, params)
    model = make_model(params, "auto")  # built for the CPU (DGL), then moved: auto follows the device
    model.load_state_dict(reference.state_dict())
    model = model.to("cuda").eval()
    out_gpu, grads_gpu = forward_backward(model, batch.to(torch.device("cuda")), params)
    assert model.graph_backend_used == ("dgl" if dgl_supports_device("cuda") else "torch")
    for field in ("emotion_logits", "sentiment_logits", "projections"):
        assert_close(getattr(out_gpu, field).cpu(), getattr(out_cpu, field), f"cuda {field}", atol=1e-4)
    for name, value in grads_cpu.items():
        assert_close(grads_gpu[name].cpu(), value, f"cuda d/d{name}", atol=1e-4)
