"""Dialogue graphs: one DGL graph per dialogue, utterances as nodes, typed edges; their file format.

Utterance ``j`` receives an edge from every utterance ``i`` with ``j - window_past <= i <= j +
window_future`` (itself included, as a self loop), as in DialogueGCN's windowed context graph
(Ghosal et al. 2019, declare-lab/conv-emotion ``DialogueGCN/model.py``; defaults 10/10). Edges go
``src -> dst`` = ``i -> j``: messages flow into ``j`` from its window. The relation type of an edge
(``g.edata["rel_type"]``) is one of:

* ``speaker_pair`` (DialogueGCN): ``2 * (s_src * M + s_dst) + d`` where ``s`` is the speaker's index in
  the dialogue (order of first appearance), ``M`` the speaker count the graphs are built for and ``d`` is
  0 when ``src`` is not later than ``dst`` (past or self) and 1 when it is later (future): ``2 * M**2``
  relations. The ``build_graphs`` stage takes ``M`` from the data (:func:`relation_speakers`: the most
  distinct speakers in any dialogue, capped by ``graph.max_speakers``), so two-speaker data gets 8
  relation types, not ``2 * 9**2 = 162``; the functions below default to ``M = graph.max_speakers``;
* ``same_other`` (speaker-count free): 0 self loop, 1 same speaker & past, 2 same speaker & future,
  3 other speaker & past, 4 other speaker & future: 5 relations.

Storage (:func:`save_graphs`, written by the ``build_graphs`` stage into ``data/graphs/``):
``graphs.safetensors`` (the edge lists of all dialogues, concatenated: ``src``, ``dst``, ``rel_type``
``[E]`` and ``speaker`` ``[N]`` int64, with ``edge_offsets`` / ``node_offsets`` ``[D + 1]``; node ``k``
of a dialogue is its ``k``-th utterance) and ``index.json`` (dialogue ids in graph order, relation
count, ``relation_speakers`` M for speaker_pair, else null; :func:`read_index`). Not
``dgl.save_graphs``: its files differ byte-wise between runs for identical graphs, which gave
``data/graphs`` a new DVC hash on every build and broke ``dvc checkout`` in fresh clones; this file is
byte-identical run to run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_path, write_json
from pipeline.config import GraphParams
from pipeline.dgl_compat import dgl

GRAPHS_FILE = "graphs.safetensors"
INDEX_FILE = "index.json"


def num_relations(graph: GraphParams, num_speakers: int | None = None) -> int:
    """Number of relation types the chosen scheme defines: ``speaker_pair`` ``2 * M**2`` with ``M =
    num_speakers`` (default ``graph.max_speakers``), ``same_other`` 5."""
    if graph.relations != "speaker_pair":
        return 5
    return 2 * (graph.max_speakers if num_speakers is None else num_speakers) ** 2


def relation_speakers(dialogues: Iterable[list[str]], graph: GraphParams) -> int:
    """``M`` for ``speaker_pair`` relations: the largest number of distinct speakers in any of
    ``dialogues`` (each a list of speaker names), at most ``graph.max_speakers``, at least 1.

    A dialogue with more speakers than the cap is not an error here: building its graph is
    (:func:`dialogue_edges`)."""
    most = max((len(set(speakers)) for speakers in dialogues), default=1)
    return max(1, min(most, graph.max_speakers))


def speaker_indices(speakers: list[str]) -> list[int]:
    """Map speaker names to 0, 1, ... in order of first appearance in the dialogue."""
    order: dict[str, int] = {}
    return [order.setdefault(s, len(order)) for s in speakers]


def dialogue_edges(
    speakers: list[str], graph: GraphParams, num_speakers: int | None = None
) -> tuple[list[int], list[int], list[int]]:
    """Edges of one dialogue: (src, dst, relation type) lists, sorted by (dst, src).

    ``num_speakers``: ``M`` of the ``speaker_pair`` relation index (:func:`relation_speakers`; default
    ``graph.max_speakers``); ignored by ``same_other``.

    Raises:
        ValueError: ``speaker_pair`` with more speakers in the dialogue than ``graph.max_speakers`` or
            than ``num_speakers``, or ``num_speakers`` outside ``1 .. graph.max_speakers``.
    """
    ids = speaker_indices(speakers)
    n_speakers = max(ids, default=-1) + 1
    m = graph.max_speakers if num_speakers is None else num_speakers
    if graph.relations == "speaker_pair":
        if not 1 <= m <= graph.max_speakers:
            raise ValueError(f"num_speakers={m} is outside 1..graph.max_speakers={graph.max_speakers}")
        if n_speakers > graph.max_speakers:
            raise ValueError(
                f"a dialogue has {n_speakers} speakers but graph.max_speakers={graph.max_speakers}: "
                "raise graph.max_speakers or use graph.relations=same_other"
            )
        if n_speakers > m:
            raise ValueError(
                f"a dialogue has {n_speakers} speakers but the speaker_pair relations were built for at most "
                f"{m} (the most in any dialogue the model was trained with): use graph.relations=same_other, "
                "or train on data with as many speakers in a dialogue"
            )
    src, dst, rel = [], [], []
    for j in range(len(ids)):
        for i in range(max(0, j - graph.window_past), min(len(ids), j + graph.window_future + 1)):
            if graph.relations == "speaker_pair":
                r = 2 * (ids[i] * m + ids[j]) + (1 if i > j else 0)
            elif i == j:
                r = 0
            else:
                r = (1 if ids[i] == ids[j] else 3) + (1 if i > j else 0)
            src.append(i)
            dst.append(j)
            rel.append(r)
    return src, dst, rel


def build_dialogue_graph(speakers: list[str], graph: GraphParams, num_speakers: int | None = None) -> dgl.DGLGraph:
    """The DGL graph of one dialogue: ``len(speakers)`` nodes, ``edata["rel_type"]`` (int64 [E]),
    ``ndata["speaker"]`` (int64 [N], index in the dialogue). ``num_speakers``: see :func:`dialogue_edges`
    (whose errors it raises)."""
    src, dst, rel = dialogue_edges(speakers, graph, num_speakers)
    g = dgl.graph((torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)), num_nodes=len(speakers))
    g.edata["rel_type"] = torch.tensor(rel, dtype=torch.int64)
    g.ndata["speaker"] = torch.tensor(speaker_indices(speakers), dtype=torch.int64)
    return g


def save_graphs(
    graphs: dict[str, dgl.DGLGraph], graph: GraphParams, graphs_dir: str | Path, num_speakers: int | None = None
) -> None:
    """Write ``{dialogue id: graph}`` (in that order) into ``graphs_dir``, atomically and byte-reproducibly.

    ``num_speakers``: the ``M`` the graphs were built with (default ``graph.max_speakers``); the index
    records it and the relation count ``2 * M**2`` (``speaker_pair``).

    Raises:
        ValueError: a relation type outside that count (graphs built for another ``M``).
    """
    relations = num_relations(graph, num_speakers)
    for dialogue_id, g in graphs.items():
        if g.num_edges() and int(g.edata["rel_type"].max()) >= relations:
            raise ValueError(f"dialogue {dialogue_id}: relation types beyond the {relations} of the index")
    edges = [g.edges() for g in graphs.values()]
    tensors = {
        "src": torch.cat([src for src, _ in edges]),
        "dst": torch.cat([dst for _, dst in edges]),
        "rel_type": torch.cat([g.edata["rel_type"] for g in graphs.values()]),
        "speaker": torch.cat([g.ndata["speaker"] for g in graphs.values()]),
        "edge_offsets": torch.tensor([0] + [g.num_edges() for g in graphs.values()]).cumsum(0),
        "node_offsets": torch.tensor([0] + [g.num_nodes() for g in graphs.values()]).cumsum(0),
    }
    with atomic_path(Path(graphs_dir) / GRAPHS_FILE) as tmp:
        save_file({k: v.to(torch.int64).contiguous() for k, v in tensors.items()}, str(tmp))
    write_json(
        {
            "dialogues": list(graphs),
            "num_relations": relations,
            "relations": graph.relations,
            "relation_speakers": (graph.max_speakers if num_speakers is None else num_speakers)
            if graph.relations == "speaker_pair"
            else None,
            "edges": int(sum(g.num_edges() for g in graphs.values())),
        },
        Path(graphs_dir) / INDEX_FILE,
    )


def read_index(graphs_dir: str | Path) -> dict:
    """The ``index.json`` :func:`save_graphs` wrote: ``dialogues``, ``num_relations``, ``relations``,
    ``relation_speakers`` (``M`` for ``speaker_pair``, else None; absent in graphs built before it was
    recorded: they used ``graph.max_speakers``), ``edges``.

    Raises:
        FileNotFoundError: no index (the build_graphs stage has not run).
    """
    path = Path(graphs_dir) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: dialogue graphs not found; run `dvc repro build_graphs`")
    return json.loads(path.read_text())


def load_graphs(graphs_dir: str | Path) -> tuple[dict[str, dgl.DGLGraph], int]:
    """Read what :func:`save_graphs` wrote: ({dialogue id: graph}, number of relation types).

    Raises:
        FileNotFoundError: the files are missing (the build_graphs stage has not run).
    """
    graphs_path, index_path = Path(graphs_dir) / GRAPHS_FILE, Path(graphs_dir) / INDEX_FILE
    if not graphs_path.exists() or not index_path.exists():
        raise FileNotFoundError(f"{graphs_path}: dialogue graphs not found; run `dvc repro build_graphs`")
    index = json.loads(Path(index_path).read_text())
    t = load_file(str(graphs_path))
    graphs = {}
    for d, dialogue_id in enumerate(index["dialogues"]):
        e0, e1 = int(t["edge_offsets"][d]), int(t["edge_offsets"][d + 1])
        n0, n1 = int(t["node_offsets"][d]), int(t["node_offsets"][d + 1])
        g = dgl.graph((t["src"][e0:e1], t["dst"][e0:e1]), num_nodes=n1 - n0)
        g.edata["rel_type"] = t["rel_type"][e0:e1]
        g.ndata["speaker"] = t["speaker"][n0:n1]
        graphs[dialogue_id] = g
    return graphs, index["num_relations"]
