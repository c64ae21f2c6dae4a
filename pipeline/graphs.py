"""Dialogue graphs: one DGL graph per dialogue, utterances as nodes, typed edges; their file format.

Utterance ``j`` receives an edge from every utterance ``i`` with ``j - window_past <= i <= j +
window_future`` (itself included, as a self loop), as in DialogueGCN's windowed context graph
(Ghosal et al. 2019, declare-lab/conv-emotion ``DialogueGCN/model.py``; defaults 10/10). Edges go
``src -> dst`` = ``i -> j``: messages flow into ``j`` from its window. The relation type of an edge
(``g.edata["rel_type"]``) is one of:

* ``speaker_pair`` (DialogueGCN): ``2 * (s_src * M + s_dst) + d`` where ``s`` is the speaker's index in
  the dialogue (order of first appearance), ``M = graph.max_speakers`` and ``d`` is 0 when ``src`` is
  not later than ``dst`` (past or self) and 1 when it is later (future): ``2 * M**2`` relations;
* ``same_other`` (speaker-count free): 0 self loop, 1 same speaker & past, 2 same speaker & future,
  3 other speaker & past, 4 other speaker & future: 5 relations.

Storage (:func:`save_graphs`, written by the ``build_graphs`` stage into ``data/graphs/``):
``graphs.safetensors`` (the edge lists of all dialogues, concatenated: ``src``, ``dst``, ``rel_type``
``[E]`` and ``speaker`` ``[N]`` int64, with ``edge_offsets`` / ``node_offsets`` ``[D + 1]``; node ``k``
of a dialogue is its ``k``-th utterance) and ``index.json`` (dialogue ids in graph order, relation
count). Not ``dgl.save_graphs``: its files differ byte-wise between runs for identical graphs, which
gave ``data/graphs`` a new DVC hash on every build and broke ``dvc checkout`` in fresh clones; this
file is byte-identical run to run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_path, write_json
from pipeline.config import GraphParams
from pipeline.dgl_compat import dgl

GRAPHS_FILE = "graphs.safetensors"
INDEX_FILE = "index.json"


def num_relations(graph: GraphParams) -> int:
    """Number of relation types the chosen scheme defines."""
    return 2 * graph.max_speakers**2 if graph.relations == "speaker_pair" else 5


def speaker_indices(speakers: list[str]) -> list[int]:
    """Map speaker names to 0, 1, ... in order of first appearance in the dialogue."""
    order: dict[str, int] = {}
    return [order.setdefault(s, len(order)) for s in speakers]


def dialogue_edges(speakers: list[str], graph: GraphParams) -> tuple[list[int], list[int], list[int]]:
    """Edges of one dialogue: (src, dst, relation type) lists, sorted by (dst, src).

    Raises:
        ValueError: ``speaker_pair`` with more speakers in the dialogue than ``graph.max_speakers``.
    """
    ids = speaker_indices(speakers)
    n_speakers = max(ids, default=-1) + 1
    if graph.relations == "speaker_pair" and n_speakers > graph.max_speakers:
        raise ValueError(
            f"a dialogue has {n_speakers} speakers but graph.max_speakers={graph.max_speakers}: "
            "raise graph.max_speakers or use graph.relations=same_other"
        )
    src, dst, rel = [], [], []
    for j in range(len(ids)):
        for i in range(max(0, j - graph.window_past), min(len(ids), j + graph.window_future + 1)):
            if graph.relations == "speaker_pair":
                r = 2 * (ids[i] * graph.max_speakers + ids[j]) + (1 if i > j else 0)
            elif i == j:
                r = 0
            else:
                r = (1 if ids[i] == ids[j] else 3) + (1 if i > j else 0)
            src.append(i)
            dst.append(j)
            rel.append(r)
    return src, dst, rel


def build_dialogue_graph(speakers: list[str], graph: GraphParams) -> dgl.DGLGraph:
    """The DGL graph of one dialogue: ``len(speakers)`` nodes, ``edata["rel_type"]`` (int64 [E]),
    ``ndata["speaker"]`` (int64 [N], index in the dialogue)."""
    src, dst, rel = dialogue_edges(speakers, graph)
    g = dgl.graph((torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)), num_nodes=len(speakers))
    g.edata["rel_type"] = torch.tensor(rel, dtype=torch.int64)
    g.ndata["speaker"] = torch.tensor(speaker_indices(speakers), dtype=torch.int64)
    return g


def save_graphs(graphs: dict[str, dgl.DGLGraph], graph: GraphParams, graphs_dir: str | Path) -> None:
    """Write ``{dialogue id: graph}`` (in that order) into ``graphs_dir``, atomically and byte-reproducibly."""
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
            "num_relations": num_relations(graph),
            "relations": graph.relations,
            "edges": int(sum(g.num_edges() for g in graphs.values())),
        },
        Path(graphs_dir) / INDEX_FILE,
    )


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
