"""Speech features: one vector per utterance (used by the ``extract_audio`` stage and ``predict``).

Decoding (:func:`pipeline.media.load_audio`): PyAV, the utterance's ``[start, end)`` segment when the
table gives one (IEMOCAP's dialogue wavs), codec padding trimmed, channels averaged, torchaudio
resampling to ``audio.sample_rate`` (16 kHz), at most ``audio.max_seconds``.

Backends (``audio.backend``):

* ``wav2vec2``: any Hugging Face audio encoder (wav2vec2, Baevski et al. 2020; HuBERT; WavLM). Long
  utterances are cut into chunks of at most ``audio.chunk_seconds``; the hidden states of the last
  layer, or the mean of the last ``audio.last_k_layers`` layers, are averaged over the valid
  (non-padding) frames of all chunks. Default for real runs: ``facebook/wav2vec2-base``; the demo
  uses a small randomly initialised wav2vec2 (``audio.random_init``), logged loudly and recorded.
* ``opensmile``: openSMILE functionals (``audio.opensmile_set``: IS10, eGeMAPSv02, ComParE_2016), the
  audio features most published IEMOCAP/MELD graph models used; nothing to download.
* ``prosody``: utterance-level functionals of log-mel energies, pitch and energy computed with librosa
  (McFee et al. 2015), pitch by pYIN (Mauch & Dixon 2014); a 90-d vector laid out in
  :func:`prosody_features`; nothing to download. A signal-processing backend: no weights, so never
  "randomly initialised" (its info records ``pretrained: true`` and ``kind: signal_processing``).

No encoder is loaded when nothing is left to encode (a text-only table, or every utterance found in the
resume cache): the encoder info (:func:`pipeline.encoders.describe_audio_backend`, the same as the
loader's) comes from the configuration alone, and random weights are announced only when the table has
audio.

Masked utterances (reason code): no media (``missing_clip``), a file without an audio stream or an
empty segment, or audio too short for the encoder or the functionals (``no_audio``), a damaged file
(``corrupt``), a file cut short (``truncated``, unless ``audio.on_truncated: use_partial`` encodes the
part that decoded), another decoding failure (``decode_error``; for ``prosody`` also non-finite
samples or functionals): see :mod:`pipeline.media`. Each is listed in the report, as are
the utterances encoded from a partial decode (``partial``) and those whose segment end lay beyond
their media and was clamped to its end (``segment_clamped``). Resumable through
:class:`pipeline.extraction_cache.ExtractionCache`. Clips are decoded in a background thread a few
utterances ahead of the encoder (:func:`pipeline.media.decode_ahead`), so decoding overlaps the model
calls and memory does not grow with the corpus.

Output: ``<features dir>/audio.safetensors`` and ``audio_report.json``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import AudioParams, Params
from pipeline.encoders import (
    announce_random,
    autocast_dtype,
    default_device,
    describe_audio_backend,
    load_audio_backend,
)
from pipeline.extraction_cache import CACHE_DIR, ExtractionCache, file_signature
from pipeline.media import MediaError, decode_ahead, decode_depth, load_audio
from pipeline.reports import finish_extraction
from pipeline.sharding import extract_units, plan_units
from pipeline.utterances import Utterance

log = logging.getLogger(__name__)

DECODE_AHEAD = 8  # utterances decoded in the background ahead of the encoder (a few MB of audio)

# audio.backend: prosody (see prosody_features)
PROSODY_N_MELS = 40
PROSODY_WINDOW_SECONDS = 0.025  # log-mel and RMS analysis window
PROSODY_HOP_SECONDS = 0.010  # frame step of every frame-level measure
PROSODY_FMIN_PERIODS = 4  # the pitch frame holds at least this many periods of audio.prosody_fmin
DB_FLOOR = -100.0  # dB of silence: power floor 1e-10 (log-mel), amplitude floor 1e-5 (RMS)
# (name, size) of the parts of the vector, in order
PROSODY_LAYOUT = (
    ("logmel_mean", PROSODY_N_MELS),
    ("logmel_std", PROSODY_N_MELS),
    ("f0", 6),
    ("rms", 4),
)
PROSODY_DIM = sum(size for _, size in PROSODY_LAYOUT)
PROSODY_F0 = ("f0_mean_hz", "f0_std_hz", "f0_min_hz", "f0_max_hz", "f0_range_hz", "voiced_fraction")
PROSODY_RMS = ("rms_mean_db", "rms_std_db", "rms_max_db", "rms_delta_db")


def prosody_frames(sample_rate: int, fmin: float) -> dict[str, int]:
    """The analysis sizes (samples) of :func:`prosody_features` at ``sample_rate``.

    ``win`` 25 ms, ``hop`` 10 ms, ``n_fft`` the power of two at or above ``win`` (log-mel and RMS), ``pitch``
    the power of two holding at least :data:`PROSODY_FMIN_PERIODS` periods of ``fmin`` (pYIN's frame; at
    16 kHz and 65 Hz: 1024 samples, 64 ms). An utterance shorter than ``pitch`` is too short to analyse.
    """
    win = round(PROSODY_WINDOW_SECONDS * sample_rate)
    return {
        "win": win,
        "hop": round(PROSODY_HOP_SECONDS * sample_rate),
        "n_fft": 1 << math.ceil(math.log2(win)),
        "pitch": 1 << math.ceil(math.log2(PROSODY_FMIN_PERIODS * sample_rate / fmin)),
    }


def prosody_features(wave: np.ndarray, sample_rate: int, fmin: float = 65.0, fmax: float = 500.0) -> np.ndarray:
    """Utterance-level prosodic and spectral functionals of a mono waveform (``audio.backend: prosody``).

    Frame-level measures (librosa, McFee et al. 2015; 25 ms windows, 10 ms hop, frames centred, the
    signal zero-padded at both ends; sizes in :func:`prosody_frames`):

    * log-mel energies: ``librosa.feature.melspectrogram`` (power, Hann window, :data:`PROSODY_N_MELS`
      Slaney mel bands from 0 Hz to ``sample_rate / 2``), ``librosa.power_to_db`` with ``ref=1.0``
      (absolute: dB of the mel power of a waveform in [-1, 1]), floor 1e-10 (-100 dB), no ``top_db``
      clipping; so doubling the amplitude adds 20 log10(2) = 6.02 dB to every band above the floor;
    * F0: ``librosa.pyin`` (probabilistic YIN, Mauch & Dixon 2014) between ``fmin`` and ``fmax`` Hz
      (``audio.prosody_fmin`` / ``prosody_fmax``), its Viterbi voicing decision per frame;
    * energy: ``librosa.feature.rms`` over ``n_fft`` samples, as dB re full scale,
      20 log10(max(rms, 1e-5)) (floor -100 dB).

    Returns:
        float32 ``[PROSODY_DIM]`` = 90 (:data:`PROSODY_LAYOUT`), in this order:

        * ``[0:40]`` mean log-mel energy per band over frames (dB), lowest band first;
        * ``[40:80]`` standard deviation of the log-mel energy per band over frames (dB);
        * ``[80:86]`` F0 over the voiced frames: mean, standard deviation, minimum, maximum, range
          (maximum - minimum), all in Hz, then the voiced fraction (voiced frames / frames, 0 to 1). With
          no voiced frame (silence, noise, whispering) the five F0 values are 0 Hz and the fraction 0;
        * ``[86:90]`` RMS energy (dB): mean, standard deviation and maximum over frames, then the mean
          absolute change between consecutive frames (dB per 10 ms; 0 for a single frame).

        Standard deviations are population ones (ddof 0). Deterministic: no randomness, the same input gives
        the same bytes.

    Raises:
        ValueError: fewer samples than pYIN's frame (``prosody_frames(...)["pitch"]``), or non-finite samples.
    """
    import librosa

    y = np.ascontiguousarray(wave, dtype=np.float32).reshape(-1)
    sizes = prosody_frames(sample_rate, fmin)
    if y.size < sizes["pitch"]:
        raise ValueError(
            f"{y.size / sample_rate * 1000:.0f} ms of audio: the prosody functionals need at least "
            f"{sizes['pitch'] / sample_rate * 1000:.0f} ms ({sizes['pitch']} samples)"
        )
    if not np.isfinite(y).all():
        raise ValueError("the waveform holds non-finite samples")
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=sample_rate,
        n_fft=sizes["n_fft"],
        hop_length=sizes["hop"],
        win_length=sizes["win"],
        n_mels=PROSODY_N_MELS,
        power=2.0,
    )
    logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).astype(np.float64)  # [bands, frames]
    f0, voiced, _ = librosa.pyin(
        y, fmin=fmin, fmax=fmax, sr=sample_rate, frame_length=sizes["pitch"], hop_length=sizes["hop"]
    )
    voiced = voiced & np.isfinite(f0)
    if voiced.any():
        v = f0[voiced].astype(np.float64)
        pitch = [v.mean(), v.std(), v.min(), v.max(), v.max() - v.min(), voiced.mean()]
    else:
        pitch = [0.0] * 6
    rms = librosa.feature.rms(y=y, frame_length=sizes["n_fft"], hop_length=sizes["hop"])[0]
    rms_db = 20.0 * np.log10(np.maximum(rms.astype(np.float64), 1e-5))
    delta = float(np.abs(np.diff(rms_db)).mean()) if rms_db.size > 1 else 0.0
    energy = [rms_db.mean(), rms_db.std(), rms_db.max(), delta]
    return np.concatenate([logmel.mean(1), logmel.std(1), pitch, energy]).astype(np.float32)


def prosody_info(settings: AudioParams) -> dict:
    """The encoder info of ``audio.backend: prosody``: a signal-processing backend, no weights.

    ``pretrained`` is True (nothing randomly initialised: no loud warning, and the metrics do not flag it);
    ``kind`` says what it is. ``weights_id`` (part of the resume-cache key) names librosa's version: another
    version may compute other values.
    """
    import librosa

    return {
        "model": (
            f"librosa prosody functionals: {PROSODY_N_MELS} log-mel bands, pYIN F0 "
            f"{settings.prosody_fmin:g}-{settings.prosody_fmax:g} Hz, RMS energy"
        ),
        "pretrained": True,
        "kind": "signal_processing",
        "hidden_size": PROSODY_DIM,
        "layout": [[name, size] for name, size in PROSODY_LAYOUT],
        "revision": librosa.__version__,
        "weights_id": f"librosa@{librosa.__version__}:prosody",
    }


def split_chunks(wave: torch.Tensor, chunk_samples: int) -> list[torch.Tensor]:
    """Cut ``[samples]`` into consecutive chunks of at most ``chunk_samples`` (the last may be shorter)."""
    return list(wave.split(chunk_samples)) if wave.numel() > chunk_samples else [wave]


@torch.inference_mode()
def encode_waves(
    waves: list[torch.Tensor], extractor, model: torch.nn.Module, settings: AudioParams, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a batch of mono waveforms (each ``[samples]`` at ``settings.sample_rate`` Hz).

    Returns:
        (``[B, D]`` float32 sums of the selected hidden states over each wave's valid frames,
        ``[B]`` number of valid frames): a chunked utterance's mean is the sum of its chunks' sums over
        the sum of their frames.
    """
    inputs = extractor(
        [w.numpy() for w in waves],
        sampling_rate=settings.sample_rate,
        padding=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    values = inputs["input_values"].to(device)
    lengths = torch.tensor([w.numel() for w in waves])
    frames = model._get_feat_extract_output_lengths(lengths).clamp_min(1)  # [B] valid frames
    dtype = autocast_dtype(settings.cuda_dtype, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(
            values, attention_mask=inputs["attention_mask"].to(device), output_hidden_states=settings.last_k_layers > 1
        )
    if settings.last_k_layers == 1:
        hidden = out.last_hidden_state
    else:
        if settings.last_k_layers > len(out.hidden_states) - 1:
            raise ValueError(
                f"audio.last_k_layers={settings.last_k_layers} but the encoder has {len(out.hidden_states) - 1} layers"
            )
        hidden = torch.stack(out.hidden_states[-settings.last_k_layers :]).mean(0)
    hidden = hidden.float().cpu()  # [B, T, D]
    valid = (torch.arange(hidden.shape[1])[None, :] < frames[:, None]).unsqueeze(-1)  # [B, T, 1]
    return (hidden * valid).sum(1), frames.float()


def min_input_samples(model: torch.nn.Module) -> int:
    """The shortest input (samples) the encoder's convolutional front end turns into one frame."""
    n = 1
    while int(model._get_feat_extract_output_lengths(torch.tensor(n))) < 1:
        n += 1
    return n


class AudioUnitWorker:
    """Decodes and encodes the utterances of one work unit (:mod:`pipeline.sharding`): a pure worker.

    Payload: ``[(utterance_id, audio_source, start, end), ...]``; result: one
    :class:`pipeline.sharding.UnitResult` per item (``[hidden_size]`` float32, or None with the reason
    and a warning for the log), and the unit's ``audio_seconds_decoded``. Decoding runs in a background
    thread ahead of the encoder (:func:`pipeline.media.decode_ahead`), beside the model that uses it;
    wav2vec2 batches (``audio.batch_size`` chunks) are formed inside the unit, so a unit's vectors do
    not depend on which process encodes it.

    Models whose first convolution uses group norm over time (``feat_extract_norm="group"``, e.g.
    wav2vec2-base) normalise over the padded batch, so their inputs are encoded one at a time
    (features must not depend on batch neighbours); layer-norm models are batched by ``audio.batch_size``.

    Raises (on the first call): OSError for a model that cannot be loaded; RuntimeError when the
    loaded model is not the one the configuration describes (``expected``: weights id and size).
    """

    def __init__(self, settings: AudioParams, expected: tuple[str, int]):
        self.settings, self.expected = settings, expected
        self._loaded = None  # (extractor, model, device, min_samples, batch_size) after the first call

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None}

    def _load(self) -> tuple:
        settings, device = self.settings, default_device()
        extractor = model = None
        min_samples, batch_size = 1, settings.batch_size
        if settings.backend != "prosody":
            extractor, model, loaded = load_audio_backend(settings, device)
            if (loaded["weights_id"], loaded["hidden_size"]) != self.expected:
                raise RuntimeError(
                    f"audio.model {settings.model}: loaded {loaded['weights_id']} ({loaded['hidden_size']}-d), "
                    f"its configuration said {self.expected[0]} ({self.expected[1]}-d); run the stage again"
                )
        if settings.backend == "wav2vec2":
            min_samples = min_input_samples(model)
            if getattr(model.config, "feat_extract_norm", "layer") == "group":
                batch_size = 1
        return extractor, model, device, min_samples, batch_size

    def __call__(self, payload: list[tuple[str, str, float | None, float | None]]) -> tuple[list, dict]:
        from pipeline.sharding import UnitResult

        if self._loaded is None:
            self._loaded = self._load()
        extractor, model, device, min_samples, batch_size = self._loaded
        settings = self.settings
        prosody_min = prosody_frames(settings.sample_rate, settings.prosody_fmin)["pitch"]
        chunk_samples = int(settings.chunk_seconds * settings.sample_rate)
        results: list = [None] * len(payload)
        pending: list[tuple[int, list[torch.Tensor], dict]] = []  # (position, chunks, decoding notes)
        seconds = 0.0

        def flush() -> None:
            chunks = [c for _, cs, _ in pending for c in cs]
            sums, frames = [], []
            for s in range(0, len(chunks), batch_size):
                a, b = encode_waves(chunks[s : s + batch_size], extractor, model, settings, device)
                sums.append(a)
                frames.append(b)
            sums, frames = torch.cat(sums), torch.cat(frames)
            k = 0
            for pos, cs, notes in pending:
                vector = sums[k : k + len(cs)].sum(0) / frames[k : k + len(cs)].sum()
                results[pos].vector, results[pos].diagnostics = vector.numpy(), {"chunks": len(cs), **notes}
                k += len(cs)
            pending.clear()

        def decode(pos: int) -> tuple[torch.Tensor, dict]:
            _, source, start, end = payload[pos]
            notes: dict = {}
            wave = load_audio(
                source,
                settings.sample_rate,
                settings.max_seconds,
                start,
                end,
                on_truncated=settings.on_truncated,
                notes=notes,
            )
            return wave, notes

        for pos, result in decode_ahead(range(len(payload)), decode, decode_depth(device, DECODE_AHEAD)):
            uid, source = payload[pos][:2]
            try:
                if isinstance(result, MediaError):
                    raise result
                wave, notes = result
                warning = None
                if "partial" in notes:
                    warning = (
                        f"{uid}: {source} was cut short: {notes['partial']['decoded']:.2f} s of audio decoded of the "
                        f"{notes['partial']['declared']:.2f} s its header declares for the utterance; encoding the "
                        "part that decoded (audio.on_truncated=use_partial)"
                    )
                results[pos] = UnitResult(uid, None, "ok", notes, warning)
                if settings.backend == "opensmile":
                    values = extractor.process_signal(wave.numpy(), settings.sample_rate).to_numpy()[0]
                    if not np.isfinite(values).all():
                        raise MediaError(
                            "no_audio",
                            source,
                            f"{wave.numel() / settings.sample_rate:.3f} s of audio is too short "
                            "for openSMILE's functionals",
                        )
                    results[pos].vector = values.astype(np.float32)
                elif settings.backend == "prosody":
                    if wave.numel() < prosody_min:
                        raise MediaError(
                            "no_audio",
                            source,
                            f"{wave.numel() / settings.sample_rate * 1000:.0f} ms of audio is too short for the "
                            f"prosody functionals (at least {prosody_min / settings.sample_rate * 1000:.0f} ms)",
                        )
                    try:
                        values = prosody_features(
                            wave.numpy(), settings.sample_rate, settings.prosody_fmin, settings.prosody_fmax
                        )
                    except ValueError as err:
                        raise MediaError("decode_error", source, str(err)) from None
                    if not np.isfinite(values).all():
                        raise MediaError("decode_error", source, "non-finite prosody functionals")
                    results[pos].vector = values
                elif wave.numel() < min_samples:
                    raise MediaError(
                        "no_audio",
                        source,
                        f"only {wave.numel()} samples of audio (the encoder needs at least {min_samples})",
                    )
                else:
                    chunks = [c for c in split_chunks(wave, chunk_samples) if c.numel() >= min_samples] or [wave]
                    pending.append((pos, chunks, notes))
                seconds += wave.numel() / settings.sample_rate
            except MediaError as err:
                hint = ""
                if err.reason == "truncated" and settings.on_truncated == "mask":
                    hint = " (audio.on_truncated: use_partial would encode the part that decodes)"
                results[pos] = UnitResult(uid, None, err.reason, {}, f"{uid} ({err.reason}): {err}; audio masked{hint}")
                continue
            if settings.backend == "wav2vec2" and sum(len(cs) for _, cs, _ in pending) >= batch_size:
                flush()
        if pending:
            flush()
        return results, {"audio_seconds_decoded": seconds}


def extract(utterances: list[Utterance], params: Params, features_dir: Path, cache_root: Path = CACHE_DIR) -> dict:
    """Decode, resample and encode every utterance's audio into ``<features_dir>/audio.safetensors``.

    The work is split into units of ``audio.shard_size`` utterances (:class:`AudioUnitWorker`) and run
    with ``runtime.backend`` (:mod:`pipeline.sharding`); the bytes written do not depend on the backend
    or the worker count.

    A clip cut short is masked (``truncated``) or, with ``audio.on_truncated: use_partial``, encoded
    from the part that decoded, with a warning naming the utterance and the decoded / declared seconds.

    The encoder is loaded only when an utterance with audio is left to encode (by each worker): the
    info (and so the resume-cache key) is :func:`pipeline.encoders.describe_audio_backend`'s (or
    :func:`prosody_info`), identical to the loader's, whether or not the model is loaded.

    Returns:
        the stage report, with ``chunked`` ``{utterance_id: chunks}`` (utterances encoded in more than
        one chunk), ``partial`` ``{utterance_id: {"decoded": s, "declared": s}}`` and
        ``segment_clamped`` ``{utterance_id: {"end": s, "media_end": s}}`` (see
        :func:`pipeline.media.load_audio`). Raises: OSError for a model that cannot be loaded.
    """
    start = time.perf_counter()
    settings = params.audio
    info = prosody_info(settings) if settings.backend == "prosody" else describe_audio_backend(settings)
    info = {
        **info,
        "backend": settings.backend,
        "sample_rate": settings.sample_rate,
        "params": settings.model_dump(mode="json"),
    }
    if settings.backend == "wav2vec2":
        info["last_k_layers"] = settings.last_k_layers
    ids = [u.utterance_id for u in utterances]
    worker = AudioUnitWorker(settings, (info["weights_id"], info["hidden_size"]))
    with ExtractionCache(
        "audio", settings.model_dump(), info["hidden_size"], cache_root, weights_id=info["weights_id"]
    ) as cache:
        run = extract_units(
            cache,
            ids,
            [cache.signature([file_signature(u.audio_source), u.start, u.end]) for u in utterances],
            lambda row: None if utterances[row].audio_source else "missing_clip",
            plan_units(len(utterances), settings.shard_size),
            lambda row: (ids[row], utterances[row].audio_source, utterances[row].start, utterances[row].end),
            worker,
            params.runtime,
            "extract_audio",
        )
        has_media = any(u.audio_source for u in utterances)
        announce_random("extract_audio (wav2vec2)", info, has_media, run["computed"], params.runtime.backend)
        table, diagnostics = cache.table(ids, info)
    chunked = {u: d["chunks"] for u, d in diagnostics.items() if d.get("chunks", 1) > 1}
    return finish_extraction(
        "audio",
        table,
        features_dir,
        {"chunked": chunked},
        named={key: {u: d[key] for u, d in diagnostics.items() if key in d} for key in ("partial", "segment_clamped")},
        run_facts={
            "seconds": round(time.perf_counter() - start, 2),
            "device": str(default_device()),
            "backend": f"{params.runtime.backend} x {params.runtime.workers}",
            "resumed_from_cache": run["resumed"],
            "audio_seconds_decoded": round(run.get("audio_seconds_decoded", 0.0), 2),
            "cache": str(cache.dir),
        },
    )
