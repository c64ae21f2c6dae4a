"""Stage ``extract_audio``: one speech feature vector per utterance from a wav2vec2-style encoder.

Each clip's audio track is decoded with PyAV, down-mixed to mono, resampled to ``audio.sample_rate``
(16 kHz) with torchaudio and capped at ``audio.max_seconds``; the encoder's last hidden states are
mean-pooled over the valid (non-padding) frames. Default for real runs: ``facebook/wav2vec2-base``
(Baevski et al. 2020); the demo uses a small randomly initialised wav2vec2 (``audio.random_init``),
which is logged loudly and recorded in the report.

Masked utterances (reason code): no clip in the release (``missing_clip``), a clip without an audio
stream (``no_audio``), a clip that does not decode (``decode_error``). Each is listed in the report.

Output: ``data/features/audio.safetensors`` and ``audio_report.json``.
Run: ``python -m pipeline.extract_audio [--params params.yaml]``.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from pipeline.config import Params, run_stage
from pipeline.encoders import default_device, load_audio_encoder
from pipeline.features import FeatureTable, finish_extraction
from pipeline.media import MediaError, load_audio
from pipeline.prepare import load_utterances

log = logging.getLogger(__name__)


@torch.inference_mode()
def encode_waves(waves: list[torch.Tensor], extractor, model: torch.nn.Module, sample_rate: int,
                 device: torch.device) -> torch.Tensor:
    """Encode a batch of mono waveforms (each ``[samples]`` at ``sample_rate`` Hz).

    Returns:
        ``[len(waves), hidden_size]`` float32 on the CPU: last hidden states averaged over the frames
        that cover real samples (padding frames excluded).
    """
    inputs = extractor([w.numpy() for w in waves], sampling_rate=sample_rate, padding=True,
                       return_attention_mask=True, return_tensors="pt")
    values = inputs["input_values"].to(device)
    lengths = torch.tensor([w.numel() for w in waves])
    frames = model._get_feat_extract_output_lengths(lengths).clamp_min(1)  # [B] valid frames
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        hidden = model(values, attention_mask=inputs["attention_mask"].to(device)).last_hidden_state
    hidden = hidden.float().cpu()  # [B, T, D]
    valid = (torch.arange(hidden.shape[1])[None, :] < frames[:, None]).unsqueeze(-1)  # [B, T, 1]
    return (hidden * valid).sum(1) / valid.sum(1).clamp_min(1)


def run(params: Params, batch_size: int = 8) -> None:
    """Decode, resample and encode every utterance's audio; mask the ones without usable audio.

    Models whose first convolution uses group norm over time (``feat_extract_norm="group"``, e.g.
    wav2vec2-base) normalise over the padded batch, so their utterances are encoded one at a time
    (features must not depend on batch neighbours); layer-norm models are batched.
    """
    start = time.perf_counter()
    utterances = load_utterances()
    device = default_device()
    extractor, model, info = load_audio_encoder(params.audio.model, params.audio.random_init, device)
    if getattr(model.config, "feat_extract_norm", "layer") == "group":
        batch_size = 1
    min_samples = 1  # the shortest input the convolutional front end turns into one frame
    while int(model._get_feat_extract_output_lengths(torch.tensor(min_samples))) < 1:
        min_samples += 1
    n = len(utterances)
    features = torch.zeros(n, model.config.hidden_size)
    reasons = ["ok"] * n
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            rows = [i for i, _ in pending]
            features[rows] = encode_waves([w for _, w in pending], extractor, model, params.audio.sample_rate, device)
            pending.clear()

    for i, utt in enumerate(tqdm(utterances, desc="extract_audio", unit="utt")):
        if not utt.clip:
            reasons[i] = "missing_clip"
            continue
        try:
            wave = load_audio(utt.clip, params.audio.sample_rate, params.audio.max_seconds)
            if wave.numel() < min_samples:
                raise MediaError("no_audio", utt.clip, f"only {wave.numel()} samples of audio "
                                 f"(the encoder needs at least {min_samples})")
        except MediaError as err:
            reasons[i] = err.reason
            log.warning("%s (%s): %s; audio masked", utt.utterance_id, err.reason, err)
            continue
        pending.append((i, wave))
        if len(pending) >= batch_size:
            flush()
    flush()
    mask = torch.tensor([r == "ok" for r in reasons])
    table = FeatureTable([u.utterance_id for u in utterances], features, mask, reasons,
                         {**info, "sample_rate": params.audio.sample_rate})
    finish_extraction("audio", table, time.perf_counter() - start, {"device": str(device)})


if __name__ == "__main__":
    run_stage(run, "Encode utterance speech (audio.*) into data/features/audio.safetensors.")
