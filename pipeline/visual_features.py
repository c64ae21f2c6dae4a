"""Face features: one vector per utterance (used by the ``extract_visual`` stage and ``predict``).

1. Frames: OpenCV, ``visual.fps`` frames per second of the utterance's segment, at most
   ``visual.max_frames`` (spread evenly over longer segments), each downscaled to at most
   ``visual.max_frame_side`` pixels on its longer side as it is decoded (:func:`pipeline.media.sample_frames`).
2. Detection: facenet-pytorch MTCNN (Zhang et al. 2016) on batches of ``visual.batch_frames`` frames
   taken across ``visual.clips_per_batch`` consecutive clips (:func:`detection_plan` fixes the groups
   from the utterance table, so a resumed run batches as an uninterrupted one); faces below
   ``visual.min_face_prob`` are ignored.
3. One face track per utterance (:func:`face_track`): the speaker's face starts the track, chosen
   by ``visual.face_select`` (the largest, the most confident or the most central detection of the
   clip); every other frame keeps the face nearest to the track's previous box. IEMOCAP's split-screen
   videos and MELD's group shots hold several faces; the largest is usually the speaker in MELD.
4. Embedding: the tracked crops (160x160) of the group's clips through InceptionResnetV1 (Schroff et
   al. 2015, FaceNet; weights ``visual.face_weights``) in batches of ``batch_frames``, 512-d, averaged
   over the frames of each clip's track.

Masked utterances (reason code): no media (``missing_clip``), an audio-only file (``no_video``), no
face in any sampled frame (``no_face``), a clip that does not decode (``corrupt``, ``truncated``,
``decode_error``: see :mod:`pipeline.media`; a clip cut short is encoded from the frames that decoded
instead with ``visual.on_truncated: use_partial``). The report keeps per-clip frame and per-frame face
counts as diagnostics, and lists the clips decoded in part (``partial``) and those whose segment end
lay beyond the video and was clamped to its end (``segment_clamped``); the log gives the time spent
decoding (in a background thread, overlapped with detection: :func:`pipeline.media.decode_ahead`),
detecting and embedding (frames/s). Resumable through
:class:`pipeline.extraction_cache.ExtractionCache`. Every ``TRIM_EVERY`` clips (in whole groups) the C
heap's free pages go back to the system (:func:`pipeline.media.trim_heap`): memory stays flat.

A table without any clip (text only) loads no face model: every utterance is masked ``missing_clip``,
the encoder info is :func:`pipeline.encoders.describe_face_models`' (nothing downloaded, built or
announced as randomly initialised).

Output: ``<features dir>/visual.safetensors`` and ``visual_report.json``.
"""

from __future__ import annotations

import logging
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Params, VisualParams
from pipeline.encoders import default_device, describe_face_models, load_face_models
from pipeline.extraction_cache import CACHE_DIR, ExtractionCache
from pipeline.media import MediaError, decode_ahead, decode_depth, sample_frames, trim_heap
from pipeline.reports import finish_extraction
from pipeline.utterances import Utterance

log = logging.getLogger(__name__)

DECODE_AHEAD = 2  # clips decoded in the background ahead of detection (each up to max_frames RGB frames)
TRIM_EVERY = 16  # clips between two trim_heap() calls (keeps the resident size flat over a corpus)


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def face_track(
    boxes: list[np.ndarray | None],
    probs: list[np.ndarray | None],
    frame_size: tuple[int, int],
    select: str,
    min_prob: float,
) -> list[int | None]:
    """Pick one face per frame that follows the same person through the clip.

    Args:
        boxes: per frame, ``[F, 4]`` boxes ``(x1, y1, x2, y2)`` in pixels, or None (no detection).
        probs: per frame, ``[F]`` detection probabilities, or None.
        frame_size: ``(width, height)`` in pixels.
        select: how the track starts: ``largest`` (box area), ``confident`` (probability) or
            ``central`` (box centre nearest the frame centre), over all frames of the clip.
        min_prob: detections below this probability are ignored.

    Returns:
        per frame, the index of the tracked face in that frame's boxes, or None (no usable face).
        From the starting frame the track moves forward and backward, each frame taking the face
        whose centre is nearest to the previously tracked one.
    """
    candidates = [
        [] if b is None or p is None else [k for k in range(len(b)) if p[k] is not None and p[k] >= min_prob]
        for b, p in zip(boxes, probs)
    ]
    scored = []
    centre = np.array(frame_size, dtype=float) / 2
    for f, ks in enumerate(candidates):
        for k in ks:
            box = boxes[f][k]
            score = {
                "largest": (box[2] - box[0]) * (box[3] - box[1]),
                "confident": probs[f][k],
                "central": -np.linalg.norm(_centre(box) - centre),
            }[select]
            scored.append((float(score), -f, f, k))
    track: list[int | None] = [None] * len(boxes)
    if not scored:
        return track
    _, _, f0, k0 = max(scored)
    track[f0] = k0
    for direction in (range(f0 + 1, len(boxes)), range(f0 - 1, -1, -1)):
        previous = _centre(boxes[f0][k0])
        for f in direction:
            if candidates[f]:
                track[f] = min(candidates[f], key=lambda k: np.linalg.norm(_centre(boxes[f][k]) - previous))
                previous = _centre(boxes[f][track[f]])
    return track


def _as_list(batch_out, n: int) -> list:
    """MTCNN returns a numpy object array (or a list) with None entries: a plain list of length n."""
    return (
        [None if x is None else np.asarray(x, dtype=float) for x in list(batch_out)][:n]
        if batch_out is not None
        else [None] * n
    )


def detection_plan(n_rows: int, pending: dict[int, str], clips_per_batch: int) -> list[list[tuple[int, str | None]]]:
    """The groups of clips whose frames go through face detection together, fixed before any decoding.

    Group ``g`` holds rows ``g * clips_per_batch`` to ``(g + 1) * clips_per_batch - 1`` of the utterance
    table, whatever is cached: MTCNN's boxes depend (by about 1e-5 pixel on the CPU) on which frames
    share its batch, so a group with one pending row is detected whole again, the cached rows along as
    context, and a resumed run batches every frame exactly as an uninterrupted one.

    Args:
        n_rows: utterances in the table.
        pending: ``{row: input signature}`` of the rows still to extract.
        clips_per_batch: rows per group (``visual.clips_per_batch``).

    Returns:
        per group with a pending row, ``(row, signature or None)`` in row order; None marks a cached
        row that is decoded and detected as context only (its cached result is kept).

    Raises:
        ValueError: ``clips_per_batch`` below 1.
    """
    if clips_per_batch < 1:
        raise ValueError(f"clips_per_batch must be at least 1, got {clips_per_batch}")
    groups = sorted({row // clips_per_batch for row in pending})
    return [
        [(row, pending.get(row)) for row in range(g * clips_per_batch, min((g + 1) * clips_per_batch, n_rows))]
        for g in groups
    ]


@torch.inference_mode()
def embed_clips(
    clips: list[list[np.ndarray]],
    mtcnn,
    embedder: torch.nn.Module,
    settings: VisualParams,
    device: torch.device,
    timings: dict | None = None,
) -> list[tuple[torch.Tensor | None, dict]]:
    """Detect faces on batches of frames across clips, track each clip's speaker, embed and average.

    Detection: the frames of all ``clips``, grouped by frame size (an MTCNN batch needs equal sizes;
    sizes in order of first appearance, frames in clip order), in batches of ``visual.batch_frames``.
    Tracking is per clip (:func:`face_track`); the tracked 160x160 crops of all clips are embedded in
    batches of ``batch_frames`` and averaged per clip.

    Args:
        clips: per clip, its RGB ``[H, W, 3]`` uint8 frames (sizes may differ between clips; a clip
            may have no frame).
        timings: if given, ``detect_seconds`` and ``embed_seconds`` are added to it.

    Returns:
        per clip: (mean embedding ``[512]`` over its tracked frames, or None when no frame has a usable
        face; diagnostics: ``frames``, ``faces_per_frame`` (detections at or above ``min_face_prob``),
        ``frames_tracked``).
    """
    t0 = time.perf_counter()
    boxes = [[None] * len(frames) for frames in clips]
    probs = [[None] * len(frames) for frames in clips]
    by_size: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for c, frames in enumerate(clips):
        for f, frame in enumerate(frames):
            by_size.setdefault(frame.shape, []).append((c, f))
    for members in by_size.values():
        for s in range(0, len(members), settings.batch_frames):
            chunk = members[s : s + settings.batch_frames]
            b, p = mtcnn.detect([clips[c][f] for c, f in chunk])
            for (c, f), box, prob in zip(chunk, _as_list(b, len(chunk)), _as_list(p, len(chunk))):
                boxes[c][f], probs[c][f] = box, prob
    crops, kept_counts, diagnostics = [], [], []
    for c, frames in enumerate(clips):
        kept = []
        if frames:
            height, width = frames[0].shape[:2]
            track = face_track(boxes[c], probs[c], (width, height), settings.face_select, settings.min_face_prob)
            kept = [f for f, k in enumerate(track) if k is not None]
        if kept:
            crops += list(mtcnn.extract([frames[f] for f in kept], [boxes[c][f][[track[f]]] for f in kept], None))
        kept_counts.append(len(kept))
        faces = [
            0 if p is None else int(sum(x is not None and x >= settings.min_face_prob for x in p)) for p in probs[c]
        ]
        diagnostics.append({"frames": len(frames), "faces_per_frame": faces, "frames_tracked": len(kept)})
    t1 = time.perf_counter()
    embeddings: list[torch.Tensor] = []
    if crops:
        crops = torch.cat(crops)  # [frames tracked in all clips, 3, 160, 160]
        per_crop = torch.cat(
            [
                embedder(crops[s : s + settings.batch_frames].to(device, non_blocking=True)).float().cpu()
                for s in range(0, len(crops), settings.batch_frames)
            ]
        )  # [frames tracked in all clips, 512]
        embeddings = list(per_crop.split(kept_counts))
    if timings is not None:
        timings["detect_seconds"] = timings.get("detect_seconds", 0.0) + t1 - t0
        timings["embed_seconds"] = timings.get("embed_seconds", 0.0) + time.perf_counter() - t1
    return [(embeddings[c].mean(0) if kept_counts[c] else None, diagnostics[c]) for c in range(len(clips))]


def embed_faces(
    frames: list[np.ndarray],
    mtcnn,
    embedder: torch.nn.Module,
    settings: VisualParams,
    device: torch.device,
    timings: dict | None = None,
) -> tuple[torch.Tensor | None, dict]:
    """:func:`embed_clips` for one clip: (mean embedding ``[512]`` or None, diagnostics)."""
    return embed_clips([frames], mtcnn, embedder, settings, device, timings)[0]


def extract(utterances: list[Utterance], params: Params, features_dir: Path, cache_root: Path = CACHE_DIR) -> dict:
    """Sample frames, track and embed the speaker's face, pool per utterance into ``visual.safetensors``.

    Returns:
        the stage report (with ``per_clip`` diagnostics, ``partial`` ``{utterance_id: {"decoded": s,
        "declared": s}}`` and ``segment_clamped`` ``{utterance_id: {"end": s, "media_end": s}}``, see
        :func:`pipeline.media.sample_frames`; its ``run`` facts hold the ``decode/detect/embed`` seconds and
        frames/s). Raises: OSError / FileNotFoundError / ValueError for face weights that cannot be loaded.
    """
    start = time.perf_counter()
    settings = params.visual
    device = default_device()
    if any(u.clip for u in utterances):
        mtcnn, embedder, info = load_face_models(settings.face_weights, settings.min_face_prob, device)
    else:  # nothing to embed (a text-only table): no model to load, no random weights to announce
        mtcnn = embedder = None
        info = describe_face_models(settings.face_weights)
    info = {
        **info,
        "fps": settings.fps,
        "max_frames": settings.max_frames,
        "face_select": settings.face_select,
        "params": settings.model_dump(mode="json"),
    }
    timings = {"decode_seconds": 0.0, "detect_seconds": 0.0, "embed_seconds": 0.0}
    frames_seen, frames_tracked = 0, 0
    with ExtractionCache(
        "visual", settings.model_dump(), 512, cache_root, flush_every=16, weights_id=info["weights_id"]
    ) as cache:

        def decode(item: tuple[int, str]) -> tuple[list[np.ndarray], dict]:  # runs in the decoding thread
            utt, t0, notes = utterances[item[0]], time.perf_counter(), {}
            try:
                frames = sample_frames(
                    utt.clip,
                    settings.fps,
                    settings.max_frames,
                    utt.start,
                    utt.end,
                    settings.max_frame_side,
                    on_truncated=settings.on_truncated,
                    notes=notes,
                )
                return frames, notes
            finally:
                timings["decode_seconds"] += time.perf_counter() - t0

        pending = dict(cache.pending_media(utterances, "clip"))
        plan = [
            [item for item in group if utterances[item[0]].clip]  # a row without a clip was recorded by pending
            for group in detection_plan(len(utterances), pending, settings.clips_per_batch)
        ]
        decoded = decode_ahead([item for group in plan for item in group], decode, decode_depth(device, DECODE_AHEAD))
        progress = tqdm(total=len(pending), desc="extract_visual", unit="utt")
        for g, group in enumerate(plan):
            if g % max(1, TRIM_EVERY // settings.clips_per_batch) == 0:
                trim_heap()
            # [((row, signature or None), (frames, decoding notes) | MediaError)]
            results = list(islice(decoded, len(group)))
            clips = [[] if isinstance(result, MediaError) else result[0] for _, result in results]
            for ((row, signature), result), (embedding, diagnostics) in zip(
                results, embed_clips(clips, mtcnn, embedder, settings, device, timings)
            ):
                if signature is None:  # a cached row, detected again as context only
                    continue
                utt = utterances[row]
                progress.update()
                if isinstance(result, MediaError):
                    cache.put(utt.utterance_id, signature, None, result.reason)
                    hint = ""
                    if result.reason == "truncated" and settings.on_truncated == "mask":
                        hint = " (visual.on_truncated: use_partial would use the frames that decode)"
                    log.warning("%s (%s): %s; visual masked%s", utt.utterance_id, result.reason, result, hint)
                    continue
                frames, notes = result
                if "partial" in notes:
                    log.warning(
                        "%s: %s was cut short: its frames decode to %.2f s of the %.2f s its header declares "
                        "for the utterance; using the %d frames that decoded (visual.on_truncated=use_partial)",
                        utt.utterance_id,
                        utt.clip,
                        notes["partial"]["decoded"],
                        notes["partial"]["declared"],
                        len(frames),
                    )
                frames_seen += diagnostics["frames"]
                frames_tracked += diagnostics["frames_tracked"]
                if embedding is None:
                    log.warning(
                        "%s (no_face): no face in %d sampled frames of %s; visual masked",
                        utt.utterance_id,
                        len(frames),
                        utt.clip,
                    )
                reason = "ok" if embedding is not None else "no_face"
                cache.put(utt.utterance_id, signature, embedding, reason, {**diagnostics, **notes})
        progress.close()
        table, per_clip = cache.table([u.utterance_id for u in utterances], info)
    named = {key: {u: d[key] for u, d in per_clip.items() if key in d} for key in ("partial", "segment_clamped")}
    per_clip = {u: {k: v for k, v in d.items() if k not in named} for u, d in per_clip.items()}
    rates = {
        "detect_frames_per_second": round(frames_seen / timings["detect_seconds"], 2)
        if timings["detect_seconds"]
        else None,
        "embed_frames_per_second": round(frames_tracked / timings["embed_seconds"], 2)
        if timings["embed_seconds"]
        else None,
    }
    return finish_extraction(
        "visual",
        table,
        features_dir,
        {"per_clip": per_clip},
        named=named,
        run_facts={
            "seconds": round(time.perf_counter() - start, 2),
            "device": str(device),
            "resumed_from_cache": cache.resumed,
            "frames": frames_seen,
            "frames_tracked": frames_tracked,
            **{k: round(v, 2) for k, v in timings.items()},
            **rates,
            "cache": str(cache.dir),
        },
    )
