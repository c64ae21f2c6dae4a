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

Masked utterances (reason code): no media (``missing_clip``), a file without an audio stream or an
empty / too short segment (``no_audio``), a damaged file (``corrupt``), a file cut short
(``truncated``, unless ``audio.on_truncated: use_partial`` encodes the part that decoded), another
decoding failure (``decode_error``): see :mod:`pipeline.media`. Each is listed in the report, as are
the utterances encoded from a partial decode (``partial``) and those whose segment end lay beyond
their media and was clamped to its end (``segment_clamped``). Resumable through
:class:`pipeline.extraction_cache.ExtractionCache`. Clips are decoded in a background thread a few
utterances ahead of the encoder (:func:`pipeline.media.decode_ahead`), so decoding overlaps the model
calls and memory does not grow with the corpus.

Output: ``<features dir>/audio.safetensors`` and ``audio_report.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import AudioParams, Params
from pipeline.encoders import autocast_dtype, default_device, load_audio_backend
from pipeline.extraction_cache import CACHE_DIR, ExtractionCache
from pipeline.media import MediaError, decode_ahead, decode_depth, load_audio
from pipeline.reports import finish_extraction
from pipeline.utterances import Utterance

log = logging.getLogger(__name__)

DECODE_AHEAD = 8  # utterances decoded in the background ahead of the encoder (a few MB of audio)


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


def extract(utterances: list[Utterance], params: Params, features_dir: Path, cache_root: Path = CACHE_DIR) -> dict:
    """Decode, resample and encode every utterance's audio into ``<features_dir>/audio.safetensors``.

    Models whose first convolution uses group norm over time (``feat_extract_norm="group"``, e.g.
    wav2vec2-base) normalise over the padded batch, so their inputs are encoded one at a time
    (features must not depend on batch neighbours); layer-norm models are batched by ``audio.batch_size``.

    A clip cut short is masked (``truncated``) or, with ``audio.on_truncated: use_partial``, encoded
    from the part that decoded, with a warning naming the utterance and the decoded / declared seconds.

    Returns:
        the stage report, with ``chunked`` ``{utterance_id: chunks}`` (utterances encoded in more than
        one chunk), ``partial`` ``{utterance_id: {"decoded": s, "declared": s}}`` and
        ``segment_clamped`` ``{utterance_id: {"end": s, "media_end": s}}`` (see
        :func:`pipeline.media.load_audio`). Raises: OSError for a model that cannot be loaded.
    """
    start = time.perf_counter()
    settings = params.audio
    device = default_device()
    extractor, model, info = load_audio_backend(settings, device)
    info = {
        **info,
        "backend": settings.backend,
        "sample_rate": settings.sample_rate,
        "params": settings.model_dump(mode="json"),
    }
    if settings.backend == "wav2vec2":
        info["last_k_layers"] = settings.last_k_layers
        min_samples = min_input_samples(model)
        batch_size = 1 if getattr(model.config, "feat_extract_norm", "layer") == "group" else settings.batch_size
    chunk_samples = int(settings.chunk_seconds * settings.sample_rate)
    pending: list[tuple[int, str, list[torch.Tensor], dict]] = []  # (row, signature, chunks, decoding notes)
    seconds = 0.0

    def flush(cache: ExtractionCache) -> None:
        chunks = [c for _, _, cs, _ in pending for c in cs]
        sums, frames = [], []
        for s in range(0, len(chunks), batch_size):
            a, b = encode_waves(chunks[s : s + batch_size], extractor, model, settings, device)
            sums.append(a)
            frames.append(b)
        sums, frames = torch.cat(sums), torch.cat(frames)
        k = 0
        for row, signature, cs, notes in pending:
            vector = sums[k : k + len(cs)].sum(0) / frames[k : k + len(cs)].sum()
            cache.put(utterances[row].utterance_id, signature, vector, diagnostics={"chunks": len(cs), **notes})
            k += len(cs)
        pending.clear()

    def decode(item: tuple[int, str]) -> tuple[torch.Tensor, dict]:
        utt, notes = utterances[item[0]], {}
        wave = load_audio(
            utt.audio_source,
            settings.sample_rate,
            settings.max_seconds,
            utt.start,
            utt.end,
            on_truncated=settings.on_truncated,
            notes=notes,
        )
        return wave, notes

    with ExtractionCache(
        "audio", settings.model_dump(), info["hidden_size"], cache_root, weights_id=info["weights_id"]
    ) as cache:
        todo = cache.pending_media(utterances, "audio_source")
        decoded = decode_ahead(todo, decode, decode_depth(device, DECODE_AHEAD))
        for (i, signature), result in tqdm(decoded, total=len(todo), desc="extract_audio", unit="utt"):
            utt = utterances[i]
            try:
                if isinstance(result, MediaError):
                    raise result
                wave, notes = result
                if "partial" in notes:
                    log.warning(
                        "%s: %s was cut short: %.2f s of audio decoded of the %.2f s its header declares "
                        "for the utterance; encoding the part that decoded (audio.on_truncated=use_partial)",
                        utt.utterance_id,
                        utt.audio_source,
                        notes["partial"]["decoded"],
                        notes["partial"]["declared"],
                    )
                if settings.backend == "opensmile":
                    values = extractor.process_signal(wave.numpy(), settings.sample_rate).to_numpy()[0]
                    if not np.isfinite(values).all():
                        raise MediaError(
                            "no_audio",
                            utt.audio_source,
                            f"{wave.numel() / settings.sample_rate:.3f} s "
                            "of audio is too short for openSMILE's functionals",
                        )
                    cache.put(
                        utt.utterance_id, signature, torch.from_numpy(values.astype(np.float32)), diagnostics=notes
                    )
                elif wave.numel() < min_samples:
                    raise MediaError(
                        "no_audio",
                        utt.audio_source,
                        f"only {wave.numel()} samples of audio (the encoder needs at least {min_samples})",
                    )
                else:
                    chunks = [c for c in split_chunks(wave, chunk_samples) if c.numel() >= min_samples] or [wave]
                    pending.append((i, signature, chunks, notes))
                seconds += wave.numel() / settings.sample_rate
            except MediaError as err:
                cache.put(utt.utterance_id, signature, None, err.reason)
                hint = ""
                if err.reason == "truncated" and settings.on_truncated == "mask":
                    hint = " (audio.on_truncated: use_partial would encode the part that decodes)"
                log.warning("%s (%s): %s; audio masked%s", utt.utterance_id, err.reason, err, hint)
                continue
            if settings.backend == "wav2vec2" and sum(len(cs) for _, _, cs, _ in pending) >= batch_size:
                flush(cache)
        if pending:
            flush(cache)
        table, diagnostics = cache.table([u.utterance_id for u in utterances], info)
    chunked = {u: d["chunks"] for u, d in diagnostics.items() if d.get("chunks", 1) > 1}
    return finish_extraction(
        "audio",
        table,
        features_dir,
        {"chunked": chunked},
        named={key: {u: d[key] for u, d in diagnostics.items() if key in d} for key in ("partial", "segment_clamped")},
        run_facts={
            "seconds": round(time.perf_counter() - start, 2),
            "device": str(device),
            "resumed_from_cache": cache.resumed,
            "audio_seconds_decoded": round(seconds, 2),
            "cache": str(cache.dir),
        },
    )
