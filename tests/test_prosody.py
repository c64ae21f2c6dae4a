"""audio.backend: prosody (librosa log-mel, pYIN pitch and RMS energy functionals) on signals with known
pitch and loudness, its stage run on generated wav clips, and no "randomly initialised" warning from the
audio and visual stages when the table has no media to encode."""

from __future__ import annotations

import logging
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FEATURES, TINY_AUDIO, run_extraction_stage, write_utterances

from pipeline import audio_features, extract_audio, extract_visual, visual_features
from pipeline.audio_features import PROSODY_DIM, PROSODY_LAYOUT, prosody_features, prosody_frames, prosody_info
from pipeline.config import ParamsError, parse_params
from pipeline.encoders import random_identity
from pipeline.feature_table import load_table

pytest.importorskip("librosa")

SR = 16000
MEL = slice(0, 40)
MEL_STD = slice(40, 80)
F0_MEAN, F0_STD, F0_MIN, F0_MAX, F0_RANGE, VOICED = range(80, 86)
RMS_MEAN, RMS_STD, RMS_MAX, RMS_DELTA = range(86, 90)
DB_PER_DOUBLING = 20 * np.log10(2.0)  # 6.02 dB
RANDOM = "RANDOMLY INITIALISED"


def sine(freq: float, seconds: float = 1.0, amplitude: float = 0.1) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float = 1.0, scale: float = 0.1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, int(seconds * SR)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray) -> Path:
    """16-bit PCM mono wav at :data:`SR`."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes((np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes())
    return path


# --- the features -------------------------------------------------------------------------------------------


def test_layout_matches_the_documented_dimension():
    assert PROSODY_LAYOUT == (("logmel_mean", 40), ("logmel_std", 40), ("f0", 6), ("rms", 4))
    assert PROSODY_DIM == 90 == sum(size for _, size in PROSODY_LAYOUT)
    assert "``[0:40]``" in prosody_features.__doc__ and "``[86:90]``" in prosody_features.__doc__
    vector = prosody_features(sine(220), SR)
    assert vector.shape == (PROSODY_DIM,) and vector.dtype == np.float32
    info = prosody_info(parse_params({"audio": {"backend": "prosody"}}).audio)
    assert info["hidden_size"] == PROSODY_DIM and info["kind"] == "signal_processing" and info["pretrained"] is True


def test_analysis_sizes_at_16_khz():
    assert prosody_frames(16000, 65.0) == {"win": 400, "hop": 160, "n_fft": 512, "pitch": 1024}
    assert prosody_frames(8000, 65.0)["pitch"] == 512  # still four periods of 65 Hz


@pytest.mark.parametrize("freq", [220.0, 150.0])
def test_sine_pitch_within_two_percent(freq: float):
    vector = prosody_features(sine(freq), SR)
    assert np.isfinite(vector).all()
    assert abs(vector[F0_MEAN] - freq) / freq < 0.02, vector[80:86]
    assert abs(vector[F0_MIN] - freq) / freq < 0.02 and abs(vector[F0_MAX] - freq) / freq < 0.02
    assert vector[F0_RANGE] == pytest.approx(vector[F0_MAX] - vector[F0_MIN], abs=1e-4)
    assert 0 <= vector[F0_STD] < 0.02 * freq
    assert vector[VOICED] > 0.9


@pytest.mark.parametrize("name", ["silence", "white noise"])
def test_silence_and_noise_are_unvoiced_and_finite(name: str):
    signal = np.zeros(SR, np.float32) if name == "silence" else noise()
    vector = prosody_features(signal, SR)
    assert np.isfinite(vector).all()
    assert vector[VOICED] < 0.05
    if vector[VOICED] == 0:  # no voiced frame: defined values, not NaN
        assert vector[F0_MEAN : VOICED + 1].tolist() == [0.0] * 6
    if name == "silence":
        assert vector[VOICED] == 0
        assert np.allclose(vector[MEL], -100, atol=1e-3) and np.allclose(vector[MEL_STD], 0, atol=1e-3)
        assert vector[RMS_MEAN] == pytest.approx(-100) and vector[RMS_MAX] == pytest.approx(-100)


def test_a_louder_copy_is_louder_by_the_expected_db():
    quiet = sine(220, amplitude=0.1) + noise(scale=0.02)
    a, b = prosody_features(quiet, SR), prosody_features(2 * quiet, SR)
    # twice the amplitude: every log-mel band, the RMS mean and maximum up by 20 log10(2) dB ...
    assert np.allclose(b[MEL] - a[MEL], DB_PER_DOUBLING, atol=0.01), b[MEL] - a[MEL]
    assert b[RMS_MEAN] - a[RMS_MEAN] == pytest.approx(DB_PER_DOUBLING, abs=0.01)
    assert b[RMS_MAX] - a[RMS_MAX] == pytest.approx(DB_PER_DOUBLING, abs=0.01)
    # ... while what does not depend on the level stays: spreads, RMS changes, pitch
    assert np.allclose(b[MEL_STD], a[MEL_STD], atol=0.01)
    assert b[RMS_STD] == pytest.approx(a[RMS_STD], abs=0.01) and b[RMS_DELTA] == pytest.approx(a[RMS_DELTA], abs=0.01)
    assert b[F0_MEAN] == pytest.approx(a[F0_MEAN], rel=1e-3) and b[VOICED] == a[VOICED]


def test_deterministic_and_too_short_refused():
    signal = sine(150, 0.5) + noise(0.5, 0.01)
    assert prosody_features(signal, SR).tobytes() == prosody_features(signal.copy(), SR).tobytes()
    with pytest.raises(ValueError, match="at least 64 ms"):
        prosody_features(sine(220, 0.05), SR)
    bad = signal.copy()
    bad[10] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        prosody_features(bad, SR)


def test_pitch_range_is_validated():
    audio = parse_params({}).audio
    assert (audio.prosody_fmin, audio.prosody_fmax) == (65.0, 500.0)
    with pytest.raises(ParamsError, match="prosody_fmin"):
        parse_params({"audio": {"prosody_fmin": 300, "prosody_fmax": 200}})
    with pytest.raises(ParamsError, match="sample_rate / 2"):
        parse_params({"audio": {"sample_rate": 8000, "prosody_fmax": 5000}})


# --- the stage ------------------------------------------------------------------------------------------------


def test_extract_audio_stage_with_the_prosody_backend(stage_dir: Path, caplog: pytest.LogCaptureFixture):
    clips = {
        "a220": write_wav(stage_dir / "a220.wav", sine(220, 1.0, 0.3)),
        "b150": write_wav(stage_dir / "b150.wav", sine(150, 0.6, 0.3) + noise(0.6, 0.003)),
        "short": write_wav(stage_dir / "short.wav", sine(220, 0.03, 0.3)),
    }
    write_utterances(
        [
            ("train/dia0_utt0", "x", "A", clips["a220"]),
            ("train/dia0_utt1", "x", "B", clips["b150"]),
            ("train/dia0_utt2", "x", "A", clips["short"]),  # 30 ms: too short to analyse
            ("train/dia0_utt3", "x", "B", ""),
        ]
    )
    params = parse_params({"audio": {"backend": "prosody", "max_masked_share": 1.0}})
    with caplog.at_level(logging.WARNING):
        first = run_extraction_stage(extract_audio, params)
    assert RANDOM not in caplog.text
    table = load_table(FEATURES / "audio.safetensors")
    assert table.dim == PROSODY_DIM and table.features.shape == (4, PROSODY_DIM)
    assert table.reasons == ["ok", "ok", "no_audio", "missing_clip"]
    assert torch.isfinite(table.features).all()
    for row, freq in ((0, 220.0), (1, 150.0)):
        assert abs(float(table.features[row, F0_MEAN]) - freq) / freq < 0.02, table.features[row, 80:86]
    assert "too short for the prosody functionals" in caplog.text
    encoder = first["encoder"]
    assert encoder["kind"] == "signal_processing" and encoder["pretrained"] is True
    assert encoder["backend"] == "prosody" and encoder["hidden_size"] == PROSODY_DIM == first["dim"]
    assert encoder["params"]["prosody_fmin"] == 65.0 and encoder["weights_id"].startswith("librosa@")
    features = (FEATURES / "audio.safetensors").read_bytes()
    second = run_extraction_stage(extract_audio, params)
    assert second["run"]["resumed_from_cache"] == 4
    assert (FEATURES / "audio.safetensors").read_bytes() == features


# --- no "randomly initialised" warning without media ----------------------------------------------------------


def no_loading(*args, **kwargs):
    raise AssertionError("the stage loaded an encoder for a table without media")


def test_text_only_table_loads_no_encoder_and_warns_nothing(
    stage_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    assert Path.cwd() == stage_dir  # the stages write data/ here, never into the repository
    write_utterances([("train/dia0_utt0", "hi", "A", ""), ("train/dia0_utt1", "ho", "B", "")])
    params = parse_params({"audio": {"random_init": TINY_AUDIO}, "visual": {"face_weights": "random", "max_frames": 2}})
    # (a context of its own: undoing the fixture's monkeypatch would also undo stage_dir's chdir)
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(audio_features, "load_audio_backend", no_loading)
        patch.setattr(visual_features, "load_face_models", no_loading)
        audio = run_extraction_stage(extract_audio, params)
        visual = run_extraction_stage(extract_visual, params)
    assert RANDOM not in caplog.text
    assert audio["reasons"] == visual["reasons"] == {"missing_clip": 2}
    # the encoder info is still the configured encoder's, as a loaded one records it
    assert audio["dim"] == 16 and audio["encoder"]["pretrained"] is False
    assert audio["encoder"]["weights_id"] == random_identity("wav2vec2", TINY_AUDIO)["weights_id"]
    assert visual["dim"] == 512 and visual["encoder"]["pretrained"] is False
    assert visual["encoder"]["weights_id"] == random_identity("InceptionResnetV1")["weights_id"]
    text_only_cache = {"audio": audio["run"]["cache"], "visual": visual["run"]["cache"]}

    # with a clip the encoders load and announce their random weights, under the same cache key
    assert Path.cwd() == stage_dir
    write_utterances(
        [
            ("train/dia0_utt0", "hi", "A", write_wav(stage_dir / "a.wav", sine(220, 0.5))),
            ("train/dia0_utt1", "ho", "B", ""),
        ]
    )
    for stage, modality, text_only in ((extract_audio, "audio", audio), (extract_visual, "visual", visual)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            returned = run_extraction_stage(stage, params)
        assert RANDOM in caplog.text, modality
        assert returned["encoder"] == text_only["encoder"], modality
        assert returned["run"]["cache"] == text_only_cache[modality], modality
        assert returned["reasons"] == {"ok" if modality == "audio" else "no_video": 1, "missing_clip": 1}


def test_a_fully_resumed_run_still_announces_random_audio_weights(
    stage_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    write_utterances([("train/dia0_utt0", "hi", "A", write_wav(stage_dir / "a.wav", sine(220, 0.5)))])
    params = parse_params({"audio": {"random_init": TINY_AUDIO}})
    first = run_extraction_stage(extract_audio, params)
    features = (FEATURES / "audio.safetensors").read_bytes()
    monkeypatch.setattr(audio_features, "load_audio_backend", no_loading)  # everything is in the cache
    with caplog.at_level(logging.WARNING):
        second = run_extraction_stage(extract_audio, params)
    assert second["run"]["resumed_from_cache"] == 1 and second["run"]["cache"] == first["run"]["cache"]
    assert RANDOM in caplog.text
    assert (FEATURES / "audio.safetensors").read_bytes() == features
