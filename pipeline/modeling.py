"""The fusion + adaptive graph model for emotion recognition in conversation (ERC).

A reconstruction of the two papers' architecture from their abstracts and the field's public code
(see ``../shared/notes/model.md`` and the README's "Model" section); it is not the authors' code.

    per modality m in model.modalities (default text, audio, visual; the others have no parameters
    and their features are never read):
        ModalityEncoder      [N, D_m] -> [N, H]    projection, learned "missing" embedding, dialogue
                                                    context (bi-GRU or transformer)
    CrossModalFusion         {m: [N, H]} -> [N, H]  text-anchored cross-attention both ways (paper 000,
                                                    MultiEMO's bidirectional cross-attention), joint
                                                    vectors (paper 001), or concat; with a single
                                                    modality cross_attention falls back to concat
    DialogueGraphEncoder     [N, H] -> [N, H]       RelGraphConv (basis) + GraphConv over the dialogue
                                                    graph, edge weights from node features ("adaptive",
                                                    paper 000) or fixed 1/in-degree ("gcn"); DGL's
                                                    kernels or plain torch ones (``model.graph_backend``)
    heads                    [N, R] -> emotion [N, C_e], sentiment [N, C_s] (multi-task, paper 000),
                             projection [N, H] for the contrastive loss (paper 001)

N is the number of utterances in a batch of whole dialogues (dialogue order), H ``model.hidden_size``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline import dgl_compat, graph_layers
from pipeline.config import ModelParams
from pipeline.data import MODALITIES, DialogueBatch
from pipeline.dgl_compat import resolve_graph_backend

log = logging.getLogger(__name__)


def pad_dialogues(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, ...]`` (dialogues concatenated) -> ``[B, T_max, ...]`` zero-padded, and ``valid`` ``[B, T_max]``."""
    chunks = torch.split(x, lengths)
    padded = nn.utils.rnn.pad_sequence(chunks, batch_first=True)
    valid = torch.arange(padded.shape[1], device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
    return padded, valid


def unpad_dialogues(padded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_dialogues`: ``[B, T_max, H]`` -> ``[N, H]``."""
    return padded[valid]


class ModalityEncoder(nn.Module):
    """Projects one modality to the common size and adds dialogue context.

    ``[N, D_m]`` -> Linear + LayerNorm + GELU -> ``[N, H]``; utterances where the modality is missing get
    a learned embedding instead (their feature rows are never read). ``context``: a bidirectional GRU
    over each dialogue (DialogueRNN / COGMEN-style), a one-layer transformer encoder with learned
    positions (up to ``max_positions`` utterances; later ones share the last position), or ``none``;
    residual connection and LayerNorm. Output ``[N, H]``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        dropout: float,
        context: str = "gru",
        num_heads: int = 4,
        max_positions: int = 256,
    ):
        super().__init__()
        self.project = nn.Sequential(
            nn.Linear(input_size, hidden_size), nn.LayerNorm(hidden_size), nn.GELU(), nn.Dropout(dropout)
        )
        self.missing = nn.Parameter(torch.randn(hidden_size) * 0.02)
        self.kind = context
        if context == "gru":
            self.context = nn.GRU(hidden_size, hidden_size // 2, batch_first=True, bidirectional=True)
        elif context == "transformer":
            self.positions = nn.Embedding(max_positions, hidden_size)
            self.context = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    hidden_size, num_heads, 2 * hidden_size, dropout, batch_first=True, norm_first=True
                ),
                num_layers=1,
                enable_nested_tensor=False,
            )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        h = torch.where(mask[:, None], self.project(x), self.missing.expand(x.shape[0], -1))  # [N, H]
        if self.kind == "none":
            return self.norm(h)
        padded, valid = pad_dialogues(h, lengths)  # [B, T, H]
        if self.kind == "gru":
            packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
            context, _ = self.context(packed)
            context, _ = pad_packed_sequence(context, batch_first=True, total_length=padded.shape[1])  # [B, T, H]
        else:
            steps = torch.arange(padded.shape[1], device=h.device).clamp_max(self.positions.num_embeddings - 1)
            context = self.context(padded + self.positions(steps)[None], src_key_padding_mask=~valid)  # [B, T, H]
        return self.norm(h + unpad_dialogues(context, valid))  # [N, H]


class CrossModalAttention(nn.Module):
    """One direction of cross-modal alignment: a query stream attends over a key stream in its dialogue.

    ``query``, ``key``: ``[B, T, H]``; ``key_valid``: ``[B, T]`` (False for padding and for utterances
    whose key modality is missing, so nobody attends to a missing modality). Output ``[B, T, H]`` =
    LayerNorm(query + attention). A dialogue with no valid key at all gets no attention term.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        no_key = ~key_valid.any(1)  # [B]
        padding = ~key_valid & ~no_key[:, None]  # all-masked rows would give NaN: unmask, then zero below
        attended, _ = self.attention(query, key, key, key_padding_mask=padding, need_weights=False)
        attended = attended.masked_fill(no_key[:, None, None], 0.0)
        return self.norm(query + self.dropout(attended))


class JointVectorFusion(nn.Module):
    """Fusion through learnable joint vectors (paper 001's "connection vectors", rebuilt as an attention
    bottleneck): ``K`` learned vectors attend over the modality tokens of each utterance.

    ``tokens``: ``[N, M, H]`` (M = the model's modalities, 1 to 3), ``present``: ``[N, M]``; a missing modality is not
    attended to. Output ``[N, K * H]`` (the K attended vectors, concatenated).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, num_vectors: int):
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(num_vectors, hidden_size) * 0.02)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        queries = self.vectors.expand(tokens.shape[0], -1, -1)  # [N, K, H]
        nothing = ~present.any(1)  # an utterance with no modality at all attends to its (missing) tokens
        padding = ~present & ~nothing[:, None]
        attended, _ = self.attention(queries, tokens, tokens, key_padding_mask=padding, need_weights=False)
        return self.norm(queries + attended).flatten(1)  # [N, K * H]


def resolve_fusion(mode: str, modalities: tuple[str, ...] | list[str]) -> str:
    """The fusion that runs for ``model.fusion`` = ``mode`` over ``modalities``: ``mode`` itself, except
    ``cross_attention`` with a single modality (nothing to attend to), which falls back to ``concat``
    (a projection of the one stream) with a warning."""
    if mode == "cross_attention" and len(modalities) < 2:
        log.warning(
            "model.fusion=cross_attention needs at least 2 modalities, model.modalities=%s has 1: "
            "fusing with concat (a projection of its stream)",
            list(modalities),
        )
        return "concat"
    return mode


class CrossModalFusion(nn.Module):
    """Fuses the modality streams ``{m: [N, H]}`` of ``modalities`` into ``[N, H]`` (``model.fusion``).

    * ``cross_attention`` (paper 000's cross-modal context fusion, rebuilt after MultiEMO's
      bidirectional multi-head cross-attention, TaoShi1998/MultiEMO): within each dialogue, the anchor
      (text, or the first modality without text) attends to each other modality and each other modality
      attends to the anchor; the ``2 * (M - 1)`` aligned streams (4 for all three) are concatenated and
      projected;
    * ``joint_vectors`` (paper 001): :class:`JointVectorFusion` over the M modality tokens;
    * ``concat``: the baseline, the M streams concatenated and projected.

    ``modalities``: in the order text, audio, visual (``model.modalities``); the streams of others are
    never read. Raises ValueError for ``cross_attention`` with fewer than 2 (:func:`resolve_fusion` first).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        dropout: float,
        mode: str,
        num_joint_vectors: int = 4,
        modalities: tuple[str, ...] = MODALITIES,
    ):
        super().__init__()
        self.mode = mode
        self.modalities = tuple(modalities)
        if mode == "cross_attention":
            if len(self.modalities) < 2:
                raise ValueError(f"cross_attention fusion needs at least 2 modalities, got {list(self.modalities)}")
            anchor = "text" if "text" in self.modalities else self.modalities[0]
            others = [m for m in self.modalities if m != anchor]
            # all three: (text, audio), (text, visual), (audio, text), (visual, text)
            self.pairs = [(anchor, m) for m in others] + [(m, anchor) for m in others]
            self.attend = nn.ModuleDict(
                {f"{q}_{k}": CrossModalAttention(hidden_size, num_heads, dropout) for q, k in self.pairs}
            )
            n_streams = len(self.pairs)
        elif mode == "joint_vectors":
            self.joint = JointVectorFusion(hidden_size, num_heads, dropout, num_joint_vectors)
            n_streams = num_joint_vectors
        else:
            n_streams = len(self.modalities)
        self.out = nn.Sequential(
            nn.Linear(n_streams * hidden_size, hidden_size), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(hidden_size)
        )

    def forward(
        self, streams: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], lengths: list[int]
    ) -> torch.Tensor:
        if self.mode == "concat":
            return self.out(torch.cat([streams[m] for m in self.modalities], dim=-1))  # [N, M * H] -> [N, H]
        if self.mode == "joint_vectors":
            tokens = torch.stack([streams[m] for m in self.modalities], dim=1)  # [N, M, H]
            present = torch.stack([masks[m] for m in self.modalities], dim=1)  # [N, M]
            return self.out(self.joint(tokens, present))
        padded, valid = {}, {}
        for m in self.modalities:
            padded[m], in_dialogue = pad_dialogues(streams[m], lengths)  # [B, T, H], [B, T]
            valid[m] = pad_dialogues(masks[m], lengths)[0] & in_dialogue  # padding is False
        aligned = [self.attend[f"{q}_{k}"](padded[q], padded[k], valid[k]) for q, k in self.pairs]  # P x [B, T, H]
        return self.out(unpad_dialogues(torch.cat(aligned, dim=-1), in_dialogue))  # [N, H]


def _graph_layers(backend: str, hidden_size: int, num_relations: int, num_bases: int) -> tuple[nn.Module, nn.Module]:
    """The two graph layers of :class:`DialogueGraphEncoder` from ``backend``'s implementation (same
    parameter names, shapes and seeded initial values for ``dgl`` and ``torch``)."""
    layers = dgl_compat if backend == "dgl" else graph_layers
    relational = layers.RelGraphConv(
        hidden_size,
        hidden_size,
        num_relations,
        regularizer="basis",
        num_bases=min(num_bases, num_relations),
        self_loop=True,
    )
    conv = layers.GraphConv(hidden_size, hidden_size, norm="none", allow_zero_in_degree=True)
    return relational, conv


def _adopt_parameters(module: nn.Module, source: nn.Module) -> nn.Module:
    """Make ``module`` use ``source``'s Parameter objects (same names and shapes); returns ``module``.

    The parameters are shared, not copied, so an optimizer built over ``source`` keeps training them.

    Raises:
        ValueError: the two modules' parameter names or shapes differ.
    """
    wanted = {name: p.shape for name, p in module.named_parameters()}
    given = {name: p.shape for name, p in source.named_parameters()}
    if wanted != given:
        raise ValueError(f"graph layers differ between backends: {wanted} vs {given}")
    for name, parameter in source.named_parameters():
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, leaf, parameter)
    return module


class DialogueGraphEncoder(nn.Module):
    """Relational graph encoder over the dialogue graphs, with adaptive or fixed edge weights.

    Layer 1: ``RelGraphConv`` with basis decomposition (Schlichtkrull et al. 2018, as in DialogueGCN) over
    the relation types of :mod:`pipeline.graphs`; layer 2: ``GraphConv``. Both scale each message by
    an edge weight ``w_ij``: ``adaptive`` (paper 000, rebuilt after DialogueGCN's edge attention)
    computes it from the node features, ``w_ij = softmax_{i in N(j)} (q_j . k_i / sqrt(H))``; ``gcn``
    uses the fixed ``1 / in-degree(j)``. Output: LayerNorm(input + layer 2), ``[N, H]``.

    ``backend``: ``dgl`` runs DGL's ``RelGraphConv`` / ``GraphConv`` / ``edge_softmax`` (CPU only with
    the PyPI DGL; needs the DGL graph), ``torch`` the same functions on plain tensors
    (:mod:`pipeline.graph_layers`, any device). Both have the same parameters (state-dict keys and
    shapes) and seeded initial values; :meth:`set_backend` switches in place.
    """

    def __init__(
        self, hidden_size: int, num_relations: int, num_bases: int, dropout: float, mode: str, backend: str = "dgl"
    ):
        super().__init__()
        if backend not in ("dgl", "torch"):
            raise ValueError(f"backend must be dgl or torch, got {backend!r}")
        self.mode = mode
        self.backend = backend
        self._sizes = (hidden_size, num_relations, num_bases)
        self.relational, self.conv = _graph_layers(backend, hidden_size, num_relations, num_bases)
        if mode == "adaptive":
            self.query = nn.Linear(hidden_size, hidden_size)
            self.key = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def set_backend(self, backend: str) -> None:
        """Switch to ``backend``'s graph layers, keeping the very same parameters (an optimizer over
        them stays valid). Consumes no random numbers.

        Raises:
            ValueError: an unknown backend.
        """
        if backend not in ("dgl", "torch"):
            raise ValueError(f"backend must be dgl or torch, got {backend!r}")
        if backend == self.backend:
            return
        with torch.random.fork_rng(devices=[]):  # the new layers' own initialisation is thrown away
            relational, conv = _graph_layers(backend, *self._sizes)
        self.relational = _adopt_parameters(relational, self.relational)
        self.conv = _adopt_parameters(conv, self.conv)
        self.backend = backend

    def edge_weights(self, h: torch.Tensor, edge_index: torch.Tensor, graph=None) -> torch.Tensor:
        """``[E, 1]`` message weights; they sum to 1 over each node's incoming edges.

        ``h`` ``[N, H]``, ``edge_index`` ``[2, E]`` (source, destination); ``graph`` (the DGL graph of the
        same edges) is used by the ``dgl`` backend's ``edge_softmax`` only.
        """
        src, dst = edge_index[0], edge_index[1]
        if self.mode == "adaptive":
            scores = (self.query(h)[dst] * self.key(h)[src]).sum(-1, keepdim=True) / math.sqrt(h.shape[-1])  # [E, 1]
            if self.backend == "dgl":
                return dgl_compat.edge_softmax(graph, scores)
            return graph_layers.edge_softmax(edge_index, scores, h.shape[0])
        degrees = graph_layers.in_degrees(edge_index, h.shape[0])  # [N]
        return (1.0 / degrees.clamp_min(1).float())[dst].unsqueeze(-1)  # [E, 1]

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, rel_type: torch.Tensor, graph=None) -> torch.Tensor:
        """``h`` ``[N, H]``, ``edge_index`` ``[2, E]`` (row 0 source, row 1 destination), ``rel_type``
        ``[E]`` int64, ``graph``: the batched DGL graph of the same edges (same order), needed by the
        ``dgl`` backend only (moved to ``h``'s device if it is elsewhere). Returns ``[N, H]``.

        Raises:
            ValueError: the ``dgl`` backend without ``graph``; a relation type beyond the layer's count
                (graphs built for another relation scheme or speaker count, see :mod:`pipeline.graphs`).
        """
        relations = self._sizes[1]
        if rel_type.numel() and int(rel_type.max()) >= relations:  # else: an index error (CUDA: device assert)
            raise ValueError(
                f"the dialogue graphs have relation type {int(rel_type.max())}, the model {relations} relation "
                "types: graphs built for another graph.relations or speaker count than the model was trained "
                "with (speaker_pair: build them with the checkpoint's relation_speakers)"
            )
        if self.backend == "dgl":
            if graph is None:
                raise ValueError("the dgl graph backend needs the DGL graph (graph=...); use backend torch without it")
            if graph.device != h.device:
                graph = graph.to(h.device)
        weights = self.edge_weights(h, edge_index, graph)  # [E, 1]
        if self.backend == "dgl":
            x = F.relu(self.relational(graph, h, rel_type, norm=weights))  # [N, H]
            x = self.conv(graph, self.dropout(x), edge_weight=weights.squeeze(-1))  # [N, H]
        else:
            x = F.relu(self.relational(h, edge_index, rel_type, norm=weights))  # [N, H]
            x = self.conv(self.dropout(x), edge_index, edge_weight=weights.squeeze(-1))  # [N, H]
        return self.norm(h + self.dropout(x))


@dataclass
class ERCOutput:
    """Model outputs for N utterances: logits ``[N, C_e]`` / ``[N, C_s]``, ``projections`` ``[N, H]``
    (L2-normalised, for the contrastive loss)."""

    emotion_logits: torch.Tensor
    sentiment_logits: torch.Tensor
    projections: torch.Tensor


class ERCModel(nn.Module):
    """Fusion + graph ERC model; see the module docstring for the data flow.

    Args:
        input_sizes: modality -> feature size ``D_m``; the modalities of ``config.modalities`` must be
            there, others are ignored.
        num_emotions / num_sentiments: class counts of the two heads.
        num_relations: relation types of the dialogue graphs (ignored when ``config.graph == "none"``).
        config: the ``model`` section of ``params.yaml``.
        graph_backend: overrides ``config.graph_backend`` (``auto`` | ``dgl`` | ``torch``), e.g. to run a
            checkpoint trained with the other backend; both have the same state dict.
        device: the device the model will run on, for resolving the backend (default: the CPU).

    The graph backend is resolved at construction (:func:`pipeline.dgl_compat.resolve_graph_backend`)
    and :attr:`graph_backend_used` says which one runs. With ``auto`` it follows the device of the
    inputs: a model built for the CPU (DGL) and moved to CUDA switches to ``torch`` at its first forward
    there, keeping its parameters. :meth:`set_graph_backend` switches explicitly.

    :attr:`modalities` are the modalities the model reads (``config.modalities``, in the order text,
    audio, visual), :attr:`fusion_used` the fusion that runs (:func:`resolve_fusion`).

    Raises:
        ValueError: an unknown backend, or ``dgl`` on a device the installed DGL cannot use (at
            construction, or at a forward on such a device); ``input_sizes`` without one of the
            model's modalities.
    """

    def __init__(
        self,
        input_sizes: dict[str, int],
        num_emotions: int,
        num_sentiments: int,
        num_relations: int,
        config: ModelParams,
        graph_backend: str | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        h = config.hidden_size
        self.graph_backend_requested = graph_backend or config.graph_backend
        self._backend_device = torch.device("cpu" if device is None else device)
        backend = resolve_graph_backend(self.graph_backend_requested, self._backend_device)
        self.modalities = tuple(m for m in MODALITIES if m in config.modalities)
        missing = [m for m in self.modalities if m not in input_sizes]
        if missing:
            raise ValueError(f"no feature size for modality {missing} of model.modalities={list(self.modalities)}")
        self.encoders = nn.ModuleDict(
            {
                m: ModalityEncoder(input_sizes[m], h, config.dropout, config.context, config.num_heads)
                for m in self.modalities
            }
        )
        self.fusion_used = resolve_fusion(config.fusion, self.modalities)
        self.fusion = CrossModalFusion(
            h, config.num_heads, config.dropout, self.fusion_used, config.num_joint_vectors, self.modalities
        )
        self.graph = (
            None
            if config.graph == "none"
            else DialogueGraphEncoder(h, num_relations, config.num_bases, config.dropout, config.graph, backend)
        )
        self._graph_backend = backend
        rep = h if self.graph is None else 2 * h
        self.dropout = nn.Dropout(config.dropout)
        self.emotion_head = nn.Linear(rep, num_emotions)
        self.sentiment_head = nn.Linear(rep, num_sentiments)
        self.projection = nn.Sequential(nn.Linear(rep, h), nn.ReLU(), nn.Linear(h, h))

    @property
    def graph_backend_used(self) -> str:
        """``"dgl"`` or ``"torch"``: the graph layers' implementation (with ``model.graph: none`` no graph
        layer runs and this is only the resolved setting)."""
        return self._graph_backend if self.graph is None else self.graph.backend

    def set_graph_backend(self, name: str, device: torch.device | str | None = None) -> str:
        """Switch the graph layers to ``name`` (``auto`` | ``dgl`` | ``torch``) resolved for ``device``
        (default: where the parameters are), keeping the parameters; returns the backend now used.

        Raises:
            ValueError: an unknown name, or ``dgl`` on a device the installed DGL cannot use.
        """
        device = torch.device(device) if device is not None else next(self.parameters()).device
        backend = resolve_graph_backend(name, device)
        self.graph_backend_requested, self._backend_device, self._graph_backend = name, device, backend
        if self.graph is not None:
            self.graph.set_backend(backend)
        return backend

    def _follow_device(self, device: torch.device) -> None:
        """Re-resolve the requested backend when the inputs are on another device than last resolved for."""
        if device == self._backend_device:
            return
        before = self.graph_backend_used
        self.set_graph_backend(self.graph_backend_requested, device)
        if self.graph_backend_used != before:
            log.info(
                "graph backend %s on %s (model.graph_backend=%s)",
                self.graph_backend_used,
                device,
                self.graph_backend_requested,
            )

    def forward(self, batch: DialogueBatch) -> ERCOutput:
        """The batch's features of :attr:`modalities` only (others may be absent). Returns :class:`ERCOutput`."""
        streams = {m: self.encoders[m](batch.features[m], batch.masks[m], batch.lengths) for m in self.modalities}
        fused = self.fusion(streams, batch.masks, batch.lengths)  # [N, H]
        if self.graph is None:
            rep = fused
        else:
            self._follow_device(fused.device)
            rep = torch.cat([fused, self.graph(fused, batch.edge_index, batch.rel_type, batch.graph)], dim=-1)
        rep = self.dropout(rep)  # [N, R]
        return ERCOutput(self.emotion_head(rep), self.sentiment_head(rep), F.normalize(self.projection(rep), dim=-1))
