"""Face features: one vector per utterance (used by the ``extract_visual`` stage and ``predict``).

1. Frames: OpenCV, ``visual.fps`` frames per second of the utterance's segment, at most
   ``visual.max_frames`` (spread evenly over longer segments), each downscaled to at most
   ``visual.max_frame_side`` pixels on its longer side as it is decoded (:func:`pipeline.media.sample_frames`).
2. Detection: facenet-pytorch MTCNN (Zhang et al. 2016) on batches of ``visual.batch_frames`` frames
   taken across ``visual.clips_per_batch`` consecutive clips (:func:`detection_groups` fixes the groups
   from the utterance table, so a resumed or sharded run batches as an uninterrupted one); faces below
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

from pipeline.config import Params, VisualParams
from pipeline.encoders import announce_random, default_device, describe_face_models, load_face_models
from pipeline.extraction_cache import CACHE_DIR, ExtractionCache, file_signature
from pipeline.media import MediaError, decode_ahead, decode_depth, sample_frames, trim_heap
from pipeline.reports import finish_extraction
from pipeline.sharding import extract_units, plan_units
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


def detection_groups(rows: list[int], clips_per_batch: int) -> list[list[int]]:
    """The groups of clips whose frames go through face detection together: rows of the utterance
    table grouped by ``row // clips_per_batch``, in row order.

    The groups follow from the table alone (a work unit holds whole groups:
    :func:`pipeline.sharding.plan_units` with ``align=clips_per_batch``), because MTCNN's boxes depend
    (by about 1e-5 pixel on the CPU) on which frames share its batch: a resumed or sharded run batches
    every frame exactly as an uninterrupted one-process run.

    Raises:
        ValueError: ``clips_per_batch`` below 1.
    """
    if clips_per_batch < 1:
        raise ValueError(f"clips_per_batch must be at least 1, got {clips_per_batch}")
    groups: dict[int, list[int]] = {}
    for row in rows:
        groups.setdefault(row // clips_per_batch, []).append(row)
    return [groups[g] for g in sorted(groups)]


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


class VisualUnitWorker:
    """Decodes, detects, tracks and embeds the faces of one work unit (:mod:`pipeline.sharding`): a pure worker.

    Payload: ``[(row, utterance_id, clip, start, end), ...]`` (rows of the utterance table, whole
    detection groups); result: one :class:`pipeline.sharding.UnitResult` per item (``[512]`` float32,
    or None with ``no_face`` or a decoding reason, and a warning for the log; per-clip frame and face
    counts in its diagnostics), and the unit's ``decode/detect/embed_seconds``, ``frames`` and
    ``frames_tracked``. Frames are decoded in a background thread ahead of detection, beside the models.
    The face models are loaded on the first call (``visual.face_weights``).
    """

    def __init__(self, settings: VisualParams):
        self.settings = settings
        self._loaded = None  # (mtcnn, embedder, device) after the first call
        self._clips: int | None = None  # clips since the last trim_heap() (None: not trimmed yet)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None, "_clips": None}

    def __call__(self, payload: list[tuple[int, str, str, float | None, float | None]]) -> tuple[list, dict]:
        from pipeline.sharding import UnitResult

        settings = self.settings
        if self._loaded is None:
            device = default_device()
            self._loaded = (*load_face_models(settings.face_weights, settings.min_face_prob, device)[:2], device)
        mtcnn, embedder, device = self._loaded
        timings = {"decode_seconds": 0.0, "detect_seconds": 0.0, "embed_seconds": 0.0}

        def decode(pos: int) -> tuple[list[np.ndarray], dict]:  # runs in the decoding thread
            _, _, clip, start, end = payload[pos]
            t0, notes = time.perf_counter(), {}
            try:
                frames = sample_frames(
                    clip,
                    settings.fps,
                    settings.max_frames,
                    start,
                    end,
                    settings.max_frame_side,
                    on_truncated=settings.on_truncated,
                    notes=notes,
                )
                return frames, notes
            finally:
                timings["decode_seconds"] += time.perf_counter() - t0

        position = {item[0]: pos for pos, item in enumerate(payload)}
        groups = [[position[r] for r in g] for g in detection_groups(list(position), settings.clips_per_batch)]
        decoded = decode_ahead([pos for group in groups for pos in group], decode, decode_depth(device, DECODE_AHEAD))
        results: list = [None] * len(payload)
        frames_seen = frames_tracked = 0
        for group in groups:
            if self._clips is None or self._clips >= TRIM_EVERY:
                trim_heap()
                self._clips = 0
            self._clips += len(group)
            decoded_group = list(islice(decoded, len(group)))  # [(position, (frames, notes) | MediaError)]
            clips = [[] if isinstance(result, MediaError) else result[0] for _, result in decoded_group]
            for (pos, result), (embedding, diagnostics) in zip(
                decoded_group, embed_clips(clips, mtcnn, embedder, settings, device, timings)
            ):
                _, uid, clip, _, _ = payload[pos]
                if isinstance(result, MediaError):
                    hint = ""
                    if result.reason == "truncated" and settings.on_truncated == "mask":
                        hint = " (visual.on_truncated: use_partial would use the frames that decode)"
                    warning = f"{uid} ({result.reason}): {result}; visual masked{hint}"
                    results[pos] = UnitResult(uid, None, result.reason, {}, warning)
                    continue
                frames, notes = result
                warnings = []
                if "partial" in notes:
                    warnings.append(
                        f"{uid}: {clip} was cut short: its frames decode to {notes['partial']['decoded']:.2f} s of "
                        f"the {notes['partial']['declared']:.2f} s its header declares for the utterance; using the "
                        f"{len(frames)} frames that decoded (visual.on_truncated=use_partial)"
                    )
                frames_seen += diagnostics["frames"]
                frames_tracked += diagnostics["frames_tracked"]
                if embedding is None:
                    warnings.append(
                        f"{uid} (no_face): no face in {len(frames)} sampled frames of {clip}; visual masked"
                    )
                results[pos] = UnitResult(
                    uid,
                    None if embedding is None else embedding.numpy(),
                    "ok" if embedding is not None else "no_face",
                    {**diagnostics, **notes},
                    "\n".join(warnings) or None,
                )
        return results, {**timings, "frames": frames_seen, "frames_tracked": frames_tracked}


def extract(utterances: list[Utterance], params: Params, features_dir: Path, cache_root: Path = CACHE_DIR) -> dict:
    """Sample frames, track and embed the speaker's face, pool per utterance into ``visual.safetensors``.

    The work is split into units of ``visual.shard_size`` utterances (whole detection groups;
    :class:`VisualUnitWorker`) and run with ``runtime.backend`` (:mod:`pipeline.sharding`); the bytes
    written do not depend on the backend or the worker count.

    Returns:
        the stage report (with ``per_clip`` diagnostics, ``partial`` ``{utterance_id: {"decoded": s,
        "declared": s}}`` and ``segment_clamped`` ``{utterance_id: {"end": s, "media_end": s}}``, see
        :func:`pipeline.media.sample_frames`; its ``run`` facts hold the ``decode/detect/embed`` seconds and
        frames/s). Raises: OSError / FileNotFoundError / ValueError for face weights that cannot be loaded.
    """
    start = time.perf_counter()
    settings = params.visual
    info = describe_face_models(settings.face_weights)  # what load_face_models will report (no loading here)
    info = {
        **info,
        "fps": settings.fps,
        "max_frames": settings.max_frames,
        "face_select": settings.face_select,
        "params": settings.model_dump(mode="json"),
    }
    ids = [u.utterance_id for u in utterances]
    with ExtractionCache(
        "visual", settings.model_dump(), 512, cache_root, flush_every=16, weights_id=info["weights_id"]
    ) as cache:
        run = extract_units(
            cache,
            ids,
            [cache.signature([file_signature(u.clip), u.start, u.end]) for u in utterances],
            lambda row: None if utterances[row].clip else "missing_clip",
            plan_units(len(utterances), settings.shard_size, align=settings.clips_per_batch),
            lambda row: (row, ids[row], utterances[row].clip, utterances[row].start, utterances[row].end),
            VisualUnitWorker(settings),
            params.runtime,
            "extract_visual",
        )
        has_media = any(u.clip for u in utterances)
        what = "extract_visual (InceptionResnetV1 face embedder)"
        announce_random(what, info, has_media, run["computed"], params.runtime.backend)
        table, per_clip = cache.table(ids, info)
    named = {key: {u: d[key] for u, d in per_clip.items() if key in d} for key in ("partial", "segment_clamped")}
    per_clip = {u: {k: v for k, v in d.items() if k not in named} for u, d in per_clip.items()}
    detect, embed = run.get("detect_seconds", 0.0), run.get("embed_seconds", 0.0)
    return finish_extraction(
        "visual",
        table,
        features_dir,
        {"per_clip": per_clip},
        named=named,
        run_facts={
            "seconds": round(time.perf_counter() - start, 2),
            "device": str(default_device()),
            "backend": f"{params.runtime.backend} x {params.runtime.workers}",
            "resumed_from_cache": run["resumed"],
            "frames": int(run.get("frames", 0)),
            "frames_tracked": int(run.get("frames_tracked", 0)),
            **{k: round(run.get(k, 0.0), 2) for k in ("decode_seconds", "detect_seconds", "embed_seconds")},
            "detect_frames_per_second": round(run.get("frames", 0) / detect, 2) if detect else None,
            "embed_frames_per_second": round(run.get("frames_tracked", 0) / embed, 2) if embed else None,
            "cache": str(cache.dir),
        },
    )
