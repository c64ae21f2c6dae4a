"""Stage ``prepare``: read a dataset release and write one validated utterance table.

Input (``data.layout: meld``), MELD's raw release layout (declare-lab/MELD)::

    <data.root>/train_sent_emo.csv   train_splits/dia{Dialogue_ID}_utt{Utterance_ID}.mp4
    <data.root>/dev_sent_emo.csv     dev_splits_complete/...
    <data.root>/test_sent_emo.csv    output_repeated_splits_test/...

Output: ``data/prepared/utterances.csv`` with one row per utterance, in dialogue order::

    utterance_id, split, dialogue_id, utterance_index, speaker, text, emotion, sentiment, clip

and ``data/prepared/report.json`` (counts, missing clips, repaired text). Policies:

* a clip listed in the CSV but absent from the release: kept text-only or skipped (``data.missing_clip``),
  listed in the report either way;
* cp1252 bytes in UTF-8 text (copies re-saved on Windows): decoded as cp1252 and counted;
* an unknown emotion or sentiment, a duplicate id, a missing column, a non-integer id: a
  :class:`DatasetError` naming the file, the row and the fix.

Run: ``python -m pipeline.prepare [--params params.yaml]``.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.config import Params, run_stage
from pipeline.features import atomic_path, write_json

log = logging.getLogger(__name__)

PREPARED_DIR = Path("data/prepared")
UTTERANCES = PREPARED_DIR / "utterances.csv"
REPORT = PREPARED_DIR / "report.json"

MELD_SPLITS = {  # split -> (CSV file, clip folder)
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
MELD_COLUMNS = ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")


class DatasetError(ValueError):
    """The dataset release is malformed; the message names the file, the row and what to do."""


@dataclass(frozen=True)
class Utterance:
    """One row of the utterance table. ``clip`` is empty when the utterance has no media."""

    utterance_id: str
    split: str
    dialogue_id: str
    utterance_index: int
    speaker: str
    text: str
    emotion: str
    sentiment: str
    clip: str


def _cp1252_fallback(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decode a byte that is not valid UTF-8 as cp1252 (MELD copies re-saved on Windows: ``\\x92``)."""
    bad = err.object[err.start:err.end]
    return bad.decode("cp1252", errors="replace"), err.end


codecs.register_error("meld_cp1252", _cp1252_fallback)


def read_text(path: Path) -> tuple[str, int]:
    """Read a text file as UTF-8, decoding stray cp1252 bytes; returns (text, number of bytes repaired)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        invalid = len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))
        return raw.decode("utf-8-sig", errors="meld_cp1252"), invalid


def read_meld_split(root: Path, split: str, params: Params) -> tuple[list[Utterance], dict]:
    """Read one MELD split CSV and locate its clips.

    Returns:
        (utterances in dialogue order, a report dict: rows, repaired bytes, missing clips).

    Raises:
        DatasetError: missing file or column, bad id, unknown label, duplicate utterance.
    """
    csv_name, clip_dir = MELD_SPLITS[split]
    path = root / csv_name
    if not path.exists():
        raise DatasetError(f"{path}: not found; data.root must hold MELD's {', '.join(c for c, _ in MELD_SPLITS.values())}")
    text, repaired = read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing_cols = [c for c in MELD_COLUMNS if c not in (reader.fieldnames or [])]
    if missing_cols:
        raise DatasetError(f"{path}: missing column(s) {missing_cols}; found {reader.fieldnames}")
    emotions, sentiments = set(params.data.emotions), set(params.data.sentiments)
    rows: list[Utterance] = []
    seen: dict[tuple[int, int], int] = {}
    missing_clips: list[str] = []
    row_no = 0
    for row_no, row in enumerate(reader, start=1):
        where = f"{path}, row {row_no} (line {reader.line_num})"
        try:
            d, u = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: Dialogue_ID/Utterance_ID must be integers, got "
                               f"{row['Dialogue_ID']!r}/{row['Utterance_ID']!r}") from None
        emotion = (row["Emotion"] or "").strip().lower()
        sentiment = (row["Sentiment"] or "").strip().lower()
        if emotion not in emotions:
            raise DatasetError(f"{where}: unknown emotion {row['Emotion']!r}; known: {params.data.emotions}. "
                               "Fix the row, or add the label to data.emotions in params.yaml")
        if sentiment not in sentiments:
            raise DatasetError(f"{where}: unknown sentiment {row['Sentiment']!r}; known: {params.data.sentiments}. "
                               "Fix the row, or add the label to data.sentiments in params.yaml")
        if (d, u) in seen:
            raise DatasetError(f"{where}: duplicate utterance Dialogue_ID={d}, Utterance_ID={u} "
                               f"(first at row {seen[d, u]}); remove one of the two rows")
        seen[d, u] = row_no
        clip = root / clip_dir / f"dia{d}_utt{u}.mp4"
        clip_field = clip.as_posix()
        if not clip.exists():
            missing_clips.append(f"{split}/dia{d}_utt{u}")
            if params.data.missing_clip == "skip":
                continue
            clip_field = ""
        rows.append(Utterance(
            utterance_id=f"{split}/dia{d}_utt{u}", split=split, dialogue_id=f"{split}/{d}",
            utterance_index=u, speaker=(row["Speaker"] or "").strip(),
            text=" ".join((row["Utterance"] or "").split()), emotion=emotion, sentiment=sentiment,
            clip=clip_field,
        ))
    rows.sort(key=lambda r: (int(r.dialogue_id.split("/")[1]), r.utterance_index))
    report = {"rows": row_no, "kept": len(rows), "repaired_bytes": repaired,
              "missing_clips": missing_clips}
    return rows, report


def prepare(params: Params) -> tuple[list[Utterance], dict]:
    """Read the dataset named by ``params.data`` into an utterance table and a report."""
    root = params.data.root
    if not root.is_dir():
        raise DatasetError(f"data.root {root} is not a directory; point data.root in params.yaml at the release")
    utterances: list[Utterance] = []
    report: dict = {"layout": params.data.layout, "root": str(root), "missing_clip_policy": params.data.missing_clip,
                    "splits": {}}
    for split in MELD_SPLITS:
        rows, split_report = read_meld_split(root, split, params)
        utterances += rows
        split_report["dialogues"] = len({r.dialogue_id for r in rows})
        split_report["emotions"] = dict(Counter(r.emotion for r in rows))
        report["splits"][split] = split_report
    report["empty_text"] = [u.utterance_id for u in utterances if not u.text]
    report["speakers"] = len({u.speaker for u in utterances})
    return utterances, report


def write_utterances(utterances: list[Utterance], path: Path = UTTERANCES) -> None:
    """Write the utterance table atomically (UTF-8 CSV)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, [fl.name for fl in fields(Utterance)])
        writer.writeheader()
        writer.writerows(asdict(u) for u in utterances)


def load_utterances(path: Path = UTTERANCES) -> list[Utterance]:
    """Read the table written by this stage, in its row order (dialogue order).

    Raises:
        FileNotFoundError: the stage has not run (``dvc repro prepare``).
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: utterance table not found; run the prepare stage (`dvc repro prepare`)")
    with open(path, newline="", encoding="utf-8") as f:
        return [Utterance(**{**row, "utterance_index": int(row["utterance_index"])}) for row in csv.DictReader(f)]


def run(params: Params) -> None:
    """Run the stage: write the utterance table and the report, log what was left out."""
    utterances, report = prepare(params)
    for split, r in report["splits"].items():
        if r["missing_clips"]:
            shown = ", ".join(r["missing_clips"][:10]) + (" ..." if len(r["missing_clips"]) > 10 else "")
            log.warning("%s: %d clip(s) listed in the CSV are missing from the release (policy %s; "
                        "all listed in %s): %s", split, len(r["missing_clips"]), params.data.missing_clip, REPORT, shown)
        if r["repaired_bytes"]:
            log.warning("%s: decoded %d cp1252 byte(s) in UTF-8 text", split, r["repaired_bytes"])
    if report["empty_text"]:
        log.warning("%d utterance(s) have empty text (text modality masked): %s",
                    len(report["empty_text"]), ", ".join(report["empty_text"]))
    write_utterances(utterances)
    write_json(report, REPORT)
    log.info("prepare: %d utterances in %d dialogues -> %s", len(utterances),
             len({u.dialogue_id for u in utterances}), UTTERANCES)


if __name__ == "__main__":
    run_stage(run, "Read a dataset release (data.*) into data/prepared/utterances.csv.")
