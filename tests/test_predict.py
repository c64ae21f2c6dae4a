"""predict: new clips (+ transcript, or ASR) + a trained checkpoint -> per-utterance predictions.

A small checkpoint is trained once in-process on the demo (3 epochs, 2 frames per clip); the tests
run ``pipeline.predict.main`` on the bundled ``data/raw/predict`` conversations (one clip corrupt), on
clips without a transcript (a tiny random wav2vec2-CTC model built here stands in for Whisper), and on
the real videos of ``../shared`` with a hand-written transcript.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_AUDIO

from pipeline import predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_root: Path) -> Path:
    """A directory with params.yaml and models/model.pt trained on the demo (cwd during the tests)."""
    from pipeline import build_graphs, extract_audio, extract_text, extract_visual, prepare, train
    from pipeline.config import load_params
    from pipeline.utterances import UTTERANCES_FILE

    root = tmp_path_factory.mktemp("predict_run")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["root"] = str(demo_root)
    raw["visual"].update(max_frames=2, fps=1.0)
    raw["train"]["epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = load_params("params.yaml")
        # the stages as dvc.yaml runs them, with its paths
        prepared, features, graphs = Path("data/prepared"), Path("data/features"), Path("data/graphs")
        prepare.run(params, out=prepared)
        for stage in (extract_text, extract_audio, extract_visual):
            stage.run(params, utterances=prepared / UTTERANCES_FILE, out=features)
        build_graphs.run(params, utterances=prepared / UTTERANCES_FILE, out=graphs)
        train.run(
            params,
            prepared=prepared,
            features=features,
            graphs=graphs,
            model=Path("models/model.pt"),
            metrics=Path("metrics/train"),
            resume_dir=Path("data/interim/train"),
        )
    finally:
        os.chdir(cwd)
    return root


def rows_by_id(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return {r["utterance_id"]: r for r in csv.DictReader(f)}


def test_predict_with_transcript_reports_the_corrupt_clip(run_dir: Path, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    clips = REPO / "data/raw/predict"
    code = predict.main(
        [
            "--clips",
            str(clips / "clips"),
            "--transcript",
            str(clips / "transcript.csv"),
            "--out",
            "out",
            "--work",
            "work",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = rows_by_id(run_dir / "out/predictions.csv")
    assert len(rows) == 13 and list(rows)[:3] == ["conv0_utt0", "conv0_utt1", "conv0_utt2"]
    broken = rows["conv1_utt1"]  # truncated to 30 %: audio and video lost, predicted from its text
    assert (broken["text_present"], broken["audio_present"], broken["visual_present"]) == ("1", "0", "0")
    assert (broken["text_missing"], broken["audio_missing"], broken["visual_missing"]) == ("", "truncated", "truncated")
    assert rows["conv1_utt2"]["visual_present"] == "0"  # the demo's no-face clip
    assert rows["conv1_utt2"]["visual_missing"] == "no_face"
    assert all(r["text_source"] == "transcript" for r in rows.values())
    emotions = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    for r in rows.values():
        probs = [float(r[f"p_emotion_{c}"]) for c in emotions]
        assert sum(probs) == pytest.approx(1.0, abs=1e-3)
        assert r["emotion"] == emotions[probs.index(max(probs))]
        assert float(r["emotion_prob"]) == pytest.approx(max(probs), abs=1e-4)
    result = json.loads((run_dir / "out/predictions.json").read_text())
    by_id = {r["utterance_id"]: r for r in result["rows"]}
    assert by_id["conv1_utt1"]["missing"] == {"audio": "truncated", "visual": "truncated"}
    assert by_id["conv1_utt1"]["modalities"] == ["text"]
    assert result["skipped"] == [] and result["text_source"] == "transcript"
    assert result["scores"] == {} and result["not_scored"] == {}  # a transcript without labels
    assert result["encoders"]["text"]["pretrained"] is True and result["encoders"]["audio"]["pretrained"] is False


def test_predict_refuses_other_feature_settings(run_dir: Path, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    raw = yaml.safe_load((run_dir / "params.yaml").read_text())
    raw["text"]["pooling"] = "cls"
    raw["text"]["batch_size"] = 3  # runtime only: not a difference
    Path("other.yaml").write_text(yaml.safe_dump(raw))
    clips = REPO / "data/raw/predict"
    code = predict.main(
        [
            "--clips",
            str(clips / "clips"),
            "--transcript",
            str(clips / "transcript.csv"),
            "--params",
            "other.yaml",
            "--out",
            "refused",
            "--work",
            "work",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: models/model.pt was trained on features made with other settings")
    assert "text.pooling: checkpoint 'mean', params 'cls'" in err and "batch_size" not in err
    assert not Path("refused").exists()
    # A checkpoint that does not record its feature settings is refused too.
    checkpoint = torch.load("models/model.pt", weights_only=True)
    del checkpoint["feature_params"]
    torch.save(checkpoint, "old.pt")
    assert (
        predict.main(
            [
                "--clips",
                str(clips / "clips"),
                "--checkpoint",
                "old.pt",
                "--transcript",
                str(clips / "transcript.csv"),
                "--out",
                "refused",
            ]
        )
        == 1
    )
    assert "does not record its feature settings" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_asr(tmp_path_factory) -> Path:
    """A randomly initialised wav2vec2-CTC model with a letter vocabulary, saved as a HF directory."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    path = tmp_path_factory.mktemp("tiny_asr")
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(path / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
    )
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(Wav2Vec2Config(**TINY_AUDIO, vocab_size=len(vocab), pad_token_id=0)).save_pretrained(path)
    return path


def test_predict_without_transcript_uses_asr(run_dir: Path, tiny_asr: Path, demo_root: Path, monkeypatch, capsys):
    from transformers import pipeline

    from pipeline.media import load_audio

    monkeypatch.chdir(run_dir)
    clips = run_dir / "asr_clips"
    clips.mkdir()
    for u in range(3):
        shutil.copy(demo_root / "output_repeated_splits_test" / f"dia2_utt{u}.mp4", clips / f"dia2_utt{u}.mp4")
    (clips / "dia2_utt3.mp4").write_bytes(b"")  # corrupt: nothing to transcribe, no audio, no video
    code = predict.main(["--clips", str(clips), "--out", "asr_out", "--work", "asr_work", "--asr-model", str(tiny_asr)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((run_dir / "asr_out/predictions.json").read_text())
    assert result["text_source"] == f"asr ({tiny_asr})"
    assert result["not_transcribed"] == {"dia2_utt3": "corrupt"}
    assert result["skipped"] == [
        {"utterance_id": "dia2_utt3", "reasons": {"text": "empty_text", "audio": "corrupt", "visual": "corrupt"}}
    ]
    rows = result["rows"]
    assert [r["utterance_id"] for r in rows] == ["dia2_utt0", "dia2_utt1", "dia2_utt2"]
    assert {r["dialogue_id"] for r in rows} == {"./dia2"} and [r["utterance_index"] for r in rows] == [0, 1, 2]
    assert all(r["text_source"] == "asr" and r["speaker"] == "unknown" for r in rows)
    # the text in the output is what the ASR model hears in that clip
    asr = pipeline("automatic-speech-recognition", model=str(tiny_asr))
    heard = asr({"raw": load_audio(clips / "dia2_utt1.mp4").numpy(), "sampling_rate": 16000})["text"]
    assert rows[1]["text"] == " ".join(heard.split())


def test_discover_clips_orders_dialogues(tmp_path: Path):
    for name in ("b/dia3_utt10.mp4", "b/dia3_utt2.mp4", "b/dia1_utt0.wav", "a/zeta.mp4", "a/alpha.mp4", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = predict.discover_clips(tmp_path)
    assert [(u.utterance_id, u.dialogue_id, u.utterance_index) for u in found] == [
        ("a/alpha", "a", 0),
        ("a/zeta", "a", 1),
        ("b/dia1_utt0", "b/dia1", 0),
        ("b/dia3_utt2", "b/dia3", 2),
        ("b/dia3_utt10", "b/dia3", 10),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(predict.DatasetError, match="no media files"):
        predict.discover_clips(tmp_path / "empty")


def test_predict_on_real_videos_with_a_handwritten_transcript(run_dir: Path, shared_dir: Path, monkeypatch, capsys):
    videos = shared_dir / "media" / "videos"
    if not (videos / "WolfgangLanger_Pexels.mp4").is_file():
        pytest.skip(f"{videos} lacks the Pexels clip")
    monkeypatch.chdir(run_dir)
    transcript = run_dir / "real_transcript.csv"
    with open(transcript, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["dialogue_id", "utterance_id", "speaker", "text", "media", "start", "end"])
        pexels = (videos / "WolfgangLanger_Pexels.mp4").as_posix()
        w.writerow(["pexels", "pexels_0", "Actress", "I can't believe you did this to me.", pexels, 0.0, 6.5])
        w.writerow(["pexels", "pexels_1", "Actress", "Why would you say that?", pexels, 6.5, 13.0])
        w.writerow(["pexels", "pexels_2", "Actress", "Fine. I'm leaving.", pexels, 13.0, 19.5])
        w.writerow(["other", "single", "A", "Hello, nice to see you.", (videos / "single_face.mp4").as_posix(), "", ""])
        w.writerow(["other", "empty_room", "B", "Is anyone there?", (videos / "no_face.mp4").as_posix(), "", ""])
    code = predict.main(
        ["--clips", str(videos), "--transcript", str(transcript), "--out", "real_out", "--work", "real_work"]
    )
    assert code == 0, capsys.readouterr().err
    rows = rows_by_id(run_dir / "real_out/predictions.csv")
    assert list(rows) == ["pexels_0", "pexels_1", "pexels_2", "single", "empty_room"]
    assert all(rows[u]["visual_present"] == "1" for u in ("pexels_0", "pexels_1", "pexels_2", "single"))
    assert rows["empty_room"]["visual_present"] == "0"
    report = json.loads((run_dir / "real_work/features/visual_report.json").read_text())
    assert report["masked"] == {"no_face": ["empty_room"]}
    assert report["per_clip"]["pexels_0"]["frames"] == 2  # max_frames over the 6.5 s segment


# Labels for the 13 utterances of data/raw/predict (all among the demo checkpoint's classes).
PREDICT_EMOTIONS = [
    "anger", "anger", "fear", "sadness", "neutral", "surprise", "disgust",
    "anger", "neutral", "surprise", "neutral", "joy", "joy",
]  # fmt: skip
PREDICT_SENTIMENTS = [
    "negative", "negative", "negative", "negative", "neutral", "positive", "negative",
    "negative", "neutral", "negative", "neutral", "positive", "positive",
]  # fmt: skip


def labelled_transcript(path: Path, emotions: list[str], sentiments: list[str], speakers: dict | None = None) -> Path:
    """data/raw/predict/transcript.csv with absolute media paths, emotion / sentiment columns and,
    optionally, some speakers renamed."""
    clips = REPO / "data/raw/predict"
    with open(clips / "transcript.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, [*rows[0], "emotion", "sentiment"])
        w.writeheader()
        for row, emotion, sentiment in zip(rows, emotions, sentiments, strict=True):
            row["media"] = (clips / row["media"]).as_posix()
            row["speaker"] = (speakers or {}).get(row["speaker"], row["speaker"])
            w.writerow({**row, "emotion": emotion, "sentiment": sentiment})
    return path


def test_predict_with_an_unknown_label_predicts_and_warns(run_dir: Path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(run_dir)
    emotions = ["excited" if i in (3, 11) else e for i, e in enumerate(PREDICT_EMOTIONS)]
    transcript = labelled_transcript(run_dir / "excited.csv", emotions, PREDICT_SENTIMENTS)
    clips = REPO / "data/raw/predict/clips"
    code = predict.main(["--clips", str(clips), "--transcript", str(transcript), "--out", "exc_out", "--work", "work"])
    assert code == 0, capsys.readouterr().err
    assert len(rows_by_id(run_dir / "exc_out/predictions.csv")) == 13
    result = json.loads((run_dir / "exc_out/predictions.json").read_text())
    assert len(result["rows"]) == 13 and "emotion" not in result["scores"]
    assert result["not_scored"]["emotion"].startswith(
        "emotion labels ['excited'] (2 rows) are not among the checkpoint's classes ['neutral', 'surprise'"
    )
    assert set(result["scores"]) == {"sentiment"}  # the sentiment labels are all known: scored
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("['excited'] (2 rows)" in w and "emotion not scored" in w for w in warnings), warnings


def test_predict_scores_against_the_transcripts_labels(run_dir: Path, monkeypatch, capsys, caplog):
    from sklearn.metrics import accuracy_score, f1_score

    caplog.set_level(logging.INFO, logger="pipeline.predict")
    monkeypatch.chdir(run_dir)
    transcript = labelled_transcript(
        run_dir / "labelled.csv", PREDICT_EMOTIONS, PREDICT_SENTIMENTS, speakers={"Bea": "=Bea", "Dan": "-Dan"}
    )
    clips = REPO / "data/raw/predict/clips"
    code = predict.main(["--clips", str(clips), "--transcript", str(transcript), "--out", "lab_out", "--work", "work"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((run_dir / "lab_out/predictions.json").read_text())
    rows = result["rows"]
    assert len(rows) == 13 and result["not_scored"] == {}
    for task, gold in (("emotion", PREDICT_EMOTIONS), ("sentiment", PREDICT_SENTIMENTS)):
        pred = [r[task] for r in rows]
        assert result["scores"][task] == {
            "weighted_f1": pytest.approx(f1_score(gold, pred, average="weighted", zero_division=0), abs=1e-4),
            "accuracy": pytest.approx(accuracy_score(gold, pred), abs=1e-4),
            "utterances": 13,
        }
    assert any("emotion against the transcript's labels: weighted F1" in r.getMessage() for r in caplog.records)
    # speakers that a spreadsheet would run as formulas: escaped in the CSV, raw in the JSON
    csv_rows = rows_by_id(run_dir / "lab_out/predictions.csv")
    assert csv_rows["conv0_utt0"]["speaker"] == "'=Bea" and csv_rows["conv0_utt1"]["speaker"] == "'-Dan"
    assert rows[0]["speaker"] == "=Bea" and rows[1]["speaker"] == "-Dan"


def test_predict_checks_every_input_before_extracting(run_dir: Path, monkeypatch, capsys):
    from pipeline import audio_features, text_features, visual_features

    def must_not_run(*args, **kwargs):
        raise AssertionError("extraction or transcription ran before the inputs were checked")

    for module in (text_features, audio_features, visual_features):
        monkeypatch.setattr(module, "extract", must_not_run)
    monkeypatch.setattr(predict, "transcribe", must_not_run)
    monkeypatch.chdir(run_dir)
    clips = REPO / "data/raw/predict/clips"
    transcript = REPO / "data/raw/predict/transcript.csv"
    Path("garbage.pt").write_text("not a checkpoint")
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["visual"]["max_frames"] = 5
    Path("mismatch.yaml").write_text(yaml.safe_dump(raw))
    Path("duplicate.csv").write_text(
        "dialogue_id,utterance_id,speaker,text\nd,u0,A,hello\nd,u0,B,hi again\n", encoding="utf-8"
    )
    cases = [
        (["--clips", "no_such_dir", "--transcript", str(transcript)], "error: --clips no_such_dir: not a directory"),
        (["--transcript", str(transcript), "--checkpoint", "none.pt"], "error: none.pt: no trained model"),
        (
            ["--transcript", str(transcript), "--checkpoint", "garbage.pt"],
            "error: --checkpoint garbage.pt: not a checkpoint written by the train stage",
        ),
        (
            ["--transcript", str(transcript), "--params", "mismatch.yaml"],
            "error: models/model.pt was trained on features made with other settings",
        ),
        (["--transcript", "no_such.csv"], "error: --transcript no_such.csv: no such file"),
        (["--transcript", "duplicate.csv"], "duplicate utterance_id 'u0'"),
    ]
    for args, message in cases:
        argv = args if "--clips" in args else ["--clips", str(clips), *args]
        code = predict.main([*argv, "--out", "refused", "--work", "refused_work"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and err.startswith("error: "), (args, err)
        assert len(err.strip().splitlines()) == (1 if "mismatch.yaml" not in args else 3), err  # one error line
        assert "visual.max_frames: checkpoint 2, params 5" in err if "mismatch.yaml" in args else True
    assert not Path("refused").exists() and not Path("refused_work").exists()


def test_predict_without_transcript_names_a_missing_asr_model(run_dir: Path, monkeypatch, capsys):
    from pipeline import audio_features, text_features, visual_features

    def must_not_run(*args, **kwargs):
        raise AssertionError("extraction or transcription ran before the ASR model was checked")

    for module in (text_features, audio_features, visual_features):
        monkeypatch.setattr(module, "extract", must_not_run)
    monkeypatch.setattr(predict, "transcribe", must_not_run)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(run_dir)
    clips = REPO / "data/raw/predict/clips"
    code = predict.main(["--clips", str(clips), "--asr-model", "some/missing-model", "--out", "asr_refused"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --asr-model some/missing-model: ")
    assert "HF_HUB_OFFLINE=1" in err and "--transcript" in err and "local model directory" in err
    assert not Path("asr_refused").exists()
