"""predict's input checks and outputs, without a trained model: hidden files among the clips, the ASR
model check (offline, Hub unreachable; no network call is made), the transcript's labels, the CSV's
formula escaping and reason-code columns, and ``--help``."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from pipeline import predict
from pipeline.utterances import Utterance


def test_discover_clips_ignores_hidden_files_and_folders(tmp_path: Path):
    for name in (
        "dia1_utt0.mp4",
        "._dia1_utt0.mp4",  # macOS AppleDouble
        ".hidden.wav",
        ".Trashes/dia1_utt1.mp4",
        "conv/.cache/x.mp4",
        "conv/talk.wav",
        "conv/._talk.wav",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = predict.discover_clips(tmp_path)
    assert [u.utterance_id for u in found] == ["dia1_utt0", "conv/talk"]
    only_hidden = tmp_path / "only_hidden"
    (only_hidden / ".git").mkdir(parents=True)
    (only_hidden / "._a.mp4").write_bytes(b"x")
    (only_hidden / ".git" / "b.mp4").write_bytes(b"x")
    with pytest.raises(predict.DatasetError, match="no media files"):
        predict.discover_clips(only_hidden)


def test_check_asr_model(tmp_path: Path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    model_dir = tmp_path / "asr"
    model_dir.mkdir()
    assert predict.check_asr_model(str(model_dir)) == str(model_dir)  # a local directory: taken as it is
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"some/missing-model: .*not in the local Hugging Face cache.*--transcript"):
        predict.check_asr_model("some/missing-model")
    with pytest.raises(OSError, match=r"no such directory, nor a Hugging Face model id"):
        predict.check_asr_model(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(OSError, match="file, not a model directory"):
        (tmp_path / "model.bin").write_bytes(b"x")
        predict.check_asr_model(str(tmp_path / "model.bin"))

    # Online but the Hub does not answer: one failed probe, a clear error, no retries.
    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(OSError, match=r"some/missing-model: .*the Hub is unreachable.*local model directory"):
        predict.check_asr_model("some/missing-model")


def utterance(uid: str, emotion: str, sentiment: str) -> Utterance:
    return Utterance(uid, "test", "d", int(uid[1:]), "A", "hi", emotion, sentiment)


def test_split_labels_keeps_known_labels_for_scoring(caplog):
    from pipeline.config import DataParams

    checkpoint = {"emotions": ["neutral", "joy", "anger"], "sentiments": ["negative", "neutral", "positive"]}
    utts = [
        utterance("u0", "happy", "positive"),  # mapped to joy by data.label_map
        utterance("u1", "neutral", ""),
        utterance("u2", "anger", ""),
    ]
    data = DataParams(label_map={"happy": "joy"})
    with caplog.at_level(logging.WARNING):
        blank, gold, not_scored = predict.split_labels(utts, checkpoint, data, Path("t.csv"))
    assert [(u.emotion, u.sentiment) for u in blank] == [("", "")] * 3  # the model never sees the labels
    assert [u.text for u in blank] == ["hi"] * 3
    assert gold == {"emotion": {"u0": "joy", "u1": "neutral", "u2": "anger"}}
    assert not_scored == {"sentiment": "2 rows have no sentiment label"}
    assert "t.csv: 2 rows have no sentiment label: sentiment not scored" in caplog.text
    # Without any label: nothing scored, nothing to warn about.
    caplog.clear()
    _, gold, not_scored = predict.split_labels([utterance("u0", "", "")], checkpoint, data, Path("t.csv"))
    assert gold == {} and not_scored == {} and not caplog.records


def test_score_is_weighted_f1_and_accuracy():
    from sklearn.metrics import f1_score

    rows = [{"utterance_id": f"u{i}", "emotion": e} for i, e in enumerate(["joy", "joy", "anger", "neutral"])]
    gold = {"emotion": {"u0": "joy", "u1": "anger", "u2": "anger", "u3": "neutral"}}
    scores = predict.score(rows, gold)
    expected = f1_score(["joy", "anger", "anger", "neutral"], ["joy", "joy", "anger", "neutral"], average="weighted")
    assert scores == {"emotion": {"weighted_f1": round(expected, 4), "accuracy": 0.75, "utterances": 4}}


def test_write_outputs_escapes_formulas_and_gives_reason_codes(tmp_path: Path):
    texts = ['=HYPERLINK("http://x")', "+1", "-minus", "@SUM(A1)", "\tTab", "\rCR", "plain - text"]
    rows = [
        {
            "utterance_id": f"=u{i}" if i == 0 else f"u{i}",
            "dialogue_id": "@d",
            "utterance_index": i,
            "speaker": "-A",
            "text": text,
            "text_source": "transcript",
            "emotion": "joy",
            "emotion_prob": 0.75,
            "sentiment": "positive",
            "sentiment_prob": 0.5,
            "modalities": ["text"],
            "missing": {"audio": "truncated", "visual": "no_face"},
            "emotion_probs": {"joy": 0.75, "anger": 0.25},
            "sentiment_probs": {"positive": 0.5, "negative": 0.5},
        }
        for i, text in enumerate(texts)
    ]
    labels = {"emotions": ["joy", "anger"], "sentiments": ["positive", "negative"]}
    result = {"rows": rows, "skipped": [], "encoders": {}, "labels": labels}
    predict.write_outputs(result, tmp_path, {"text_source": "transcript"})
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as f:
        out = list(csv.DictReader(f))
    assert [r["text"] for r in out] == ["'" + t for t in texts[:-1]] + ["plain - text"]
    assert out[0]["utterance_id"] == "'=u0" and out[1]["utterance_id"] == "u1"
    assert {(r["dialogue_id"], r["speaker"]) for r in out} == {("'@d", "'-A")}
    assert out[0]["p_emotion_joy"] == "0.75" and out[0]["utterance_index"] == "0"  # numbers as they are
    assert (out[0]["text_present"], out[0]["audio_present"], out[0]["visual_present"]) == ("1", "0", "0")
    assert (out[0]["text_missing"], out[0]["audio_missing"], out[0]["visual_missing"]) == ("", "truncated", "no_face")
    raw = json.loads((tmp_path / "predictions.json").read_text())
    assert [r["text"] for r in raw["rows"]] == texts and raw["rows"][0]["utterance_id"] == "=u0"


def test_help_gives_every_option_and_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: models/model.pt)" in out and "(default: data/predict)" in out
    assert "(default: params.yaml)" in out and "(default: openai/whisper-small)" in out
    for option in ("--clips", "--transcript", "--checkpoint", "--params", "--out", "--work", "--asr-model"):
        assert option in out


def test_transcript_c1_characters_are_repaired_and_named(tmp_path: Path, caplog):
    from pipeline.config import parse_params

    transcript = tmp_path / "t.csv"
    transcript.write_text(
        "dialogue_id,utterance_id,speaker,text\nd,u1,A,I don\u0092t know\nd,u2,B,Fine\n", encoding="utf-8"
    )
    caplog.set_level(logging.WARNING, logger="pipeline.predict")
    utterances, report = predict.utterances_from_transcript(transcript, tmp_path, parse_params({}))
    assert utterances[0].text == "I don\u2019t know"
    where = f"{transcript}, row 1 (line 2)"
    assert report["cp1252_repaired"] == [{"row": where, "utterance_id": "u1", "characters": 1}]
    assert f"{where}: 1 cp1252 character(s) decoded" in caplog.text


def test_a_setting_newer_than_the_checkpoint_counts_as_its_default():
    from pipeline.config import parse_params

    params = parse_params({})
    recorded = {s: getattr(params, s).model_dump(mode="json") for s in ("text", "audio", "visual", "graph")}
    del recorded["audio"]["on_truncated"]  # trained before the setting existed
    checkpoint = {"feature_params": recorded}
    predict.check_feature_params(checkpoint, params, "model.pt")  # the default: what that code did
    partial = parse_params({"audio": {"on_truncated": "use_partial"}})
    with pytest.raises(ValueError, match="audio.on_truncated: checkpoint 'mask', params 'use_partial'"):
        predict.check_feature_params(checkpoint, partial, "model.pt")
