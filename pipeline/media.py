"""Decoding: audio tracks with PyAV, video frames with OpenCV. No model code here.

Failures raise :class:`MediaError` with a reason code from :mod:`pipeline.features` (``no_audio``,
``decode_error``) so the extraction stages can mask the utterance and report it instead of crashing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF


class MediaError(RuntimeError):
    """A clip could not be decoded. ``reason`` is a reason code (see :mod:`pipeline.features`)."""

    def __init__(self, reason: str, path: str | Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason = reason
        self.path = str(path)


def load_audio(path: str | Path, sample_rate: int = 16000, max_seconds: float | None = None) -> torch.Tensor:
    """Decode a clip's first audio stream to mono float32 at ``sample_rate`` Hz.

    Decoding uses PyAV; the AAC encoder's tail padding (which PyAV, unlike ffmpeg, keeps) is trimmed to
    the stream's declared duration; channels are averaged; resampling uses ``torchaudio.functional.
    resample`` (windowed sinc).

    Returns:
        ``[num_samples]`` float32 tensor, values in [-1, 1].

    Raises:
        MediaError: ``no_audio`` when the container has no audio stream or it decodes to nothing,
            ``decode_error`` when the file cannot be opened or decoded.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError("no_audio", path, "the clip has no audio stream")
            stream = container.streams.audio[0]
            if stream.codec_context is None:  # e.g. a file cut inside its header
                raise MediaError("decode_error", path, "the audio stream has no decodable codec")
            rate = stream.codec_context.sample_rate
            # Convert to planar float at the native rate and layout (libswresample), then average the
            # channels here: ffmpeg's own down-mix scales by 1/sqrt(2) and can leave [-1, 1].
            to_float = av.AudioResampler(format="fltp", rate=rate)
            chunks = [out.to_ndarray() for frame in container.decode(stream) for out in to_float.resample(frame)]
            chunks += [out.to_ndarray() for out in to_float.resample(None)]
            declared = None
            if stream.duration is not None and stream.time_base is not None:
                declared = int(round(float(stream.duration * stream.time_base) * rate))
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, AttributeError) as err:
        raise MediaError("decode_error", path, f"audio could not be decoded ({err})") from None
    wave = torch.from_numpy(np.concatenate(chunks, axis=1).mean(axis=0)) if chunks else torch.zeros(0)
    if declared is not None and 0 < declared < wave.numel():
        wave = wave[:declared]  # PyAV keeps the AAC encoder's tail padding; ffmpeg trims it
    if wave.numel() == 0:
        raise MediaError("no_audio", path, "the audio stream decoded to zero samples")
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    if max_seconds is not None:
        wave = wave[: int(max_seconds * sample_rate)]
    return wave.contiguous()


def sample_frames(path: str | Path, fps: float, max_frames: int) -> list[np.ndarray]:
    """Read up to ``max_frames`` RGB frames from a clip, ``fps`` frames per second of video.

    Frames are grabbed with OpenCV sequentially (``grab`` skips decoding-to-RGB of frames not kept).
    When the clip is longer than ``max_frames / fps`` seconds, the kept frames are spread evenly
    over the whole clip instead.

    Returns:
        list of ``[height, width, 3]`` uint8 RGB arrays (at least one).

    Raises:
        MediaError: ``decode_error`` when the file cannot be opened or yields no frame.
    """
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise MediaError("decode_error", path, "the video could not be opened")
        native_fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        step = max(native_fps / fps, 1.0)
        wanted = np.arange(0, max(total, 1), step)
        if len(wanted) > max_frames:
            wanted = np.linspace(0, max(total - 1, 0), max_frames)
        targets = sorted({int(round(i)) for i in wanted})
        frames: list[np.ndarray] = []
        index = 0
        for target in targets:
            while index < target:
                if not capture.grab():
                    break
                index += 1
            ok, frame = capture.read()
            index += 1
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise MediaError("decode_error", path, "no video frame could be decoded")
    return frames
