"""pipeline.media: audio decoding (PyAV) and frame sampling (OpenCV), with their MediaError reasons."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from pipeline.media import MediaError, decode_ahead, decode_depth, load_audio, sample_frames


def container_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        return container.duration / 1e6


def untrimmed_samples(path: Path) -> int:
    """Samples PyAV decodes from the first audio stream, AAC tail padding included."""
    with av.open(str(path)) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum)) * rate / len(wave)


# --- load_audio ---------------------------------------------------------------------------------------------


def test_demo_clip_decodes_to_mono_float32_16k_without_aac_padding(demo_root: Path):
    clip = demo_root / "train_splits" / "dia0_utt0.mp4"
    wave = load_audio(clip)
    assert isinstance(wave, torch.Tensor) and wave.dtype == torch.float32 and wave.ndim == 1
    expected = container_seconds(clip) * 16000
    assert abs(wave.numel() - expected) <= 16  # within 1 ms of the container's duration
    assert wave.numel() < untrimmed_samples(clip) - 100  # the encoder's tail padding is gone
    assert wave.abs().max() <= 1.0 and wave.std() > 0.01  # real speech, in range


def test_resampling_44k_stereo_keeps_duration_and_pitch(clips: dict[str, Path]):
    clip = clips["stereo44k"]
    wave = load_audio(clip).numpy()
    assert wave.ndim == 1 and wave.dtype == np.float32
    assert abs(len(wave) - container_seconds(clip) * 16000) <= 16
    assert abs(len(wave) - 1.5 * 16000) <= 16
    assert dominant_hz(wave, 16000) == pytest.approx(440, abs=2)
    # Another target rate: same duration, same pitch.
    wave8k = load_audio(clip, sample_rate=8000).numpy()
    assert abs(len(wave8k) - 1.5 * 8000) <= 8
    assert dominant_hz(wave8k, 8000) == pytest.approx(440, abs=2)


def test_stereo_downmix_is_the_channel_average_and_stays_in_range(clips: dict[str, Path]):
    wave = load_audio(clips["loud_stereo"]).numpy()[1600:-1600]  # skip codec edge effects
    amplitude = wave.std() * np.sqrt(2)
    assert amplitude == pytest.approx(0.9, abs=0.05)
    assert np.abs(wave).max() <= 1.0


def test_one_sided_stereo_downmix_is_not_louder_than_its_channel(clips: dict[str, Path]):
    # Left 0.5 sine, right silent: any sane down-mix gives an amplitude in (0, 0.5].
    wave = load_audio(clips["stereo44k"]).numpy()[1600:-1600]
    amplitude = wave.std() * np.sqrt(2)
    assert 0.1 < amplitude <= 0.5 + 0.02


def test_max_seconds_caps_the_wave(demo_root: Path):
    wave = load_audio(demo_root / "train_splits" / "dia0_utt0.mp4", max_seconds=0.5)
    assert wave.numel() == 8000
    full = load_audio(demo_root / "train_splits" / "dia0_utt0.mp4")
    assert torch.equal(wave, full[:8000])


def test_clip_without_audio_stream_is_no_audio(demo_root: Path, clips: dict[str, Path]):
    for clip in (demo_root / "train_splits" / "dia5_utt0.mp4", clips["ramp"]):
        with pytest.raises(MediaError) as err:
            load_audio(clip)
        assert err.value.reason == "no_audio" and err.value.path == str(clip)
        assert str(clip) in str(err.value)


@pytest.mark.parametrize("name", ["empty", "random"])
def test_undecodable_file_is_corrupt(bad_clips: dict[str, Path], name: str):
    with pytest.raises(MediaError) as err:
        load_audio(bad_clips[name])
    assert err.value.reason == "corrupt" and "Invalid data" in str(err.value)  # PyAV's own words
    with pytest.raises(MediaError) as err:
        sample_frames(bad_clips[name], 2.0, 2)
    assert err.value.reason == "corrupt"


def test_missing_file_is_missing_clip(tmp_path: Path):
    for fn in (lambda p: load_audio(p), lambda p: sample_frames(p, 2.0, 2)):
        with pytest.raises(MediaError) as err:
            fn(tmp_path / "absent.mp4")
        assert err.value.reason == "missing_clip" and "does not exist" in str(err.value)


def test_truncated_clip_is_truncated(bad_clips: dict[str, Path]):
    clip = bad_clips["truncated"]  # 30 % of a faststart mp4: the header survives, most packets do not
    with pytest.raises(MediaError, match="declares .* no frame decodes") as err:
        sample_frames(clip, 2.0, 2)
    assert err.value.reason == "truncated"
    with pytest.raises(MediaError, match=r"declares 2\.\d\d s but decoded to 0\.00 s") as err:
        load_audio(clip)
    assert err.value.reason == "truncated"


def test_is_truncated_allows_codec_padding_not_lost_seconds():
    from pipeline.media import is_truncated

    assert not is_truncated(1.98, 2.0)  # AAC priming/padding: a few ms
    assert not is_truncated(0.0, 0.2)  # too short to tell (0.25 s minimum gap)
    assert is_truncated(0.58, 2.0) and is_truncated(0.0, 2.54)
    assert not is_truncated(9.2, 10.0) and is_truncated(8.9, 10.0)  # more than 10 % missing


def test_any_truncation_raises_only_media_error(demo_root: Path, tmp_path: Path):
    data = (demo_root / "train_splits" / "dia0_utt0.mp4").read_bytes()
    clip = tmp_path / "cut.mp4"
    leaked = []
    for size in range(0, min(len(data), 3000), 25):
        clip.write_bytes(data[:size])
        for fn in (lambda: load_audio(clip), lambda: sample_frames(clip, 2.0, 2)):
            try:
                fn()
            except MediaError as err:
                assert err.reason in ("decode_error", "no_audio", "corrupt", "truncated")
            except Exception as err:  # noqa: BLE001 - the point of the test
                leaked.append((size, type(err).__name__, str(err)))
    assert leaked == []


# --- sample_frames --------------------------------------------------------------------------------------------


def test_frames_follow_fps(clips: dict[str, Path]):
    frames = sample_frames(clips["ramp"], fps=2.0, max_frames=100)  # 3 s at 2 fps of a 10 fps clip
    assert len(frames) == 6
    for frame in frames:
        assert frame.dtype == np.uint8 and frame.shape == (48, 64, 3)
    brightness = [float(f.mean()) for f in frames]
    assert brightness == sorted(brightness) and brightness[0] < 10
    assert np.diff(brightness).min() > 20  # every 5th frame of a ramp of 8 per frame: about 40 apart


def test_fps_above_native_reads_every_frame_once(clips: dict[str, Path]):
    frames = sample_frames(clips["ramp"], fps=100.0, max_frames=1000)
    assert len(frames) == 30
    brightness = [float(f.mean()) for f in frames]
    assert brightness == sorted(brightness)


@pytest.mark.parametrize("max_frames", [1, 3, 4])
def test_max_frames_spreads_frames_over_the_whole_clip(clips: dict[str, Path], max_frames: int):
    frames = sample_frames(clips["ramp"], fps=10.0, max_frames=max_frames)
    assert len(frames) == max_frames
    brightness = [float(f.mean()) for f in frames]
    assert brightness[0] < 10  # starts at the first frame
    if max_frames > 1:
        assert brightness[-1] > 200  # ... and ends at the last one (luma 232)
        assert np.diff(brightness).min() > 40


def test_frames_are_rgb(clips: dict[str, Path]):
    frame = sample_frames(clips["red"], fps=2.0, max_frames=1)[0]
    red, green, blue = frame.reshape(-1, 3).mean(0)
    assert red > 200 and green < 40 and blue < 40


def test_demo_clip_frames(demo_root: Path):
    clip = demo_root / "train_splits" / "dia0_utt0.mp4"  # 2.54 s at 10 fps
    frames = sample_frames(clip, fps=2.0, max_frames=8)
    assert len(frames) == 5
    assert all(f.shape == (240, 320, 3) and f.dtype == np.uint8 for f in frames)
    assert len(sample_frames(clip, fps=2.0, max_frames=2)) == 2


# decode_ahead: background decoding in order, errors as values, bounded look-ahead


def test_decode_ahead_yields_in_order_with_media_errors_in_place(demo_root: Path):
    clips = sorted(demo_root.rglob("*.mp4"))[:5]
    items = [str(clips[0]), str(demo_root / "missing.mp4"), *map(str, clips[1:])]
    out = list(decode_ahead(items, load_audio, depth=2))
    assert [item for item, _ in out] == items
    assert isinstance(out[1][1], MediaError) and out[1][1].reason == "missing_clip"
    for item, wave in out[:1] + out[2:]:
        assert torch.equal(wave, load_audio(item))  # same result as decoding in the caller


def test_decode_ahead_runs_in_a_background_thread_at_most_depth_ahead():
    import threading
    import time

    started, consumed = [], []

    def decode(i: int) -> tuple[int, str]:
        started.append(i)
        return i, threading.current_thread().name

    for i, (j, thread) in decode_ahead(list(range(20)), decode, depth=3):
        time.sleep(0.005)  # the consumer is slower than decoding: the thread runs ahead, up to depth
        assert j == i and thread != threading.current_thread().name
        assert max(started) <= i + 3 + 1  # the item being consumed + depth + the one being submitted
        consumed.append(i)
    assert consumed == list(range(20)) and started == list(range(20))


def test_decode_ahead_raises_other_errors_in_the_caller_and_stops_decoding():
    started = []

    def decode(i: int) -> int:
        started.append(i)
        if i == 3:
            raise KeyError("not a media error")
        return i

    with pytest.raises(KeyError, match="not a media error"):
        for _ in decode_ahead(list(range(100)), decode, depth=2):
            pass
    assert max(started) <= 3 + 2 + 1  # decodes not yet started were cancelled


def test_decode_ahead_closed_early_cancels_pending_decodes():
    started = []
    gen = decode_ahead(list(range(100)), lambda i: started.append(i) or i, depth=4)
    assert next(gen) == (0, 0)
    gen.close()
    assert len(started) <= 6
    with pytest.raises(ValueError, match="depth"):
        next(decode_ahead([1], lambda i: i, depth=-1))


def test_decode_ahead_depth_zero_decodes_lazily_in_the_caller():
    import threading

    started = []
    gen = decode_ahead([0, 1, 2], lambda i: started.append(i) or threading.current_thread().name, depth=0)
    assert next(gen) == (0, threading.current_thread().name) and started == [0]
    assert [i for i, _ in gen] == [1, 2] and started == [0, 1, 2]


def test_decode_depth_uses_a_thread_only_when_a_core_is_free(monkeypatch: pytest.MonkeyPatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert decode_depth(torch.device("cpu"), 8) == 0
    assert decode_depth(torch.device("cuda"), 8) == 8
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert decode_depth(torch.device("cpu"), 8) == 8


TRIM_PROBE = """
import ctypes, ctypes.util, sys
from pathlib import Path
from pipeline.media import trim_heap

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
resident = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20
big, pins = [], []
for _ in range(2048):  # 64 KiB: below glibc's mmap threshold, so they come from the heap
    block = libc.malloc(64 * 1024)
    ctypes.memset(block, 1, 64 * 1024)  # make the pages resident
    big.append(block)
    pins.append(libc.malloc(1024))  # a live block after each: the freed ones cannot merge into the top
for block in big:
    libc.free(block)
before = resident()
trimmed = trim_heap()
print(trimmed, before - resident())
"""


def test_trim_heap_gives_freed_heap_pages_back(repo_root: Path):
    """What the visual stage relies on: 128 MiB of freed heap blocks, held in place by small live blocks
    between them (as long runs leave the heap), stay resident until trim_heap() returns them. Run in a
    fresh interpreter, whose heap is not shaped by the tests before it."""
    import subprocess
    import sys

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux's /proc to read the resident size")
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], cwd=repo_root, capture_output=True, text=True, check=True)
    trimmed, released = out.stdout.split()
    if trimmed != "True":
        pytest.skip("needs glibc's malloc_trim")
    assert float(released) > 64, out.stdout
