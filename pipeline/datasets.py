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

import csv
import difflib
import io
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DataParams
from pipeline.utterances import Utterance, allow_long_fields

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


MAX_ROW_ERRORS = 50  # row errors listed in one run (the rest are counted)


class RowErrors:
    """The row errors of one read, collected so that one run lists them all (up to ``cap``), then stops.

    A reader adds each bad row's :class:`DatasetError` and goes on with the next row; :meth:`check`
    raises one :class:`DatasetError` listing them. Errors that make the rest meaningless (a missing file
    or column) are raised at once instead.
    """

    def __init__(self, cap: int = MAX_ROW_ERRORS):
        self.cap, self.count, self.messages = cap, 0, []

    def add(self, error: DatasetError | str) -> None:
        self.count += 1
        if len(self.messages) < self.cap:
            self.messages.append(str(error))

    def __len__(self) -> int:
        return self.count

    def check(self) -> None:
        """Raise the collected errors, if any.

        Raises:
            DatasetError: one message per row (the first ``cap``), then how many more there are.
        """
        if not self.count:
            return
        if self.count == 1:
            raise DatasetError(self.messages[0])
        more = f"\n  ... and {self.count - self.cap} more" if self.count > self.cap else ""
        raise DatasetError(f"{self.count} bad rows; fix them all, then rerun:\n  " + "\n  ".join(self.messages) + more)


def read_text(path: Path) -> str:
    """Read a text file as UTF-8 (a BOM is dropped).

    Bytes that are not valid UTF-8 (MELD copies re-saved on Windows hold cp1252 ``\\x92``) come back as
    lone surrogates U+DC80-U+DCFF (``surrogateescape``): :func:`repair_text` decodes them row by row,
    so each repair is reported with its row.
    """
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


_REPAIRABLE = re.compile("[\x80-\x9f\udc80-\udcff]")


def repair_text(value: str) -> tuple[str, int]:
    """Decode the cp1252 that reached a text: stray bytes and C1 control characters.

    Two forms: a byte that is not UTF-8 (a lone surrogate from :func:`read_text`), and a C1 control
    character U+0080-U+009F, which is a cp1252 byte mis-decoded as Latin-1 upstream (U+0092 stands for
    ’). Each becomes the cp1252 character it stands for; the five bytes cp1252 leaves undefined
    (0x81, 0x8D, 0x8F, 0x90, 0x9D) are dropped. Tokenizers drop C1 characters silently.

    Returns:
        (the repaired text, the number of characters repaired).
    """
    count = 0

    def fix(match: re.Match) -> str:
        nonlocal count
        count += 1
        code = ord(match.group())
        return bytes([code - 0xDC00 if code >= 0xDC00 else code]).decode("cp1252", errors="ignore")

    return _REPAIRABLE.sub(fix, value), count


def repair_record(record: dict) -> tuple[dict, int]:
    """:func:`repair_text` on every string value of a row: (the repaired row, characters repaired)."""
    out, total = {}, 0
    for key, value in record.items():
        if isinstance(value, str):
            value, n = repair_text(value)
            total += n
        out[key] = value
    return out, total


def normalise_text(text: str | None) -> str:
    """Collapse runs of whitespace (newlines, tabs) into single spaces and strip."""
    return " ".join((text or "").split())


def _meld_seconds(value: str | None) -> float | None:
    """MELD's ``StartTime``/``EndTime`` (``HH:MM:SS,mmm``) in seconds; None when absent or unreadable."""
    match = re.fullmatch(r"\s*(\d+):(\d\d):(\d\d)[,.](\d{1,3})\s*", value or "")
    if not match:
        return None
    h, m, sec, ms = match.groups()
    return int(h) * 3600 + int(m) * 60 + int(sec) + int(ms.ljust(3, "0")) / 1000


def read_meld_split(
    root: Path, split: str, data: DataParams, errors: RowErrors
) -> tuple[list[tuple[Utterance, str]], dict]:
    """Read one MELD split CSV and locate its clips; bad rows go to ``errors`` (and are left out).

    Returns:
        (``(utterance, where)`` in dialogue order, a report dict: ``rows``, ``missing_clips``,
        ``dangling_symlinks`` (clips that are links to nothing), ``cp1252_repaired`` (rows),
        ``end_before_start`` (rows whose ``EndTime`` precedes their ``StartTime``: kept, as the
        utterance's own clip is used, not the times)).

    Raises:
        DatasetError: a missing column (at once); bad ids and duplicate utterances go to ``errors``.
    """
    csv_name, clip_dir = MELD_SPLITS[split]
    path = root / csv_name
    allow_long_fields()
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    missing_cols = [c for c in MELD_COLUMNS if c not in (reader.fieldnames or [])]
    if missing_cols:
        raise DatasetError(f"{path}: missing column(s) {missing_cols}; found {reader.fieldnames}")
    rows: list[tuple[Utterance, str]] = []
    seen: dict[tuple[int, int], int] = {}
    report: dict = {"rows": 0, "missing_clips": [], "dangling_symlinks": [], "cp1252_repaired": []}
    report["end_before_start"] = []
    for row_no, row in enumerate(reader, start=1):
        report["rows"] = row_no
        where = f"{path}, row {row_no} (line {reader.line_num})"
        row, repaired = repair_record(row)
        try:
            d, u = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        except (TypeError, ValueError):
            errors.add(
                f"{where}: Dialogue_ID/Utterance_ID must be integers, got "
                f"{row['Dialogue_ID']!r}/{row['Utterance_ID']!r}; fix the cells"
            )
            continue
        if (d, u) in seen:
            errors.add(
                f"{where}: duplicate utterance Dialogue_ID={d}, Utterance_ID={u} "
                f"(first at row {seen[d, u]}); remove one of the two rows"
            )
            continue
        seen[d, u] = row_no
        uid = f"{split}/dia{d}_utt{u}"
        if repaired:
            report["cp1252_repaired"].append({"row": where, "utterance_id": uid, "characters": repaired})
        start, end = _meld_seconds(row.get("StartTime")), _meld_seconds(row.get("EndTime"))
        if start is not None and end is not None and end < start:
            report["end_before_start"].append({"row": where, "utterance_id": uid, "start": start, "end": end})
        clip = root / clip_dir / f"dia{d}_utt{u}.mp4"
        clip_field = clip.as_posix()
        if not clip.exists():
            report["missing_clips"].append(uid)
            if clip.is_symlink():
                report["dangling_symlinks"].append(clip.as_posix())
            if data.missing_clip == "skip":
                continue
            clip_field = ""
        rows.append(
            (
                Utterance(
                    utterance_id=uid,
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
    return rows, report


def read_meld(root: Path, data: DataParams, errors: RowErrors | None = None) -> RawDataset:
    """MELD's raw release layout (declare-lab/MELD)::

        <root>/train_sent_emo.csv   train_splits/dia{Dialogue_ID}_utt{Utterance_ID}.mp4
        <root>/dev_sent_emo.csv     dev_splits_complete/...
        <root>/test_sent_emo.csv    output_repeated_splits_test/...

    Utterance ids are ``<split>/dia<D>_utt<U>`` (MELD restarts dialogue ids per split). Clips the CSV
    lists but the release lacks are kept text-only or skipped (``data.missing_clip``) and listed. A
    release with only some of the CSVs (a dev-only copy) is read; the missing splits are listed in
    ``report["missing_splits"]`` (:mod:`pipeline.prepare` says what that means).

    Args:
        errors: where bad rows go; None: collected here and raised at the end.

    Raises:
        DatasetError: none of the three CSVs, a missing column; with ``errors=None`` also the bad rows
            (non-integer ids, duplicate utterances), all of them in one message.
    """
    own = errors is None
    errors = RowErrors() if errors is None else errors
    present = [split for split, (csv_name, _) in MELD_SPLITS.items() if (root / csv_name).is_file()]
    if not present:
        raise DatasetError(
            f"{root}: none of MELD's {', '.join(c for c, _ in MELD_SPLITS.values())} found; "
            "point data.root at the folder that holds them"
        )
    dataset = RawDataset([], list(MELD_EMOTIONS), list(SENTIMENTS))
    dataset.report["missing_splits"] = {
        split: (root / csv_name).as_posix() for split, (csv_name, _) in MELD_SPLITS.items() if split not in present
    }
    for split in present:
        rows, split_report = read_meld_split(root, split, data, errors)
        dataset.rows += rows
        dataset.split_reports[split] = split_report
    if own:
        errors.check()
    return dataset


def read_iemocap(root: Path, data: DataParams, errors: RowErrors | None = None) -> RawDataset:
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

    Stray cp1252 in the transcriptions is decoded (:func:`repair_text`), each repaired line listed in
    ``report["cp1252_repaired"]``.

    Args:
        errors: where bad lines go; None: collected here and raised at the end.

    Raises:
        DatasetError: no ``Session*/dialog/EmoEvaluation/*.txt`` under root, a dialogue found twice, too
            few Session 1-4 dialogues for the dev draw; with ``errors=None`` also the bad lines (a label
            code that is not IEMOCAP's, a malformed or duplicate utterance name), all in one message.
    """
    own = errors is None
    errors = RowErrors() if errors is None else errors
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
        entries = []
        for entry in _iemocap_evaluation(path, errors):
            name, where = entry[0], entry[-1]
            if name in seen:
                errors.add(
                    f"{where}: duplicate utterance {name} (also at {seen[name]}); remove the duplicate dialogue or line"
                )
                continue
            seen[name] = where
            try:
                entries.append((*entry[:4], _iemocap_speaker(name, where), where))
            except DatasetError as err:
                errors.add(err)
        dialogues[path.stem] = path, entries
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
        "cp1252_repaired": [],
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
        for index, (name, start, end, label, speaker, where) in enumerate(kept):
            report["no_transcript"] += name not in texts
            rows.append(
                (
                    Utterance(
                        utterance_id=name,
                        split=split,
                        dialogue_id=dialogue,
                        utterance_index=index,
                        speaker=speaker,
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
    if own:
        errors.check()
    return RawDataset(rows, list(_IEMOCAP_EMOTIONS), list(SENTIMENTS), report, split_reports)


def read_manifest(
    path: Path, data: DataParams, require_labels: bool = True, errors: RowErrors | None = None
) -> RawDataset:
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

    A column (CSV) or key (JSONL) outside these is an error that suggests the nearest known name (a
    misspelt ``media_path`` would otherwise turn every row text-only). Cells of any length are read;
    stray cp1252 is decoded (:func:`repair_text`), each repaired row listed in
    ``report["cp1252_repaired"]``. A media file that is a link to nothing is listed in
    ``report["dangling_symlinks"]``.

    Args:
        errors: where bad rows go; None: collected here and raised at the end (all in one message).

    Raises:
        DatasetError: naming the file and the row (CSV data row / JSONL line) and the fix: no manifest
            or two in a folder, a missing or unknown column (at once); with ``errors=None`` also every
            bad row: a missing or unknown key, invalid JSON or a line that is not an object, an
            empty or duplicate utterance_id, an empty dialogue_id, a split outside train/dev/test or a
            dialogue in two splits, a non-integer or duplicate utterance_index, a bad start/end.
    """
    own = errors is None
    errors = RowErrors() if errors is None else errors
    path = _manifest_file(path)
    required = [c for c in _MANIFEST_REQUIRED if require_labels or c not in ("emotion", "split")]
    records, columns = _manifest_records(path, required, errors)
    repairs: list[dict] = []
    dangling: list[str] = []
    dialogues: dict[str, list[tuple[Utterance, str]]] = {}  # in order of first appearance
    seen_at: dict[object, str] = {}  # utterance id, (dialogue id, index) -> where
    split_of: dict[str, tuple[str, str]] = {}
    positions: Counter[str] = Counter()
    emotions: set[str] = set()
    split_reports = {s: {"rows": 0, "missing_clips": []} for s in MELD_SPLITS}
    rows: list[tuple[Utterance, str]] = []
    for where, rec in records:
        try:
            rec, repaired = repair_record(rec)
            uid, did = _cell(rec, "utterance_id"), _cell(rec, "dialogue_id")
            if not uid or not did:
                raise DatasetError(f"{where}: empty {'utterance_id' if not uid else 'dialogue_id'}; give every row one")
            if uid in seen_at:
                raise DatasetError(
                    f"{where}: duplicate utterance_id {uid!r} (first at {seen_at[uid]}); utterance ids must be unique"
                )
            seen_at[uid] = where
            if repaired:
                repairs.append({"row": where, "utterance_id": uid, "characters": repaired})
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
                dangling += [m.as_posix() for m in media if m is not None and m.is_symlink() and not m.exists()]
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
        except DatasetError as err:
            errors.add(err)
    for utterances in dialogues.values():
        rows += sorted(utterances, key=lambda r: r[0].utterance_index)
    if own:
        errors.check()
    report = {
        "manifest": path.as_posix(),
        "rows": len(records),
        "cp1252_repaired": repairs,
        "dangling_symlinks": dangling,
    }
    return RawDataset(rows, sorted(emotions - {""}), list(SENTIMENTS), report, split_reports)


_IEMOCAP_EMOTIONS = ["hap", "sad", "neu", "ang", "exc", "fru"]  # the standard 6 classes (COSMIC, GraphSmile)
_IEMOCAP_LABELS = _IEMOCAP_EMOTIONS + ["xxx", "oth", "sur", "fea", "dis"]  # the other codes are dropped
_EVALUATION_LINE = re.compile(r"^\s*\[\s*(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\s*\]\s+(\S+)\s+(\S+)")
_TRANSCRIPT_LINE = re.compile(r"^\s*(\S+_[FM]\d+)\s*\[[\d.\s-]+\]\s*:(.*)$")
_MANIFEST_REQUIRED = ("dialogue_id", "utterance_id", "speaker", "text", "emotion", "split")
_MANIFEST_OPTIONAL = ("sentiment", "utterance_index", "media", "audio", "start", "end")


def _iemocap_evaluation(path: Path, errors: RowErrors) -> list[tuple[str, float, float, str, str]]:
    """The summary lines of an EmoEvaluation file: ``(name, start, end, label, where)`` in file order;
    a line with a label code that is not IEMOCAP's goes to ``errors``."""
    entries = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        match = _EVALUATION_LINE.match(line)
        if match:
            start, end, name, label = match.groups()
            if label.lower() not in _IEMOCAP_LABELS:
                errors.add(
                    f"{path}, line {n}: unknown IEMOCAP label {label!r} for {name}; expected one "
                    f"of {_IEMOCAP_LABELS} (is this an EmoEvaluation file of the full release?)"
                )
                continue
            entries.append((name, float(start), float(end), label.lower(), f"{path}, line {n}"))
    return entries


def _iemocap_transcription(path: Path, report: dict) -> dict[str, str]:
    """Utterance name -> text of a transcription file; counts unmatched lines and a missing file in
    ``report``, and lists the lines whose cp1252 was repaired."""
    if not path.is_file():
        report["missing_transcriptions"].append(path.stem)
        return {}
    texts = {}
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        line, repaired = repair_text(line)
        match = _TRANSCRIPT_LINE.match(line)
        if match:
            texts[match[1]] = normalise_text(match[2])
        else:
            report["unmatched_transcript_lines"] += 1
        if repaired:
            report["cp1252_repaired"].append(
                {"row": f"{path}, line {n}", "utterance_id": match[1] if match else None, "characters": repaired}
            )
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
                    "holds both manifest.csv and manifest.jsonl; keep one, or point data.root / --transcript at one"
                    if found
                    else "holds no manifest.csv or manifest.jsonl; add one, or point data.root / --transcript at a file"
                )
            )
        return found[0]
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise DatasetError(
            f"{path}: a manifest must be a .csv or .jsonl file, or a folder holding manifest.csv or manifest.jsonl"
        )
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found; point data.root (predict: --transcript) at it")
    return path


def _unknown_columns(names, where: str) -> str | None:
    """The message for manifest columns/keys that are not known (None when all are), with the nearest
    known name for each."""
    known = _MANIFEST_REQUIRED + _MANIFEST_OPTIONAL
    unknown = [n for n in names if n not in known]
    if not unknown:
        return None
    hints = []
    for name in unknown:
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hints.append(f"{name!r} (did you mean {near[0]!r}?)" if near else repr(name))
    return (
        f"{where}: unknown column(s) {', '.join(hints)}; a manifest has {list(_MANIFEST_REQUIRED)} and "
        f"optionally {list(_MANIFEST_OPTIONAL)}. Rename or remove them"
    )


def _manifest_records(path: Path, required: list[str], errors: RowErrors) -> tuple[list[tuple[str, dict]], set[str]]:
    """``(where, record)`` per row of a CSV or JSONL manifest, and the columns present; bad JSONL lines
    go to ``errors``.

    Raises:
        DatasetError: a CSV header with a missing or unknown column; a manifest without rows.
    """
    text = read_text(path)
    if path.suffix.lower() == ".csv":
        allow_long_fields()
        reader = csv.DictReader(io.StringIO(text, newline=""))
        reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
        where = f"{path}, row 0 (header)"
        missing = [c for c in required if c not in reader.fieldnames]
        if missing:
            raise DatasetError(
                f"{where}: missing column(s) {missing}; found {reader.fieldnames}. Add them (required: {required})"
            )
        unknown = _unknown_columns(reader.fieldnames, where)
        if unknown:
            raise DatasetError(unknown)
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
                errors.add(f"{where}: invalid JSON ({err.msg}); write one JSON object per line")
                continue
            if not isinstance(rec, dict):
                errors.add(f"{where}: expected a JSON object, got {type(rec).__name__}; write one object per line")
                continue
            missing = [c for c in required if c not in rec]
            unknown = _unknown_columns(rec, where)
            if missing or unknown:
                errors.add(unknown or f"{where}: missing key(s) {missing}; every object needs {required}")
                continue
            records.append((where, rec))
            columns |= rec.keys()
    if not records and not errors:
        raise DatasetError(f"{path}: no utterances; add one row per utterance")
    return records, columns


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


def check_root(data: DataParams) -> None:
    """Check that ``data.root`` exists and has the layout's kind (a folder; a manifest may be a file).

    Raises:
        DatasetError: naming ``data.root`` and what to set it to.
    """
    if not data.root.exists():
        raise DatasetError(
            f"data.root {data.root} does not exist; point data.root in params.yaml at the "
            f"{data.layout} release (see the README, Data)"
        )
    if data.layout != "manifest" and not data.root.is_dir():
        raise DatasetError(f"data.root {data.root} is not a directory; the {data.layout} layout is a folder")
