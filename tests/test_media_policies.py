"""What the pipeline does with bad input it can still use, and how it names the rows: clips cut short
(``audio.on_truncated`` / ``visual.on_truncated``: mask or use the part that decoded), segment ends beyond
the media (clamped), utterances cut to ``text.max_length``. Each is listed in its stage's report, summarised
in the log, and listed again when the stage resumes from its cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_AUDIO, save_tiny_bert

from pipeline import audio_features, text_features, visual_features
from pipeline.config import parse_params
from pipeline.feature_table import load_table
from pipeline.media import MediaError, load_audio, sample_frames
from pipeline.utterances import Utterance

VISUAL = {"face_weights": "random", "fps": 2.0, "max_frames": 8}
WORDS = "i am happy sad so very hate this cat dog love the train leaves".split()
KEPT = 0.6  # share of a clip's bytes a cut copy keeps


def utt(uid: str, clip: Path | str = "", start: float | None = None, end: float | None = None, text: str = "x"):
    split, name = uid.split("/")
    d, u = name[3:].split("_utt")
    clip = str(clip) if clip else ""
    return Utterance(uid, split, f"{split}/{d}", int(u), "A", text, "neutral", "neutral", clip, "", start, end)


def read_report(features_dir: Path, modality: str) -> dict:
    return json.loads((features_dir / f"{modality}_report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cut_clips(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, ffmpeg) -> dict[str, Path]:
    """The demo's face clip (2.54 s, 10 fps, with audio) as MP4 (moov atom first), Matroska and WebM, whole
    (``whole.<ext>``) and cut to the first 60 % of their bytes (``cut.<ext>``): the header survives and
    declares the whole duration, the packets after the cut are gone (the reported case: about a third of the
    audio and three of four frames decode)."""
    out = tmp_path_factory.mktemp("cut_clips")
    source = demo_root / "train_splits" / "dia0_utt0.mp4"
    codecs = {
        "mp4": ["-c:v", "libx264", "-c:a", "aac", "-movflags", "+faststart"],
        "mkv": ["-c:v", "libx264", "-c:a", "aac"],
        "webm": ["-c:v", "libvpx", "-b:v", "300k", "-c:a", "libopus"],
    }
    clips = {}
    for ext, args in codecs.items():
        whole = out / f"whole.{ext}"
        ffmpeg("-i", str(source), *args, str(whole))
        data = whole.read_bytes()
        (out / f"cut.{ext}").write_bytes(data[: int(len(data) * KEPT)])
        clips[f"whole.{ext}"], clips[f"cut.{ext}"] = whole, out / f"cut.{ext}"
    return clips


# --- media: truncation of the whole clip and of a segment ---------------------------------------------------


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
def test_a_cut_clip_is_truncated_for_audio_and_frames(cut_clips: dict[str, Path], ext: str):
    clip = cut_clips[f"cut.{ext}"]
    # Matroska / WebM declare each track's duration in a tag, not in the stream's duration field
    with pytest.raises(MediaError, match=r"audio stream declares 2\.\d\d s but decoded to [01]\.\d\d s") as err:
        load_audio(clip)
    assert err.value.reason == "truncated" and err.value.path == str(clip)
    # some frames decode: still cut short
    with pytest.raises(MediaError, match=r"video stream declares 2\.\d\d s but frames decode only to") as err:
        sample_frames(clip, 2.0, 8)
    assert err.value.reason == "truncated"


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
def test_whole_clips_are_not_truncated_and_leave_no_notes(cut_clips: dict[str, Path], ext: str):
    notes: dict = {}
    wave = load_audio(cut_clips[f"whole.{ext}"], notes=notes)
    assert abs(wave.numel() / 16000 - 2.54) < 0.1
    assert len(sample_frames(cut_clips[f"whole.{ext}"], 2.0, 8, notes=notes)) == 5
    assert notes == {}


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
def test_use_partial_returns_what_decoded_and_notes_it(cut_clips: dict[str, Path], ext: str):
    whole, cut = cut_clips[f"whole.{ext}"], cut_clips[f"cut.{ext}"]
    notes: dict = {}
    wave = load_audio(cut, on_truncated="use_partial", notes=notes)
    partial = notes["partial"]
    assert set(notes) == {"partial"} and abs(partial["declared"] - 2.54) < 0.1  # + codec priming
    assert 0.2 < partial["decoded"] < 0.9 * partial["declared"]
    assert abs(wave.numel() / 16000 - partial["decoded"]) < 0.01
    # the part that decoded is the beginning of the whole clip's audio (codec edge samples aside)
    reference = load_audio(whole)[: wave.numel()]
    assert torch.allclose(wave[:-2000], reference[:-2000], atol=1e-3)

    notes = {}
    frames = sample_frames(cut, 2.0, 8, on_truncated="use_partial", notes=notes)
    assert 1 <= len(frames) < 5 and abs(notes["partial"]["declared"] - 2.5) < 0.1
    assert (len(frames) - 1) / 2.0 < notes["partial"]["decoded"] < 0.9 * notes["partial"]["declared"]
    reference = sample_frames(whole, 2.0, 8)
    for got, expected in zip(frames[:-1], reference):
        assert np.array_equal(got, expected)
    # the last frame may come from the packet the cut went through: a few pixels concealed by the decoder
    assert np.abs(frames[-1].astype(int) - reference[len(frames) - 1].astype(int)).mean() < 1.0


def test_a_cut_after_audio_max_seconds_changes_nothing(cut_clips: dict[str, Path]):
    notes: dict = {}
    wave = load_audio(cut_clips["cut.mp4"], max_seconds=0.5, notes=notes)
    assert notes == {} and torch.equal(wave, load_audio(cut_clips["whole.mp4"], max_seconds=0.5))


def test_nothing_decoded_is_truncated_even_with_use_partial(bad_clips: dict[str, Path]):
    clip = bad_clips["truncated"]  # 30 % of a demo clip: the header survives, no packet decodes
    for decode in (load_audio, lambda p, **k: sample_frames(p, 2.0, 2, **k)):
        with pytest.raises(MediaError) as err:
            decode(clip, on_truncated="use_partial", notes={})
        assert err.value.reason == "truncated"


def test_a_segment_is_checked_against_its_part_of_the_declared_duration(cut_clips: dict[str, Path]):
    whole, cut = cut_clips["whole.mp4"], cut_clips["cut.mp4"]
    # a segment inside the part that survived decodes whole: no truncation, the same samples and frames
    notes: dict = {}
    segment = load_audio(cut, start=0.1, end=0.5, notes=notes)
    assert notes == {} and torch.allclose(segment, load_audio(whole, start=0.1, end=0.5), atol=1e-4)
    assert len(sample_frames(cut, 10.0, 8, 0.1, 0.5, notes=notes)) == 4 and notes == {}
    # a segment reaching past the cut: truncated (the check used to run on whole clips only)
    with pytest.raises(MediaError, match=r"segment \[0\.2, 2\.4\] s should hold .* 2\.20 s but decoded to") as err:
        load_audio(cut, start=0.2, end=2.4)
    assert err.value.reason == "truncated"
    with pytest.raises(MediaError, match=r"segment \[0\.2, 2\.4\] s should hold") as err:
        sample_frames(cut, 2.0, 8, 0.2, 2.4)
    assert err.value.reason == "truncated"
    notes = {}
    load_audio(cut, start=0.2, end=2.4, on_truncated="use_partial", notes=notes)
    assert notes["partial"]["declared"] == pytest.approx(2.2) and notes["partial"]["decoded"] < 1.5


def test_a_segment_end_beyond_the_media_is_clamped_and_noted(cut_clips: dict[str, Path]):
    clip = cut_clips["whole.mp4"]
    notes: dict = {}
    wave = load_audio(clip, start=2.0, end=9.0, notes=notes)
    assert notes == {"segment_clamped": {"end": 9.0, "media_end": pytest.approx(2.54, abs=0.02)}}
    assert abs(wave.numel() / 16000 - (notes["segment_clamped"]["media_end"] - 2.0)) < 0.01
    notes = {}
    assert len(sample_frames(clip, 10.0, 8, 2.0, 9.0, notes=notes)) == 5
    assert notes == {"segment_clamped": {"end": 9.0, "media_end": pytest.approx(2.5, abs=0.05)}}
    notes = {}  # an end inside the media is not clamped
    load_audio(clip, start=1.0, end=2.0, notes=notes)
    sample_frames(clip, 2.0, 8, 1.0, 2.0, notes=notes)
    assert notes == {}


def test_an_unknown_policy_is_a_value_error(cut_clips: dict[str, Path]):
    with pytest.raises(ValueError, match="on_truncated"):
        load_audio(cut_clips["cut.mp4"], on_truncated="keep")
    with pytest.raises(ValueError, match="on_truncated"):
        sample_frames(cut_clips["cut.mp4"], 2.0, 8, on_truncated="keep")


# --- the audio and visual stages: on_truncated, and the rows they name -----------------------------------------


def run_media_stage(module, section: dict, utterances, tmp_path: Path, tag: str) -> dict:
    modality = module.__name__.split(".")[-1].split("_")[0]
    params = parse_params({modality: {**section, "max_masked_share": 1.0}})
    return module.extract(utterances, params, tmp_path / tag, tmp_path / "cache")


@pytest.mark.parametrize(
    "module, section",
    [(audio_features, {"random_init": TINY_AUDIO}), (visual_features, VISUAL)],
    ids=["audio", "visual"],
)
def test_stage_masks_a_cut_clip_by_default(module, section, cut_clips, tmp_path: Path, caplog):
    rows = [utt("train/dia0_utt0", cut_clips["whole.mp4"]), utt("train/dia0_utt1", cut_clips["cut.mp4"])]
    report = run_media_stage(module, section, rows, tmp_path, "f")
    assert report["masked"] == {"truncated": ["train/dia0_utt1"]} and report["partial"] == {}
    modality = report["modality"]
    assert f"{modality}.on_truncated: use_partial would" in caplog.text  # the way out is named


@pytest.mark.parametrize(
    "module, section",
    [(audio_features, {"random_init": TINY_AUDIO}), (visual_features, VISUAL)],
    ids=["audio", "visual"],
)
def test_stage_with_use_partial_encodes_a_cut_clip_and_names_it(module, section, cut_clips, tmp_path: Path, caplog):
    caplog.set_level(logging.INFO)
    rows = [utt("train/dia0_utt0", cut_clips["whole.mp4"]), utt("train/dia0_utt1", cut_clips["cut.mp4"])]
    report = run_media_stage(module, {**section, "on_truncated": "use_partial"}, rows, tmp_path, "f")
    modality = report["modality"]
    table = load_table(tmp_path / "f" / f"{modality}.safetensors")
    assert table.reasons == ["ok", "ok"] and torch.count_nonzero(table.features[1]) > 0
    partial = report["partial"]
    assert list(partial) == ["train/dia0_utt1"]
    assert partial["train/dia0_utt1"]["decoded"] < 0.9 * partial["train/dia0_utt1"]["declared"]
    assert read_report(tmp_path / "f", modality)["partial"] == partial
    if modality == "visual":  # the frames facts stay per clip, the decoding facts are listed apart
        assert set(report["per_clip"]["train/dia0_utt1"]) == {"frames", "faces_per_frame", "frames_tracked"}
    # a warning names the utterance and the seconds; the summary line counts the rows
    warning = next(r.getMessage() for r in caplog.records if "was cut short" in r.getMessage())
    decoded, declared = partial["train/dia0_utt1"]["decoded"], partial["train/dia0_utt1"]["declared"]
    assert "train/dia0_utt1" in warning and f"{decoded:.2f} s" in warning and f"{declared:.2f} s" in warning
    assert f"{modality}: 1 of 2 utterances were cut short" in caplog.text and "'partial'" in caplog.text

    # resumed from the cache: the same rows listed, the same report bytes
    written = (tmp_path / "f" / f"{modality}_report.json").read_bytes()
    again = run_media_stage(module, {**section, "on_truncated": "use_partial"}, rows, tmp_path, "f")
    assert again["run"]["resumed_from_cache"] == 2 and again["partial"] == partial
    assert (tmp_path / "f" / f"{modality}_report.json").read_bytes() == written


@pytest.mark.parametrize(
    "module, section",
    [(audio_features, {"random_init": TINY_AUDIO}), (visual_features, VISUAL)],
    ids=["audio", "visual"],
)
def test_stage_names_segments_clamped_to_the_media(module, section, cut_clips, tmp_path: Path, caplog):
    clip = cut_clips["whole.mp4"]
    rows = [utt("train/dia0_utt0", clip, 0.0, 1.0), utt("train/dia0_utt1", clip, 1.0, 7.5)]
    report = run_media_stage(module, section, rows, tmp_path, "f")
    modality = report["modality"]
    assert report["reasons"] == {"ok": 2}
    clamped = report["segment_clamped"]
    assert list(clamped) == ["train/dia0_utt1"] and clamped["train/dia0_utt1"]["end"] == 7.5
    assert abs(clamped["train/dia0_utt1"]["media_end"] - 2.54) < 0.06
    assert f"{modality}: 1 of 2 utterances have a segment end beyond their media" in caplog.text
    again = run_media_stage(module, section, rows, tmp_path, "g")  # resumed: listed again
    assert again["run"]["resumed_from_cache"] == 2 and again["segment_clamped"] == clamped


# --- text: utterances cut to text.max_length --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_bert")
    save_tiny_bert(path, WORDS, num_hidden_layers=1, max_position_embeddings=32)
    return path


LONG = "i am so very very sad hate this cat dog love the train leaves i am so sad"  # 18 tokens


@pytest.mark.parametrize(
    "context_window, max_length, cut",
    [
        (0, 16, ["train/dia0_utt1"]),
        # the long utterance is cut; the short one keeps its tokens, its context (the long one) is cut
        (1, 16, ["train/dia0_utt1"]),
        # longest_first cuts both segments to about half of max_length: the short utterance loses a token too
        (1, 12, ["train/dia0_utt0", "train/dia0_utt1"]),
    ],
)
def test_text_names_utterances_whose_own_tokens_were_cut(
    tiny_bert: Path, tmp_path: Path, context_window: int, max_length: int, cut: list[str], caplog
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [utt("train/dia0_utt0", text="i am happy"), utt("train/dia0_utt1", text=LONG)]
    section = {"model": str(tiny_bert), "max_length": max_length, "context_window": context_window}
    report = text_features.extract(rows, parse_params({"text": section}), tmp_path / "f", tmp_path / "c")
    own = {u.utterance_id: u.text if context_window == 0 else f"A: {u.text}" for u in rows}  # the first segment
    expected = {uid: len(tokenizer(own[uid], add_special_tokens=False)["input_ids"]) for uid in cut}
    assert report["truncated_to_max_length"] == expected
    assert read_report(tmp_path / "f", "text")["truncated_to_max_length"] == expected
    assert f"text: {len(cut)} of 2 utterances had their own tokens cut to text.max_length" in caplog.text
    again = text_features.extract(rows, parse_params({"text": section}), tmp_path / "f", tmp_path / "c")
    assert again["run"]["resumed_from_cache"] == 2 and again["truncated_to_max_length"] == expected  # listed again


def test_text_within_max_length_names_no_row(tiny_bert: Path, tmp_path: Path):
    rows = [utt("train/dia0_utt0", text="i am happy"), utt("train/dia0_utt1", text=LONG)]
    params = parse_params({"text": {"model": str(tiny_bert), "max_length": 32}})
    assert text_features.extract(rows, params, tmp_path / "f", tmp_path / "c")["truncated_to_max_length"] == {}
