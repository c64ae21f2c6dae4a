"""Stage ``prepare``: read a dataset release and write one validated utterance table.

Input: the layout ``data.layout`` names under ``data.root`` (MELD's raw release, IEMOCAP's full
release, or a generic manifest; see :mod:`pipeline.datasets`).

Output, in the folder ``--out`` names (``data/prepared/`` in ``dvc.yaml``):

* ``utterances.csv``: one row per utterance, in dialogue order (the fields of :class:`Utterance`)::

      utterance_id, split, dialogue_id, utterance_index, speaker, text, emotion, sentiment,
      clip, audio_clip, start, end

* ``labels.json``: the emotion and sentiment classes, in model-output order (train and evaluate read
  them from here, not from params: label sets are data);
* ``report.json``: counts per split and class, missing clips, repaired text, dropped labels.

Label policy, the same for every layout: raw labels are lower-cased and mapped through
``data.label_map``; the class list is ``data.emotions`` when given, else the one the dataset declares;
an emotion outside it stops the stage with the file and row (``data.unknown_label: error``) or drops
the utterance with a count (``skip``). A dataset without sentiment labels gets them from the emotion
through ``data.sentiment_map`` over :data:`DEFAULT_SENTIMENT_MAP`.

Run: ``python -m pipeline.prepare --out data/prepared [--params params.yaml]``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import DataParams, Params
from pipeline.datasets import READERS, DatasetError, RawDataset
from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, Utterance, write_utterances

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"

# emotion -> sentiment where a dataset has no sentiment labels. IEMOCAP's mapping follows GraphSmile
# (lijfrank-open/GraphSmile): sad/ang/fru negative, neu neutral, hap/exc positive. Ambiguous emotions
# (surprise) are left out on purpose: give a sentiment column or data.sentiment_map.
DEFAULT_SENTIMENT_MAP = {
    "neu": "neutral",
    "neutral": "neutral",
    "hap": "positive",
    "exc": "positive",
    "happy": "positive",
    "happiness": "positive",
    "joy": "positive",
    "excited": "positive",
    "sad": "negative",
    "ang": "negative",
    "fru": "negative",
    "sadness": "negative",
    "anger": "negative",
    "angry": "negative",
    "frustrated": "negative",
    "frustration": "negative",
    "disgust": "negative",
    "fear": "negative",
}


def apply_label_policy(dataset: RawDataset, data: DataParams) -> tuple[list[Utterance], dict, dict]:
    """Map, check and complete the labels of a dataset's rows.

    Returns:
        (kept utterances, ``{"emotions": [...], "sentiments": [...]}``, a report of what was mapped,
        derived and dropped).

    Raises:
        DatasetError: an unknown emotion or sentiment (``data.unknown_label: error``), or an emotion
            without a sentiment to derive; the message names the file and row and the fix.
    """
    label_map = data.label_map
    emotions = (
        list(data.emotions)
        if data.emotions is not None
        else list(dict.fromkeys(label_map.get(e, e) for e in dataset.emotions))
    )
    sentiments = list(data.sentiments) if data.sentiments is not None else list(dataset.sentiments)
    sentiment_map = {**DEFAULT_SENTIMENT_MAP, **data.sentiment_map}
    kept: list[Utterance] = []
    dropped: Counter[str] = Counter()
    mapped: Counter[str] = Counter()
    derived = 0
    for utt, where in dataset.rows:
        emotion = label_map.get(utt.emotion, utt.emotion)
        if emotion != utt.emotion:
            mapped[f"{utt.emotion}->{emotion}"] += 1
        if emotion not in emotions:
            if data.unknown_label == "skip":
                dropped[emotion or "(empty)"] += 1
                continue
            raise DatasetError(
                f"{where}: unknown emotion {utt.emotion!r}; known: {emotions}. Fix the row, map it "
                "with data.label_map, add it to data.emotions, or set data.unknown_label: skip"
            )
        sentiment = utt.sentiment
        if not sentiment:
            if emotion not in sentiment_map:
                raise DatasetError(
                    f"{where}: no sentiment label and none derivable from emotion {emotion!r}; "
                    f"add a sentiment column or data.sentiment_map.{emotion} in params.yaml"
                )
            sentiment, derived = sentiment_map[emotion], derived + 1
        if sentiment not in sentiments:
            raise DatasetError(
                f"{where}: unknown sentiment {utt.sentiment or sentiment!r}; known: {sentiments}. "
                "Fix the row, or set data.sentiments in params.yaml"
            )
        kept.append(dataclasses.replace(utt, emotion=emotion, sentiment=sentiment))
    report = {
        "label_map": dict(mapped),
        "sentiment_derived": derived,
        "unknown_label_policy": data.unknown_label,
        "dropped_unknown_labels": dict(dropped),
    }
    return kept, {"emotions": emotions, "sentiments": sentiments}, report


def prepare(params: Params) -> tuple[list[Utterance], dict, dict]:
    """Read the dataset named by ``params.data`` into an utterance table, its labels and a report.

    Returns:
        (utterances in dialogue order, ``{"emotions", "sentiments"}``, report dict).

    Raises:
        DatasetError: the release is missing or malformed (the message says where and what to do).
    """
    data = params.data
    if not data.root.exists():
        raise DatasetError(f"data.root {data.root} does not exist; point data.root in params.yaml at the release")
    if data.layout != "manifest" and not data.root.is_dir():
        raise DatasetError(f"data.root {data.root} is not a directory; the {data.layout} layout is a folder")
    dataset = READERS[data.layout](data.root, data)
    utterances, labels, label_report = apply_label_policy(dataset, data)
    report: dict = {
        "layout": data.layout,
        "root": str(data.root),
        "missing_clip_policy": data.missing_clip,
        **dataset.report,
        **label_report,
        "labels": labels,
        "splits": {},
    }
    for split in ("train", "dev", "test"):
        rows = [u for u in utterances if u.split == split]
        report["splits"][split] = {
            **dataset.split_reports.get(split, {}),
            "kept": len(rows),
            "dialogues": len({u.dialogue_id for u in rows}),
            "emotions": dict(Counter(u.emotion for u in rows)),
        }
    report["empty_text"] = [u.utterance_id for u in utterances if not u.text]
    report["speakers"] = len({u.speaker for u in utterances})
    return utterances, labels, report


def run(params: Params, out: Path) -> None:
    """Run the stage: write the utterance table, the labels and the report into ``out``; log what was left out."""
    utterances, labels, report = prepare(params)
    for split, r in report["splits"].items():
        if r.get("missing_clips"):
            shown = ", ".join(r["missing_clips"][:10]) + (" ..." if len(r["missing_clips"]) > 10 else "")
            log.warning(
                "%s: %d clip(s) listed are missing from the release (policy %s; all listed in %s): %s",
                split,
                len(r["missing_clips"]),
                params.data.missing_clip,
                out / REPORT_FILE,
                shown,
            )
        if r.get("repaired_bytes"):
            log.warning("%s: decoded %d cp1252 byte(s) in UTF-8 text", split, r["repaired_bytes"])
    if report["dropped_unknown_labels"]:
        log.warning(
            "left out utterances with labels outside %s: %s", labels["emotions"], report["dropped_unknown_labels"]
        )
    if report["empty_text"]:
        shown = ", ".join(report["empty_text"][:10]) + (" ..." if len(report["empty_text"]) > 10 else "")
        log.warning("%d utterance(s) have empty text (text modality masked): %s", len(report["empty_text"]), shown)
    write_utterances(utterances, out / UTTERANCES_FILE)
    write_json(labels, out / LABELS_FILE)
    write_json(report, out / REPORT_FILE)
    log.info(
        "prepare: %d utterances in %d dialogues, %d emotion classes %s -> %s",
        len(utterances),
        len({u.dialogue_id for u in utterances}),
        len(labels["emotions"]),
        labels["emotions"],
        out / UTTERANCES_FILE,
    )


if __name__ == "__main__":
    run_stage(
        run,
        "Read a dataset release (data.*) into an utterance table.",
        {"out": "output folder: utterances.csv, labels.json, report.json"},
    )
