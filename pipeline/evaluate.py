"""Stage ``evaluate``: test-split metrics and plots of the trained model, tracked by DVC.

Protocol: the checkpoint ``train`` selected by the best dev weighted F1 is scored once on the test
split. For emotion and sentiment: accuracy, weighted F1, macro F1, per-class F1 (scikit-learn), the
confusion matrix, and two chance levels for reference (always predicting the majority test class;
uniform random guessing, expected value). The weights each feature came from (pretrained or random)
are recorded beside the figures, with the weights' revisions and the versions of torch, transformers
and dgl that produced them.

Output (paths from the command line, as ``dvc.yaml`` gives them): ``<metrics>/metrics.json``
(``dvc metrics show``), ``<metrics>/plots/sklearn/confusion_{emotion,sentiment}.json`` (``dvc plots
show``), PNG confusion matrices and per-class F1 bars in ``<metrics>/plots/images/``,
``<predictions>/test.csv``. Run: the ``evaluate`` command in ``dvc.yaml`` (``python -m pipeline.evaluate --help``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from pipeline.atomic import atomic_path
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.data import load_dialogues
from pipeline.encoders import default_device
from pipeline.graphs import load_graphs
from pipeline.inference import build_model, load_checkpoint, run_model
from pipeline.utterances import UTTERANCES_FILE, load_utterances

log = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    """The versions of the libraries that determine the figures (torch, transformers, dgl)."""
    import torch
    import transformers

    from pipeline.dgl_compat import dgl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "dgl": dgl.__version__}


def chance_levels(y_true: np.ndarray, num_classes: int) -> dict[str, float]:
    """Weighted F1 of two trivial predictors on labels ``y_true``.

    ``majority``: always the most frequent class; ``uniform``: the expected weighted F1 of guessing
    uniformly at random (per class: precision = class share, recall = 1/C).
    """
    counts = np.bincount(y_true, minlength=num_classes)
    share = counts / counts.sum()
    majority = np.full_like(y_true, counts.argmax())
    uniform_f1 = 2 * share * (1 / num_classes) / np.maximum(share + 1 / num_classes, 1e-12)
    return {
        "majority_weighted_f1": float(f1_score(y_true, majority, average="weighted", zero_division=0)),
        "uniform_weighted_f1": float((share * uniform_f1).sum()),
    }


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, weighted F1, macro F1 (over the classes present in ``y_true``), per-class F1, chance.

    Args:
        y_true, y_pred: ``[N]`` class indices into ``labels``.
    """
    present = sorted(set(y_true.tolist()))
    per_class = f1_score(y_true, y_pred, labels=list(range(len(labels))), average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "f1": {label: float(f) for label, f in zip(labels, per_class)},
        "chance": chance_levels(y_true, len(labels)),
    }


def figures(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], task: str, per_class_f1: dict):
    """Matplotlib figures for readers of the repository: the confusion matrix (utterance counts) and
    per-class F1 bars. Returns (confusion figure, F1 figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    confusion, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.8 * len(labels)))
    ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_pred,
        labels=list(range(len(labels))),
        display_labels=labels,
        ax=ax,
        colorbar=False,
        xticks_rotation=45,
    )
    ax.set_title(f"Test {task} confusion matrix")
    confusion.tight_layout()
    bars, ax = plt.subplots(figsize=(1.5 + 0.7 * len(labels), 3.2))
    ax.bar(list(per_class_f1), list(per_class_f1.values()), color="#4C72B0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(f"Test {task} F1 per class")
    ax.tick_params(axis="x", rotation=45)
    bars.tight_layout()
    return confusion, bars


def run(
    params: Params, prepared: Path, features: Path, graphs: Path, model: Path, metrics: Path, predictions: Path
) -> None:
    """Score the checkpoint ``model`` on the test split; write metrics and plots into ``metrics`` and
    the per-utterance predictions into ``predictions/test.csv``."""
    from dvclive import Live

    checkpoint = load_checkpoint(model)
    device = default_device()
    network = build_model(checkpoint, device)
    emotions, sentiments = checkpoint["emotions"], checkpoint["sentiments"]
    graph_table, _ = load_graphs(graphs)
    splits, encoders = load_dialogues(
        emotions, sentiments, load_utterances(prepared / UTTERANCES_FILE), features, graph_table
    )
    if not splits.get("test"):
        raise ValueError("the test split has no dialogues; check data.root and the prepare report")
    out = run_model(network, splits["test"], params, device)
    results = {}
    with Live(str(metrics), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for task, labels in (("emotion", emotions), ("sentiment", sentiments)):
            y_true = out[task].numpy()
            y_pred = out[f"{task}_prob"].argmax(-1).numpy()
            results[task] = classification_metrics(y_true, y_pred, labels)
            confusion, bars = figures(y_true, y_pred, labels, task, results[task]["f1"])
            live.log_image(f"confusion_{task}.png", confusion)
            live.log_image(f"f1_per_class_{task}.png", bars)
            live.log_sklearn_plot(
                "confusion_matrix",
                [labels[i] for i in y_true],
                [labels[i] for i in y_pred],
                name=f"confusion_{task}.json",
                title=f"Test {task} confusion matrix",
                x_label="true label",
                y_label="predicted label",
            )
        live.summary.update(
            {
                "test": results,
                "test_utterances": len(out["utterance_ids"]),
                "best_epoch": checkpoint["best_epoch"],
                "encoders_pretrained": {m: bool(info.get("pretrained")) for m, info in encoders.items()},
                "encoder_weights": {m: info.get("weights_id") for m, info in encoders.items()},
                "encoder_revisions": {m: info.get("revision") for m, info in encoders.items()},
                "versions": library_versions(),
                "graph_backend": network.graph_backend_used,
            }
        )
    with atomic_path(predictions / "test.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["utterance_id", "emotion", "emotion_pred", "emotion_prob", "sentiment", "sentiment_pred"])
        for i, uid in enumerate(out["utterance_ids"]):
            e_pred = int(out["emotion_prob"][i].argmax())
            writer.writerow(
                [
                    uid,
                    emotions[int(out["emotion"][i])],
                    emotions[e_pred],
                    f"{float(out['emotion_prob'][i, e_pred]):.4f}",
                    sentiments[int(out["sentiment"][i])],
                    sentiments[int(out["sentiment_prob"][i].argmax())],
                ]
            )
    e = results["emotion"]
    log.info(
        "evaluate: test emotion weighted F1 %.4f (chance: majority %.4f, uniform %.4f), accuracy %.4f, "
        "macro F1 %.4f; sentiment weighted F1 %.4f",
        e["weighted_f1"],
        e["chance"]["majority_weighted_f1"],
        e["chance"]["uniform_weighted_f1"],
        e["accuracy"],
        e["macro_f1"],
        results["sentiment"]["weighted_f1"],
    )
    not_pretrained = [m for m, info in encoders.items() if not info.get("pretrained")]
    if not_pretrained:
        log.warning("these figures use features from RANDOMLY INITIALISED encoders: %s", ", ".join(not_pretrained))


if __name__ == "__main__":
    run_stage(
        run,
        "Score the trained model on the test split.",
        {
            "prepared": "prepare's output folder (utterances.csv)",
            "features": "folder of the feature files",
            "graphs": "build_graphs' output folder",
            "model": "the checkpoint to score",
            "metrics": "DVCLive folder for the metrics and plots",
            "predictions": "folder for test.csv",
        },
    )
