"""Graph layers on plain tensors: ``RelGraphConv``, ``GraphConv`` and ``edge_softmax`` without DGL.

The PyPI build of DGL (2.1.0) has CPU kernels only, so :class:`pipeline.modeling.DialogueGraphEncoder`
cannot run DGL's layers on CUDA. These modules compute the same functions with torch's own gather /
scatter ops (``index_select``, ``index_add_``, ``scatter_reduce``), so they run on any device torch
supports. They are written after DGL's documentation of the same layers (``dgl.nn.pytorch.RelGraphConv``,
``dgl.nn.pytorch.GraphConv``, ``dgl.nn.functional.edge_softmax``) and keep DGL's parameter names and
shapes, so one ``state_dict`` loads into either implementation (tested in ``tests/test_graph_layers.py``).

Graph format: a graph with ``N`` nodes and ``E`` directed edges is

* ``edge_index`` ``[2, E]`` int64: row 0 the source, row 1 the destination node of each edge (the order
  of ``torch.stack(dgl_graph.edges())``); node ids are ``0 .. N-1``, ``N`` = the number of rows of the
  node features; a batch of graphs is one graph whose node ids are offset per graph, as in
  ``dgl.batch``;
* ``etypes`` ``[E]`` int64: the relation type of each edge (``0 .. num_rels-1``), for ``RelGraphConv``.

Messages flow from source to destination: a node's output aggregates (sums) over its incoming edges. A
node without incoming edges receives nothing (zeros before bias / self loop). Indices are not
bounds-checked here (that would synchronise with the device on every call); an index out of range
raises torch's own IndexError on the CPU and a device-side assertion on CUDA.

References: Schlichtkrull et al. 2018, "Modeling Relational Data with Graph Convolutional Networks"
(R-GCN, basis decomposition); Kipf & Welling 2017, "Semi-Supervised Classification with Graph
Convolutional Networks" (GCN); DGL's API docs of the three operations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TypedLinear", "RelGraphConv", "GraphConv", "edge_softmax", "in_degrees", "out_degrees"]


def _check_edge_index(edge_index: torch.Tensor) -> None:
    """Raise ValueError unless ``edge_index`` is an integer ``[2, E]`` tensor."""
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"edge_index must be int64 or int32, got {edge_index.dtype}")


def _check_edge_data(name: str, value: torch.Tensor, num_edges: int) -> None:
    """Raise ValueError unless ``value`` has one row per edge (``[E]`` or ``[E, 1]``)."""
    if value.dim() not in (1, 2) or value.shape[0] != num_edges or (value.dim() == 2 and value.shape[1] != 1):
        raise ValueError(f"{name} must have shape [E] or [E, 1] with E = {num_edges}, got {list(value.shape)}")


def in_degrees(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Number of incoming edges of each node: ``[2, E]`` -> ``[N]`` int64 (as ``DGLGraph.in_degrees()``)."""
    _check_edge_index(edge_index)
    return torch.bincount(edge_index[1], minlength=num_nodes)


def out_degrees(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Number of outgoing edges of each node: ``[2, E]`` -> ``[N]`` int64 (as ``DGLGraph.out_degrees()``)."""
    _check_edge_index(edge_index)
    return torch.bincount(edge_index[0], minlength=num_nodes)


# Aggregation over incoming edges has two equal forms: gather the source rows per edge and scatter-add
# them into the destinations (O(E * D)), or build the weighted adjacency matrix and multiply
# (O(N^2 * D), one dense matmul). The dense form is several times faster for the small batched graphs
# of a training step (a few dialogues, tens of nodes), the sparse one the only choice for large
# graphs: the dense form is used while N^2 (the entries of one N x N block) is at most this many per edge.
DENSE_ENTRIES_PER_EDGE = 16


def _use_dense(num_nodes: int, num_edges: int) -> bool:
    return num_nodes * num_nodes <= DENSE_ENTRIES_PER_EDGE * num_edges


def _adjacency(
    edge_index: torch.Tensor, values: torch.Tensor, num_nodes: int, blocks: int = 1, block: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense weighted adjacency ``A`` ``[N, blocks * N]`` with ``A[dst, k * N + src] += values[e, k]``.

    ``values``: ``[E, blocks]`` (one value per edge and block), or ``[E]`` with ``block`` ``[E]`` naming
    the one block each edge's value goes to. Parallel edges add up. Differentiable w.r.t. ``values``.
    """
    src, dst = edge_index[0], edge_index[1]
    row = dst * (blocks * num_nodes) + src  # [E]: entry (dst, src) of block 0
    if block is not None:
        index = row + block * num_nodes  # [E]
    else:
        index = (row.unsqueeze(1) + torch.arange(blocks, device=row.device) * num_nodes).reshape(-1)  # [E * K]
    flat = values.new_zeros(num_nodes * blocks * num_nodes).index_add_(0, index, values.reshape(-1))
    return flat.view(num_nodes, blocks * num_nodes)


def _aggregate(x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None) -> torch.Tensor:
    """Weighted sum over incoming edges: ``out[j] = sum_{(i -> j)} w_ij * x[i]``; ``[N, D]`` -> ``[N, D]``."""
    n, num_edges = x.shape[0], edge_index.shape[1]
    if _use_dense(n, num_edges):
        weight = edge_weight.reshape(-1) if edge_weight is not None else x.new_ones(num_edges)  # [E]
        return _adjacency(edge_index, weight, n) @ x  # [N, N] @ [N, D]
    messages = x.index_select(0, edge_index[0])  # [E, D]
    if edge_weight is not None:
        messages = messages * edge_weight.reshape(-1, 1)  # [E, D]
    return x.new_zeros(x.shape).index_add_(0, edge_index[1], messages)  # [N, D]


def edge_softmax(edge_index: torch.Tensor, logits: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Softmax of edge scores over each destination node's incoming edges.

    ``out[e] = exp(logits[e]) / sum_{e' : dst(e') = dst(e)} exp(logits[e'])``, computed per feature
    column, with each node's maximum subtracted first for stability (the same function as DGL's
    ``dgl.nn.functional.edge_softmax(graph, logits)`` with the default ``norm_by="dst"``). The
    incoming weights of every node with at least one incoming edge sum to 1.

    Args:
        edge_index: ``[2, E]`` int64 (source, destination).
        logits: ``[E]`` or ``[E, *]`` float scores, one row per edge.
        num_nodes: ``N``, the number of nodes (greater than every destination id).

    Returns:
        ``[E]`` / ``[E, *]``, the shape of ``logits``; differentiable w.r.t. ``logits``.

    Raises:
        ValueError: ``edge_index`` is not ``[2, E]`` or ``logits`` has not ``E`` rows.
    """
    _check_edge_index(edge_index)
    if logits.dim() == 0 or logits.shape[0] != edge_index.shape[1]:
        raise ValueError(f"logits must have one row per edge ({edge_index.shape[1]}), got {list(logits.shape)}")
    dst = edge_index[1]
    index = dst.reshape(-1, *([1] * (logits.dim() - 1))).expand_as(logits)  # [E, *]
    # per-node maximum, a constant shift: no gradient flows through it (softmax is shift invariant)
    node_max = logits.new_full((num_nodes, *logits.shape[1:]), float("-inf"))  # [N, *]
    node_max = node_max.scatter_reduce(0, index, logits.detach(), reduce="amax", include_self=True)
    exp = (logits - node_max.index_select(0, dst)).exp()  # [E, *]
    denominator = exp.new_zeros(node_max.shape).index_add_(0, dst, exp)  # [N, *]
    return exp / denominator.index_select(0, dst)  # [E, *]


class TypedLinear(nn.Module):
    """A linear map with one weight matrix per type: ``y_e = x_e @ W_{t_e}`` (no bias).

    The relation weights of :class:`RelGraphConv`, named like DGL's ``dgl.nn.pytorch.TypedLinear`` so
    that state dicts match (``W``, ``coeff``):

    * ``regularizer=None``: ``W`` ``[num_types, in_size, out_size]``, one free matrix per type;
    * ``regularizer="basis"`` (Schlichtkrull et al. 2018, eq. 3): ``W`` ``[num_bases, in_size, out_size]``
      shared bases and ``coeff`` ``[num_types, num_bases]``; ``W_t = sum_b coeff[t, b] * W[b]``.

    Initialisation as DGL's (``W`` uniform in ``+-1/sqrt(in_size)``, ``coeff`` Xavier-uniform with the
    ReLU gain, in that order), so that a seeded model starts from the same weights with either backend.

    Raises:
        ValueError: an unsupported regularizer (DGL's block-diagonal ``"bdd"`` is not implemented).
    """

    def __init__(
        self, in_size: int, out_size: int, num_types: int, regularizer: str | None = None, num_bases: int | None = None
    ):
        super().__init__()
        if regularizer not in (None, "basis"):
            raise ValueError(f'regularizer must be None or "basis", got {regularizer!r} ("bdd" is not implemented)')
        self.in_size, self.out_size, self.num_types = in_size, out_size, num_types
        self.regularizer = regularizer
        if regularizer is None:
            self.num_bases = num_types
            self.W = nn.Parameter(torch.empty(num_types, in_size, out_size))
        else:
            self.num_bases = num_types if num_bases is None else num_bases
            self.W = nn.Parameter(torch.empty(self.num_bases, in_size, out_size))
            self.coeff = nn.Parameter(torch.empty(num_types, self.num_bases))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_size)
        nn.init.uniform_(self.W, -bound, bound)
        if self.regularizer == "basis":
            nn.init.xavier_uniform_(self.coeff, gain=nn.init.calculate_gain("relu"))

    def get_weight(self) -> torch.Tensor:
        """The per-type matrices ``[num_types, in_size, out_size]``."""
        if self.regularizer is None:
            return self.W
        return (self.coeff @ self.W.flatten(1)).view(self.num_types, self.in_size, self.out_size)

    def forward(
        self,
        x: torch.Tensor,
        x_type: torch.Tensor,
        index: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``y_m = scale_m * x[index_m] @ W_{x_type_m}`` for ``m = 0 .. M-1``.

        Without ``index`` (``M = N``, row ``m`` of ``x``) this is DGL's ``TypedLinear(x, x_type)``; with it,
        the R-GCN message of edge ``m`` from its source node ``index_m``. No ``[M, in, out]`` tensor of
        per-row matrices is built: the ``N`` rows of ``x`` are projected once onto every basis (or every
        type, without a regularizer), ``[N, B, out]``, and row ``m`` takes its source's projections
        combined with its type's coefficients (``sum_b coeff[t, b] * (x_i @ W[b]) = x_i @ W_t``).

        Args:
            x: ``[N, in_size]``.
            x_type: ``[M]`` int64 types in ``0 .. num_types-1``.
            index: ``[M]`` int64 rows of ``x`` (default: ``0 .. N-1``, then ``M = N``).
            scale: ``[M]`` or ``[M, 1]`` factor of each output row (default: 1).

        Returns:
            ``[M, out_size]``.
        """
        n, out = x.shape[0], self.out_size
        projected = x @ self.W.permute(1, 0, 2).reshape(self.in_size, self.num_bases * out)  # [N, B * out]
        if self.regularizer is None:  # bases = types: pick row (source, type) of [N * R, out]
            source = torch.arange(n, device=x.device) if index is None else index  # [M]
            rows = source * self.num_types + x_type  # [M]
            y = projected.view(n * self.num_types, out).index_select(0, rows)  # [M, out]
            return y if scale is None else y * scale.reshape(-1, 1)
        coeff = self.coeff.index_select(0, x_type)  # [M, B]
        if scale is not None:
            coeff = coeff * scale.reshape(-1, 1)  # [M, B]: the row's factor folded into its combination
        per_basis = projected if index is None else projected.index_select(0, index)  # [M, B * out]
        return torch.bmm(coeff.unsqueeze(1), per_basis.view(-1, self.num_bases, out)).squeeze(1)  # [M, out]

    def extra_repr(self) -> str:
        return (
            f"in_size={self.in_size}, out_size={self.out_size}, num_types={self.num_types}, "
            f"regularizer={self.regularizer}, num_bases={self.num_bases}"
        )


class RelGraphConv(nn.Module):
    """Relational graph convolution (R-GCN, Schlichtkrull et al. 2018) on an edge index.

    For every node ``j``::

        h_j = sum_{(i -> j), r = etype} norm_ij * x_i @ W_r  +  h_bias  +  x_j @ loop_weight

    followed by ``activation`` and dropout, the function DGL's ``RelGraphConv`` computes (its
    ``layer_norm`` option is not implemented). With ``regularizer="basis"`` the messages are computed
    through the bases, never materialising a matrix per edge: each node is projected once onto the
    ``B`` bases (``x @ W[b]``, ``[N, B, out]``), and an edge's message is the combination of its source's
    projections with its relation's coefficients (``sum_b coeff[r, b] * (x_i @ W[b])``), which is
    ``x_i @ W_r`` by linearity. Cost: ``O(N * in * B * out + E * B * out)`` instead of
    ``O(E * in * out)``. Without a regularizer, each node is projected onto every relation
    (``[N, R, out]``) and an edge picks its relation's row. On small graphs (see
    ``DENSE_ENTRIES_PER_EDGE``) the sum over incoming edges is one matmul with a dense adjacency that
    holds each edge's basis coefficients (``[N, B * N]``), instead of a gather and a scatter-add.

    Parameters (state-dict keys as DGL's): ``linear_r.W``, ``linear_r.coeff`` (basis only), ``h_bias``
    ``[out]`` (``bias=True``), ``loop_weight`` ``[in, out]`` (``self_loop=True``).

    Raises:
        ValueError: an unsupported regularizer (see :class:`TypedLinear`).
    """

    def __init__(
        self,
        in_feat: int,
        out_feat: int,
        num_rels: int,
        regularizer: str | None = None,
        num_bases: int | None = None,
        bias: bool = True,
        activation=None,
        self_loop: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if regularizer is not None and num_bases is None:
            num_bases = num_rels
        self.linear_r = TypedLinear(in_feat, out_feat, num_rels, regularizer, num_bases)
        self.bias = bias
        self.activation = activation
        self.self_loop = self_loop
        if bias:
            self.h_bias = nn.Parameter(torch.zeros(out_feat))
        if self_loop:
            self.loop_weight = nn.Parameter(torch.empty(in_feat, out_feat))
            nn.init.xavier_uniform_(self.loop_weight, gain=nn.init.calculate_gain("relu"))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, feat: torch.Tensor, edge_index: torch.Tensor, etypes: torch.Tensor, norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Convolve node features over the typed edges.

        Args:
            feat: ``[N, in_feat]`` node features.
            edge_index: ``[2, E]`` int64 (source, destination).
            etypes: ``[E]`` int64 relation type of each edge, in ``0 .. num_rels-1``.
            norm: ``[E, 1]`` or ``[E]`` message weight of each edge (DGL's ``norm``), or None (1).

        Returns:
            ``[N, out_feat]``.

        Raises:
            ValueError: ``edge_index`` is not ``[2, E]``, or ``etypes`` / ``norm`` have not ``E`` rows.
        """
        _check_edge_index(edge_index)
        num_edges = edge_index.shape[1]
        if etypes.dim() != 1 or etypes.shape[0] != num_edges:
            raise ValueError(f"etypes must have shape [E] with E = {num_edges}, got {list(etypes.shape)}")
        if norm is not None:
            _check_edge_data("norm", norm, num_edges)
        n = feat.shape[0]
        if _use_dense(n, num_edges):
            h = self._dense_messages(feat, edge_index, etypes, norm)  # [N, out]
        else:
            messages = self.linear_r(feat, etypes, index=edge_index[0], scale=norm)  # [E, out]
            h = messages.new_zeros(n, messages.shape[1]).index_add_(0, edge_index[1], messages)  # [N, out]
        if self.bias:
            h = h + self.h_bias
        if self.self_loop:
            h = h + feat @ self.loop_weight  # [N, out]
        if self.activation is not None:
            h = self.activation(h)
        return self.dropout(h)

    def _dense_messages(
        self, feat: torch.Tensor, edge_index: torch.Tensor, etypes: torch.Tensor, norm: torch.Tensor | None
    ) -> torch.Tensor:
        """The summed messages through a dense adjacency per basis (small graphs): ``[N, out]``.

        Every node is projected onto the ``K`` bases (or relations), stacked ``[K * N, out]``; the
        adjacency ``[N, K * N]`` holds each edge's coefficient for each basis (times its norm), so one
        matmul sums ``sum_b coeff[r, b] * norm * (x_i @ W[b])`` over each node's incoming edges.
        """
        lin = self.linear_r
        n, k, out = feat.shape[0], lin.num_bases, lin.out_size
        projected = feat @ lin.W.permute(1, 0, 2).reshape(lin.in_size, k * out)  # [N, K * out]
        stacked = projected.view(n, k, out).transpose(0, 1).reshape(k * n, out)  # [K * N, out], block b = x @ W[b]
        if lin.regularizer is None:  # an edge's message uses its own relation's block only
            values = norm.reshape(-1) if norm is not None else feat.new_ones(edge_index.shape[1])  # [E]
            adjacency = _adjacency(edge_index, values, n, blocks=k, block=etypes)  # [N, K * N]
        else:
            coeff = lin.coeff.index_select(0, etypes)  # [E, K]
            if norm is not None:
                coeff = coeff * norm.reshape(-1, 1)  # [E, K]
            adjacency = _adjacency(edge_index, coeff, n, blocks=k)  # [N, K * N]
        return adjacency @ stacked  # [N, out]


class GraphConv(nn.Module):
    """Graph convolution (GCN, Kipf & Welling 2017) on an edge index, as DGL's ``GraphConv``.

    ``h_j = sum_{(i -> j)} c_ij * w_ij * x_i @ weight + bias`` where ``w_ij`` is the optional
    ``edge_weight`` and ``c_ij`` the normalisation ``norm``: ``"none"`` (1), ``"right"`` (``1/in_deg(j)``),
    ``"left"`` (``1/out_deg(i)``) or ``"both"`` (``1/sqrt(out_deg(i) * in_deg(j))``), degrees clamped to
    at least 1. As in DGL, the matrix product comes before the aggregation when it shrinks the features
    (``in_feats > out_feats``) and after it otherwise.

    Parameters (state-dict keys as DGL's): ``weight`` ``[in_feats, out_feats]`` (Xavier-uniform), ``bias``
    ``[out_feats]`` (zeros).

    Raises:
        ValueError: an unknown ``norm``.
    """

    def __init__(
        self,
        in_feats: int,
        out_feats: int,
        norm: str = "both",
        weight: bool = True,
        bias: bool = True,
        activation=None,
        allow_zero_in_degree: bool = False,
    ):
        super().__init__()
        if norm not in ("none", "both", "right", "left"):
            raise ValueError(f'norm must be "none", "both", "right" or "left", got {norm!r}')
        self._in_feats, self._out_feats, self._norm = in_feats, out_feats, norm
        self._allow_zero_in_degree = allow_zero_in_degree
        self._activation = activation
        if weight:
            self.weight = nn.Parameter(torch.empty(in_feats, out_feats))
            nn.init.xavier_uniform_(self.weight)
        else:
            self.register_parameter("weight", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_feats))
        else:
            self.register_parameter("bias", None)

    def forward(
        self, feat: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Convolve node features over the edges.

        Args:
            feat: ``[N, in_feats]`` node features.
            edge_index: ``[2, E]`` int64 (source, destination).
            edge_weight: ``[E]`` (or ``[E, 1]``) scalar weight of each message, or None (1).

        Returns:
            ``[N, out_feats]``.

        Raises:
            ValueError: ``edge_index`` is not ``[2, E]``, ``edge_weight`` has not ``E`` rows, or a node
                has no incoming edge while ``allow_zero_in_degree`` is False (its output would be the
                bias alone; DGL raises DGLError there).
        """
        _check_edge_index(edge_index)
        n = feat.shape[0]
        if edge_weight is not None:
            _check_edge_data("edge_weight", edge_weight, edge_index.shape[1])
        if not self._allow_zero_in_degree and (in_degrees(edge_index, n) == 0).any():
            raise ValueError(
                "a node has no incoming edge, so its output would be invalid; add self loops or "
                "construct GraphConv with allow_zero_in_degree=True"
            )
        x = feat
        if self._norm in ("left", "both"):
            degrees = out_degrees(edge_index, n).to(feat.dtype).clamp(min=1)  # [N]
            x = x * (degrees.rsqrt() if self._norm == "both" else 1.0 / degrees).unsqueeze(-1)
        if self.weight is not None and self._in_feats > self._out_feats:
            h = _aggregate(x @ self.weight, edge_index, edge_weight)  # [N, out]
        else:
            h = _aggregate(x, edge_index, edge_weight)  # [N, in]
            if self.weight is not None:
                h = h @ self.weight  # [N, out]
        if self._norm in ("right", "both"):
            degrees = in_degrees(edge_index, n).to(feat.dtype).clamp(min=1)  # [N]
            h = h * (degrees.rsqrt() if self._norm == "both" else 1.0 / degrees).unsqueeze(-1)
        if self.bias is not None:
            h = h + self.bias
        if self._activation is not None:
            h = self._activation(h)
        return h

    def extra_repr(self) -> str:
        return f"in={self._in_feats}, out={self._out_feats}, normalization={self._norm}"
