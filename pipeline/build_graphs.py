"""Stage ``build_graphs``: one DGL speaker graph per dialogue of the utterance table.

Edges, relation types and the file format: :mod:`pipeline.graphs`. The graphs depend only on the
speakers in dialogue order and the ``graph.*`` settings (window past/future, relation scheme).
``speaker_pair`` relations are sized for the most distinct speakers in any dialogue of the table
(every split), capped by ``graph.max_speakers`` (:func:`pipeline.graphs.relation_speakers`): two-speaker
data gets ``2 * 2**2 = 8`` relation types. The count reaches train through ``index.json``.

Run: ``python -m pipeline.build_graphs --utterances data/prepared/utterances.csv --out data/graphs``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.graphs import GRAPHS_FILE, build_dialogue_graph, num_relations, relation_speakers, save_graphs
from pipeline.utterances import load_utterances

log = logging.getLogger(__name__)


def run(params: Params, utterances: Path, out: Path) -> None:
    """Build one graph per dialogue of the table ``utterances`` and save them into ``out``.

    Raises:
        ValueError: naming the dialogue, when it has more speakers than ``graph.max_speakers`` allows.
    """
    speakers: dict[str, list[str]] = {}
    for u in load_utterances(utterances):
        speakers.setdefault(u.dialogue_id, []).append(u.speaker)
    m = relation_speakers(speakers.values(), params.graph)  # used by speaker_pair only
    graphs = {}
    for dialogue_id, names in speakers.items():
        try:
            graphs[dialogue_id] = build_dialogue_graph(names, params.graph, m)
        except ValueError as err:
            raise ValueError(f"dialogue {dialogue_id}: {err}") from None
    save_graphs(graphs, params.graph, out, m)
    log.info(
        "build_graphs: %d dialogues, %d edges, %d relation types (%s%s) -> %s",
        len(graphs),
        sum(g.num_edges() for g in graphs.values()),
        num_relations(params.graph, m),
        params.graph.relations,
        f": up to {m} speakers a dialogue, graph.max_speakers={params.graph.max_speakers}"
        if params.graph.relations == "speaker_pair"
        else "",
        out / GRAPHS_FILE,
    )


if __name__ == "__main__":
    run_stage(
        run,
        "Build one DGL speaker graph per dialogue (graph.*).",
        {
            "utterances": "the utterance table (prepare's utterances.csv)",
            "out": "output folder: graphs.safetensors, index.json",
        },
    )
