"""Dataset layouts: IEMOCAP's full release and the generic manifest (CSV / JSONL), on tiny fake trees."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest

from pipeline.config import DataParams, parse_params
from pipeline.datasets import DatasetError, read_iemocap, read_manifest
from pipeline.prepare import prepare
from pipeline.utterances import Utterance

SIX = ["hap", "sad", "neu", "ang", "exc", "fru"]

# ----------------------------------------------------------------------------------------- IEMOCAP


def write_iemocap(
    root: Path,
    dialogues: dict[str, list[tuple]],
    *,
    no_avi: set[str] = frozenset(),
    no_wav: set[str] = frozenset(),
    no_transcription: set[str] = frozenset(),
) -> Path:
    """A fake IEMOCAP full release. ``dialogues``: dialog -> ``(name, start, end, label, text)`` in file order
    (text None: no transcript line). Session from the name (``Ses03...`` -> Session3); media are empty files."""
    for dialog, utts in dialogues.items():
        d = root / f"Session{int(dialog[3:5])}" / "dialog"
        for sub in ("EmoEvaluation/Categorical", "transcriptions", "avi/DivX", "wav"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        for name, start, end, label, _ in utts:
            lines += [
                f"[{start:.4f} - {end:.4f}]\t{name}\t{label}\t[2.5000, 2.5000, 2.5000]",
                "C-E2:\tNeutral;\t()",
                "C-E3:\tAnger;\t()",
                "A-E3:\tval 3; act 2; dom  2;\t()",
                "",
            ]
        (d / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(lines), encoding="utf-8")
        (d / "EmoEvaluation" / "Categorical" / f"{dialog}_e2_cat.txt").write_text("not read\n")
        if dialog not in no_transcription:
            tr = [f"{n} [{s:08.4f}-{e:08.4f}]: {t}" for n, s, e, _, t in utts if t is not None]
            (d / "transcriptions" / f"{dialog}.txt").write_text("\n".join(tr) + "\n", encoding="utf-8")
        if dialog not in no_avi:
            (d / "avi" / "DivX" / f"{dialog}.avi").write_bytes(b"")
        if dialog not in no_wav:
            (d / "wav" / f"{dialog}.wav").write_bytes(b"")
    return root


def simple(dialog: str, labels: str = "neu ang") -> list[tuple]:
    """One utterance per label, alternating F/M, one second each."""
    return [
        (f"{dialog}_{'FM'[i % 2]}{i:03d}", float(i), i + 0.5, label, f"line {i}")
        for i, label in enumerate(labels.split())
    ]


@pytest.fixture
def iemocap(tmp_path: Path) -> Path:
    """Three Session 1-2 dialogues and one Session 5 dialogue; the first has noise and out-of-order lines."""
    root = write_iemocap(
        tmp_path / "IEMOCAP_full_release",
        {
            "Ses01F_impro01": [
                ("Ses01F_impro01_M001", 10.01, 11.3925, "ang", "Yes,   I\tdo."),
                ("Ses01F_impro01_F000", 6.2901, 8.2357, "neu", "Excuse me."),
                ("Ses01F_impro01_F001", 12.5, 14.0, "xxx", "Mumble."),
                ("Ses01F_impro01_M000", 8.5, 9.75, "exc", None),
            ],
            "Ses01M_script01_1": simple("Ses01M_script01_1", "hap sad fru oth sur"),
            "Ses02F_impro02": simple("Ses02F_impro02", "fea dis neu"),
            "Ses05M_impro03": simple("Ses05M_impro03", "neu hap"),
        },
    )
    tr = root / "Session1" / "dialog" / "transcriptions" / "Ses01F_impro01.txt"
    tr.write_text(tr.read_text() + "M: [BREATHING]\nSes01F_impro01_MXX0 [012.0000-013.0000]: Hm.\n\n")
    return root


def test_iemocap_parses_ids_speakers_order_times_text_and_media(iemocap: Path):
    ds = read_iemocap(iemocap, DataParams(dev_dialogues=1))
    dialog = [u for u, _ in ds.rows if u.dialogue_id == "Ses01F_impro01"]
    assert [u.utterance_id for u in dialog] == [  # start-time order; xxx dropped
        "Ses01F_impro01_F000",
        "Ses01F_impro01_M000",
        "Ses01F_impro01_M001",
    ]
    d = iemocap / "Session1" / "dialog"
    assert dialog[2] == Utterance(
        utterance_id="Ses01F_impro01_M001",
        split=dialog[2].split,
        dialogue_id="Ses01F_impro01",
        utterance_index=2,
        speaker="Ses01_M",
        text="Yes, I do.",
        emotion="ang",
        sentiment="",
        clip=(d / "avi" / "DivX" / "Ses01F_impro01.avi").as_posix(),
        audio_clip=(d / "wav" / "Ses01F_impro01.wav").as_posix(),
        start=10.01,
        end=11.3925,
    )
    assert [(u.utterance_index, u.speaker, u.start, u.end, u.text, u.emotion) for u in dialog[:2]] == [
        (0, "Ses01_F", 6.2901, 8.2357, "Excuse me.", "neu"),
        (1, "Ses01_M", 8.5, 9.75, "", "exc"),
    ]
    script = [u for u, _ in ds.rows if u.dialogue_id == "Ses01M_script01_1"]
    assert [(u.utterance_id, u.speaker) for u in script] == [
        ("Ses01M_script01_1_F000", "Ses01_F"),
        ("Ses01M_script01_1_M001", "Ses01_M"),
        ("Ses01M_script01_1_F002", "Ses01_F"),
    ]
    assert [u.dialogue_id for u, _ in ds.rows] == sorted(u.dialogue_id for u, _ in ds.rows)  # by dialogue name
    assert re.fullmatch(r".*Ses01F_impro01\.txt, line \d+", ds.rows[0][1])
    assert ds.report["unmatched_transcript_lines"] == 2  # "M: ..." and the ...MXX0 line
    assert ds.report["no_transcript"] == 1 and ds.report["missing_transcriptions"] == []
    assert ds.report["partial_media"] == []


def test_iemocap_declares_six_classes_and_counts_dropped_labels(iemocap: Path):
    ds = read_iemocap(iemocap, DataParams(dev_dialogues=1))
    assert ds.emotions == SIX and ds.sentiments == ["negative", "neutral", "positive"]
    assert ds.report["dropped_labels"] == {"xxx": 1, "oth": 1, "sur": 1, "fea": 1, "dis": 1}
    assert len(ds.rows) == 14 - 5
    assert sum(r["rows"] for r in ds.split_reports.values()) == 14  # evaluated utterances seen
    assert {u.emotion for u, _ in ds.rows} == set(SIX)


def test_iemocap_session5_is_test_and_the_dev_draw_is_fixed_by_the_seed(tmp_path: Path):
    pool = [f"Ses0{s}F_impro0{i}" for s in (1, 2, 3, 4) for i in (1, 2)]
    root = write_iemocap(tmp_path / "iemocap", {d: simple(d) for d in pool + ["Ses05F_impro01", "Ses05M_impro02"]})

    def split_of(seed: int) -> dict[str, list[str]]:
        ds = read_iemocap(root, DataParams(dev_dialogues=3, dev_seed=seed))
        out = {s: sorted({u.dialogue_id for u, _ in ds.rows if u.split == s}) for s in ("train", "dev", "test")}
        assert ds.report["dev_dialogues"] == out["dev"]
        return out

    seed0 = split_of(0)
    assert seed0["test"] == ["Ses05F_impro01", "Ses05M_impro02"]
    assert (len(seed0["train"]), len(seed0["dev"])) == (5, 3)
    assert seed0["dev"] == sorted(random.Random(0).sample(sorted(pool), 3))  # COSMIC-style draw over sorted names
    assert split_of(0) == seed0
    assert any(split_of(seed)["dev"] != seed0["dev"] for seed in range(1, 6))
    ds = read_iemocap(root, DataParams(dev_dialogues=3))
    assert {s: r["rows"] for s, r in ds.split_reports.items()} == {"train": 10, "dev": 6, "test": 4}


def test_iemocap_too_few_dialogues_for_the_dev_draw(tmp_path: Path):
    root = write_iemocap(
        tmp_path / "iemocap", {d: simple(d) for d in ("Ses01F_impro01", "Ses02F_impro01", "Ses05F_impro01")}
    )
    with pytest.raises(DatasetError, match=r"2 Session 1-4 dialogue\(s\).*data.dev_dialogues=2"):
        read_iemocap(root, DataParams(dev_dialogues=2))
    assert len(read_iemocap(root, DataParams(dev_dialogues=1)).report["dev_dialogues"]) == 1


@pytest.mark.parametrize("policy", ["text_only", "skip"])
def test_iemocap_missing_media_policy_and_partial_media(tmp_path: Path, policy: str):
    names = ["Ses01F_impro01", "Ses01F_impro02", "Ses01F_impro03", "Ses05F_impro01"]
    root = write_iemocap(
        tmp_path / "iemocap",
        {d: simple(d) for d in names},
        no_avi={"Ses01F_impro02", "Ses01F_impro03"},
        no_wav={"Ses01F_impro03", "Ses05F_impro01"},
    )
    ds = read_iemocap(root, DataParams(dev_dialogues=1, dev_seed=0, missing_clip=policy))
    missing = [m for r in ds.split_reports.values() for m in r["missing_clips"]]
    assert missing == ["Ses01F_impro03_F000", "Ses01F_impro03_M001"]
    assert ds.report["partial_media"] == ["Ses01F_impro02", "Ses05F_impro01"]
    table = {u.utterance_id: u for u, _ in ds.rows}
    assert (
        table["Ses01F_impro02_F000"].clip,
        table["Ses01F_impro02_F000"].audio_clip.endswith("Session1/dialog/wav/Ses01F_impro02.wav"),
    ) == ("", True)
    assert table["Ses05F_impro01_M001"].clip.endswith("avi/DivX/Ses05F_impro01.avi")
    assert table["Ses05F_impro01_M001"].audio_clip == ""
    if policy == "skip":
        assert "Ses01F_impro03_F000" not in table and len(table) == 6
    else:
        assert (table["Ses01F_impro03_F000"].clip, table["Ses01F_impro03_F000"].audio_clip) == ("", "")
        assert table["Ses01F_impro03_F000"].text == "line 0" and len(table) == 8


def test_iemocap_missing_transcription_file_gives_empty_text(tmp_path: Path):
    names = ["Ses01F_impro01", "Ses01F_impro02", "Ses05F_impro01"]
    root = write_iemocap(tmp_path / "iemocap", {d: simple(d) for d in names}, no_transcription={"Ses01F_impro02"})
    ds = read_iemocap(root, DataParams(dev_dialogues=1))
    assert [u.text for u, _ in ds.rows if u.dialogue_id == "Ses01F_impro02"] == ["", ""]
    assert [u.text for u, _ in ds.rows if u.dialogue_id == "Ses01F_impro01"] == ["line 0", "line 1"]
    assert ds.report["missing_transcriptions"] == ["Ses01F_impro02"] and ds.report["no_transcript"] == 2


def test_iemocap_unknown_label_code_names_file_and_line(tmp_path: Path):
    names = ["Ses01F_impro01", "Ses01F_impro02", "Ses05F_impro01"]
    root = write_iemocap(tmp_path / "iemocap", {d: simple(d, "neu joy" if d.endswith("02") else "neu") for d in names})
    # line 1 header, 2 blank, 3 the first block's summary, 8 the second's
    with pytest.raises(DatasetError, match=r"Ses01F_impro02\.txt, line 8: unknown IEMOCAP label 'joy'"):
        read_iemocap(root, DataParams(dev_dialogues=1))


def test_iemocap_duplicate_utterance_name(tmp_path: Path):
    utts = simple("Ses01F_impro01")
    root = write_iemocap(
        tmp_path / "iemocap",
        {
            "Ses01F_impro01": utts + utts[:1],
            "Ses01F_impro02": simple("Ses01F_impro02"),
            "Ses05F_impro01": simple("Ses05F_impro01"),
        },
    )
    with pytest.raises(DatasetError, match=r"Ses01F_impro01\.txt, line 13: duplicate utterance Ses01F_impro01_F000"):
        read_iemocap(root, DataParams(dev_dialogues=1))


def test_iemocap_dialogue_in_two_sessions(tmp_path: Path):
    root = write_iemocap(tmp_path / "iemocap", {d: simple(d) for d in ("Ses01F_impro01", "Ses02F_impro01")})
    copy = root / "Session3" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    copy.parent.mkdir(parents=True)
    copy.write_bytes((root / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt").read_bytes())
    with pytest.raises(
        DatasetError,
        match=r"Session3/dialog/EmoEvaluation/Ses01F_impro01\.txt: dialogue "
        r"Ses01F_impro01 also in .*Session1/",
    ):
        read_iemocap(root, DataParams(dev_dialogues=1))


def test_iemocap_missing_layout(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no Session\*/dialog/EmoEvaluation/\*\.txt found.*Session1\.\.Session5"):
        read_iemocap(tmp_path / "empty", DataParams())
    (tmp_path / "noeval" / "Session1" / "dialog" / "wav").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"noeval: no Session"):
        read_iemocap(tmp_path / "noeval", DataParams())


def test_iemocap_through_prepare_derives_sentiment_and_merges_exc(iemocap: Path):
    raw = {"layout": "iemocap", "root": str(iemocap), "dev_dialogues": 1}
    utterances, labels, report = prepare(parse_params({"data": raw}))
    assert labels["emotions"] == SIX
    sentiment = {u.emotion: u.sentiment for u in utterances}
    assert (sentiment["ang"], sentiment["exc"], sentiment["neu"], sentiment["fru"], sentiment["hap"]) == (
        "negative",
        "positive",
        "neutral",
        "negative",
        "positive",
    )
    assert report["dropped_labels"] == {"xxx": 1, "oth": 1, "sur": 1, "fea": 1, "dis": 1}
    assert report["splits"]["test"]["dialogues"] == 1 and report["splits"]["dev"]["dialogues"] == 1

    merged, labels, report = prepare(parse_params({"data": {**raw, "label_map": {"exc": "hap"}}}))
    assert labels["emotions"] == ["hap", "sad", "neu", "ang", "fru"]
    assert {u.utterance_id: u.emotion for u in merged}["Ses01F_impro01_M000"] == "hap"
    assert report["label_map"] == {"exc->hap": 1}


# ---------------------------------------------------------------------------------------- manifest

HEADER = [
    "dialogue_id",
    "utterance_id",
    "speaker",
    "text",
    "emotion",
    "split",
    "sentiment",
    "utterance_index",
    "media",
    "audio",
    "start",
    "end",
]


def manifest_rows(root: Path) -> list[dict]:
    """Dialogue d2 appears first; d1's rows are out of index order; media relative, audio absolute."""
    (root / "clips").mkdir(parents=True, exist_ok=True)
    for name in ("clips/a.mp4", "clips/b.wav", "long.wav"):
        (root / name).write_bytes(b"")
    return [
        {
            "dialogue_id": "d2",
            "utterance_id": "u5",
            "speaker": "Ann",
            "text": "Later.",
            "emotion": "Joy",
            "split": "dev",
            "sentiment": "",
            "utterance_index": 0,
            "media": "",
            "audio": "",
            "start": "",
            "end": "",
        },
        {
            "dialogue_id": "d1",
            "utterance_id": "u2",
            "speaker": " Bob ",
            "text": " Second\n  one ",
            "emotion": "anger",
            "split": "train",
            "sentiment": "Negative",
            "utterance_index": 1,
            "media": "clips/b.wav",
            "audio": str(root / "long.wav"),
            "start": 1.5,
            "end": 3,
        },
        {
            "dialogue_id": "d1",
            "utterance_id": "u1",
            "speaker": "Ann",
            "text": "First.",
            "emotion": "neutral",
            "split": "train",
            "sentiment": "neutral",
            "utterance_index": 0,
            "media": "clips/a.mp4",
            "audio": "",
            "start": 0,
            "end": 1.5,
        },
    ]


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, header or list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def utts(ds) -> list[Utterance]:
    return [u for u, _ in ds.rows]


def test_manifest_csv_and_jsonl_give_the_same_utterances(tmp_path: Path):
    rows = manifest_rows(tmp_path)
    from_csv = read_manifest(write_csv(tmp_path / "m.csv", rows), DataParams())
    from_jsonl = read_manifest(write_jsonl(tmp_path / "m.jsonl", rows), DataParams())
    assert utts(from_csv) == utts(from_jsonl)
    assert [u.utterance_id for u in utts(from_csv)] == ["u5", "u1", "u2"]  # d2 first, then d1 by index
    assert utts(from_csv)[2] == Utterance(
        utterance_id="u2",
        split="train",
        dialogue_id="d1",
        utterance_index=1,
        speaker="Bob",
        text="Second one",
        emotion="anger",
        sentiment="negative",
        clip=(tmp_path / "clips" / "b.wav").as_posix(),
        audio_clip=(tmp_path / "long.wav").as_posix(),
        start=1.5,
        end=3.0,
    )
    assert utts(from_csv)[0] == Utterance("u5", "dev", "d2", 0, "Ann", "Later.", "joy", "")
    assert utts(from_csv)[1].clip == (tmp_path / "clips" / "a.mp4").as_posix() and utts(from_csv)[1].start == 0.0
    assert from_csv.emotions == ["anger", "joy", "neutral"]
    assert from_csv.sentiments == ["negative", "neutral", "positive"]
    assert {s: r["rows"] for s, r in from_jsonl.split_reports.items()} == {"train": 2, "dev": 1, "test": 0}
    assert from_csv.rows[0][1] == f"{tmp_path / 'm.csv'}, row 1 (line 2)"
    assert from_jsonl.rows[0][1] == f"{tmp_path / 'm.jsonl'}, line 1"
    assert from_jsonl.rows[1][1] == f"{tmp_path / 'm.jsonl'}, line 5"  # blank lines skipped but counted


def test_manifest_folder_form(tmp_path: Path):
    rows = manifest_rows(tmp_path / "data")
    write_csv(tmp_path / "data" / "manifest.csv", rows)
    assert [u.utterance_id for u in utts(read_manifest(tmp_path / "data", DataParams()))] == ["u5", "u1", "u2"]
    write_jsonl(tmp_path / "data" / "manifest.jsonl", rows)
    with pytest.raises(DatasetError, match="holds both manifest.csv and manifest.jsonl"):
        read_manifest(tmp_path / "data", DataParams())
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match=r"none: holds no manifest.csv or manifest.jsonl"):
        read_manifest(tmp_path / "none", DataParams())
    with pytest.raises(DatasetError, match=r"m\.txt: a manifest must be a \.csv or \.jsonl"):
        read_manifest(tmp_path / "m.txt", DataParams())


def test_text_only_manifest_positions_and_cp1252(tmp_path: Path):
    path = tmp_path / "m.csv"
    path.write_bytes(
        "dialogue_id,utterance_id,speaker,text,emotion,split\r\n"
        "a,1,X,I don\x92t know,neutral,test\r\nb,2,Y,,sadness,test\r\na,3,X,Yes,neutral,test\r\n".encode("latin-1")
    )
    ds = read_manifest(path, DataParams())
    assert [(u.utterance_id, u.dialogue_id, u.utterance_index, u.text) for u in utts(ds)] == [
        ("1", "a", 0, "I don\u2019t know"),
        ("3", "a", 1, "Yes"),
        ("2", "b", 0, ""),
    ]
    assert {(u.clip, u.audio_clip, u.start, u.end) for u in utts(ds)} == {("", "", None, None)}
    assert all(r["missing_clips"] == [] for r in ds.split_reports.values())
    assert ds.report["cp1252_repaired"] == [{"row": f"{path}, row 1 (line 2)", "utterance_id": "1", "characters": 1}]
    assert ds.emotions == ["neutral", "sadness"]


@pytest.mark.parametrize("policy", ["text_only", "skip"])
def test_manifest_missing_media_policy(tmp_path: Path, policy: str):
    rows = manifest_rows(tmp_path)
    rows[1]["media"], rows[2]["audio"] = "clips/gone.mp4", "nowhere.wav"
    ds = read_manifest(write_csv(tmp_path / "m.csv", rows), DataParams(missing_clip=policy))
    assert ds.split_reports["train"]["missing_clips"] == ["u2", "u1"] and ds.split_reports["train"]["rows"] == 2
    table = {u.utterance_id: u for u in utts(ds)}
    if policy == "skip":
        assert list(table) == ["u5"]
    else:
        assert (table["u2"].clip, table["u2"].audio_clip) == ("", (tmp_path / "long.wav").as_posix())
        assert (table["u1"].clip, table["u1"].audio_clip) == ((tmp_path / "clips" / "a.mp4").as_posix(), "")


def test_manifest_without_labels_for_prediction(tmp_path: Path):
    rows = [
        {"dialogue_id": "c", "utterance_id": "x1", "speaker": "S", "text": "Hi"},
        {"dialogue_id": "e", "utterance_id": "x2", "speaker": "T", "text": "Bye", "split": "dev"},
    ]
    path = write_csv(tmp_path / "m.csv", rows, ["dialogue_id", "utterance_id", "speaker", "text"])
    ds = read_manifest(path, DataParams(), require_labels=False)
    assert [(u.utterance_id, u.split, u.emotion, u.sentiment) for u in utts(ds)] == [
        ("x1", "test", "", ""),
        ("x2", "test", "", ""),
    ]
    assert ds.emotions == []
    with pytest.raises(DatasetError, match=r"m\.csv, row 0 \(header\): missing column\(s\) \['emotion', 'split'\]"):
        read_manifest(path, DataParams())
    ds = read_manifest(write_jsonl(tmp_path / "m.jsonl", rows), DataParams(), require_labels=False)
    assert [u.split for u in utts(ds)] == ["test", "dev"] and ds.split_reports["dev"]["rows"] == 1


def base_row(**kw) -> dict:
    return {
        "dialogue_id": "d",
        "utterance_id": "u",
        "speaker": "S",
        "text": "t",
        "emotion": "neutral",
        "split": "train",
        **kw,
    }


@pytest.mark.parametrize(
    "rows, message",
    [
        ([base_row(utterance_id="")], r"row 1 \(line 2\): empty utterance_id"),
        ([base_row(dialogue_id=" ")], r"row 1 \(line 2\): empty dialogue_id"),
        ([base_row(), base_row()], r"row 2 \(line 3\): duplicate utterance_id 'u' \(first at .*row 1"),
        (
            [base_row(), base_row(utterance_id="v", split="test")],
            r"row 2 \(line 3\): dialogue 'd' is in split 'test' here but 'train' at .*row 1.*one split",
        ),
        ([base_row(split="validation")], r"row 1 \(line 2\): split 'validation' is not one of train, dev, test"),
        ([base_row(utterance_index="1.5")], r"row 1 \(line 2\): utterance_index must be an integer, got '1.5'"),
        (
            [base_row(utterance_index=0), base_row(utterance_id="v", utterance_index=0)],
            r"row 2 \(line 3\): utterance_index 0 repeats in dialogue 'd' \(first at .*row 1",
        ),
        ([base_row(start=2, end=1)], r"row 1 \(line 2\): start/end must satisfy 0 <= start < end.*start=2.0, end=1.0"),
        ([base_row(start=-1)], r"row 1 \(line 2\): start/end must satisfy"),
        ([base_row(start=1, end=1)], r"row 1 \(line 2\): start/end must satisfy"),
        ([base_row(end="soon")], r"row 1 \(line 2\): end must be a number of seconds, got 'soon'"),
    ],
    ids=[
        "empty_id",
        "empty_dialogue",
        "duplicate_id",
        "two_splits",
        "bad_split",
        "index_not_int",
        "index_repeats",
        "start_after_end",
        "negative_start",
        "empty_segment",
        "end_not_number",
    ],
)
def test_manifest_csv_errors_name_file_and_row(tmp_path: Path, rows: list[dict], message: str):
    header = list(dict.fromkeys(k for r in rows for k in r))
    path = write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ", " + message):
        read_manifest(path, DataParams())


def test_manifest_missing_column_and_empty_file(tmp_path: Path):
    path = write_csv(tmp_path / "m.csv", [base_row()], ["dialogue_id", "utterance_id", "text", "emotion", "split"])
    header_error = re.escape(str(path)) + r", row 0 \(header\): missing column\(s\) \['speaker'\]"
    with pytest.raises(DatasetError, match=header_error):
        read_manifest(path, DataParams())
    path = write_csv(tmp_path / "e.csv", [], list(base_row()))
    with pytest.raises(DatasetError, match=r"e\.csv: no utterances"):
        read_manifest(path, DataParams())


@pytest.mark.parametrize(
    "lines, message",
    [
        ([json.dumps(base_row()), "{not json"], r"line 2: invalid JSON"),
        ([json.dumps(base_row()), "", json.dumps([1, 2])], r"line 3: expected a JSON object, got list"),
        ([json.dumps({k: v for k, v in base_row().items() if k != "text"})], r"line 1: missing key\(s\) \['text'\]"),
        (
            [json.dumps(base_row(utterance_index=0)), json.dumps(base_row(utterance_id="v", utterance_index=True))],
            r"line 2: utterance_index must be an integer, got True",
        ),
    ],
    ids=["invalid_json", "not_object", "missing_key", "bool_index"],
)
def test_manifest_jsonl_errors_name_file_and_line(tmp_path: Path, lines: list[str], message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ", " + message):
        read_manifest(path, DataParams())


def test_manifest_through_prepare_derives_sentiment_or_asks_for_a_map(tmp_path: Path):
    rows = [
        base_row(utterance_id="a", emotion="Joy"),
        base_row(utterance_id="b", emotion="anger"),
        base_row(utterance_id="c", emotion="neutral"),
    ]
    path = write_csv(tmp_path / "m.csv", rows)
    utterances, labels, report = prepare(parse_params({"data": {"layout": "manifest", "root": str(path)}}))
    assert [(u.emotion, u.sentiment) for u in utterances] == [
        ("joy", "positive"),
        ("anger", "negative"),
        ("neutral", "neutral"),
    ]
    assert labels == {"emotions": ["anger", "joy", "neutral"], "sentiments": ["negative", "neutral", "positive"]}
    assert report["sentiment_derived"] == [u.utterance_id for u in utterances]

    path = write_csv(tmp_path / "s.csv", rows + [base_row(utterance_id="d", emotion="surprise")])
    params = parse_params({"data": {"layout": "manifest", "root": str(path)}})
    with pytest.raises(DatasetError, match=re.escape(str(path)) + r", row 4 .*data\.sentiment_map\.surprise"):
        prepare(params)
    params = parse_params(
        {"data": {"layout": "manifest", "root": str(path), "sentiment_map": {"surprise": "positive"}}}
    )
    assert prepare(params)[0][3].sentiment == "positive"
