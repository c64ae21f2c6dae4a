"""Command (and optional stage) ``predict``: clips of new conversations -> emotion and sentiment per utterance.

Input:

* ``--clips DIR``: media files of one or more conversations (video with speech, or audio only);
* ``--transcript FILE`` (optional): the utterance manifest that ``prepare`` reads (``data.layout:
  manifest``, CSV or JSONL: ``dialogue_id, utterance_id, speaker, text``, optional ``utterance_index``,
  ``media``, ``audio``, ``start``, ``end``, ``emotion``, ``sentiment``). Without a ``media`` column each
  utterance's clip is the file in ``--clips`` named after its ``utterance_id`` (any media extension).
  Without a transcript every media file under ``--clips`` is one utterance (hidden files and folders,
  names starting with ``.`` such as macOS's ``._*``, are ignored): files named like MELD's
  ``dia{D}_utt{U}.mp4`` give dialogue ``D`` in order ``U``, other files form one dialogue per folder in
  name order, speaker ``unknown``; the text comes from a Hugging Face speech-recognition model
  (``--asr-model``, Whisper by default) and the outputs say so (``text_source: asr``);
* a trained run: ``--checkpoint`` (``models/model.pt``) and ``--params`` (its ``params.yaml``).

Every input is checked before the (long) feature extraction: the clips folder, the checkpoint (readable,
its model rebuildable), the params against the checkpoint's feature settings (``text.*``, ``audio.*``,
``visual.*``, ``graph.*``, as recorded at training time: other settings are refused), the transcript, and
without a transcript that the ASR model is a local directory or in the Hugging Face cache, or else
downloadable (not with ``HF_HUB_OFFLINE=1``, nor with the Hub unreachable). The features are made by the
extraction stages' own code (:func:`pipeline.text_features.extract` etc.) into a work folder
(resumable), the dialogue graphs by :func:`pipeline.graphs.build_dialogue_graph`.

Labels in the transcript (optional) are never given to the model; they score its predictions: the
emotion (after ``data.label_map``, as ``prepare`` maps it) and the sentiment are each scored (weighted F1
and accuracy over the predicted utterances) when every row carries a label among the checkpoint's
classes. A task with a label the checkpoint does not know, or with unlabelled rows, is not scored, with
a warning naming the labels and row counts (listed under ``not_scored``); the predictions are made all
the same.

Output (``--out``, default ``data/predict``): ``predictions.csv`` and ``predictions.json`` with, per
utterance, the predicted emotion and sentiment, their probabilities (all classes), the modalities that
were present (``<modality>_present``, 0/1) and the reason code of each missing one
(``<modality>_missing``, empty when present), and where the text came from; the JSON adds ``scores``
(``{task: {"weighted_f1", "accuracy", "utterances"}}``) and ``not_scored`` (``{task: why}``). Text cells
of the CSV that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or
carriage return) get a leading ``'`` (OWASP's CSV-injection rule); the JSON keeps the raw text. An
utterance with no usable modality at all (a corrupt clip and no transcript) is reported under
``skipped`` and left out.

Run: ``python -m pipeline.predict --clips DIR [--transcript FILE] [--checkpoint models/model.pt]``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline import audio_features, text_features, visual_features
from pipeline.atomic import atomic_path, write_json
from pipeline.cli import apply_runtime, setup_logging
from pipeline.config import DEFAULT_PARAMS, DataParams, Params, ParamsError, load_params
from pipeline.data import MODALITIES, batches, load_dialogues
from pipeline.datasets import DatasetError, read_manifest
from pipeline.encoders import default_device, resolve_model_path
from pipeline.extraction_cache import CACHE_DIR
from pipeline.feature_table import feature_path, load_table
from pipeline.graphs import build_dialogue_graph
from pipeline.inference import build_model, check_feature_params, load_checkpoint
from pipeline.media import MediaError, load_audio
from pipeline.utterances import Utterance

log = logging.getLogger(__name__)

MEDIA_EXTENSIONS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".wav", ".flac", ".mp3", ".m4a", ".ogg"}
DEFAULT_ASR = "openai/whisper-small"
MELD_NAME = re.compile(r"^dia(\d+)_utt(\d+)$")
CHECKPOINT_KEYS = ("emotions", "sentiments", "model", "state_dict", "input_sizes", "num_relations")
TASKS = ("emotion", "sentiment")
ASR_HINT = "pass --transcript FILE with the utterances' text, or --asr-model with a local model directory"
# OWASP (CSV Injection): a cell starting with one of these is run as a formula by spreadsheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def one_line(err: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception on one line, cut to ``limit`` characters (for an ``error:`` line)."""
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_checkpoint(path: Path, params: Params) -> dict:
    """Load a checkpoint and check that it can predict with ``params``, before any extraction runs.

    Checks: the file is a checkpoint written by ``train`` (readable, with its keys), its model can be
    rebuilt (on the CPU, weights loaded) and its feature settings are those of ``params``
    (:func:`check_feature_params`).

    Returns:
        The checkpoint dict (as :func:`pipeline.inference.load_checkpoint` reads it).

    Raises:
        FileNotFoundError: no such file. ValueError: not a checkpoint, a model that cannot be rebuilt,
            or other feature settings.
    """
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch.load on a file that is no checkpoint: KeyError, EOFError, pickle errors ...
        raise ValueError(
            f"--checkpoint {path}: not a checkpoint written by the train stage ({one_line(err)}); "
            "pass the models/model.pt of a trained run"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise ValueError(
            f"--checkpoint {path}: not a checkpoint written by the train stage (no {', '.join(missing)}); "
            "pass the models/model.pt of a trained run"
        )
    check_feature_params(checkpoint, params, path)
    try:
        build_model(checkpoint)
    except Exception as err:  # a state dict or model config that does not fit this version's model
        raise ValueError(
            f"--checkpoint {path}: the model cannot be rebuilt from it ({one_line(err)}); "
            "retrain it with this version (`dvc repro train`)"
        ) from None
    return checkpoint


def hub_offline() -> bool:
    """Whether downloads from the Hugging Face Hub are switched off (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.is_offline_mode() or flag in ("1", "ON", "YES", "TRUE")


def check_asr_model(spec: str) -> str:
    """Make sure the speech-recognition model can be loaded, before any extraction or transcription.

    ``spec`` is resolved by :func:`pipeline.encoders.resolve_model_path`; a local directory is taken as
    it is, a Hub id must be in the local Hugging Face cache, or else downloadable: not when
    ``HF_HUB_OFFLINE=1``, and not when the Hub does not answer (checked once, 10 s timeout, instead of
    transformers' retries).

    Returns:
        The local directory or Hub id to load.

    Raises:
        OSError: naming the model and what to do (``--transcript`` or a local ``--asr-model``).
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    path = resolve_model_path(spec)
    if Path(path).is_dir():
        return path
    if Path(path).exists():
        raise OSError(f"--asr-model {spec}: {path} is a file, not a model directory; {ASR_HINT}")
    try:
        cached = try_to_load_from_cache(path, "config.json")
    except HFValidationError:
        raise OSError(f"--asr-model {spec}: no such directory, nor a Hugging Face model id; {ASR_HINT}") from None
    if isinstance(cached, str):
        return path
    if hub_offline():
        raise OSError(
            f"--asr-model {spec}: the model is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and HF_HUB_OFFLINE=1 forbids downloading it; {ASR_HINT} (or download it once: `hf download {spec}`)"
        )
    try:
        HfApi().model_info(path, timeout=10)
    except RepositoryNotFoundError:
        raise OSError(
            f"--asr-model {spec}: no such model on the Hugging Face Hub (or a private / gated one: "
            f"`hf auth login`); {ASR_HINT}"
        ) from None
    except HfHubHTTPError:
        pass  # the Hub answers: let the download say what is wrong
    except Exception as err:  # no network: DNS failure, refused connection, timeout
        raise OSError(
            f"--asr-model {spec}: the model is not in the local Hugging Face cache and the Hub is unreachable "
            f"({one_line(err)}); {ASR_HINT}"
        ) from None
    return path


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
    extension. Hidden files and folders (a name starting with ``.``: macOS's ``._*`` AppleDouble files,
    ``.git`` ...) are ignored.

    Raises:
        DatasetError: no media file under ``clips_dir``.
    """
    files = sorted(
        p
        for p in clips_dir.rglob("*")
        if p.is_file()
        and p.suffix.lower() in MEDIA_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(clips_dir).parts)
    )
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
        (utterances in dialogue order, the manifest reader's report: ``missing_clips``, and the rows whose
        cp1252 was repaired, ``cp1252_repaired``, each also logged).

    Raises:
        DatasetError: a malformed manifest (the message names the file and every bad row).
    """
    data = params.data.model_copy(update={"missing_clip": "text_only"})  # a lost clip: predict from text
    dataset = read_manifest(transcript, data, require_labels=False)
    utterances = []
    for utt, _ in dataset.rows:
        if not utt.clip and not utt.audio_clip:
            utt = dataclasses.replace(utt, clip=find_media(clips_dir, utt.utterance_id))
        utterances.append(dataclasses.replace(utt, split="test"))
    for repair in dataset.report["cp1252_repaired"]:
        log.warning("%s: %d cp1252 character(s) decoded in UTF-8 text", repair["row"], repair["characters"])
    return utterances, {
        "missing_clips": [m for r in dataset.split_reports.values() for m in r.get("missing_clips", [])],
        "cp1252_repaired": dataset.report["cp1252_repaired"],
    }


def split_labels(
    utterances: list[Utterance], checkpoint: dict, data: DataParams, transcript: Path
) -> tuple[list[Utterance], dict[str, dict[str, str]], dict[str, str]]:
    """Take a transcript's labels off its utterances (the model never sees them) and keep those that can score.

    Per task (emotion, sentiment), the labels score the predictions only when every row carries one
    among the checkpoint's classes (emotions mapped by ``data.label_map`` first, as ``prepare`` does).
    A task with unknown labels or unlabelled rows is not scored and a warning names the labels and the
    row counts; a task without any label is silently not scored. Never an error.

    Returns:
        (the utterances with empty emotion / sentiment, ``{task: {utterance_id: label}}`` for the tasks
        to score, ``{task: why it is not scored}`` for tasks with labels that cannot score).
    """
    classes = {"emotion": checkpoint["emotions"], "sentiment": checkpoint["sentiments"]}
    gold, not_scored = {}, {}
    for task in TASKS:
        labels = {u.utterance_id: getattr(u, task) for u in utterances}
        if task == "emotion":
            labels = {uid: data.label_map.get(label, label) for uid, label in labels.items()}
        if not any(labels.values()):
            continue
        unknown = Counter(label for label in labels.values() if label and label not in classes[task])
        unlabelled = sum(1 for label in labels.values() if not label)
        problems = []
        if unknown:
            problems.append(
                f"{task} labels {sorted(unknown)} ({sum(unknown.values())} rows) are not among the "
                f"checkpoint's classes {classes[task]}"
            )
        if unlabelled:
            problems.append(f"{unlabelled} rows have no {task} label")
        if problems:
            not_scored[task] = "; ".join(problems)
            log.warning("%s: %s: %s not scored (predicted all the same)", transcript, not_scored[task], task)
        else:
            gold[task] = labels
    blank = [dataclasses.replace(u, emotion="", sentiment="") for u in utterances]
    return blank, gold, not_scored


def score(rows: list[dict], gold: dict[str, dict[str, str]]) -> dict[str, dict]:
    """Score the predictions against the transcript's labels (:func:`split_labels`).

    Args:
        rows: the predicted utterances (``predict(...)["rows"]``), each with ``utterance_id``,
            ``emotion`` and ``sentiment``.
        gold: ``{task: {utterance_id: label}}``, a label for every predicted utterance.

    Returns:
        ``{task: {"weighted_f1", "accuracy", "utterances"}}`` (scikit-learn's ``f1_score(average=
        "weighted")`` and ``accuracy_score``, in [0, 1], rounded to 4 decimals) for each task of ``gold``.
    """
    scores = {}
    for task, labels in gold.items():
        y_true = [labels[r["utterance_id"]] for r in rows]
        y_pred = [r[task] for r in rows]
        scores[task] = {
            "weighted_f1": round(float(f1_score(y_true, y_pred, average="weighted", zero_division=0)), 4),
            "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
            "utterances": len(rows),
        }
    return scores


def transcribe(utterances: list[Utterance], asr_model: str, device: torch.device) -> tuple[list[Utterance], dict]:
    """Fill each utterance's text with a Hugging Face speech-recognition model (Whisper, wav2vec2-CTC ...).

    Audio is decoded by :func:`pipeline.media.load_audio` (16 kHz mono, the utterance's segment) and
    given to ``transformers.pipeline("automatic-speech-recognition")`` in 30 s chunks. An utterance
    whose audio cannot be decoded keeps an empty text (its text modality is then masked) and is listed.

    Returns:
        (utterances with text, ``{utterance_id: reason}`` for those that could not be transcribed).

    Raises:
        OSError: the model cannot be found locally or downloaded (the message names it and what to do;
            :func:`check_asr_model` checks this up front).
    """
    from transformers import pipeline

    try:
        asr = pipeline("automatic-speech-recognition", model=resolve_model_path(asr_model), device=device)
    except OSError as err:
        raise OSError(
            f"--asr-model {asr_model}: the speech-recognition model cannot be loaded ({one_line(err, 400)}); {ASR_HINT}"
        ) from None
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


def predict(
    utterances: list[Utterance], params: Params, checkpoint: dict, work_dir: Path, text_encoder: Path | None = None
) -> dict:
    """Extract features for ``utterances``, build their graphs and run the checkpoint's model.

    Args:
        utterances: unlabelled (empty emotion / sentiment), in dialogue order.
        checkpoint: as :func:`open_checkpoint` returns it (checked against ``params``).
        text_encoder: finetune_text's output, read when ``text.finetune.enabled``.

    Returns:
        ``{"rows": [per-utterance dict], "skipped": [{"utterance_id", "reasons"}], "encoders": {...},
        "labels": {"emotions", "sentiments"}}``; a row's ``missing`` maps each missing modality to its
        reason code.

    Raises:
        ValueError: no utterance has a usable modality.
    """
    features_dir, cache_root = work_dir / "features", work_dir / "cache"
    text_features.extract(utterances, params, features_dir, cache_root, text_encoder=text_encoder)
    for features in (audio_features, visual_features):
        features.extract(utterances, params, features_dir, cache_root)
    tables = {m: load_table(feature_path(m, features_dir)) for m in MODALITIES}
    status = {}
    for m, table in tables.items():
        for uid, reason in zip(table.utterance_ids, table.reasons):
            status.setdefault(uid, {})[m] = reason
    used = checkpoint.get("modalities", MODALITIES)  # the modalities the model reads (model.modalities)
    usable = [u for u in utterances if any(status[u.utterance_id][m] == "ok" for m in used)]
    skipped = [
        {"utterance_id": u.utterance_id, "reasons": status[u.utterance_id]}
        for u in utterances
        if not any(status[u.utterance_id][m] == "ok" for m in used)
    ]
    for s in skipped:
        log.warning(
            "%s: no usable modality among the model's %s (%s); left out of the predictions",
            s["utterance_id"],
            list(used),
            s["reasons"],
        )
    if not usable:
        raise ValueError("no utterance has a usable modality (see the warnings above); nothing to predict")
    graphs: dict = {}
    for u in usable:
        graphs.setdefault(u.dialogue_id, []).append(u.speaker)
    # speaker_pair relations are sized by the speakers the model was trained with (None: graph.max_speakers)
    speakers_trained = checkpoint.get("relation_speakers")
    graphs = {d: build_dialogue_graph(speakers, params.graph, speakers_trained) for d, speakers in graphs.items()}
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


def escape_formula(value: object) -> object:
    """A CSV cell safe to open in a spreadsheet: a string starting with ``=``, ``+``, ``-``, ``@``, tab or
    carriage return gets a leading ``'`` (OWASP's CSV-injection rule); numbers and other strings as they are.
    """
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_START) else value


def write_outputs(result: dict, out_dir: Path, meta: dict) -> None:
    """Write ``predictions.csv`` (one row per utterance, probabilities as ``p_emotion_<class>`` columns,
    per modality ``<m>_present`` 0/1 and ``<m>_missing`` its reason code, text cells escaped by
    :func:`escape_formula`) and ``predictions.json`` (everything, raw text, plus ``meta``), atomically."""
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
        *(f"{m}_missing" for m in MODALITIES),
        *(f"p_emotion_{c}" for c in emotions),
        *(f"p_sentiment_{c}" for c in sentiments),
    ]
    with atomic_path(out_dir / "predictions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        for r in result["rows"]:
            row = {
                **{k: r[k] for k in header if k in r},
                "text_source": r["text_source"],
                **{f"{m}_present": int(m in r["modalities"]) for m in MODALITIES},
                **{f"{m}_missing": r["missing"].get(m, "") for m in MODALITIES},
                **{f"p_emotion_{c}": p for c, p in r["emotion_probs"].items()},
                **{f"p_sentiment_{c}": p for c, p in r["sentiment_probs"].items()},
            }
            writer.writerow({k: escape_formula(v) for k, v in row.items()})
    write_json({**meta, **result}, out_dir / "predictions.json")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; known input errors print one ``error:`` line and exit 1.

    Every input is checked before the feature extraction (see the module docstring).
    """
    parser = argparse.ArgumentParser(description="Predict emotion and sentiment for the utterances of new clips.")
    parser.add_argument("--clips", type=Path, required=True, help="folder of media files (one per utterance)")
    parser.add_argument(
        "--transcript",
        type=Path,
        help="utterance manifest (CSV/JSONL; emotion/sentiment columns, when given, score the predictions); "
        "omit to transcribe the clips with --asr-model",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("models/model.pt"),
        help="the trained model (train stage) (default: %(default)s)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=DEFAULT_PARAMS,
        help="the params.yaml the checkpoint was trained with (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/predict"),
        help="folder for predictions.csv and predictions.json (default: %(default)s)",
    )
    parser.add_argument(
        "--text-encoder",
        type=Path,
        default=Path("models/text_encoder"),
        help="the fine-tuned text encoder of the run (finetune_text), read when text.finetune.enabled "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=CACHE_DIR.parent / "predict",
        help="features and resume cache of this command (default: %(default)s)",
    )
    parser.add_argument(
        "--asr-model",
        default=DEFAULT_ASR,
        help="Hugging Face id, local directory or package: reference of the speech-recognition model, used "
        "without --transcript (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        # Every input is checked here, before the extraction that takes minutes.
        params = load_params(args.params)
        apply_runtime(params)
        if not args.clips.is_dir():
            raise DatasetError(f"--clips {args.clips}: not a directory; give the folder of the media files")
        for option, path in (("--out", args.out), ("--work", args.work)):
            if path.exists() and not path.is_dir():
                raise DatasetError(f"{option} {path}: is a file, not a folder; give another path")
        checkpoint = open_checkpoint(args.checkpoint, params)
        text_features.encoder_spec(params, args.text_encoder)  # a missing fine-tuned encoder fails here
        failed: dict = {}
        if args.transcript is not None:
            if not args.transcript.exists():
                raise DatasetError(
                    f"--transcript {args.transcript}: no such file; give the utterance manifest (CSV/JSONL), "
                    "or omit --transcript to transcribe the clips"
                )
            utterances, transcript_report = utterances_from_transcript(args.transcript, args.clips, params)
            utterances, gold, not_scored = split_labels(utterances, checkpoint, params.data, args.transcript)
            source = "transcript"
        else:
            utterances, transcript_report, gold, not_scored = discover_clips(args.clips), {}, {}, {}
            asr_model = check_asr_model(args.asr_model)
            log.info("no transcript: transcribing %d clips with %s", len(utterances), args.asr_model)
            utterances, failed = transcribe(utterances, asr_model, default_device())
            source = "asr"
        dialogues: dict[str, list[str]] = {}
        for u in utterances:
            dialogues.setdefault(u.dialogue_id, []).append(u.speaker)
        for speakers in dialogues.values():  # more speakers than a speaker_pair model knows: fail before extracting
            build_dialogue_graph(speakers, params.graph, checkpoint.get("relation_speakers"))
        result = predict(utterances, params, checkpoint, args.work, args.text_encoder)
        for row in result["rows"]:
            row["text_source"] = source
        scores = score(result["rows"], gold)
        meta = {
            "checkpoint": str(args.checkpoint),
            "params": str(args.params),
            "clips": str(args.clips),
            "transcript": str(args.transcript) if args.transcript else None,
            "text_source": source if source == "transcript" else f"asr ({args.asr_model})",
            "not_transcribed": failed,
            **transcript_report,
            "scores": scores,
            "not_scored": not_scored,
        }
        write_outputs(result, args.out, meta)
    except (ParamsError, DatasetError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    not_pretrained = [m for m, e in result["encoders"].items() if not e["pretrained"]]
    if not_pretrained:
        log.warning("these predictions use features from RANDOMLY INITIALISED encoders: %s", ", ".join(not_pretrained))
    for task, value in scores.items():
        log.info(
            "%s against the transcript's labels: weighted F1 %.4f, accuracy %.4f (%d utterances)",
            task,
            value["weighted_f1"],
            value["accuracy"],
            value["utterances"],
        )
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
