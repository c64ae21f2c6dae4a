"""Stage ``extract_visual``: one face feature vector per utterance.

Frames are sampled with OpenCV (``visual.fps``, at most ``visual.max_frames`` per clip); facenet-pytorch
MTCNN (Zhang et al. 2016) detects faces in each frame and keeps the largest one (the speaker, in
MELD-style close-ups) as a 160x160 crop when its detection probability reaches ``visual.min_face_prob``;
InceptionResnetV1 (Schroff et al. 2015, FaceNet; weights ``visual.face_weights``) embeds each crop
into 512-d; the embeddings are averaged over the frames with a face.

Masked utterances (reason code): no clip (``missing_clip``), no face in any sampled frame
(``no_face``), a clip that does not decode (``decode_error``). Per-clip frame and face counts are kept in
the report as diagnostics.

Output: ``data/features/visual.safetensors`` and ``visual_report.json``.
Run: ``python -m pipeline.extract_visual [--params params.yaml]``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Params, run_stage
from pipeline.encoders import default_device, load_face_models
from pipeline.features import FeatureTable, finish_extraction
from pipeline.media import MediaError, sample_frames
from pipeline.prepare import load_utterances

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed_faces(frames: list[np.ndarray], mtcnn, embedder: torch.nn.Module, *, min_face_prob: float,
                batch_frames: int, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """Detect the largest face per frame and embed the crops.

    Args:
        frames: RGB ``[H, W, 3]`` uint8 arrays of one clip (all the same size).

    Returns:
        (mean embedding ``[512]`` over frames with a face, or None when no frame has one;
        number of frames with a face).
    """
    crops = []
    for start in range(0, len(frames), batch_frames):
        # keep_all=True: facenet-pytorch's keep_all=False path fails on batches that mix frames with
        # and without a face; with select_largest=True, index 0 of each frame is its largest face.
        faces, probs = mtcnn(frames[start:start + batch_frames], return_prob=True)
        for face, prob in zip(faces, probs):
            if face is None:
                continue
            prob = np.asarray(prob, dtype=object).ravel()  # scalars, arrays or None, depending on the batch
            if prob.size and prob[0] is not None and float(prob[0]) >= min_face_prob:
                crops.append(face[0])
    if not crops:
        return None, 0
    embeddings = torch.cat([embedder(torch.stack(crops[s:s + batch_frames]).to(device)).float().cpu()
                            for s in range(0, len(crops), batch_frames)])
    return embeddings.mean(0), len(crops)


def run(params: Params) -> None:
    """Sample frames, detect and embed the speaker's face, pool per utterance; mask clips without one."""
    start = time.perf_counter()
    utterances = load_utterances()
    device = default_device()
    mtcnn, embedder, info = load_face_models(params.visual.face_weights, params.visual.min_face_prob, device)
    n = len(utterances)
    features = torch.zeros(n, 512)
    reasons = ["ok"] * n
    diagnostics = {}
    frames_seen = 0
    for i, utt in enumerate(tqdm(utterances, desc="extract_visual", unit="utt")):
        if not utt.clip:
            reasons[i] = "missing_clip"
            continue
        try:
            frames = sample_frames(utt.clip, params.visual.fps, params.visual.max_frames)
        except MediaError as err:
            reasons[i] = err.reason
            log.warning("%s (%s): %s; visual masked", utt.utterance_id, err.reason, err)
            continue
        embedding, with_face = embed_faces(frames, mtcnn, embedder, min_face_prob=params.visual.min_face_prob,
                                           batch_frames=params.visual.batch_frames, device=device)
        frames_seen += len(frames)
        diagnostics[utt.utterance_id] = {"frames": len(frames), "frames_with_face": with_face}
        if embedding is None:
            reasons[i] = "no_face"
            log.warning("%s (no_face): no face in %d sampled frames of %s; visual masked",
                        utt.utterance_id, len(frames), utt.clip)
            continue
        features[i] = embedding
    mask = torch.tensor([r == "ok" for r in reasons])
    table = FeatureTable([u.utterance_id for u in utterances], features, mask, reasons,
                         {**info, "fps": params.visual.fps, "max_frames": params.visual.max_frames})
    finish_extraction("visual", table, time.perf_counter() - start,
                      {"device": str(device), "frames": frames_seen, "per_clip": diagnostics})


if __name__ == "__main__":
    run_stage(run, "Detect and embed speakers' faces (visual.*) into data/features/visual.safetensors.")
