"""The utterance table: the row type every stage shares, and the files ``prepare`` writes.

``prepare`` writes, into its output folder, ``utterances.csv`` (one row per utterance in dialogue
order, the fields of :class:`Utterance`) and ``labels.json`` (the emotion and sentiment classes in
model-output order); the other stages read them with :func:`load_utterances` and :func:`load_labels`.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.atomic import atomic_path

UTTERANCES_FILE = "utterances.csv"
LABELS_FILE = "labels.json"


def allow_long_fields() -> None:
    """Let Python's csv module read cells of any length.

    Its default limit, 131,072 characters per cell, stops a reader with ``_csv.Error: field larger
    than field limit`` on one long transcript cell; every CSV reader of the pipeline calls this first
    (the limit is process-wide; raising it changes nothing else).
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class Utterance:
    """One row of the utterance table.

    Attributes:
        utterance_id: unique over the whole table, e.g. ``train/dia0_utt2``.
        split: ``train``, ``dev`` or ``test``.
        dialogue_id: unique over the table (e.g. ``train/0``); rows of a dialogue are consecutive.
        utterance_index: position in the dialogue (sortable; MELD's Utterance_ID).
        speaker: speaker name (graph relations use it).
        text: the transcript, whitespace-normalised; empty = text modality masked.
        emotion / sentiment: class labels (lower case); empty when unlabelled (prediction).
        clip: media file holding the utterance (video with sound, or audio only); empty = no media.
        audio_clip: a separate audio file (IEMOCAP's dialogue wav); empty = the audio of ``clip``.
        start / end: the utterance's segment in seconds within the media files; None = whole file.
    """

    utterance_id: str
    split: str
    dialogue_id: str
    utterance_index: int
    speaker: str
    text: str
    emotion: str
    sentiment: str
    clip: str = ""
    audio_clip: str = ""
    start: float | None = None
    end: float | None = None

    @property
    def audio_source(self) -> str:
        """The file to decode audio from (``audio_clip`` when set, else ``clip``; may be empty)."""
        return self.audio_clip or self.clip


def write_utterances(utterances: list[Utterance], path: str | Path) -> None:
    """Write the utterance table atomically (UTF-8 CSV; ``start``/``end`` empty when None)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, [fl.name for fl in fields(Utterance)])
        writer.writeheader()
        for u in utterances:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(u).items()})


def load_utterances(path: str | Path) -> list[Utterance]:
    """Read an utterance table written by ``prepare``, in its row order (dialogue order).

    Raises:
        FileNotFoundError: the stage has not run (``dvc repro prepare``).
        ValueError: a table written by an older version of this stage (rerun it).
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: utterance table not found; run the prepare stage (`dvc repro prepare`)")
    allow_long_fields()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [fl.name for fl in fields(Utterance) if fl.name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: columns {missing} missing (written by an older version); "
                "rerun the prepare stage (`dvc repro prepare`)"
            )
        return [
            Utterance(
                **{
                    **row,
                    "utterance_index": int(row["utterance_index"]),
                    "start": float(row["start"]) if row["start"] else None,
                    "end": float(row["end"]) if row["end"] else None,
                }
            )
            for row in reader
        ]


def load_labels(path: str | Path) -> dict[str, list[str]]:
    """The class lists written by ``prepare``: ``{"emotions": [...], "sentiments": [...]}``.

    Raises:
        FileNotFoundError: the stage has not run (``dvc repro prepare``).
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: label file not found; run the prepare stage (`dvc repro prepare`)")
    return json.loads(Path(path).read_text(encoding="utf-8"))
