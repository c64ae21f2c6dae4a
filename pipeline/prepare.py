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
from pipeline.datasets import MELD_SPLITS, READERS, RawDataset, RowErrors, check_root
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


def apply_label_policy(
    dataset: RawDataset, data: DataParams, errors: RowErrors | None = None
) -> tuple[list[Utterance], dict, dict]:
    """Map, check and complete the labels of a dataset's rows.

    Args:
        errors: where bad rows go; None: collected here and raised at the end (all in one message).

    Returns:
        (kept utterances, ``{"emotions": [...], "sentiments": [...]}``, a report of what was mapped,
        derived and dropped: ``label_map`` counts, ``sentiment_derived`` (the utterance ids whose
        sentiment came from their emotion), ``dropped_unknown_labels`` (count per label) and
        ``dropped_rows`` (``{"row", "utterance_id", "emotion"}`` of each utterance left out)).

    Raises:
        DatasetError: with ``errors=None``, every unknown emotion or sentiment (``data.unknown_label:
            error``) and every emotion without a sentiment to derive; each message names the file and
            row and the fix.
    """
    own = errors is None
    errors = RowErrors() if errors is None else errors
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
    dropped_rows: list[dict] = []
    mapped: Counter[str] = Counter()
    derived: list[str] = []
    for utt, where in dataset.rows:
        emotion = label_map.get(utt.emotion, utt.emotion)
        if emotion != utt.emotion:
            mapped[f"{utt.emotion}->{emotion}"] += 1
        if emotion not in emotions:
            if data.unknown_label == "skip":
                dropped[emotion or "(empty)"] += 1
                dropped_rows.append({"row": where, "utterance_id": utt.utterance_id, "emotion": utt.emotion})
                continue
            errors.add(
                f"{where}: unknown emotion {utt.emotion!r}; known: {emotions}. Fix the row, map it "
                "with data.label_map, add it to data.emotions, or set data.unknown_label: skip"
            )
            continue
        sentiment = utt.sentiment
        if not sentiment:
            if emotion not in sentiment_map:
                errors.add(
                    f"{where}: no sentiment label and none derivable from emotion {emotion!r}; "
                    f"add a sentiment column or data.sentiment_map.{emotion} in params.yaml"
                )
                continue
            sentiment = sentiment_map[emotion]
            derived.append(utt.utterance_id)
        if sentiment not in sentiments:
            errors.add(
                f"{where}: unknown sentiment {utt.sentiment or sentiment!r}; known: {sentiments}. "
                "Fix the row, or set data.sentiments in params.yaml"
            )
            continue
        kept.append(dataclasses.replace(utt, emotion=emotion, sentiment=sentiment))
    report = {
        "label_map": dict(mapped),
        "sentiment_derived": derived,
        "unknown_label_policy": data.unknown_label,
        "dropped_unknown_labels": dict(dropped),
        "dropped_rows": dropped_rows,
    }
    if own:
        errors.check()
    return kept, {"emotions": emotions, "sentiments": sentiments}, report


def prepare(params: Params) -> tuple[list[Utterance], dict, dict]:
    """Read the dataset named by ``params.data`` into an utterance table, its labels and a report.

    Returns:
        (utterances in dialogue order, ``{"emotions", "sentiments"}``, report dict).

    Bad rows of the reader and of the label policy are collected (:class:`pipeline.datasets.RowErrors`)
    and raised together, so one run lists them all.

    Raises:
        DatasetError: the release is missing or malformed (the message says where and what to do).
    """
    data = params.data
    check_root(data)
    errors = RowErrors()
    dataset = READERS[data.layout](data.root, data, errors=errors)
    utterances, labels, label_report = apply_label_policy(dataset, data, errors)
    errors.check()
    report: dict = {
        "layout": data.layout,
        "root": str(data.root),
        "missing_clip_policy": data.missing_clip,
        **dataset.report,
        **label_report,
        "labels": labels,
        "splits": {},
    }
    for key in ROW_LISTS:  # one list each over the whole dataset (MELD reads them per split)
        report[key] = report.get(key, []) + [
            item for split in MELD_SPLITS for item in dataset.split_reports.get(split, {}).pop(key, [])
        ]
    for split in MELD_SPLITS:
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


# Per-row lists of the report that the readers fill: rows whose cp1252 was repaired, clips that are links
# to nothing, MELD rows whose EndTime precedes their StartTime.
ROW_LISTS = ("cp1252_repaired", "dangling_symlinks", "end_before_start")

# What a split without utterances means for the stages after prepare.
EMPTY_SPLIT = {
    "train": "`train` cannot run (dvc repro stops there); `evaluate` and `predict` with a trained checkpoint work",
    "dev": "`train` cannot run (it selects its checkpoint on dev); `evaluate` and `predict` with a checkpoint work",
    "test": "`evaluate` has nothing to score; training works",
}


def _shown(items: list, limit: int = 5) -> str:
    """The first ``limit`` items as text, then how many more."""
    return ", ".join(str(i) for i in items[:limit]) + (f" ... (+{len(items) - limit})" if len(items) > limit else "")


def log_policies(report: dict, params: Params, report_path: Path) -> None:
    """One warning per policy that touched rows (the report lists every row): missing clips and
    dangling links, empty or absent splits, repaired cp1252, MELD times out of order, labels left out,
    sentiments derived from emotions, empty transcripts."""
    missing_splits = report.get("missing_splits", {})
    for split, r in report["splits"].items():
        if r.get("missing_clips"):
            log.warning(
                "%s: %d clip(s) listed are missing from the release (policy %s; all listed in %s): %s",
                split,
                len(r["missing_clips"]),
                params.data.missing_clip,
                report_path,
                _shown(r["missing_clips"]),
            )
        if not r["kept"]:
            if split in missing_splits:
                why = f"{missing_splits[split]} not found"
            elif r.get("rows"):
                why = f"none of its {r['rows']} row(s) was kept"
            else:
                why = "the data has no rows for it"
            log.warning("%s split is empty (%s): %s", split, why, EMPTY_SPLIT[split])
    if report["dangling_symlinks"]:
        log.warning(
            "%d clip(s) are symbolic links to nothing (treated as missing): %s",
            len(report["dangling_symlinks"]),
            _shown(report["dangling_symlinks"]),
        )
    if report["cp1252_repaired"]:
        log.warning(
            "%d row(s) held cp1252 in UTF-8 text (%d characters decoded as cp1252, e.g. U+0092 -> \u2019): %s",
            len(report["cp1252_repaired"]),
            sum(r["characters"] for r in report["cp1252_repaired"]),
            _shown([r["row"] for r in report["cp1252_repaired"]], 3),
        )
    if report["end_before_start"]:
        log.warning(
            "%d MELD row(s) have an EndTime before their StartTime (kept: each utterance has its own clip): %s",
            len(report["end_before_start"]),
            _shown([r["row"] for r in report["end_before_start"]], 3),
        )
    if report["dropped_rows"]:
        log.warning(
            "left out %d utterance(s) with labels outside %s (data.unknown_label: skip) %s: %s",
            len(report["dropped_rows"]),
            report["labels"]["emotions"],
            report["dropped_unknown_labels"],
            _shown([r["row"] for r in report["dropped_rows"]], 3),
        )
    if report["sentiment_derived"]:
        log.warning(
            "%d sentiment label(s) derived from the emotion (no sentiment given; data.sentiment_map): %s",
            len(report["sentiment_derived"]),
            _shown(report["sentiment_derived"]),
        )
    if report["empty_text"]:
        log.warning(
            "%d utterance(s) have empty text (text modality masked): %s",
            len(report["empty_text"]),
            _shown(report["empty_text"]),
        )


def run(params: Params, out: Path) -> None:
    """Run the stage: write the utterance table, the labels and the report into ``out``; log every
    policy that touched rows (:func:`log_policies`)."""
    utterances, labels, report = prepare(params)
    log_policies(report, params, out / REPORT_FILE)
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
