"""Dataset layouts: readers that turn a release on disk into utterances with their raw labels.

Each reader returns a :class:`RawDataset`: the utterances (labels lower-cased but not yet checked
against the class list), where each came from (``file, row N`` for error messages), the emotion and
sentiment classes the dataset declares, and a report. :mod:`pipeline.prepare` then applies
``data.label_map``, the class lists and the unknown-label policy, the same way for every layout.

Layouts:

* ``meld`` (:func:`read_meld`): MELD's raw release (declare-lab/MELD), CSVs + one clip per utterance;
* ``iemocap`` (:func:`read_iemocap`): IEMOCAP's full release, one video and one wav per dialogue,
  utterances cut by their start/end times;
* ``manifest`` (:func:`read_manifest`): a generic utterance table (CSV or JSONL) for your own data.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DataParams
from pipeline.utterances import Utterance

MELD_EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
SENTIMENTS = ["negative", "neutral", "positive"]

MELD_SPLITS = {  # split -> (CSV file, clip folder)
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
MELD_COLUMNS = ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")


class DatasetError(ValueError):
    """The dataset release is malformed; the message names the file, the row and what to do."""


@dataclass
class RawDataset:
    """What a layout reader returns, before the label policy is applied.

    Attributes:
        rows: ``(utterance, where)`` in dialogue order; ``where`` names the source file and row.
            ``sentiment`` is empty when the dataset has none (derived later from the emotion).
        emotions / sentiments: the classes the dataset declares, in its canonical order.
        report: layout-specific counts (rows, missing clips, repaired bytes, dropped labels, ...).
        split_reports: per split, what the reader saw (``rows``, ``missing_clips`` ...).
    """

    rows: list[tuple[Utterance, str]]
    emotions: list[str]
    sentiments: list[str]
    report: dict = field(default_factory=dict)
    split_reports: dict[str, dict] = field(default_factory=dict)


def _cp1252_fallback(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decode a byte that is not valid UTF-8 as cp1252 (MELD copies re-saved on Windows: ``\\x92``)."""
    bad = err.object[err.start : err.end]
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


def normalise_text(text: str | None) -> str:
    """Collapse runs of whitespace (newlines, tabs) into single spaces and strip."""
    return " ".join((text or "").split())


def read_meld_split(root: Path, split: str, data: DataParams) -> tuple[list[tuple[Utterance, str]], dict]:
    """Read one MELD split CSV and locate its clips.

    Returns:
        (``(utterance, where)`` in dialogue order, a report dict: rows, repaired bytes, missing clips).

    Raises:
        DatasetError: missing file or column, bad id, duplicate utterance.
    """
    csv_name, clip_dir = MELD_SPLITS[split]
    path = root / csv_name
    if not path.exists():
        raise DatasetError(
            f"{path}: not found; data.root must hold MELD's {', '.join(c for c, _ in MELD_SPLITS.values())}"
        )
    text, repaired = read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing_cols = [c for c in MELD_COLUMNS if c not in (reader.fieldnames or [])]
    if missing_cols:
        raise DatasetError(f"{path}: missing column(s) {missing_cols}; found {reader.fieldnames}")
    rows: list[tuple[Utterance, str]] = []
    seen: dict[tuple[int, int], int] = {}
    missing_clips: list[str] = []
    row_no = 0
    for row_no, row in enumerate(reader, start=1):
        where = f"{path}, row {row_no} (line {reader.line_num})"
        try:
            d, u = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        except (TypeError, ValueError):
            raise DatasetError(
                f"{where}: Dialogue_ID/Utterance_ID must be integers, got "
                f"{row['Dialogue_ID']!r}/{row['Utterance_ID']!r}"
            ) from None
        if (d, u) in seen:
            raise DatasetError(
                f"{where}: duplicate utterance Dialogue_ID={d}, Utterance_ID={u} "
                f"(first at row {seen[d, u]}); remove one of the two rows"
            )
        seen[d, u] = row_no
        clip = root / clip_dir / f"dia{d}_utt{u}.mp4"
        clip_field = clip.as_posix()
        if not clip.exists():
            missing_clips.append(f"{split}/dia{d}_utt{u}")
            if data.missing_clip == "skip":
                continue
            clip_field = ""
        rows.append(
            (
                Utterance(
                    utterance_id=f"{split}/dia{d}_utt{u}",
                    split=split,
                    dialogue_id=f"{split}/{d}",
                    utterance_index=u,
                    speaker=(row["Speaker"] or "").strip(),
                    text=normalise_text(row["Utterance"]),
                    emotion=(row["Emotion"] or "").strip().lower(),
                    sentiment=(row["Sentiment"] or "").strip().lower(),
                    clip=clip_field,
                ),
                where,
            )
        )
    rows.sort(key=lambda r: (int(r[0].dialogue_id.split("/")[1]), r[0].utterance_index))
    return rows, {"rows": row_no, "repaired_bytes": repaired, "missing_clips": missing_clips}


def read_meld(root: Path, data: DataParams) -> RawDataset:
    """MELD's raw release layout (declare-lab/MELD)::

        <root>/train_sent_emo.csv   train_splits/dia{Dialogue_ID}_utt{Utterance_ID}.mp4
        <root>/dev_sent_emo.csv     dev_splits_complete/...
        <root>/test_sent_emo.csv    output_repeated_splits_test/...

    Utterance ids are ``<split>/dia<D>_utt<U>`` (MELD restarts dialogue ids per split). Clips the CSV
    lists but the release lacks are kept text-only or skipped (``data.missing_clip``) and listed.

    Raises:
        DatasetError: a missing CSV or column, a non-integer id, a duplicate utterance.
    """
    dataset = RawDataset([], list(MELD_EMOTIONS), list(SENTIMENTS))
    for split in MELD_SPLITS:
        rows, split_report = read_meld_split(root, split, data)
        dataset.rows += rows
        dataset.split_reports[split] = split_report
    return dataset


def read_iemocap(root: Path, data: DataParams) -> RawDataset:
    """IEMOCAP's full release layout (``IEMOCAP_full_release``), one video and one wav per dialogue::

        <root>/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt    times and labels
        <root>/Session{1..5}/dialog/transcriptions/<dialog>.txt   text
        <root>/Session{1..5}/dialog/avi/DivX/<dialog>.avi          video with sound
        <root>/Session{1..5}/dialog/wav/<dialog>.wav               audio

    Only the EmoEvaluation summary lines ``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[V, A, D]``
    are read (annotator lines are ignored); the text comes from transcription lines
    ``Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`` (other lines are counted in
    ``report["unmatched_transcript_lines"]``; an utterance without one gets empty text, counted in
    ``report["no_transcript"]``). Ids are the utterance names, ``dialogue_id`` the dialog name, the index
    the order of start times, the speaker ``Ses01_F`` (session + gender letter); ``start``/``end`` cut the
    utterance out of the dialogue's avi (``clip``) and wav (``audio_clip``).

    Protocol of COSMIC (declare-lab/conv-emotion) and GraphSmile (lijfrank-open/GraphSmile): the six
    classes hap, sad, neu, ang, exc, fru (``data.label_map: {exc: hap}`` merges excited into happy);
    utterances labelled xxx/oth/sur/fea/dis are dropped and counted in ``report["dropped_labels"]``.
    Session 5 is test; ``data.dev_dialogues`` of the sorted Session 1-4 dialogues, drawn with
    ``random.Random(data.dev_seed).sample``, are dev (``report["dev_dialogues"]``), the rest train
    (108 / 12 / 31 dialogues). A dialogue with neither avi nor wav follows ``data.missing_clip`` and its
    utterances are listed in ``split_reports[split]["missing_clips"]``; one with only one of the two is
    listed in ``report["partial_media"]``.

    Raises:
        DatasetError: no ``Session*/dialog/EmoEvaluation/*.txt`` under root, a label code that is not
            IEMOCAP's, a malformed or duplicate utterance name, too few Session 1-4 dialogues for the
            dev draw.
    """
    evaluations = sorted(
        (p for p in root.glob("Session*/dialog/EmoEvaluation/*.txt") if not p.name.startswith(".")),
        key=lambda p: (p.stem, p),
    )  # skip macOS "._" copies
    if not evaluations:
        raise DatasetError(
            f"{root}: no Session*/dialog/EmoEvaluation/*.txt found; data.root must be IEMOCAP's "
            "full release folder holding Session1..Session5/dialog/{EmoEvaluation,transcriptions,"
            "avi/DivX,wav}/<dialog>.*"
        )
    dialogues: dict[str, tuple[Path, list]] = {}
    seen: dict[str, str] = {}
    for path in evaluations:
        if path.stem in dialogues:
            raise DatasetError(f"{path}: dialogue {path.stem} also in {dialogues[path.stem][0]}; keep one copy")
        dialogues[path.stem] = path, _iemocap_evaluation(path)
        for name, *_, where in dialogues[path.stem][1]:
            if name in seen:
                raise DatasetError(
                    f"{where}: duplicate utterance {name} (also at {seen[name]}); remove the duplicate dialogue or line"
                )
            seen[name] = where
    pool = sorted(d for d, (path, _) in dialogues.items() if path.parents[2].name != "Session5")
    if len(pool) < data.dev_dialogues + 1:
        raise DatasetError(
            f"{root}: {len(pool)} Session 1-4 dialogue(s), need more than data.dev_dialogues="
            f"{data.dev_dialogues} to carve out a dev split and keep a train split; "
            "lower data.dev_dialogues or add sessions"
        )
    dev = set(random.Random(data.dev_seed).sample(pool, data.dev_dialogues))
    report: dict = {
        "dev_dialogues": sorted(dev),
        "dropped_labels": Counter(),
        "partial_media": [],
        "missing_transcriptions": [],
        "unmatched_transcript_lines": 0,
        "no_transcript": 0,
        "repaired_bytes": 0,
    }
    split_reports = {s: {"rows": 0, "missing_clips": []} for s in MELD_SPLITS}
    rows: list[tuple[Utterance, str]] = []
    for dialogue, (path, entries) in sorted(dialogues.items()):
        split = "test" if path.parents[2].name == "Session5" else "dev" if dialogue in dev else "train"
        split_reports[split]["rows"] += len(entries)
        report["dropped_labels"].update(e[3] for e in entries if e[3] not in _IEMOCAP_EMOTIONS)
        kept = sorted((e for e in entries if e[3] in _IEMOCAP_EMOTIONS), key=lambda e: (e[1], e[0]))
        dialog_dir = path.parents[1]
        clip, audio = (
            p.as_posix() if p.is_file() else ""
            for p in (dialog_dir / "avi" / "DivX" / f"{dialogue}.avi", dialog_dir / "wav" / f"{dialogue}.wav")
        )
        if not clip and not audio:
            split_reports[split]["missing_clips"] += [e[0] for e in kept]
            if data.missing_clip == "skip":
                continue
        elif not clip or not audio:
            report["partial_media"].append(dialogue)
        texts = _iemocap_transcription(dialog_dir / "transcriptions" / path.name, report)
        for index, (name, start, end, label, where) in enumerate(kept):
            report["no_transcript"] += name not in texts
            rows.append(
                (
                    Utterance(
                        utterance_id=name,
                        split=split,
                        dialogue_id=dialogue,
                        utterance_index=index,
                        speaker=_iemocap_speaker(name, where),
                        text=texts.get(name, ""),
                        emotion=label,
                        sentiment="",
                        clip=clip,
                        audio_clip=audio,
                        start=start,
                        end=end,
                    ),
                    where,
                )
            )
    report["dropped_labels"] = dict(report["dropped_labels"])
    return RawDataset(rows, list(_IEMOCAP_EMOTIONS), list(SENTIMENTS), report, split_reports)


def read_manifest(path: Path, data: DataParams, require_labels: bool = True) -> RawDataset:
    """A generic utterance manifest for your own data: a ``.csv`` (UTF-8; stray cp1252 bytes decoded) or
    ``.jsonl`` file (one object per line, blank lines ignored), or a folder holding ``manifest.csv`` or
    ``manifest.jsonl``. One row per utterance::

        dialogue_id, utterance_id, speaker, text, emotion, split     required
        sentiment, utterance_index, media, audio, start, end         optional

    ``split`` is train/dev/test and a dialogue lies in one split. ``media`` is a video-with-sound or
    audio-only file, ``audio`` a separate audio file, both relative to the manifest's folder (or
    absolute); a referenced file that does not exist follows ``data.missing_clip`` and is listed in
    ``split_reports[split]["missing_clips"]``; without media columns the manifest is text-only.
    ``start``/``end`` (seconds, ``0 <= start < end``) cut the utterance out of longer files (as IEMOCAP).
    ``utterance_index`` defaults to the row's position in its dialogue; rows are ordered by the
    dialogue's first appearance, then the index. Labels are lower-cased; an empty ``sentiment`` is
    derived from the emotion by :mod:`pipeline.prepare` (GraphSmile's IEMOCAP mapping). The declared
    emotion classes are the sorted labels present. With ``require_labels=False`` (prediction on
    unlabelled transcripts) ``emotion`` may be absent (``""``) and ``split`` defaults to ``test``.

    Raises:
        DatasetError: naming the file and the row (CSV data row / JSONL line) and the fix: no manifest
            or two in a folder, a missing column or key, invalid JSON or a line that is not an object, an
            empty or duplicate utterance_id, an empty dialogue_id, a split outside train/dev/test or a
            dialogue in two splits, a non-integer or duplicate utterance_index, a bad start/end.
    """
    path = _manifest_file(path)
    required = [c for c in _MANIFEST_REQUIRED if require_labels or c not in ("emotion", "split")]
    records, columns, repaired = _manifest_records(path, required)
    dialogues: dict[str, list[tuple[Utterance, str]]] = {}  # in order of first appearance
    seen_at: dict[object, str] = {}  # utterance id, (dialogue id, index) -> where
    split_of: dict[str, tuple[str, str]] = {}
    positions: Counter[str] = Counter()
    emotions: set[str] = set()
    split_reports = {s: {"rows": 0, "missing_clips": []} for s in MELD_SPLITS}
    rows: list[tuple[Utterance, str]] = []
    for where, rec in records:
        uid, did = _cell(rec, "utterance_id"), _cell(rec, "dialogue_id")
        if not uid or not did:
            raise DatasetError(f"{where}: empty {'utterance_id' if not uid else 'dialogue_id'}; give every row one")
        if uid in seen_at:
            raise DatasetError(
                f"{where}: duplicate utterance_id {uid!r} (first at {seen_at[uid]}); utterance ids must be unique"
            )
        seen_at[uid] = where
        split = _cell(rec, "split").lower() or ("" if require_labels else "test")
        if split not in MELD_SPLITS:
            raise DatasetError(f"{where}: split {split!r} is not one of train, dev, test; fix the cell")
        other, other_where = split_of.setdefault(did, (split, where))
        if other != split:
            raise DatasetError(
                f"{where}: dialogue {did!r} is in split {split!r} here but {other!r} at "
                f"{other_where}; a dialogue must lie in one split"
            )
        if "utterance_index" in columns:
            try:
                index = int(_cell(rec, "utterance_index"))
            except ValueError:
                raise DatasetError(
                    f"{where}: utterance_index must be an integer, got "
                    f"{rec.get('utterance_index')!r}; fix the cell or drop the column"
                ) from None
        else:
            index = positions[did]
        positions[did] += 1
        if (did, index) in seen_at:
            raise DatasetError(
                f"{where}: utterance_index {index} repeats in dialogue {did!r} (first at "
                f"{seen_at[did, index]}); give each utterance of a dialogue its own index"
            )
        seen_at[did, index] = where
        start, end = _seconds(rec, "start", where), _seconds(rec, "end", where)
        if (start is not None and start < 0) or (end is not None and end <= (start or 0)):
            raise DatasetError(
                f"{where}: start/end must satisfy 0 <= start < end (seconds), got start={start}, "
                f"end={end}; fix the cells or leave them empty (whole file)"
            )
        emotion = _cell(rec, "emotion").lower()
        emotions.add(emotion)
        split_reports[split]["rows"] += 1
        media = [_manifest_media(path.parent, _cell(rec, key)) for key in ("media", "audio")]
        if any(m is not None and not m.is_file() for m in media):
            split_reports[split]["missing_clips"].append(uid)
            if data.missing_clip == "skip":
                continue
        clip, audio = (m.as_posix() if m is not None and m.is_file() else "" for m in media)
        dialogues.setdefault(did, []).append(
            (
                Utterance(
                    utterance_id=uid,
                    split=split,
                    dialogue_id=did,
                    utterance_index=index,
                    speaker=_cell(rec, "speaker"),
                    text=normalise_text(_cell(rec, "text")),
                    emotion=emotion,
                    sentiment=_cell(rec, "sentiment").lower(),
                    clip=clip,
                    audio_clip=audio,
                    start=start,
                    end=end,
                ),
                where,
            )
        )
    for utterances in dialogues.values():
        rows += sorted(utterances, key=lambda r: r[0].utterance_index)
    report = {"manifest": path.as_posix(), "rows": len(records), "repaired_bytes": repaired}
    return RawDataset(rows, sorted(emotions - {""}), list(SENTIMENTS), report, split_reports)


_IEMOCAP_EMOTIONS = ["hap", "sad", "neu", "ang", "exc", "fru"]  # the standard 6 classes (COSMIC, GraphSmile)
_IEMOCAP_LABELS = _IEMOCAP_EMOTIONS + ["xxx", "oth", "sur", "fea", "dis"]  # the other codes are dropped
_EVALUATION_LINE = re.compile(r"^\s*\[\s*(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\s*\]\s+(\S+)\s+(\S+)")
_TRANSCRIPT_LINE = re.compile(r"^\s*(\S+_[FM]\d+)\s*\[[\d.\s-]+\]\s*:(.*)$")
_MANIFEST_REQUIRED = ("dialogue_id", "utterance_id", "speaker", "text", "emotion", "split")


def _iemocap_evaluation(path: Path) -> list[tuple[str, float, float, str, str]]:
    """The summary lines of an EmoEvaluation file: ``(name, start, end, label, where)`` in file order."""
    entries = []
    for n, line in enumerate(read_text(path)[0].splitlines(), start=1):
        match = _EVALUATION_LINE.match(line)
        if match:
            start, end, name, label = match.groups()
            if label.lower() not in _IEMOCAP_LABELS:
                raise DatasetError(
                    f"{path}, line {n}: unknown IEMOCAP label {label!r} for {name}; expected one "
                    f"of {_IEMOCAP_LABELS} (is this an EmoEvaluation file of the full release?)"
                )
            entries.append((name, float(start), float(end), label.lower(), f"{path}, line {n}"))
    return entries


def _iemocap_transcription(path: Path, report: dict) -> dict[str, str]:
    """Utterance name -> text of a transcription file; counts unmatched lines and a missing file in ``report``."""
    if not path.is_file():
        report["missing_transcriptions"].append(path.stem)
        return {}
    text, repaired = read_text(path)
    report["repaired_bytes"] += repaired
    texts = {}
    for line in filter(str.strip, text.splitlines()):
        match = _TRANSCRIPT_LINE.match(line)
        if match:
            texts[match[1]] = normalise_text(match[2])
        else:
            report["unmatched_transcript_lines"] += 1
    return texts


def _iemocap_speaker(name: str, where: str) -> str:
    """``Ses01F_impro01_M012`` -> ``Ses01_M``: the session and the gender letter of the utterance's actor."""
    gender = name.rsplit("_", 1)[-1][:1]
    if not re.match(r"Ses\d\d", name) or gender not in ("F", "M"):
        raise DatasetError(
            f"{where}: utterance name {name!r} is not like Ses01F_impro01_F000 "
            "(session, dialog, F/M + number); fix the line"
        )
    return f"{name[:5]}_{gender}"


def _manifest_file(path: Path) -> Path:
    """The manifest file ``path`` names (a ``.csv``/``.jsonl`` file, or a folder holding exactly one)."""
    if path.is_dir():
        found = [path / n for n in ("manifest.csv", "manifest.jsonl") if (path / n).is_file()]
        if len(found) != 1:
            raise DatasetError(
                f"{path}: "
                + (
                    "holds both manifest.csv and manifest.jsonl; keep one or point data.root at the file"
                    if found
                    else "holds no manifest.csv or manifest.jsonl; add one or point data.root at the manifest file"
                )
            )
        return found[0]
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise DatasetError(
            f"{path}: a manifest must be a .csv or .jsonl file, or a folder holding manifest.csv or manifest.jsonl"
        )
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found; point data.root at it")
    return path


def _manifest_records(path: Path, required: list[str]) -> tuple[list[tuple[str, dict]], set[str], int]:
    """``(where, record)`` per row of a CSV or JSONL manifest, the columns present and the repaired bytes."""
    text, repaired = read_text(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
        missing = [c for c in required if c not in reader.fieldnames]
        if missing:
            raise DatasetError(
                f"{path}, row 0 (header): missing column(s) {missing}; found {reader.fieldnames}. "
                f"Add them (required: {required})"
            )
        records = [(f"{path}, row {i} (line {reader.line_num})", rec) for i, rec in enumerate(reader, start=1)]
        columns = set(reader.fieldnames)
    else:
        records, columns = [], set()
        for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a string
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: invalid JSON ({err.msg}); write one JSON object per line") from None
            if not isinstance(rec, dict):
                raise DatasetError(
                    f"{where}: expected a JSON object, got {type(rec).__name__}; write one object per line"
                )
            missing = [c for c in required if c not in rec]
            if missing:
                raise DatasetError(f"{where}: missing key(s) {missing}; every object needs {required}")
            records.append((where, rec))
            columns |= rec.keys()
    if not records:
        raise DatasetError(f"{path}: no utterances; add one row per utterance")
    return records, columns, repaired


def _cell(rec: dict, key: str) -> str:
    """A manifest value as a stripped string (absent, null or a short CSV row -> ``""``)."""
    value = rec.get(key)
    return "" if value is None else str(value).strip()


def _seconds(rec: dict, key: str, where: str) -> float | None:
    """``start``/``end`` in seconds (None when absent or empty)."""
    value = _cell(rec, key)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise DatasetError(f"{where}: {key} must be a number of seconds, got {rec.get(key)!r}; fix or empty the cell")
    return seconds


def _manifest_media(base: Path, value: str) -> Path | None:
    """A media cell as a path (relative to the manifest's folder unless absolute); None when empty."""
    return None if not value else Path(value) if Path(value).is_absolute() else base / value


READERS = {"meld": read_meld, "iemocap": read_iemocap, "manifest": read_manifest}
