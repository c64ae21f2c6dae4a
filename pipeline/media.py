"""Decoding: audio tracks with PyAV, video frames with OpenCV. No model code here.

Failures raise :class:`MediaError` with a reason code from :mod:`pipeline.feature_table`, so the
extraction stages can mask the utterance and report it instead of crashing. Where PyAV says why, the
cause is kept: ``missing_clip`` (the file is gone), ``no_audio`` / ``no_video`` (no such stream),
``corrupt`` (the container or its packets do not decode), ``truncated`` (a stream, or the part of it an
utterance's segment covers, decodes to far less than its header declares: :func:`is_truncated`);
``decode_error`` for any other failure.

A truncated clip is masked by default; with ``on_truncated="use_partial"`` the part that decoded is
returned instead, and the caller's ``notes`` dict says so (``partial``), as it says when a segment's
``end`` lies beyond the media and was clamped to its end (``segment_clamped``): the extraction stages
list both in their reports.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torchaudio.functional as AF

T = TypeVar("T")
R = TypeVar("R")

# Opening a file probes its streams (avformat_find_stream_info), which decodes the first video frames;
# no caller here needs them (audio is decoded with PyAV, frames with OpenCV): skipping them halves the
# cost of opening a clip (1.2 -> 0.7 ms per demo clip) and leaves the decoded audio bit-identical.
PROBE_OPTIONS = {"skip_frame": "all"}
# A whole-file decode counts as truncated when it falls short of the declared duration by more than
# this share of it, and by more than TRUNCATED_MIN_SECONDS (AAC priming and padding are a few ms).
TRUNCATED_SHARE = 0.1
TRUNCATED_MIN_SECONDS = 0.25
ON_TRUNCATED = ("mask", "use_partial")  # what load_audio / sample_frames do with a truncated clip


class MediaError(RuntimeError):
    """A clip could not be decoded. ``reason`` is a reason code (see :mod:`pipeline.feature_table`)."""

    def __init__(self, reason: str, path: str | Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason = reason
        self.path = str(path)


def load_audio(
    path: str | Path,
    sample_rate: int = 16000,
    max_seconds: float | None = None,
    start: float | None = None,
    end: float | None = None,
    on_truncated: str = "mask",
    notes: dict | None = None,
) -> torch.Tensor:
    """Decode a clip's first audio stream, or its ``[start, end)`` segment, to mono float32 at ``sample_rate``.

    Decoding uses PyAV (seeking to ``start`` when given: dialogue-long IEMOCAP wavs are not decoded
    whole for every utterance); the AAC encoder's tail padding (which PyAV, unlike ffmpeg, keeps) is
    trimmed to the stream's declared duration (:func:`declared_seconds`); channels are averaged;
    resampling uses ``torchaudio.functional.resample`` (windowed sinc).

    The decoded seconds are compared with what the header declares for the clip, or for the segment
    (the part of ``[start, end]`` inside the declared duration): far less (:func:`is_truncated`) means
    the file was cut short. A decoding error after the first packets ends the decode there and is
    judged the same way (a cut file's last packet is often incomplete): truncated when far short, kept
    when not; ``corrupt`` when the header declares no duration to judge it by.

    Args:
        start / end: segment bounds in seconds (None: from the beginning / to the end). An ``end``
            beyond the declared duration is clamped to it (see ``notes``).
        max_seconds: keep at most this many seconds (None: all); a clip cut after them is not truncated.
        on_truncated: ``mask`` raises ``truncated``; ``use_partial`` returns what decoded (when
            anything did) and records it in ``notes``.
        notes: if given, filled with what the caller should report: ``partial`` =
            ``{"decoded": s, "declared": s}`` when a truncated decode was returned (seconds, rounded
            to ms; ``declared`` is the segment's expected length for a segment), ``segment_clamped`` =
            ``{"end": s, "media_end": s}`` when ``end`` lies beyond the stream's declared duration.

    Returns:
        ``[num_samples]`` float32 tensor, values in [-1, 1].

    Raises:
        MediaError: ``missing_clip`` when the file does not exist; ``no_audio`` when the container has
            no audio stream or the segment decodes to nothing; ``corrupt`` when the file or its audio
            packets cannot be decoded; ``truncated`` when the decode falls far short of the duration
            the header declares for the clip or segment (the header survived, the packets did not)
            and ``on_truncated`` is ``mask`` or nothing decoded; ``decode_error`` for any other
            decoding failure.
        ValueError: an ``on_truncated`` other than ``mask`` / ``use_partial``.
    """
    import av

    if on_truncated not in ON_TRUNCATED:
        raise ValueError(f"on_truncated must be one of {ON_TRUNCATED}, got {on_truncated!r}")
    failed = None  # a decoding error after the first packets: the decode ended there
    try:
        with av.open(str(path), options=PROBE_OPTIONS) as container:
            if not container.streams.audio:
                raise MediaError("no_audio", path, "the clip has no audio stream")
            stream = container.streams.audio[0]
            if stream.codec_context is None:  # e.g. a file cut inside its header
                raise MediaError("corrupt", path, "the audio stream has no decodable codec")
            rate = stream.codec_context.sample_rate
            declared = declared_seconds(container, stream)
            if start and stream.time_base is not None:
                # 0.1 s early: AAC needs the previous frame (pre-roll) to decode the first one right;
                # the extra samples are trimmed below
                container.seek(int(max(0.0, start - 0.1) / stream.time_base), stream=stream, backward=True)
            # Convert to planar float at the native rate and layout (libswresample), then average the
            # channels here: ffmpeg's own down-mix scales by 1/sqrt(2) and can leave [-1, 1].
            to_float = av.AudioResampler(format="fltp", rate=rate)
            chunks, first_time = [], None
            try:
                for frame in container.decode(stream):
                    if first_time is None:
                        first_time = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
                    chunks += [out.to_ndarray() for out in to_float.resample(frame)]
                    if end is not None and frame.pts is not None and float(frame.pts * frame.time_base) > end:
                        break
            except (av.InvalidDataError, av.error.EOFError) as err:
                if not chunks:
                    raise
                failed = err
            chunks += [out.to_ndarray() for out in to_float.resample(None)]
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError("missing_clip", path, "the file does not exist (moved or deleted after prepare?)") from None
    except (av.InvalidDataError, av.error.EOFError) as err:  # what PyAV raises for damaged data
        raise MediaError("corrupt", path, f"audio could not be decoded ({err})") from None
    except (av.FFmpegError, OSError, ValueError, AttributeError) as err:
        raise MediaError("decode_error", path, f"audio could not be decoded ({err})") from None
    wave = torch.from_numpy(np.concatenate(chunks, axis=1).mean(axis=0)) if chunks else torch.zeros(0)
    first_time = first_time or 0.0
    stop = declared if declared is not None and declared > 0 else None
    if end is not None:
        stop = end if stop is None else min(stop, end)
    if stop is not None and 0 < int(round((stop - first_time) * rate)) < wave.numel():
        wave = wave[: int(round((stop - first_time) * rate))]  # also drops the AAC tail padding
    if start:
        wave = wave[max(0, int(round((start - first_time) * rate))) :]
    expected, clamped = expected_seconds(declared, start, end)
    if expected is not None and max_seconds is not None:
        expected = min(expected, max_seconds)  # a cut past what is kept changes nothing
    decoded = wave.numel() / rate
    if expected is not None and is_truncated(decoded, expected):
        if on_truncated == "mask" or wave.numel() == 0:
            raise MediaError(
                "truncated",
                path,
                f"{_declares('audio', start, end)} {expected:.2f} s but decoded to {decoded:.2f} s"
                + (f" (decoding stopped: {failed})" if failed is not None else "")
                + " (the file was cut short: re-export or replace it)",
            )
        if notes is not None:
            notes["partial"] = {"decoded": round(decoded, 3), "declared": round(expected, 3)}
    elif failed is not None and expected is None:  # no declared duration to judge the decode against
        raise MediaError("corrupt", path, f"audio could not be decoded ({failed})")
    if wave.numel() == 0:
        what = f"the segment [{start}, {end}] s" if start is not None or end is not None else "the audio stream"
        raise MediaError("no_audio", path, f"{what} decoded to zero samples")
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    if max_seconds is not None:
        wave = wave[: int(max_seconds * sample_rate)]
    if clamped and notes is not None:
        notes["segment_clamped"] = clamped
    return wave.contiguous()


def declared_seconds(container, stream) -> float | None:
    """The duration (s) a stream's header declares, or None when it declares none.

    Matroska / WebM give each track's duration as a ``DURATION`` tag (their stream duration field is
    empty, or FFmpeg's estimate from the container), which is used first; then the stream's duration
    field (MP4, WAV ...); then the container's duration. ``container`` / ``stream``: an open PyAV
    container and one of its streams.
    """
    tag = stream.metadata.get("DURATION")
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            pass
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def expected_seconds(declared: float | None, start: float | None, end: float | None) -> tuple[float | None, dict]:
    """What a decode of ``[start, end)`` should yield from a stream declaring ``declared`` seconds.

    Returns:
        (the seconds of the segment inside the declared duration, at most 0 for a segment past it;
        None when nothing is declared, as nothing can then be checked; ``{"end": s, "media_end": s}``
        when ``end`` lies beyond the declared duration (by 1 ms or more), else ``{}``).
    """
    if not declared:
        return None, {}
    stop = declared if end is None else min(end, declared)
    clamped = {"end": end, "media_end": round(declared, 3)} if end is not None and end - declared >= 0.001 else {}
    return stop - (start or 0.0), clamped


def is_truncated(decoded_seconds: float, declared_seconds: float) -> bool:
    """Whether a stream that declares ``declared_seconds`` but decoded ``decoded_seconds`` was cut short:
    short by more than :data:`TRUNCATED_SHARE` of the declared duration and by more than
    :data:`TRUNCATED_MIN_SECONDS`."""
    gap = declared_seconds - decoded_seconds
    return gap > TRUNCATED_MIN_SECONDS and gap > TRUNCATED_SHARE * declared_seconds


def video_stream_seconds(path: str | Path) -> float | bool | None:
    """The duration (s) the first video stream declares (:func:`declared_seconds`; 0.0 when none is
    given); False for a file without a video stream; None when the file cannot be opened or holds no
    stream at all."""
    import av

    try:
        with av.open(str(path), options=PROBE_OPTIONS) as container:
            if container.streams.video:
                return declared_seconds(container, container.streams.video[0]) or 0.0
            return False if container.streams.audio else None
    except (av.FFmpegError, OSError, ValueError):
        return None


def bound_frame(frame: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale ``[H, W, C]`` so that its longer side is at most ``max_side`` pixels (area
    interpolation, aspect kept); smaller frames and ``max_side=None`` are returned unchanged."""
    import cv2

    height, width = frame.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return frame
    scale = max_side / max(height, width)
    size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def sample_frames(
    path: str | Path,
    fps: float,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    max_side: int | None = None,
    on_truncated: str = "mask",
    notes: dict | None = None,
) -> list[np.ndarray]:
    """Read up to ``max_frames`` RGB frames from a clip (or its ``[start, end)`` segment), ``fps`` per second.

    Frames are grabbed with OpenCV sequentially (``grab`` skips decoding-to-RGB of frames not kept),
    after seeking to the segment's first frame. When the segment is longer than ``max_frames / fps``
    seconds, the kept frames are spread evenly over the whole segment instead. Each kept frame is
    downscaled at once to at most ``max_side`` pixels on its longer side (:func:`bound_frame`), so a
    4K clip costs the face detector and the memory no more than a frame of ``max_side`` pixels.

    How far the frames decode is compared with the duration the video stream declares (for a segment:
    the part of ``[start, end]`` inside it), as :func:`load_audio` does: after the last kept frame,
    frames are grabbed on only as long as the decode would still count as truncated
    (:func:`is_truncated`; at most a fraction of a second).

    Args:
        on_truncated: ``mask`` raises ``truncated``; ``use_partial`` returns the frames that decoded
            (when any did) and records it in ``notes``.
        notes: if given, filled as by :func:`load_audio` (``partial``: ``{"decoded": s, "declared": s}``,
            ``segment_clamped``: ``{"end": s, "media_end": s}``).

    Returns:
        list of ``[height, width, 3]`` uint8 RGB arrays (at least one), ``max(height, width) <= max_side``.

    Raises:
        MediaError: ``missing_clip`` when the file does not exist, ``no_video`` for a file without a
            video stream (audio only), ``corrupt`` when the file cannot be opened as media at all,
            ``truncated`` when the frames stop far short of the duration the video stream declares
            for the clip or segment and ``on_truncated`` is ``mask`` or no frame decodes,
            ``decode_error`` when the video yields no frame otherwise (e.g. a segment past its end).
        ValueError: an ``on_truncated`` other than ``mask`` / ``use_partial``.
    """
    import cv2

    if on_truncated not in ON_TRUNCATED:
        raise ValueError(f"on_truncated must be one of {ON_TRUNCATED}, got {on_truncated!r}")
    declared = video_stream_seconds(path)
    expected, clamped = expected_seconds(declared or None, start, end)
    capture = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    decoded = 0.0  # seconds of the segment the frames decoded up to
    try:
        if capture.isOpened():
            native_fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
            total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            first = int(round(start * native_fps)) if start else 0
            last = (
                min(total, int(round(end * native_fps)))
                if end is not None and total > 0
                else (total if total > 0 else first + 1)
            )
            step = max(native_fps / fps, 1.0)
            wanted = np.arange(first, max(last, first + 1), step)
            if len(wanted) > max_frames:
                wanted = np.linspace(first, max(last - 1, first), max_frames)
            targets = sorted({int(round(i)) for i in wanted})
            index = 0  # the next frame's number: frames [0, index) were decoded (or skipped by the seek)
            if first > 0 and capture.set(cv2.CAP_PROP_POS_FRAMES, first):
                index = int(capture.get(cv2.CAP_PROP_POS_FRAMES))
            for target in targets:
                while index < target and capture.grab():
                    index += 1
                ok, frame = capture.read() if index >= target else (False, None)
                if not ok:
                    break
                index += 1
                frames.append(cv2.cvtColor(bound_frame(frame, max_side), cv2.COLOR_BGR2RGB))
            else:  # every frame wanted decoded: read on only while the decode would count as truncated
                while (
                    expected is not None
                    and is_truncated(index / native_fps - (start or 0.0), expected)
                    and capture.grab()
                ):
                    index += 1
            decoded = max(0.0, index / native_fps - (start or 0.0))
    finally:
        capture.release()
    if frames and expected is not None and is_truncated(decoded, expected):
        if on_truncated == "mask":
            raise MediaError(
                "truncated",
                path,
                f"{_declares('video', start, end)} {expected:.2f} s but frames decode only to {decoded:.2f} s "
                "(the file was cut short: re-export or replace it)",
            )
        if notes is not None:
            notes["partial"] = {"decoded": round(decoded, 3), "declared": round(expected, 3)}
    if frames:
        if clamped and notes is not None:
            notes["segment_clamped"] = clamped
        return frames
    if not Path(path).exists():
        raise MediaError("missing_clip", path, "the file does not exist (moved or deleted after prepare?)")
    if declared is False:
        raise MediaError("no_video", path, "the file has no video stream (audio only?)")
    if declared is None:
        raise MediaError("corrupt", path, "the file cannot be opened as audio or video (damaged or not media)")
    if expected is not None and is_truncated(0.0, expected):
        raise MediaError(
            "truncated",
            path,
            f"{_declares('video', start, end)} {expected:.2f} s but no frame decodes "
            "(the file was cut short: re-export or replace it)",
        )
    raise MediaError(
        "decode_error",
        path,
        "no video frame could be decoded"
        + (f" in the segment [{start}, {end}] s" if start is not None or end is not None else ""),
    )


def _declares(kind: str, start: float | None, end: float | None) -> str:
    """How a ``truncated`` message names the expected seconds: the ``kind`` stream's, or the segment's."""
    if start is None and end is None:
        return f"the {kind} stream declares"
    return f"the segment [{start}, {end}] s should hold (by the {kind} stream's declared duration)"


def decode_ahead(items: Sequence[T], decode: Callable[[T], R], depth: int = 4) -> Iterator[tuple[T, R | MediaError]]:
    """Decode ``items`` in one background thread, at most ``depth`` items ahead of the consumer.

    Yields ``(item, decode(item))`` in the order of ``items``; a :class:`MediaError` raised by
    ``decode`` is yielded in place of the result (the caller masks that utterance and goes on), any
    other exception is raised in the caller's thread. PyAV and OpenCV release the GIL while they
    decode, so the next clips are decoded while the caller runs the model on the current one; at most
    ``depth + 1`` decoded items are held at a time (memory does not grow with the corpus). Closing the
    generator early (an exception or interrupt in the caller) cancels the decodes not yet started and
    waits for the running one. ``depth=0`` decodes in the caller's thread, one item at a time (see
    :func:`decode_depth`).

    Raises:
        ValueError: a negative ``depth``.
    """
    if depth < 0:
        raise ValueError(f"depth must be at least 0, got {depth}")

    def guarded(item: T) -> R | MediaError:
        try:
            return decode(item)
        except MediaError as err:
            return err

    if depth == 0:
        for item in items:
            yield item, guarded(item)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
    futures: deque = deque()
    submitted = 0
    try:
        for item in items:
            while submitted < len(items) and len(futures) <= depth:
                futures.append(pool.submit(guarded, items[submitted]))
                submitted += 1
            yield item, futures.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decode_depth(device: torch.device, depth: int) -> int:
    """``depth`` when a background decoding thread has a core to itself, else 0 (decode inline).

    On CUDA the model runs on the GPU and the CPU is free to decode; on the CPU only when there are
    more cores than torch's intra-op threads. Measured on the 2-core development machine with torch
    on both cores, a decoding thread competing with them made the demo's audio stage no faster
    (``benchmarks/README.md``, extraction speed).
    """
    if device.type == "cuda":
        return depth
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return depth if cores > torch.get_num_threads() else 0


def trim_heap() -> bool:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim(0)``).

    Decoded frames, MTCNN's image pyramids and the embedder's activations are large buffers of
    varying size, allocated and freed for every clip. glibc keeps the freed memory in its arenas, so
    over a long run the resident size of the visual stage crept up by about 270 MB per 1,000
    utterances while the memory actually in use stayed flat (measured with ``benchmarks/memory.py``
    and glibc's ``mallinfo2``; ``benchmarks/README.md``, extraction memory). Calling this every few
    clips keeps the resident size flat; every clip would cost about 15% of the stage's time.

    Returns:
        True when the heap was trimmed; False where glibc's ``malloc_trim`` is absent (macOS, musl),
        which is harmless: nothing is trimmed.
    """
    malloc_trim = _glibc_malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _glibc_malloc_trim():
    """glibc's ``malloc_trim`` through ctypes, or None where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
