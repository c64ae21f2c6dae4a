"""Training data: dialogues with their per-modality features, masks, labels and graph, and batching.

A batch is a list of whole dialogues: features are concatenated over the batch's utterances in
dialogue order (``[N, D_m]``), and the graphs are batched with ``dgl.batch`` so that node ``k`` of the
batched graph is row ``k`` of every tensor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.build_graphs import load_graphs, speaker_indices
from pipeline.dgl_compat import dgl
from pipeline.features import feature_path, load_table
from pipeline.prepare import Utterance, load_utterances

MODALITIES = ("text", "audio", "visual")


@dataclass
class Dialogue:
    """One dialogue, ready for the model.

    Attributes:
        dialogue_id: e.g. ``"train/3"``.
        utterance_ids: length T.
        features: modality -> ``[T, D_m]`` float32.
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
    graph: "dgl.DGLGraph"

    def __len__(self) -> int:
        return len(self.utterance_ids)


@dataclass
class DialogueBatch:
    """Several dialogues concatenated: N = total utterances, B = dialogues.

    Attributes:
        features / masks: modality -> ``[N, D_m]`` / ``[N]``.
        emotion, sentiment: ``[N]`` int64.
        lengths: ``[B]`` utterances per dialogue (in batch order).
        graph: batched DGL graph with N nodes, ``edata["rel_type"]`` ``[E]``.
        utterance_ids: length N.
    """

    features: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    emotion: torch.Tensor
    sentiment: torch.Tensor
    lengths: list[int]
    graph: "dgl.DGLGraph"
    utterance_ids: list[str]

    def to(self, device: torch.device) -> "DialogueBatch":
        return DialogueBatch({m: f.to(device) for m, f in self.features.items()},
                             {m: k.to(device) for m, k in self.masks.items()}, self.emotion.to(device),
                             self.sentiment.to(device), self.lengths, self.graph.to(device), self.utterance_ids)


def collate(dialogues: list[Dialogue]) -> DialogueBatch:
    """Concatenate dialogues into one :class:`DialogueBatch`."""
    return DialogueBatch(
        features={m: torch.cat([d.features[m] for d in dialogues]) for m in dialogues[0].features},
        masks={m: torch.cat([d.masks[m] for d in dialogues]) for m in dialogues[0].masks},
        emotion=torch.cat([d.emotion for d in dialogues]),
        sentiment=torch.cat([d.sentiment for d in dialogues]),
        lengths=[len(d) for d in dialogues],
        graph=dgl.batch([d.graph for d in dialogues]),
        utterance_ids=[u for d in dialogues for u in d.utterance_ids],
    )


def load_dialogues(emotions: list[str], sentiments: list[str], utterances: list[Utterance] | None = None,
                   features_dir: Path | None = None, graphs: dict | None = None,
                   ) -> tuple[dict[str, list[Dialogue]], dict[str, dict]]:
    """Join the utterance table, the three feature files and the graphs into dialogues per split.

    Defaults: the prepare stage's table, ``data/features`` and the build_graphs stage's graphs.
    Unlabelled utterances (empty emotion / sentiment, for prediction) get label index -1.

    Returns:
        ({split: [Dialogue, ...]}, {modality: encoder info of its feature file}).

    Raises:
        FileNotFoundError: an upstream stage output is missing.
        ValueError: outputs of different runs disagree (rerun ``dvc repro``).
    """
    utterances = utterances if utterances is not None else load_utterances()
    tables = {m: load_table(feature_path(m) if features_dir is None else features_dir / f"{m}.safetensors")
              for m in MODALITIES}
    if graphs is None:
        graphs, _ = load_graphs()
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
        features, masks = {}, {}
        for m, table in tables.items():
            features[m], masks[m] = table.rows(ids)
        splits.setdefault(utts[0].split, []).append(Dialogue(
            dialogue_id, ids, features, masks,
            torch.tensor([emotions.index(u.emotion) if u.emotion else -1 for u in utts]),
            torch.tensor([sentiments.index(u.sentiment) if u.sentiment else -1 for u in utts]),
            graphs[dialogue_id],
        ))
    return splits, {m: t.info for m, t in tables.items()}


def batches(dialogues: list[Dialogue], batch_size: int, shuffle: bool, rng: random.Random | None = None):
    """Yield :class:`DialogueBatch` of ``batch_size`` dialogues; shuffled with ``rng`` when asked."""
    order = list(range(len(dialogues)))
    if shuffle:
        (rng or random.Random(0)).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([dialogues[i] for i in order[start:start + batch_size]])
