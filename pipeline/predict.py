"""Command (and optional stage) ``predict``: clips of new conversations -> emotion and sentiment per utterance.

Input:

* ``--clips DIR``: media files of one or more conversations (video with speech, or audio only);
* ``--transcript FILE`` (optional): the utterance manifest that ``prepare`` reads (``data.layout:
  manifest``, CSV or JSONL: ``dialogue_id, utterance_id, speaker, text``, optional ``utterance_index``,
  ``media``, ``audio``, ``start``, ``end``; labels not needed). Without a ``media`` column each
  utterance's clip is the file in ``--clips`` named after its ``utterance_id`` (any media extension).
  Without a transcript every media file under ``--clips`` is one utterance: files named like MELD's
  ``dia{D}_utt{U}.mp4`` give dialogue ``D`` in order ``U``, other files form one dialogue per folder in
  name order, speaker ``unknown``; the text comes from a Hugging Face speech-recognition model
  (``--asr-model``, Whisper by default) and the outputs say so (``text_source: asr``);
* a trained run: ``--checkpoint`` (``models/model.pt``) and ``--params`` (its ``params.yaml``).

The features are made by the extraction stages' own code (:func:`pipeline.text_features.extract` etc.)
into a work folder (resumable), the dialogue graphs by :func:`pipeline.graphs.build_dialogue_graph`.
The command refuses a checkpoint whose feature settings (``text.*``, ``audio.*``, ``visual.*``,
``graph.*``, as recorded at training time) differ from the params given.

Output (``--out``, default ``data/predict``): ``predictions.csv`` and ``predictions.json`` with, per
utterance, the predicted emotion and sentiment, their probabilities (all classes), the modalities that
were present (and the reason code of each missing one) and where the text came from. An utterance with
no usable modality at all (a corrupt clip and no transcript) is reported under ``skipped`` and left out.

Run: ``python -m pipeline.predict --clips DIR [--transcript FILE] [--checkpoint models/model.pt]``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import re
import sys
import time
from pathlib import Path

import torch

from pipeline import audio_features, text_features, visual_features
from pipeline.atomic import atomic_path, write_json
from pipeline.cli import setup_logging
from pipeline.config import DEFAULT_PARAMS, Params, ParamsError, load_params
from pipeline.data import MODALITIES, batches, load_dialogues
from pipeline.datasets import DatasetError, read_manifest
from pipeline.encoders import default_device, resolve_model_path
from pipeline.extraction_cache import CACHE_DIR, RUNTIME_ONLY
from pipeline.feature_table import feature_path, load_table
from pipeline.graphs import build_dialogue_graph
from pipeline.inference import build_model, load_checkpoint
from pipeline.media import MediaError, load_audio
from pipeline.utterances import Utterance

log = logging.getLogger(__name__)

MEDIA_EXTENSIONS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".wav", ".flac", ".mp3", ".m4a", ".ogg"}
DEFAULT_ASR = "openai/whisper-small"
MELD_NAME = re.compile(r"^dia(\d+)_utt(\d+)$")


def check_feature_params(checkpoint: dict, params: Params, checkpoint_path: Path | str) -> None:
    """Refuse params whose feature settings differ from those the checkpoint was trained on.

    Raises:
        ValueError: listing every differing key (``text.pooling: checkpoint mean, params cls``) and what
            to do; also for checkpoints from before feature settings were recorded.
    """
    recorded = checkpoint.get("feature_params")
    if not recorded or any(recorded.get(s) is None for s in (*MODALITIES, "graph")):
        raise ValueError(
            f"{checkpoint_path}: the checkpoint does not record its feature settings "
            "(trained by an older version); retrain it (`dvc repro train`)"
        )
    diffs = []
    for section in (*MODALITIES, "graph"):
        given = getattr(params, section).model_dump(mode="json")
        for key in sorted(set(recorded[section]) | set(given)):
            if key not in RUNTIME_ONLY and recorded[section].get(key) != given.get(key):
                diffs.append(f"{section}.{key}: checkpoint {recorded[section].get(key)!r}, params {given.get(key)!r}")
    if diffs:
        raise ValueError(
            f"{checkpoint_path} was trained on features made with other settings than the params "
            "given:\n  "
            + "\n  ".join(diffs)
            + "\nPass the params.yaml of the run that trained it (--params), or retrain."
        )


def find_media(clips_dir: Path, stem: str) -> str:
    """The media file ``<clips_dir>/<stem>.<ext>`` (any media extension), or "" when there is none."""
    for ext in sorted(MEDIA_EXTENSIONS):
        candidate = clips_dir / f"{stem}{ext}"
        if candidate.is_file():
            return candidate.as_posix()
    return ""


def discover_clips(clips_dir: Path) -> list[Utterance]:
    """One unlabelled utterance per media file under ``clips_dir`` (no transcript: text filled by ASR).

    ``dia{D}_utt{U}.*`` files form dialogue ``D`` in order ``U`` (MELD's naming); other files form one
    dialogue per folder, in name order. Utterance ids are the paths relative to ``clips_dir`` without
    extension.

    Raises:
        DatasetError: no media file under ``clips_dir``.
    """
    files = sorted(p for p in clips_dir.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)
    if not files:
        raise DatasetError(f"{clips_dir}: no media files ({', '.join(sorted(MEDIA_EXTENSIONS))}) to predict on")
    keyed = []
    for path in files:
        rel = path.relative_to(clips_dir).with_suffix("")
        folder = rel.parent.as_posix()
        match = MELD_NAME.match(rel.name)
        dialogue = f"{folder}/dia{match.group(1)}" if match else folder
        index = int(match.group(2)) if match else None
        keyed.append((dialogue, index, rel.as_posix(), path))
    keyed.sort(key=lambda k: (k[0], k[1] if k[1] is not None else -1, k[2]))
    utterances, position = [], {}
    for dialogue, index, uid, path in keyed:
        position[dialogue] = position.get(dialogue, -1) + 1
        utterances.append(
            Utterance(
                uid,
                "test",
                dialogue,
                index if index is not None else position[dialogue],
                "unknown",
                "",
                "",
                "",
                clip=path.as_posix(),
            )
        )
    return utterances


def utterances_from_transcript(transcript: Path, clips_dir: Path, params: Params) -> tuple[list[Utterance], dict]:
    """Read a transcript manifest; utterances without a media column get ``<clips_dir>/<utterance_id>.*``.

    Returns:
        (utterances in dialogue order, the manifest reader's report).

    Raises:
        DatasetError: a malformed manifest (the message names the file and row).
    """
    data = params.data.model_copy(update={"missing_clip": "text_only"})  # a lost clip: predict from text
    dataset = read_manifest(transcript, data, require_labels=False)
    utterances = []
    for utt, _ in dataset.rows:
        if not utt.clip and not utt.audio_clip:
            utt = dataclasses.replace(utt, clip=find_media(clips_dir, utt.utterance_id))
        utterances.append(dataclasses.replace(utt, split="test"))
    return utterances, {
        "missing_clips": [m for r in dataset.split_reports.values() for m in r.get("missing_clips", [])]
    }


def transcribe(utterances: list[Utterance], asr_model: str, device: torch.device) -> tuple[list[Utterance], dict]:
    """Fill each utterance's text with a Hugging Face speech-recognition model (Whisper, wav2vec2-CTC ...).

    Audio is decoded by :func:`pipeline.media.load_audio` (16 kHz mono, the utterance's segment) and
    given to ``transformers.pipeline("automatic-speech-recognition")`` in 30 s chunks. An utterance
    whose audio cannot be decoded keeps an empty text (its text modality is then masked) and is listed.

    Returns:
        (utterances with text, ``{utterance_id: reason}`` for those that could not be transcribed).

    Raises:
        OSError: the model cannot be found locally or downloaded.
    """
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=resolve_model_path(asr_model), device=device)
    out, failed = [], {}
    for utt in utterances:
        try:
            wave = load_audio(utt.audio_source, 16000, None, utt.start, utt.end) if utt.audio_source else None
        except MediaError as err:
            failed[utt.utterance_id] = err.reason
            log.warning("%s (%s): %s; not transcribed", utt.utterance_id, err.reason, err)
            out.append(utt)
            continue
        if wave is None:
            failed[utt.utterance_id] = "missing_clip"
            out.append(utt)
            continue
        text = asr({"raw": wave.numpy(), "sampling_rate": 16000}, chunk_length_s=30)["text"]
        out.append(dataclasses.replace(utt, text=" ".join(text.split())))
    return out, failed


def predict(utterances: list[Utterance], params: Params, checkpoint_path: Path, work_dir: Path) -> dict:
    """Extract features for ``utterances``, build their graphs and run the checkpoint's model.

    Returns:
        ``{"rows": [per-utterance dict], "skipped": [{"utterance_id", "reasons"}], "encoders": {...}}``.

    Raises:
        FileNotFoundError: no checkpoint. ValueError: feature settings differ from the checkpoint's.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    check_feature_params(checkpoint, params, checkpoint_path)
    features_dir, cache_root = work_dir / "features", work_dir / "cache"
    for features in (text_features, audio_features, visual_features):
        features.extract(utterances, params, features_dir, cache_root)
    tables = {m: load_table(feature_path(m, features_dir)) for m in MODALITIES}
    status = {}
    for m, table in tables.items():
        for uid, reason in zip(table.utterance_ids, table.reasons):
            status.setdefault(uid, {})[m] = reason
    usable = [u for u in utterances if "ok" in status[u.utterance_id].values()]
    skipped = [
        {"utterance_id": u.utterance_id, "reasons": status[u.utterance_id]}
        for u in utterances
        if "ok" not in status[u.utterance_id].values()
    ]
    for s in skipped:
        log.warning("%s: no usable modality (%s); left out of the predictions", s["utterance_id"], s["reasons"])
    if not usable:
        raise ValueError("no utterance has a usable modality (see the warnings above); nothing to predict")
    graphs: dict = {}
    for u in usable:
        graphs.setdefault(u.dialogue_id, []).append(u.speaker)
    graphs = {d: build_dialogue_graph(speakers, params.graph) for d, speakers in graphs.items()}
    emotions, sentiments = checkpoint["emotions"], checkpoint["sentiments"]
    splits, encoders = load_dialogues(emotions, sentiments, usable, features_dir, graphs)
    device = default_device()
    model = build_model(checkpoint, device).eval()
    probs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for batch in batches(splits["test"], params.train.batch_dialogues, shuffle=False):
            result = model(batch.to(device))
            for k, uid in enumerate(batch.utterance_ids):
                probs[uid] = (result.emotion_logits[k].softmax(-1).cpu(), result.sentiment_logits[k].softmax(-1).cpu())
    rows = []
    for u in usable:
        e, s = probs[u.utterance_id]
        rows.append(
            {
                "utterance_id": u.utterance_id,
                "dialogue_id": u.dialogue_id,
                "utterance_index": u.utterance_index,
                "speaker": u.speaker,
                "text": u.text,
                "emotion": emotions[int(e.argmax())],
                "emotion_prob": round(float(e.max()), 4),
                "sentiment": sentiments[int(s.argmax())],
                "sentiment_prob": round(float(s.max()), 4),
                "modalities": [m for m in MODALITIES if status[u.utterance_id][m] == "ok"],
                "missing": {m: r for m, r in status[u.utterance_id].items() if r != "ok"},
                "emotion_probs": {c: round(float(p), 4) for c, p in zip(emotions, e)},
                "sentiment_probs": {c: round(float(p), 4) for c, p in zip(sentiments, s)},
            }
        )
    return {
        "rows": rows,
        "skipped": skipped,
        "encoders": {
            m: {"model": i.get("model"), "pretrained": bool(i.get("pretrained"))} for m, i in encoders.items()
        },
        "labels": {"emotions": emotions, "sentiments": sentiments},
    }


def write_outputs(result: dict, out_dir: Path, meta: dict) -> None:
    """Write ``predictions.csv`` (one row per utterance, probabilities as ``p_emotion_<class>`` columns)
    and ``predictions.json`` (everything, plus ``meta``), atomically."""
    emotions, sentiments = result["labels"]["emotions"], result["labels"]["sentiments"]
    header = [
        "utterance_id",
        "dialogue_id",
        "utterance_index",
        "speaker",
        "text",
        "text_source",
        "emotion",
        "emotion_prob",
        "sentiment",
        "sentiment_prob",
        *(f"{m}_present" for m in MODALITIES),
        *(f"p_emotion_{c}" for c in emotions),
        *(f"p_sentiment_{c}" for c in sentiments),
    ]
    with atomic_path(out_dir / "predictions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow(
                {
                    **{k: r[k] for k in header if k in r},
                    "text_source": r["text_source"],
                    **{f"{m}_present": int(m in r["modalities"]) for m in MODALITIES},
                    **{f"p_emotion_{c}": p for c, p in r["emotion_probs"].items()},
                    **{f"p_sentiment_{c}": p for c, p in r["sentiment_probs"].items()},
                }
            )
    write_json({**meta, **result}, out_dir / "predictions.json")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; known input errors print one ``error:`` line and exit 1."""
    parser = argparse.ArgumentParser(description="Predict emotion and sentiment for the utterances of new clips.")
    parser.add_argument("--clips", type=Path, required=True, help="folder of media files")
    parser.add_argument("--transcript", type=Path, help="utterance manifest (CSV/JSONL); omit to transcribe with ASR")
    parser.add_argument("--checkpoint", type=Path, default=Path("models/model.pt"))
    parser.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS, help="the params.yaml the checkpoint was trained with"
    )
    parser.add_argument("--out", type=Path, default=Path("data/predict"))
    parser.add_argument(
        "--work",
        type=Path,
        default=CACHE_DIR.parent / "predict",
        help="features and resume cache of this command (default data/interim/predict)",
    )
    parser.add_argument("--asr-model", default=DEFAULT_ASR, help="HF id / local path of the ASR model (no transcript)")
    args = parser.parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        if not args.clips.is_dir():
            raise DatasetError(f"--clips {args.clips}: not a directory")
        failed: dict = {}
        if args.transcript is not None:
            utterances, transcript_report = utterances_from_transcript(args.transcript, args.clips, params)
            source = "transcript"
        else:
            utterances, transcript_report = discover_clips(args.clips), {}
            log.info("no transcript: transcribing %d clips with %s", len(utterances), args.asr_model)
            utterances, failed = transcribe(utterances, args.asr_model, default_device())
            source = "asr"
        result = predict(utterances, params, args.checkpoint, args.work)
        for row in result["rows"]:
            row["text_source"] = source
        meta = {
            "checkpoint": str(args.checkpoint),
            "params": str(args.params),
            "clips": str(args.clips),
            "transcript": str(args.transcript) if args.transcript else None,
            "text_source": source if source == "transcript" else f"asr ({args.asr_model})",
            "not_transcribed": failed,
            **transcript_report,
        }
        write_outputs(result, args.out, meta)
    except (ParamsError, DatasetError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    not_pretrained = [m for m, e in result["encoders"].items() if not e["pretrained"]]
    if not_pretrained:
        log.warning("these predictions use features from RANDOMLY INITIALISED encoders: %s", ", ".join(not_pretrained))
    log.info(
        "predict: %d utterances predicted, %d skipped (no usable modality), text from %s -> %s (%.1f s)",
        len(result["rows"]),
        len(result["skipped"]),
        meta["text_source"],
        args.out / "predictions.csv",
        time.perf_counter() - start,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
