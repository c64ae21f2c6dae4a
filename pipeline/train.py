"""Stage ``train``: fit the fusion + graph model, keep the epoch with the best dev weighted F1.

Batches are whole dialogues (``train.batch_dialogues`` per step, DGL-batched graphs); AdamW with a
linear warm-up over ``train.warmup_epochs``, then the constant ``train.lr``; gradient clipping; the
loss of :mod:`pipeline.losses`; optional early stopping after ``train.patience`` epochs without a
better dev weighted F1. Seeds are fixed and deterministic algorithms requested, so two CPU runs
give the same metrics. Per-epoch train/dev loss, dev weighted F1 / accuracy and the learning rate go
to DVCLive (``metrics/train/``).

Output: ``models/model.pt`` (best-dev state dict, the model/label/feature settings it needs, the
encoders its features came from). Run: ``python -m pipeline.train [--params params.yaml]``.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline.build_graphs import load_graphs
from pipeline.config import ModelParams, Params, run_stage
from pipeline.data import Dialogue, batches
from pipeline.encoders import default_device
from pipeline.features import atomic_path
from pipeline.losses import erc_loss, inverse_frequency
from pipeline.modeling import ERCModel
from pipeline.prepare import load_labels

log = logging.getLogger(__name__)

CHECKPOINT = Path("models/model.pt")
TRAIN_METRICS_DIR = Path("metrics/train")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def predict(model: ERCModel, dialogues: list[Dialogue], params: Params, device: torch.device,
            class_weights: torch.Tensor | None = None) -> dict:
    """Run the model over dialogues (eval mode).

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
        loss, _ = erc_loss(result.emotion_logits, result.sentiment_logits, result.projections,
                           batch.emotion, batch.sentiment, params.loss, class_weights)
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


def build_model(checkpoint: dict) -> ERCModel:
    """Rebuild the model a checkpoint describes and load its weights."""
    model = ERCModel(checkpoint["input_sizes"], len(checkpoint["emotions"]), len(checkpoint["sentiments"]),
                     checkpoint["num_relations"], ModelParams(**checkpoint["model"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model


def load_checkpoint(path: Path = CHECKPOINT) -> dict:
    """Read a checkpoint written by :func:`train`.

    Raises:
        FileNotFoundError: no checkpoint (run ``dvc repro train``).
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no trained model; run the train stage (`dvc repro train`)")
    return torch.load(path, map_location="cpu", weights_only=True)


def train(params: Params, splits: dict[str, list[Dialogue]], num_relations: int, labels: dict[str, list[str]],
          encoders: dict | None = None, live=None) -> dict:
    """Train on ``splits["train"]``, select on ``splits["dev"]`` by emotion weighted F1.

    Args:
        splits: ``{"train": [...], "dev": [...]}`` dialogues (see :func:`pipeline.data.load_dialogues`).
        num_relations: relation types of the dialogue graphs.
        labels: ``{"emotions": [...], "sentiments": [...]}``, the classes in output order
            (:func:`pipeline.prepare.load_labels`).
        encoders: which encoders produced the features (stored in the checkpoint).
        live: a ``dvclive.Live`` to log per-epoch metrics to, or None.

    Returns:
        the checkpoint dict (best-dev state dict and everything :func:`build_model` needs).

    Raises:
        ValueError: the train or dev split is empty.
    """
    for split in ("train", "dev"):
        if not splits.get(split):
            raise ValueError(f"the {split} split has no dialogues; check data.root and the prepare report")
    set_seed(params.train.seed)
    device = default_device()
    example = splits["train"][0]
    input_sizes = {m: int(f.shape[1]) for m, f in example.features.items()}
    emotions, sentiments = list(labels["emotions"]), list(labels["sentiments"])
    model = ERCModel(input_sizes, len(emotions), len(sentiments), num_relations,
                     params.model).to(device)
    class_weights = inverse_frequency(torch.cat([d.emotion for d in splits["train"]]),
                                      len(emotions)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
    steps_per_epoch = -(-len(splits["train"]) // params.train.batch_dialogues)
    warmup = max(1, params.train.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    rng = random.Random(params.train.seed)
    best = {"dev_weighted_f1": -1.0}
    for epoch in range(params.train.epochs):
        start = time.perf_counter()
        model.train()
        train_losses = []
        for batch in batches(splits["train"], params.train.batch_dialogues, shuffle=True, rng=rng):
            batch = batch.to(device)
            result = model(batch)
            loss, _ = erc_loss(result.emotion_logits, result.sentiment_logits, result.projections,
                               batch.emotion, batch.sentiment, params.loss, class_weights)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
            optimizer.step()
            scheduler.step()
            train_losses.append(loss.item())
        lr = optimizer.param_groups[0]["lr"]
        dev = predict(model, splits["dev"], params, device, class_weights)
        dev_pred = dev["emotion_prob"].argmax(-1)
        dev_f1 = f1_score(dev["emotion"], dev_pred, average="weighted", zero_division=0)
        dev_acc = accuracy_score(dev["emotion"], dev_pred)
        log.info("epoch %3d  train loss %.4f  dev loss %.4f  dev weighted F1 %.4f  acc %.4f  lr %.2e  (%.1f s)",
                 epoch + 1, np.mean(train_losses), dev["loss"], dev_f1, dev_acc, lr, time.perf_counter() - start)
        if live is not None:
            live.log_metric("train/loss", float(np.mean(train_losses)))
            live.log_metric("dev/loss", dev["loss"])
            live.log_metric("dev/weighted_f1", float(dev_f1))
            live.log_metric("dev/accuracy", float(dev_acc))
            live.log_metric("lr", lr)
            live.next_step()
        if dev_f1 > best["dev_weighted_f1"]:
            best = {"dev_weighted_f1": float(dev_f1), "dev_accuracy": float(dev_acc), "epoch": epoch + 1,
                    "state_dict": copy.deepcopy(model.state_dict())}
        elif params.train.patience is not None and epoch + 1 - best["epoch"] >= params.train.patience:
            log.info("early stopping: no better dev weighted F1 for %d epochs", params.train.patience)
            break
    return {
        "state_dict": best["state_dict"], "model": params.model.model_dump(), "input_sizes": input_sizes,
        "emotions": emotions, "sentiments": sentiments,
        "num_relations": num_relations, "encoders": encoders or {}, "lr": params.train.lr,
        # the settings the features (as their files record them) and graphs were made with:
        # predict refuses to run with other ones
        "feature_params": {**{m: (encoders or {}).get(m, {}).get("params") for m in ("text", "audio", "visual")},
                           "graph": params.graph.model_dump(mode="json")},
        "best_epoch": best["epoch"], "best_dev_weighted_f1": best["dev_weighted_f1"],
        "best_dev_accuracy": best["dev_accuracy"], "epochs_run": epoch + 1,
    }


def run(params: Params) -> None:
    """Train, save the best checkpoint, log the curves and a summary with DVCLive."""
    from dvclive import Live

    from pipeline.data import load_dialogues

    labels = load_labels()
    splits, encoders = load_dialogues(labels["emotions"], labels["sentiments"])
    _, num_relations = load_graphs()
    with Live(str(TRAIN_METRICS_DIR), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        checkpoint = train(params, splits, num_relations, labels, encoders, live)
        live.summary.update({"best_epoch": checkpoint["best_epoch"],
                             "best_dev_weighted_f1": checkpoint["best_dev_weighted_f1"],
                             "best_dev_accuracy": checkpoint["best_dev_accuracy"], "lr_configured": params.train.lr})
        with atomic_path(CHECKPOINT) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)  # a file object: the archive's inner name does not depend on tmp's
    log.info("train: best dev weighted F1 %.4f at epoch %d -> %s", checkpoint["best_dev_weighted_f1"],
             checkpoint["best_epoch"], CHECKPOINT)


if __name__ == "__main__":
    run_stage(run, "Train the fusion + graph model (model.*, loss.*, train.*) into models/model.pt.")
