"""Stage prepare: MELD raw-release layout -> data/prepared/utterances.csv + report.json."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MELD_CSVS, MELD_HEADER, PREPARED, UTTERANCES, meld_csv_bytes, row, write_meld

from pipeline import prepare as prep
from pipeline.config import parse_params
from pipeline.datasets import DatasetError
from pipeline.utterances import Utterance, load_labels, load_utterances


def params_for(root: Path, **data):
    return parse_params({"data": {"root": str(root), **data}})


def by_id(utterances: list[Utterance]) -> dict[str, Utterance]:
    return {u.utterance_id: u for u in utterances}


def test_utterance_table_ids_order_speaker_and_text(tmp_path: Path):
    root = write_meld(
        tmp_path / "meld",
        {
            "train": [
                row(1, 0, "Second dialogue.", "Monica"),
                row(0, 2, "  Third   line,\n  split\tover lines.  ", " Joey ", "Joy", "Positive"),
                row(0, 0, "First line.", "Ross"),
                row(0, 1, "Second line.", "Rachel", "anger", "negative"),
            ],
            "dev": [row(4, 0, "Dev.", "Phoebe")],
        },
    )
    utterances, _, report = prep.prepare(params_for(root))

    assert [u.utterance_id for u in utterances] == [
        "train/dia0_utt0",
        "train/dia0_utt1",
        "train/dia0_utt2",
        "train/dia1_utt0",
        "dev/dia4_utt0",
        "test/dia0_utt0",
    ]
    third = by_id(utterances)["train/dia0_utt2"]
    assert third == Utterance(
        utterance_id="train/dia0_utt2",
        split="train",
        dialogue_id="train/0",
        utterance_index=2,
        speaker="Joey",
        text="Third line, split over lines.",
        emotion="joy",
        sentiment="positive",
        clip=(root / "train_splits" / "dia0_utt2.mp4").as_posix(),
    )
    assert by_id(utterances)["dev/dia4_utt0"].clip == (root / "dev_splits_complete" / "dia4_utt0.mp4").as_posix()
    assert by_id(utterances)["test/dia0_utt0"].clip.endswith("output_repeated_splits_test/dia0_utt0.mp4")
    assert report["splits"]["train"]["rows"] == 4 and report["splits"]["train"]["dialogues"] == 2
    assert report["splits"]["train"]["emotions"] == {"joy": 1, "anger": 1, "neutral": 2}
    assert report["speakers"] == 5 and report["empty_text"] == []


def test_missing_clip_text_only_keeps_the_row_without_clip(tmp_path: Path):
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0), row(0, 1), row(0, 2)]}, missing={"train/dia0_utt1"})
    utterances, _, report = prep.prepare(params_for(root, missing_clip="text_only"))
    table = by_id(utterances)
    assert table["train/dia0_utt1"].clip == "" and table["train/dia0_utt1"].text == "Hello there."
    assert table["train/dia0_utt0"].clip and table["train/dia0_utt2"].clip
    assert report["missing_clip_policy"] == "text_only"
    assert report["splits"]["train"]["missing_clips"] == ["train/dia0_utt1"]
    assert report["splits"]["train"]["kept"] == 3


def test_missing_clip_skip_leaves_the_row_out_and_reports_it(tmp_path: Path):
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0), row(0, 1), row(0, 2)]}, missing={"train/dia0_utt1"})
    utterances, _, report = prep.prepare(params_for(root, missing_clip="skip"))
    assert [u.utterance_id for u in utterances if u.split == "train"] == ["train/dia0_utt0", "train/dia0_utt2"]
    train = report["splits"]["train"]
    assert (train["rows"], train["kept"], train["missing_clips"]) == (3, 2, ["train/dia0_utt1"])
    assert report["missing_clip_policy"] == "skip"


def test_cp1252_bytes_in_utf8_text_are_decoded_and_counted(tmp_path: Path):
    csv_bytes = meld_csv_bytes([row(0, 0, "PLACEHOLDER_A"), row(0, 1, "It’s real UTF-8 — fine.")])
    # A Windows re-save: cp1252 apostrophe, ellipsis and en dash inside an otherwise UTF-8 file.
    csv_bytes = csv_bytes.replace(b"PLACEHOLDER_A", b"I don\x92t know\x85 really \x96 no.")
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0), row(0, 1)]}, raw={"train": csv_bytes})
    utterances, _, report = prep.prepare(params_for(root))
    table = by_id(utterances)
    assert table["train/dia0_utt0"].text == "I don’t know… really – no."
    assert table["train/dia0_utt1"].text == "It’s real UTF-8 — fine."
    assert report["cp1252_repaired"] == [
        {"row": f"{root / 'train_sent_emo.csv'}, row 1 (line 2)", "utterance_id": "train/dia0_utt0", "characters": 3}
    ]


def test_utf8_bom_is_ignored(tmp_path: Path):
    header = ["Dialogue_ID", "Utterance_ID", "Utterance", "Speaker", "Emotion", "Sentiment"]
    csv_bytes = b"\xef\xbb\xbf" + meld_csv_bytes([row(0, 0, "Hi.")], header=header)
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0)]}, raw={"train": csv_bytes})
    utterances, _, _ = prep.prepare(params_for(root))
    assert by_id(utterances)["train/dia0_utt0"].text == "Hi."


def test_crlf_and_lf_line_ends_give_the_same_table(tmp_path: Path):
    rows = [row(0, 0, "Line one."), row(0, 1, 'He said "no,\r\nnever".', "Rachel", "anger", "negative")]
    crlf = meld_csv_bytes(rows, line_end="\r\n")
    assert crlf.count(b"\r\n") >= 3
    lf = meld_csv_bytes(rows, line_end="\n").replace(b"\r\n", b"\n")
    assert b"\r" not in lf
    tables = []
    for name, data in (("crlf", crlf), ("lf", lf)):
        root = write_meld(tmp_path / name, {"train": rows}, raw={"train": data})
        utterances, _, _ = prep.prepare(params_for(root))
        tables.append([(u.utterance_id, u.text, u.speaker, u.emotion) for u in utterances])
    assert tables[0] == tables[1]
    assert ("train/dia0_utt1", 'He said "no, never".', "Rachel", "anger") in tables[0]
    assert not any("\r" in text for _, text, _, _ in tables[0])


def test_unknown_emotion_names_file_and_row(tmp_path: Path):
    root = write_meld(tmp_path / "meld", {"dev": [row(0, 0), row(0, 1, emotion="contempt")]})
    with pytest.raises(DatasetError) as err:
        prep.prepare(params_for(root))
    message = str(err.value)
    assert str(root / "dev_sent_emo.csv") in message
    assert re.search(r"\brow 2\b", message) and "'contempt'" in message


def test_unknown_sentiment_names_file_and_row(tmp_path: Path):
    root = write_meld(tmp_path / "meld", {"test": [row(0, 0), row(0, 1), row(1, 0, sentiment="mixed")]})
    with pytest.raises(DatasetError) as err:
        prep.prepare(params_for(root))
    assert str(root / "test_sent_emo.csv") in str(err.value)
    assert re.search(r"\brow 3\b", str(err.value)) and "'mixed'" in str(err.value)


def test_duplicate_utterance_names_both_rows(tmp_path: Path):
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0), row(0, 1), row(0, 2), row(0, 1, "Again.")]})
    with pytest.raises(DatasetError) as err:
        prep.prepare(params_for(root))
    message = str(err.value)
    assert str(root / "train_sent_emo.csv") in message
    assert re.search(r"\brow 4\b", message) and re.search(r"\brow 2\b", message)
    assert "Dialogue_ID=0" in message and "Utterance_ID=1" in message


def test_missing_column_names_the_column(tmp_path: Path):
    header = [c for c in MELD_HEADER if c != "Sentiment"]
    root = write_meld(
        tmp_path / "meld", {"train": [row(0, 0)]}, raw={"train": meld_csv_bytes([row(0, 0)], header=header)}
    )
    with pytest.raises(DatasetError) as err:
        prep.prepare(params_for(root))
    assert "'Sentiment'" in str(err.value) and "train_sent_emo.csv" in str(err.value)


def test_non_integer_ids_are_rejected(tmp_path: Path):
    root = write_meld(
        tmp_path / "meld", {"train": [row(0, 0), {**row(0, 1), "Utterance_ID": "1a"}]}, missing={"train/dia0_utt1a"}
    )
    with pytest.raises(DatasetError, match=r"row 2.*'1a'"):
        prep.prepare(params_for(root))


def test_partial_release_is_read_and_its_gaps_explained(tmp_path: Path, caplog):
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0)], "dev": [row(0, 0)], "test": []})
    (root / "dev_sent_emo.csv").unlink()
    caplog.set_level(logging.WARNING, logger="pipeline.prepare")
    utterances, _, report = prep.prepare(params_for(root))
    assert [u.utterance_id for u in utterances] == ["train/dia0_utt0"]
    assert report["missing_splits"] == {"dev": (root / "dev_sent_emo.csv").as_posix()}
    assert report["splits"]["test"]["rows"] == 0 and "rows" not in report["splits"]["dev"]
    prep.log_policies(report, params_for(root), tmp_path / "report.json")
    dev, test = (
        next(r.message for r in caplog.records if r.message.startswith(s)) for s in ("dev split", "test split")
    )
    assert "dev_sent_emo.csv not found" in dev and "`train` cannot run" in dev and "`evaluate`" in dev
    assert "has no rows" in test and "`evaluate` has nothing to score" in test
    for name in ("train_sent_emo.csv", "test_sent_emo.csv"):
        (root / name).unlink()
    with pytest.raises(DatasetError, match="none of MELD's train_sent_emo.csv, dev_sent_emo.csv, test_sent_emo.csv"):
        prep.prepare(params_for(root))


def test_missing_root(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        prep.prepare(params_for(tmp_path / "nowhere"))
    (tmp_path / "file.csv").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        prep.prepare(params_for(tmp_path / "file.csv"))


def test_empty_text_is_kept_and_reported(tmp_path: Path):
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0, "   "), row(0, 1, "Hi.")]})
    utterances, _, report = prep.prepare(params_for(root))
    assert by_id(utterances)["train/dia0_utt0"].text == ""
    assert report["empty_text"] == ["train/dia0_utt0"]


def test_labels_in_params_are_matched_case_insensitively(tmp_path: Path):
    root = write_meld(tmp_path / "meld", {split: [row(0, 0, emotion="Neutral")] for split in MELD_CSVS})
    utterances, _, _ = prep.prepare(params_for(root, emotions=["Neutral", "Joy"]))
    assert len(utterances) == 3


def test_run_writes_table_and_report_that_load_back(tmp_path: Path, stage_dir: Path):
    root = write_meld(
        tmp_path / "meld",
        {"train": [row(0, 0, 'Quote "this", and, commas.'), row(0, 1, "")], "dev": [row(2, 0, "Ünïcödé ’quotes’")]},
        missing={"dev/dia2_utt0"},
    )
    params = params_for(root)
    prep.run(params, out=PREPARED)
    table = load_utterances(UTTERANCES)
    assert table == prep.prepare(params)[0]
    assert load_labels(PREPARED / "labels.json") == prep.prepare(params)[1]
    assert by_id(table)["dev/dia2_utt0"].clip == ""
    assert by_id(table)["train/dia0_utt0"].text == 'Quote "this", and, commas.'
    report = json.loads(Path("data/prepared/report.json").read_text(encoding="utf-8"))
    assert report["splits"]["dev"]["missing_clips"] == ["dev/dia2_utt0"]
    assert report["empty_text"] == ["train/dia0_utt1"]


def test_load_utterances_before_the_stage_ran(stage_dir: Path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        load_utterances(UTTERANCES)
    with pytest.raises(FileNotFoundError, match="prepare"):
        load_labels(PREPARED / "labels.json")


def _run_cli(args: list[str], cwd: Path, repo_root: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONWARNINGS": "ignore",
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_bad_dataset_exits_1_with_one_error_line(tmp_path: Path, repo_root: Path):
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0), row(0, 1, emotion="angry")]})
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  root: {root}\n", encoding="utf-8")
    result = _run_cli(["--params", str(params), "--out", "data/prepared"], tmp_path, repo_root)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "train_sent_emo.csv" in lines[0] and "row 2" in lines[0]
    assert not (tmp_path / "data" / "prepared" / "utterances.csv").exists()


def test_cli_bad_params_exits_1_naming_the_key(tmp_path: Path, repo_root: Path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  missing_clips: skip\n", encoding="utf-8")
    result = _run_cli(["--params", str(params), "--out", "data/prepared"], tmp_path, repo_root)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "data.missing_clips" in result.stderr


def test_bundled_demo_release(demo_root: Path):
    utterances, _, report = prep.prepare(params_for(demo_root))
    table = by_id(utterances)
    # scripts/make_demo.py: 12/3/4 dialogues; defects: a missing clip, a clip without audio, one without a face.
    assert {s: r["dialogues"] for s, r in report["splits"].items()} == {"train": 12, "dev": 3, "test": 4}
    assert {s: r["missing_clips"] for s, r in report["splits"].items()} == {
        "train": ["train/dia2_utt1"],
        "dev": [],
        "test": [],
    }
    assert table["train/dia2_utt1"].clip == ""
    assert Path(table["train/dia5_utt0"].clip).is_file() and Path(table["test/dia1_utt2"].clip).is_file()
    assert all(Path(u.clip).is_file() for u in utterances if u.clip)
    assert report["empty_text"] == [] and report["cp1252_repaired"] == []


# --- real MELD text and labels (../shared), skipped when absent -------------------------------------------


@pytest.fixture(scope="module")
def meld_prepared(meld_dir: Path):
    return prep.prepare(params_for(meld_dir))


def test_real_meld_counts(meld_prepared):
    utterances, labels, report = meld_prepared
    assert labels == {
        "emotions": ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
        "sentiments": ["negative", "neutral", "positive"],
    }
    assert len(utterances) == 13708
    splits = report["splits"]
    assert {s: splits[s]["rows"] for s in splits} == {"train": 9989, "dev": 1109, "test": 2610}
    assert {s: splits[s]["kept"] for s in splits} == {"train": 9989, "dev": 1109, "test": 2610}
    assert {s: splits[s]["dialogues"] for s in splits} == {"train": 1038, "dev": 114, "test": 280}
    # MELD's published train label distribution.
    assert splits["train"]["emotions"] == {
        "neutral": 4710,
        "joy": 1743,
        "surprise": 1205,
        "anger": 1109,
        "sadness": 683,
        "disgust": 271,
        "fear": 268,
    }
    assert len({u.utterance_id for u in utterances}) == 13708


def test_real_meld_structure(meld_prepared):
    utterances, labels, report = meld_prepared
    assert labels == {
        "emotions": ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
        "sentiments": ["negative", "neutral", "positive"],
    }
    train_dialogues = {u.dialogue_id for u in utterances if u.split == "train"}
    assert "train/60" not in train_dialogues and "train/59" in train_dialogues and "train/61" in train_dialogues
    # No clips in ../shared: every row is kept text-only and listed.
    assert all(u.clip == "" for u in utterances)
    assert sum(len(s["missing_clips"]) for s in report["splits"].values()) == 13708
    # Typographic characters are real UTF-8 there: nothing repaired, no replacement characters.
    assert report["cp1252_repaired"] == []
    assert not any("\ufffd" in u.text or "\x92" in u.text for u in utterances)
    assert sum("’" in u.text for u in utterances) > 1000
    first = utterances[0]
    assert (first.utterance_id, first.speaker) == ("train/dia0_utt0", "Chandler")
    assert first.text.startswith("also I was the point person on my company’s transition")
    # Dialogue order: within each dialogue the utterance indices increase.
    last: dict[str, int] = {}
    for u in utterances:
        assert u.utterance_index > last.get(u.dialogue_id, -1)
        last[u.dialogue_id] = u.utterance_index


def test_real_meld_skip_policy_without_clips_keeps_nothing(meld_dir: Path):
    utterances, _, report = prep.prepare(params_for(meld_dir, missing_clip="skip"))
    assert utterances == []
    assert report["splits"]["dev"]["rows"] == 1109 and report["splits"]["dev"]["kept"] == 0


def test_real_meld_resaved_with_cp1252_apostrophes_gives_the_same_text(meld_dir: Path, tmp_path: Path, meld_prepared):
    copy = tmp_path / "meld"
    copy.mkdir()
    for name in MELD_CSVS.values():
        shutil.copy(meld_dir / name, copy / name)
    dev = (meld_dir / "dev_sent_emo.csv").read_bytes()
    apostrophe = "’".encode()
    replaced = dev.count(apostrophe)
    assert replaced > 100
    (copy / "dev_sent_emo.csv").write_bytes(dev.replace(apostrophe, b"\x92"))
    utterances, _, report = prep.prepare(params_for(copy))
    assert sum(r["characters"] for r in report["cp1252_repaired"]) == replaced
    assert {r["row"].split(",")[0] for r in report["cp1252_repaired"]} == {str(copy / "dev_sent_emo.csv")}
    original = [(u.utterance_id, u.text) for u in meld_prepared[0]]
    assert [(u.utterance_id, u.text) for u in utterances] == original


# --- bad input, second pass -----------------------------------------------------------------------------------


def test_a_cell_longer_than_the_csv_module_limit_is_read(tmp_path: Path, stage_dir: Path):
    long_text = "word " * 40_000  # 200,000 characters: past csv's default 131,072 limit
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0, long_text), row(0, 1, "Short.")]})
    utterances, _, _ = prep.prepare(params_for(root))
    assert len(by_id(utterances)["train/dia0_utt0"].text) == len(long_text.strip())
    # Written and read back by the next stages.
    prep.run(params_for(root), PREPARED)
    assert load_utterances(UTTERANCES)[0].text == by_id(utterances)["train/dia0_utt0"].text


def test_every_bad_row_is_listed_in_one_run(tmp_path: Path):
    rows = [row(0, 0), row(0, 1, emotion="excited"), row(0, 0), row(1, 0, emotion="bored"), row(2, 0)]
    rows[4]["Dialogue_ID"] = "2x"
    root = write_meld(tmp_path / "meld", {"train": rows})
    with pytest.raises(DatasetError) as err:
        prep.prepare(params_for(root))
    message = str(err.value)
    assert message.startswith("4 bad rows; fix them all, then rerun:")
    for expected in ("row 3 (line 4): duplicate utterance", "row 5 (line 6): Dialogue_ID", "'excited'", "'bored'"):
        assert expected in message
    # Past the cap, the rest is counted.
    many = [row(0, u, emotion="excited") for u in range(60)]
    root = write_meld(tmp_path / "many", {"train": many})
    with pytest.raises(DatasetError, match=r"60 bad rows(.|\n)*\.\.\. and 10 more") as err:
        prep.prepare(params_for(root))
    assert str(err.value).count("unknown emotion") == 50


def test_c1_control_characters_become_the_cp1252_characters_they_stand_for(tmp_path: Path, caplog):
    # U+0092 is a cp1252 apostrophe mis-decoded as Latin-1 upstream; U+0085 an ellipsis; U+0081 is undefined.
    root = write_meld(tmp_path / "meld", {"train": [row(0, 0, "I don\x92t know\x85 \x81ok"), row(0, 1)]})
    utterances, _, report = prep.prepare(params_for(root))
    assert by_id(utterances)["train/dia0_utt0"].text == "I don\u2019t know\u2026 ok"
    where = f"{root / 'train_sent_emo.csv'}, row 1 (line 2)"
    assert report["cp1252_repaired"] == [{"row": where, "utterance_id": "train/dia0_utt0", "characters": 3}]
    caplog.set_level(logging.WARNING, logger="pipeline.prepare")
    prep.log_policies(report, params_for(root), tmp_path / "report.json")
    assert any("1 row(s) held cp1252" in r.message and where in r.message for r in caplog.records)


def test_policies_name_the_rows_they_touched(tmp_path: Path, caplog):
    rows = [row(0, 0), row(0, 1, emotion="excited"), row(0, 2)]
    rows[2]["StartTime"], rows[2]["EndTime"] = "00:00:05,000", "00:00:04,500"
    root = write_meld(tmp_path / "meld", {"train": rows}, missing={"train/dia0_utt0"})
    (root / "train_splits" / "dia0_utt0.mp4").symlink_to(tmp_path / "gone.mp4")  # a link to nothing
    utterances, _, report = prep.prepare(params_for(root, unknown_label="skip"))
    csv_path = root / "train_sent_emo.csv"
    assert report["dropped_rows"] == [
        {"row": f"{csv_path}, row 2 (line 3)", "utterance_id": "train/dia0_utt1", "emotion": "excited"}
    ]
    assert report["end_before_start"] == [
        {"row": f"{csv_path}, row 3 (line 4)", "utterance_id": "train/dia0_utt2", "start": 5.0, "end": 4.5}
    ]
    assert report["dangling_symlinks"] == [(root / "train_splits" / "dia0_utt0.mp4").as_posix()]
    assert report["splits"]["train"]["missing_clips"] == ["train/dia0_utt0"]
    assert by_id(utterances)["train/dia0_utt0"].clip == ""
    caplog.set_level(logging.WARNING, logger="pipeline.prepare")
    prep.log_policies(report, params_for(root), tmp_path / "report.json")
    text = caplog.text
    assert "left out 1 utterance(s) with labels outside" in text and "row 2 (line 3)" in text
    assert "1 MELD row(s) have an EndTime before their StartTime" in text and "row 3 (line 4)" in text
    assert "symbolic links to nothing" in text and "dia0_utt0.mp4" in text


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_an_unknown_manifest_column_names_the_nearest_known_one(tmp_path: Path, suffix: str):
    from pipeline.datasets import read_manifest

    record = {"dialogue_id": "d", "utterance_id": "u", "speaker": "S", "text": "t", "emotion": "joy"}
    record |= {"split": "test", "media_path": "u.mp4"}
    path = tmp_path / f"m.{suffix}"
    if suffix == "csv":
        path.write_text(",".join(record) + "\n" + ",".join(record.values()) + "\n", encoding="utf-8")
        where = r"row 0 \(header\)"
    else:
        path.write_text(json.dumps(record) + "\n", encoding="utf-8")
        where = "line 1"
    with pytest.raises(DatasetError, match=rf"{where}: unknown column\(s\) 'media_path' \(did you mean 'media'\?\)"):
        read_manifest(path, parse_params({}).data)


def test_manifest_long_cell_c1_repair_and_dangling_link(tmp_path: Path):
    from pipeline.datasets import read_manifest

    (tmp_path / "clip.mp4").symlink_to(tmp_path / "nowhere.mp4")
    header = "dialogue_id,utterance_id,speaker,text,emotion,split,media\n"
    text = "x" * 140_000 + " don\u0092t"
    path = tmp_path / "m.csv"
    path.write_text(header + f"d,u1,S,{text},joy,test,clip.mp4\n", encoding="utf-8")
    ds = read_manifest(path, parse_params({}).data)
    ((utterance, _),) = ds.rows
    assert utterance.text.endswith(" don\u2019t") and len(utterance.text) == len(text)
    assert ds.report["cp1252_repaired"] == [{"row": f"{path}, row 1 (line 2)", "utterance_id": "u1", "characters": 1}]
    assert ds.report["dangling_symlinks"] == [(tmp_path / "clip.mp4").as_posix()]
    assert ds.split_reports["test"]["missing_clips"] == ["u1"] and utterance.clip == ""
