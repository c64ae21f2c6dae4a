"""Using a trained model: rebuild it from a checkpoint and run it over dialogues.

Shared by ``train`` (dev scoring), ``evaluate`` (test scoring) and ``predict`` (new clips), so that no
stage imports another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelParams, Params
from pipeline.data import MODALITIES, Dialogue, batches
from pipeline.extraction_cache import RUNTIME_ONLY
from pipeline.losses import batch_loss
from pipeline.modeling import ERCModel


@torch.no_grad()
def run_model(
    model: ERCModel,
    dialogues: list[Dialogue],
    params: Params,
    device: torch.device,
    class_weights: torch.Tensor | None = None,
) -> dict:
    """Run the model over dialogues (eval mode, no gradients), in batches of ``train.batch_dialogues``.

    Returns:
        dict with ``utterance_ids`` (N), ``emotion_prob`` ``[N, C_e]``, ``sentiment_prob`` ``[N, C_s]``,
        ``emotion`` / ``sentiment`` gold ``[N]`` and ``loss`` (mean batch loss).
    """
    model.eval()
    out = {"utterance_ids": [], "emotion_prob": [], "sentiment_prob": [], "emotion": [], "sentiment": []}
    losses = []
    for batch in batches(dialogues, params.train.batch_dialogues, shuffle=False):
        batch = batch.to(device)
        result = model(batch)
        loss, _ = batch_loss(result, batch, params.loss, class_weights)
        losses.append(loss.item())
        out["utterance_ids"] += batch.utterance_ids
        out["emotion_prob"].append(result.emotion_logits.softmax(-1).cpu())
        out["sentiment_prob"].append(result.sentiment_logits.softmax(-1).cpu())
        out["emotion"].append(batch.emotion.cpu())
        out["sentiment"].append(batch.sentiment.cpu())
    for key in ("emotion_prob", "sentiment_prob", "emotion", "sentiment"):
        out[key] = torch.cat(out[key])
    out["loss"] = float(np.mean(losses))
    return out


def build_model(checkpoint: dict, device: torch.device | None = None, graph_backend: str | None = None) -> ERCModel:
    """Rebuild the model a checkpoint describes, load its weights and move it to ``device``.

    The architecture comes from the checkpoint's ``model`` section, ``model.modalities`` included (the
    model reads those modalities only; checkpoints from before it was recorded use all three), and its
    ``input_sizes`` and ``num_relations``.

    The graph layers' kernels are chosen for ``device`` (``graph_backend``, default the checkpoint's
    ``model.graph_backend``: ``auto`` = DGL where it supports the device, torch otherwise); both
    backends have the same parameters, so a checkpoint trained with one predicts with the other.

    Raises:
        ValueError: ``graph_backend`` is ``dgl`` and the installed DGL cannot run on ``device``.
    """
    config = ModelParams(**checkpoint["model"])
    model = ERCModel(
        checkpoint["input_sizes"],
        len(checkpoint["emotions"]),
        len(checkpoint["sentiments"]),
        checkpoint["num_relations"],
        config,
        graph_backend=graph_backend or config.graph_backend,
        device=device,
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model if device is None else model.to(device)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`pipeline.train.train` (a dict saved with ``torch.save``).

    Raises:
        FileNotFoundError: no checkpoint (run ``dvc repro train``).
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no trained model; run the train stage (`dvc repro train`)")
    return torch.load(path, map_location="cpu", weights_only=True)


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
        # A setting added after the checkpoint was trained counts as its default (what that code did).
        defaults = type(getattr(params, section))().model_dump(mode="json")
        for key in sorted(set(recorded[section]) | set(given)):
            trained = recorded[section].get(key, defaults.get(key))
            if key not in RUNTIME_ONLY and trained != given.get(key):
                diffs.append(f"{section}.{key}: checkpoint {trained!r}, params {given.get(key)!r}")
    if diffs:
        raise ValueError(
            f"{checkpoint_path} was trained on features made with other settings than the params "
            "given:\n  "
            + "\n  ".join(diffs)
            + "\nPass the params.yaml of the run that trained it (--params), or retrain."
        )
