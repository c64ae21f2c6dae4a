"""Using a trained model: rebuild it from a checkpoint and run it over dialogues.

Shared by ``train`` (dev scoring), ``evaluate`` (test scoring) and ``predict`` (new clips), so that no
stage imports another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelParams, Params
from pipeline.data import Dialogue, batches
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
