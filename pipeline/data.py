"""Training data: dialogues with their per-modality features, masks, labels and graph, and batching.

A batch is a list of whole dialogues: features are concatenated over the batch's utterances in
dialogue order (``[N, D_m]``), and the graphs are batched with ``dgl.batch`` so that node ``k`` of the
batched graph is row ``k`` of every tensor.

Features are not held in memory: :func:`load_dialogues` maps the feature files
(:func:`pipeline.feature_table.open_table`) and a dialogue reads its rows from them when they are
asked for (:class:`MappedFeatures`), so train and evaluate work on corpora whose features do not fit
in RAM, and a batch costs only the rows of its dialogues.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.dgl_compat import dgl
from pipeline.feature_table import MappedFeatureTable, Rows, feature_path, open_table
from pipeline.graphs import speaker_indices
from pipeline.utterances import Utterance

MODALITIES = ("text", "audio", "visual")


class MappedFeatures(Mapping):
    """One dialogue's features: modality -> ``[T, D_m]`` float32, read from the mapped feature files
    on each access (a fresh, writable copy each time: editing it does not change the dialogue).

    The rows are looked up once (:meth:`MappedFeatureTable.locate`: usually one contiguous slice per
    file); the tables are shared by all dialogues of a :func:`load_dialogues` call. Nothing of the
    features is kept in memory between accesses.
    """

    __slots__ = ("tables", "rows")

    def __init__(self, tables: dict[str, MappedFeatureTable], rows: dict[str, Rows]) -> None:
        self.tables, self.rows = tables, rows

    def __getitem__(self, modality: str) -> torch.Tensor:
        return self.tables[modality].read(self.rows[modality])

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"MappedFeatures({ {m: self.tables[m].path.name for m in self.rows} })"


@dataclass
class Dialogue:
    """One dialogue, ready for the model.

    Attributes:
        dialogue_id: e.g. ``"train/3"``.
        utterance_ids: length T.
        features: modality -> ``[T, D_m]`` float32: a dict of tensors, or, from :func:`load_dialogues`,
            :class:`MappedFeatures`, which reads the rows from the feature files on each access.
        masks: modality -> ``[T]`` bool (True = present).
        emotion, sentiment: ``[T]`` int64 label indices.
        graph: DGL graph with T nodes.
    """

    dialogue_id: str
    utterance_ids: list[str]
    features: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    emotion: torch.Tensor
    sentiment: torch.Tensor
    graph: dgl.DGLGraph

    def __len__(self) -> int:
        return len(self.utterance_ids)


@dataclass
class DialogueBatch:
    """Several dialogues concatenated: N = total utterances, B = dialogues.

    Attributes:
        features / masks: modality -> ``[N, D_m]`` / ``[N]``.
        emotion, sentiment: ``[N]`` int64.
        lengths: ``[B]`` utterances per dialogue (in batch order).
        graph: batched DGL graph with N nodes, ``edata["rel_type"]`` ``[E]``; it stays on the CPU
            (the PyPI DGL build has no CUDA kernels): :meth:`to` moves only the tensors below.
        utterance_ids: length N.
        edge_index: ``[2, E]`` int64, row 0 the source and row 1 the destination node of each edge of
            ``graph`` (same edge order), for graph layers on plain tensors (any device).
        rel_type: ``[E]`` int64 relation type of each edge.
    """

    features: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    emotion: torch.Tensor
    sentiment: torch.Tensor
    lengths: list[int]
    graph: dgl.DGLGraph
    utterance_ids: list[str]
    edge_index: torch.Tensor
    rel_type: torch.Tensor

    def to(self, device: torch.device) -> DialogueBatch:
        """The batch with every tensor on ``device`` (the DGL graph stays where it is, on the CPU).

        On CUDA the tensors are copied from pinned memory without blocking the host.
        """
        cuda = torch.device(device).type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)

        return DialogueBatch(
            {m: move(f) for m, f in self.features.items()},
            {m: move(k) for m, k in self.masks.items()},
            move(self.emotion),
            move(self.sentiment),
            self.lengths,
            self.graph,
            self.utterance_ids,
            move(self.edge_index),
            move(self.rel_type),
        )


def _concat_features(dialogues: list[Dialogue], modality: str) -> torch.Tensor:
    """``[N, D]``: the dialogues' features of one modality, concatenated. Mapped features are read
    straight into the batch's tensor (one copy from the file, none in between)."""
    sources = [d.features for d in dialogues]
    if not all(isinstance(f, MappedFeatures) for f in sources):
        return torch.cat([f[modality] for f in sources])
    tables = [f.tables[modality] for f in sources]
    out = torch.empty((sum(len(d) for d in dialogues), tables[0].dim), dtype=torch.float32)
    start = 0
    for d, f, table in zip(dialogues, sources, tables):
        table.read(f.rows[modality], out=out[start : start + len(d)])
        start += len(d)
    return out


def collate(dialogues: list[Dialogue]) -> DialogueBatch:
    """Concatenate dialogues into one :class:`DialogueBatch`."""
    graph = dgl.batch([d.graph for d in dialogues])
    src, dst = graph.edges()
    return DialogueBatch(
        features={m: _concat_features(dialogues, m) for m in dialogues[0].features},
        masks={m: torch.cat([d.masks[m] for d in dialogues]) for m in dialogues[0].masks},
        emotion=torch.cat([d.emotion for d in dialogues]),
        sentiment=torch.cat([d.sentiment for d in dialogues]),
        lengths=[len(d) for d in dialogues],
        graph=graph,
        utterance_ids=[u for d in dialogues for u in d.utterance_ids],
        edge_index=torch.stack([src, dst]).long(),
        rel_type=graph.edata["rel_type"].long(),
    )


def load_dialogues(
    emotions: list[str],
    sentiments: list[str],
    utterances: list[Utterance],
    features_dir: Path,
    graphs: dict[str, dgl.DGLGraph],
) -> tuple[dict[str, list[Dialogue]], dict[str, dict]]:
    """Join the utterance table, the three feature files of ``features_dir`` and the graphs
    (``{dialogue id: graph}``, :func:`pipeline.graphs.load_graphs`) into dialogues per split.

    Unlabelled utterances (empty emotion / sentiment, for prediction) get label index -1.

    The feature files are mapped, not read (:func:`pipeline.feature_table.open_table`): each dialogue
    finds its rows once here and reads them when its features are used (:class:`MappedFeatures`), so
    memory holds the ids, masks, labels and graphs, not the ``[N, D]`` features. The masks are read
    here (``[T]`` bool copies).

    Returns:
        ({split: [Dialogue, ...]}, {modality: encoder info of its feature file}).

    Raises:
        FileNotFoundError: an upstream stage output is missing.
        ValueError: outputs of different runs disagree (rerun ``dvc repro``).
    """
    tables = {m: open_table(feature_path(m, features_dir)) for m in MODALITIES}
    for table in tables.values():
        table.share_ids(tables[MODALITIES[0]])
    by_dialogue: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_dialogue.setdefault(u.dialogue_id, []).append(u)
    splits: dict[str, list[Dialogue]] = {}
    for dialogue_id, utts in by_dialogue.items():
        ids = [u.utterance_id for u in utts]
        speakers = torch.tensor(speaker_indices([u.speaker for u in utts]))
        graph = graphs.get(dialogue_id)
        # The graph's edges and relation types follow from the speakers in order: check they match.
        if graph is None or graph.num_nodes() != len(ids) or not torch.equal(graph.ndata["speaker"], speakers):
            raise ValueError(f"dialogue {dialogue_id}: graph and utterance table disagree; rerun `dvc repro`")
        # dgl.batch caches these small tensors on each graph the first time it batches it: made here,
        # they are not allocated between the first pass's batch tensors, where they would pin the freed
        # batch memory (glibc's heap then grows by about one copy of the features over the first epoch).
        graph.batch_num_nodes(), graph.batch_num_edges()
        rows = {m: table.locate(ids) for m, table in tables.items()}
        features = MappedFeatures(tables, rows)
        masks = {m: table.read_mask(rows[m]) for m, table in tables.items()}
        splits.setdefault(utts[0].split, []).append(
            Dialogue(
                dialogue_id,
                ids,
                features,
                masks,
                torch.tensor([emotions.index(u.emotion) if u.emotion else -1 for u in utts]),
                torch.tensor([sentiments.index(u.sentiment) if u.sentiment else -1 for u in utts]),
                graphs[dialogue_id],
            )
        )
    return splits, {m: t.info for m, t in tables.items()}


def batch_plan(dialogues: list[Dialogue], batch_size: int, rng: random.Random | None = None) -> list[list[Dialogue]]:
    """The batches of an epoch: ``batch_size`` dialogues each, in an order shuffled with ``rng``
    (in table order without one). Every training process draws the same plan from the same seed."""
    order = list(range(len(dialogues)))
    if rng is not None:
        rng.shuffle(order)
    return [[dialogues[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def batches(dialogues: list[Dialogue], batch_size: int, shuffle: bool, rng: random.Random | None = None):
    """Yield :class:`DialogueBatch` of ``batch_size`` dialogues; shuffled with ``rng`` when asked."""
    for group in batch_plan(dialogues, batch_size, (rng or random.Random(0)) if shuffle else None):
        yield collate(group)
