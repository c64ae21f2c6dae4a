"""Dialogue graphs (pipeline.graphs) and the build_graphs stage: windowed speaker graphs per dialogue, checked
edge by edge against hand-written lists."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import GRAPHS, UTTERANCES, write_utterances

from pipeline.build_graphs import run as build_graphs_stage
from pipeline.config import GraphParams, parse_params
from pipeline.dgl_compat import dgl
from pipeline.graphs import (
    build_dialogue_graph,
    dialogue_edges,
    load_graphs,
    num_relations,
    read_index,
    relation_speakers,
    save_graphs,
    speaker_indices,
)

SPEAKERS = ["A", "B", "A", "C", "B"]  # speaker index by first appearance: A=0, B=1, C=2

# window_past=2, window_future=1: node j receives from i in [j-2, j+1]; (src, dst, relation), sorted by (dst, src).
# same_other: 0 self, 1 same speaker & past, 2 same & future, 3 other & past, 4 other & future.
EXPECTED_SAME_OTHER = [
    (0, 0, 0),
    (1, 0, 4),
    (0, 1, 3),
    (1, 1, 0),
    (2, 1, 4),
    (0, 2, 1),
    (1, 2, 3),
    (2, 2, 0),
    (3, 2, 4),
    (1, 3, 3),
    (2, 3, 3),
    (3, 3, 0),
    (4, 3, 4),
    (2, 4, 3),
    (3, 4, 3),
    (4, 4, 0),
]
# speaker_pair, M=3: 2 * (s_src * 3 + s_dst) + (1 if src is later than dst).
EXPECTED_SPEAKER_PAIR = [
    (0, 0, 0),
    (1, 0, 7),  # A->A self; B->A future: 2*(3+0)+1
    (0, 1, 2),
    (1, 1, 8),
    (2, 1, 3),  # A->B past: 2*1; B->B self: 2*4; A->B future: 2*1+1
    (0, 2, 0),
    (1, 2, 6),
    (2, 2, 0),
    (3, 2, 13),  # A->A past; B->A past: 2*3; self; C->A future: 2*6+1
    (1, 3, 10),
    (2, 3, 4),
    (3, 3, 16),
    (4, 3, 11),  # B->C past: 2*5; A->C past: 2*2; C->C: 2*8; B->C future
    (2, 4, 2),
    (3, 4, 14),
    (4, 4, 8),  # A->B past: 2*1; C->B past: 2*7; B->B self: 2*4
]


def triples(edges: tuple[list[int], list[int], list[int]]) -> list[tuple[int, int, int]]:
    src, dst, rel = edges
    assert len(src) == len(dst) == len(rel)
    return list(zip(src, dst, rel))


def test_speaker_indices_by_first_appearance():
    assert speaker_indices(SPEAKERS) == [0, 1, 0, 2, 1]
    assert speaker_indices(["Ross", "Ross", "Monica"]) == [0, 0, 1]


def test_same_other_edges_by_hand():
    graph = GraphParams(window_past=2, window_future=1, relations="same_other")
    assert triples(dialogue_edges(SPEAKERS, graph)) == EXPECTED_SAME_OTHER


def test_speaker_pair_edges_by_hand():
    graph = GraphParams(window_past=2, window_future=1, relations="speaker_pair", max_speakers=3)
    assert triples(dialogue_edges(SPEAKERS, graph)) == EXPECTED_SPEAKER_PAIR
    assert max(r for _, _, r in EXPECTED_SPEAKER_PAIR) < num_relations(graph) == 18


def test_same_other_uses_all_five_relations():
    # A A B, window 1/1: the same-speaker future relation (2) appears here, unlike in SPEAKERS.
    graph = GraphParams(window_past=1, window_future=1, relations="same_other")
    assert triples(dialogue_edges(["A", "A", "B"], graph)) == [
        (0, 0, 0),
        (1, 0, 2),
        (0, 1, 1),
        (1, 1, 0),
        (2, 1, 4),
        (1, 2, 3),
        (2, 2, 0),
    ]
    assert num_relations(graph) == 5


def test_zero_windows_give_self_loops_only():
    graph = GraphParams(window_past=0, window_future=0, relations="same_other")
    assert triples(dialogue_edges(SPEAKERS, graph)) == [(i, i, 0) for i in range(5)]


def test_too_many_speakers_for_speaker_pair():
    graph = GraphParams(window_past=2, window_future=1, relations="speaker_pair", max_speakers=2)
    with pytest.raises(ValueError, match="3 speakers.*max_speakers=2"):
        dialogue_edges(SPEAKERS, graph)
    # same_other does not depend on the number of speakers.
    same_other = GraphParams(window_past=2, window_future=1, relations="same_other", max_speakers=2)
    assert len(dialogue_edges(SPEAKERS, same_other)[0]) == 16


def test_relation_speakers_are_the_most_in_a_dialogue_capped():
    pair = GraphParams(relations="speaker_pair")  # max_speakers 9
    assert relation_speakers([["A", "B", "A"], ["C", "C"], ["D"]], pair) == 2
    assert relation_speakers([SPEAKERS, ["A"]], pair) == 3
    assert relation_speakers([SPEAKERS], GraphParams(relations="speaker_pair", max_speakers=2)) == 2  # the cap
    assert relation_speakers([], pair) == relation_speakers([["A"]], pair) == 1


def test_two_speaker_pair_relations_by_hand():
    # M = 2: 2 * (s_src * 2 + s_dst) + (1 if src is later than dst); 2 * 2**2 = 8 relation types, not 162
    graph = GraphParams(window_past=1, window_future=1, relations="speaker_pair")
    assert num_relations(graph) == 162 and num_relations(graph, 2) == 8
    assert triples(dialogue_edges(["A", "B", "A"], graph, num_speakers=2)) == [
        (0, 0, 0),
        (1, 0, 5),  # A->A self; B->A future: 2*(2+0)+1
        (0, 1, 2),
        (1, 1, 6),
        (2, 1, 3),  # A->B past: 2*1; B->B self: 2*3; A->B future
        (1, 2, 4),
        (2, 2, 0),  # B->A past: 2*2; A->A self
    ]
    assert num_relations(GraphParams(relations="same_other"), 2) == 5


def test_speaker_pair_count_below_a_dialogue_or_outside_the_cap_is_refused():
    graph = GraphParams(window_past=2, window_future=1, relations="speaker_pair", max_speakers=9)
    with pytest.raises(ValueError, match="3 speakers but the speaker_pair relations were built for at most 2"):
        dialogue_edges(SPEAKERS, graph, num_speakers=2)
    for bad in (0, 10):
        with pytest.raises(ValueError, match=f"num_speakers={bad} is outside 1..graph.max_speakers=9"):
            dialogue_edges(["A"], graph, num_speakers=bad)
    # the cap wins over a larger count, with today's message
    capped = GraphParams(window_past=2, window_future=1, relations="speaker_pair", max_speakers=2)
    with pytest.raises(ValueError, match="3 speakers but graph.max_speakers=2"):
        dialogue_edges(SPEAKERS, capped, num_speakers=2)
    # same_other ignores it
    same_other = GraphParams(window_past=2, window_future=1, relations="same_other")
    assert triples(dialogue_edges(SPEAKERS, same_other, num_speakers=1)) == EXPECTED_SAME_OTHER


def test_build_dialogue_graph():
    graph = GraphParams(window_past=2, window_future=1, relations="speaker_pair", max_speakers=3)
    g = build_dialogue_graph(SPEAKERS, graph)
    assert g.num_nodes() == 5 and g.num_edges() == 16
    src, dst = g.edges()
    rel = g.edata["rel_type"]
    assert rel.dtype == torch.int64 and src.dtype == torch.int64
    assert list(zip(src.tolist(), dst.tolist(), rel.tolist())) == EXPECTED_SPEAKER_PAIR
    assert g.ndata["speaker"].tolist() == [0, 1, 0, 2, 1]
    assert g.in_degrees().tolist() == [2, 3, 4, 4, 3]


def test_single_utterance_dialogue_has_one_self_loop():
    g = build_dialogue_graph(["Ross"], GraphParams(window_past=10, window_future=10))
    assert g.num_nodes() == 1 and g.edges()[0].tolist() == [0] and g.edata["rel_type"].tolist() == [0]


def run(params) -> None:
    """The build_graphs stage on ``data/prepared/utterances.csv`` into ``data/graphs`` (dvc.yaml's paths)."""
    build_graphs_stage(params, utterances=UTTERANCES, out=GRAPHS)


def test_stage_run_and_load_graphs_round_trip(stage_dir: Path):
    write_utterances(
        [
            ("train/dia0_utt0", "a", "A", ""),
            ("train/dia0_utt1", "b", "B", ""),
            ("train/dia0_utt2", "c", "A", ""),
            ("train/dia0_utt3", "d", "C", ""),
            ("train/dia0_utt4", "e", "B", ""),
            ("train/dia1_utt0", "f", "Ross", ""),
            ("train/dia1_utt1", "g", "Ross", ""),
            ("test/dia0_utt0", "h", "Joey", ""),
        ]
    )
    params = parse_params({"graph": {"window_past": 2, "window_future": 1, "relations": "same_other"}})
    run(params)
    graphs, relations = load_graphs(GRAPHS)
    assert relations == 5
    assert list(graphs) == ["train/0", "train/1", "test/0"]
    g = graphs["train/0"]
    src, dst = g.edges()
    assert list(zip(src.tolist(), dst.tolist(), g.edata["rel_type"].tolist())) == EXPECTED_SAME_OTHER
    assert g.ndata["speaker"].tolist() == [0, 1, 0, 2, 1]
    pair = graphs["train/1"]
    assert list(zip(*[t.tolist() for t in pair.edges()], pair.edata["rel_type"].tolist())) == [
        (0, 0, 0),
        (1, 0, 2),
        (0, 1, 1),
        (1, 1, 0),
    ]
    assert graphs["test/0"].num_edges() == 1
    index = json.loads(Path("data/graphs/index.json").read_text())
    assert index["edges"] == 16 + 4 + 1 and index["relations"] == "same_other"
    # The graphs batch for message passing (what train does).
    batch = dgl.batch(list(graphs.values()))
    assert batch.num_nodes() == 8 and batch.num_edges() == 21
    # byte-identical when rebuilt: DVC hashes (and `dvc checkout` in a fresh clone) depend on it
    first = Path("data/graphs/graphs.safetensors").read_bytes()
    run(params)
    assert Path("data/graphs/graphs.safetensors").read_bytes() == first


TWO_SPEAKER_ROWS = [
    ("train/dia0_utt0", "a", "Ross", ""),
    ("train/dia0_utt1", "b", "Rachel", ""),
    ("train/dia0_utt2", "c", "Ross", ""),
    ("train/dia1_utt0", "d", "Joey", ""),
    ("dev/dia0_utt0", "e", "Monica", ""),
    ("dev/dia0_utt1", "f", "Chandler", ""),
    ("test/dia0_utt0", "g", "Phoebe", ""),
]


def test_stage_sizes_speaker_pair_relations_from_the_data(stage_dir: Path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.build_graphs")
    write_utterances(TWO_SPEAKER_ROWS)
    run(parse_params({"graph": {"window_past": 1, "window_future": 1, "relations": "speaker_pair"}}))
    graphs, relations = load_graphs(GRAPHS)
    assert relations == 2 * 2**2 == 8  # graph.max_speakers (9) would give 162
    index = read_index(GRAPHS)
    assert index["relation_speakers"] == 2 and index["num_relations"] == 8
    assert max(int(g.edata["rel_type"].max()) for g in graphs.values()) < 8
    g = graphs["train/0"]  # Ross Rachel Ross, as test_two_speaker_pair_relations_by_hand
    assert g.edata["rel_type"].tolist() == [0, 5, 2, 6, 3, 4, 0]
    assert "8 relation types (speaker_pair: up to 2 speakers a dialogue, graph.max_speakers=9)" in caplog.text

    # one three-speaker dialogue anywhere (here: test) sizes them all
    write_utterances([*TWO_SPEAKER_ROWS, ("test/dia0_utt1", "h", "Gunther", ""), ("test/dia0_utt2", "i", "Ross", "")])
    run(parse_params({"graph": {"relations": "speaker_pair"}}))
    assert load_graphs(GRAPHS)[1] == 18 and read_index(GRAPHS)["relation_speakers"] == 3
    # ... unless the cap is below it: that dialogue is refused (as before)
    with pytest.raises(ValueError, match="dialogue test/0: a dialogue has 3 speakers but graph.max_speakers=2"):
        run(parse_params({"graph": {"relations": "speaker_pair", "max_speakers": 2}}))
    # same_other: 5 relation types, no speaker count
    run(parse_params({"graph": {"relations": "same_other"}}))
    assert load_graphs(GRAPHS)[1] == 5 and read_index(GRAPHS)["relation_speakers"] is None


def test_save_graphs_refuses_relation_types_beyond_the_index(tmp_path: Path):
    graph = GraphParams(relations="speaker_pair", max_speakers=3)
    graphs = {"train/0": build_dialogue_graph(SPEAKERS, graph)}  # built for M = 3
    with pytest.raises(ValueError, match="train/0: relation types beyond the 8"):
        save_graphs(graphs, graph, tmp_path, num_speakers=2)


def test_stage_run_names_the_dialogue_with_too_many_speakers(stage_dir: Path):
    write_utterances(
        [("dev/dia7_utt0", "a", "A", ""), ("dev/dia7_utt1", "b", "B", ""), ("dev/dia7_utt2", "c", "C", "")]
    )
    with pytest.raises(ValueError, match="dialogue dev/7: .*max_speakers=2"):
        run(parse_params({"graph": {"relations": "speaker_pair", "max_speakers": 2}}))
    assert not Path("data/graphs/graphs.safetensors").exists()


def test_load_graphs_before_the_stage_ran(stage_dir: Path):
    with pytest.raises(FileNotFoundError, match="build_graphs"):
        load_graphs(GRAPHS)
