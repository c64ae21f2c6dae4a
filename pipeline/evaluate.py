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

Cross-corpus evaluation (e.g. a model trained on IEMOCAP scored on MELD): the same command with
``--prepared``, ``--features`` and ``--graphs`` of another dataset, prepared, extracted and built with
the checkpoint's feature and graph settings (checked against what the feature files and graph index
record, and the encoders' weights). When that data's class lists (``labels.json``) differ from the
checkpoint's, the test split is scored through ``evaluate.label_map`` (``{model class: target class}``,
:func:`map_probabilities`): the probabilities of model classes mapped to one target class are summed,
model classes without a mapping are dropped, and target utterances whose gold class nothing maps to
are left out and counted per class. Sentiment (negative / neutral / positive in every layout) is scored
when both sides have the same classes. ``metrics.json`` then holds ``test`` (per-class F1 over the
mapped target classes, weighted and macro F1, accuracy, chance levels) and ``cross_corpus`` (the map,
both class lists, scored and left-out utterances, the unmapped classes of both sides with counts; see
:func:`score_mapped`); ``test.csv`` gives per utterance the mapped prediction, its summed probability,
the model's own top class and whether the utterance was scored.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline.atomic import atomic_path
from pipeline.cli import run_stage
from pipeline.config import Params, ParamsError, parse_params
from pipeline.data import MODALITIES, load_dialogues
from pipeline.encoders import default_device
from pipeline.feature_table import feature_path
from pipeline.graphs import load_graphs
from pipeline.inference import build_model, check_feature_params, load_checkpoint, run_model
from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, load_labels, load_utterances

log = logging.getLogger(__name__)

TASKS = ("emotion", "sentiment")


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


# ---------------------------------------------------------------------------------------------
# cross-corpus evaluation: another dataset's classes


def map_probabilities(
    prob: np.ndarray, model_classes: list[str], label_map: dict[str, str], target_classes: list[str]
) -> tuple[np.ndarray, list[str]]:
    """Carry the model's class probabilities over to another dataset's classes.

    Args:
        prob: ``[N, C_m]`` probabilities over ``model_classes`` (each row sums to 1).
        label_map: ``{model class: target class}`` (checked by :func:`check_label_map`); several model
            classes may map to one target class.
        target_classes: the target dataset's classes in its output order (its ``labels.json``).

    Returns:
        (``[N, C_t]`` float64, the ``C_t`` target classes at least one model class maps to, in the target's
        order). Column ``j`` is the sum of the probabilities of the model classes mapped to class ``j``;
        the model classes without a mapping are dropped, so a row sums to 1 minus their probability.
    """
    classes = [c for c in target_classes if c in set(label_map.values())]
    matrix = np.zeros((len(model_classes), len(classes)))
    for source, target in label_map.items():
        matrix[model_classes.index(source), classes.index(target)] = 1.0
    return np.asarray(prob, dtype=np.float64) @ matrix, classes


def check_label_map(
    label_map: dict[str, str], model_classes: list[str], target_classes: list[str], model: Path, labels: Path
) -> None:
    """Check that ``evaluate.label_map`` maps classes of the model (``model``) onto classes of the data
    (``labels``, its ``labels.json``).

    Raises:
        ValueError: naming every key that is not a model class and every value that is not a target
            class, with the known classes of that side.
    """
    errors = []
    for source, target in label_map.items():
        if source not in model_classes:
            errors.append(f"key {source!r} is not an emotion class of the model {model} ({', '.join(model_classes)})")
        if target not in target_classes:
            errors.append(
                f"{source}: {target!r} is not an emotion class of the data {labels} ({', '.join(target_classes)})"
            )
    if errors:
        raise ValueError(
            "evaluate.label_map (the --params file):\n  "
            + "\n  ".join(errors)
            + "\nMap each model class onto a class of the data ({model class: target class})."
        )


def class_mappings(
    params: Params, checkpoint: dict, target: dict[str, list[str]], model: Path, labels: Path
) -> dict[str, dict[str, str] | None]:
    """The class map of each task for scoring ``checkpoint`` on data whose classes are ``target``
    (``{"emotions": [...], "sentiments": [...]}``, read from ``labels``).

    Returns:
        ``{"emotion": map, "sentiment": map or None}``: emotion ``evaluate.label_map``, or the identity
        when both sides have the same classes (in another order) and no map is given; sentiment the
        identity when both sides have the same classes, else None (not scored).

    Raises:
        ValueError: the emotion classes differ and ``evaluate.label_map`` is empty, or it names a class
            that is not the model's (key) or the data's (value).
    """
    model_emotions, target_emotions = checkpoint["emotions"], target["emotions"]
    emotion_map = dict(params.evaluate.label_map)
    if not emotion_map:
        if set(model_emotions) != set(target_emotions):
            raise ValueError(
                f"{labels}: the data's emotion classes ({', '.join(target_emotions)}) are not those of the "
                f"model {model} ({', '.join(model_emotions)}): set evaluate.label_map in the --params file to map "
                "the model's classes onto the data's (e.g. {hap: joy, sad: sadness}), or score data prepared "
                "with the model's classes"
            )
        emotion_map = {c: c for c in model_emotions}
    check_label_map(emotion_map, model_emotions, target_emotions, model, labels)
    model_sentiments, target_sentiments = checkpoint["sentiments"], target["sentiments"]
    same = set(model_sentiments) == set(target_sentiments)
    return {"emotion": emotion_map, "sentiment": {c: c for c in model_sentiments} if same else None}


def score_mapped(
    prob: np.ndarray, gold: np.ndarray, model_classes: list[str], target_classes: list[str], label_map: dict[str, str]
) -> dict:
    """Score the model's probabilities against another dataset's gold labels through ``label_map``.

    Args:
        prob: ``[N, C_m]`` model probabilities over ``model_classes``.
        gold: ``[N]`` gold class indices into ``target_classes`` (-1: unlabelled).
        label_map: ``{model class: target class}`` (:func:`map_probabilities`).

    Returns:
        dict with

        * ``classes``: the ``C_t`` target classes some model class maps to; ``prob``: ``[N, C_t]`` summed
          probabilities; ``pred``: ``[N]`` index into ``classes`` (argmax of ``prob``);
        * ``gold``: ``[N]`` gold index into ``classes`` (-1: unlabelled or a class nothing maps to);
          ``scored``: ``[N]`` bool, ``gold >= 0``;
        * ``metrics``: :func:`classification_metrics` of the scored utterances over ``classes`` (None
          when no utterance is scored);
        * ``report``: ``scored_utterances``, ``left_out_utterances`` (labelled but with an unmapped gold
          class), ``unlabelled_utterances``, ``unmapped_target`` (``{class: utterances left out}`` for
          every target class that no model class maps to, 0 included), ``unmapped_model``
          (``{class: {"top_class": utterances, "mean_probability": p}}`` for every model class without
          a mapping: on how many of the N utterances it was the model's most probable class, and its
          mean probability, the mass dropped).
    """
    prob = np.asarray(prob, dtype=np.float64)
    gold = np.asarray(gold)
    mapped, classes = map_probabilities(prob, model_classes, label_map, target_classes)
    pred = mapped.argmax(-1) if classes else np.zeros(len(gold), dtype=np.int64)
    to_mapped = np.array([classes.index(c) if c in classes else -1 for c in target_classes] + [-1])
    gold_mapped = to_mapped[gold]  # gold -1 (unlabelled) indexes the trailing -1
    scored = gold_mapped >= 0
    labelled = gold >= 0
    counts = np.bincount(gold[labelled], minlength=len(target_classes))
    top = prob.argmax(-1)
    report = {
        "scored_utterances": int(scored.sum()),
        "left_out_utterances": int((labelled & ~scored).sum()),
        "unlabelled_utterances": int((~labelled).sum()),
        "unmapped_target": {c: int(counts[i]) for i, c in enumerate(target_classes) if c not in classes},
        "unmapped_model": {
            c: {"top_class": int((top == i).sum()), "mean_probability": float(prob[:, i].mean()) if len(prob) else 0.0}
            for i, c in enumerate(model_classes)
            if c not in label_map
        },
    }
    metrics = classification_metrics(gold_mapped[scored], pred[scored], classes) if scored.any() else None
    return {
        "classes": classes,
        "prob": mapped,
        "pred": pred,
        "gold": gold_mapped,
        "scored": scored,
        "metrics": metrics,
        "report": report,
    }


def check_target_features(
    checkpoint: dict,
    model: Path,
    params: Params,
    encoders: dict[str, dict],
    features: Path,
    graphs: Path,
    num_relations: int,
    example,
) -> None:
    """Check that the features and graphs to score were made as those ``checkpoint`` was trained on.

    Compared with the checkpoint's records: the text / audio / visual settings each feature file of
    ``features`` records (``encoders[m]["params"]``) and ``params.graph`` (the graph files do not record
    all of it), by :func:`pipeline.inference.check_feature_params`; the encoder weights (``weights_id``)
    of the modalities the model reads; the relation types of ``graphs`` (``num_relations``); the feature
    sizes of ``example`` (a :class:`pipeline.data.Dialogue` of the data) against ``input_sizes``.

    Raises:
        ValueError: naming each difference and what to do (re-extract the data with the checkpoint's
            settings and encoders); also when a feature file records no settings.
    """
    recorded = {}
    for m in MODALITIES:
        recorded[m] = (encoders.get(m) or {}).get("params")
        if recorded[m] is None:
            raise ValueError(
                f"{feature_path(m, features)} does not record the settings it was made with (an older "
                "version); re-extract it"
            )
    try:
        made_with = parse_params({**recorded, "graph": params.graph.model_dump(mode="json")}, str(features))
    except ParamsError as err:
        raise ValueError(f"{features}: the feature files record settings this version cannot read: {err}") from None
    try:
        check_feature_params(checkpoint, made_with, model)
    except ValueError as err:
        raise ValueError(
            f"the data to score ({features}; 'params' = the settings its feature files record, graph.* "
            f"from --params): {err}"
        ) from None
    diffs = []
    trained = checkpoint.get("encoders") or {}
    for m in checkpoint.get("modalities", MODALITIES):
        ours, theirs = (trained.get(m) or {}).get("weights_id"), (encoders.get(m) or {}).get("weights_id")
        if ours and theirs and ours != theirs:
            diffs.append(f"{m} encoder weights: checkpoint {ours}, {feature_path(m, features)} {theirs}")
    if num_relations != checkpoint["num_relations"]:
        diffs.append(f"relation types: checkpoint {checkpoint['num_relations']}, {graphs} {num_relations}")
    for m, size in checkpoint["input_sizes"].items():
        if m in example.features and int(example.features[m].shape[1]) != int(size):
            diffs.append(
                f"{m} feature size: checkpoint {size}, {feature_path(m, features)} {example.features[m].shape[1]}"
            )
    if diffs:
        raise ValueError(
            f"{model} cannot score the data of {features} and {graphs}:\n  "
            + "\n  ".join(diffs)
            + "\nExtract the data's features and build its graphs with the encoders and settings the model was "
            "trained with."
        )


# ---------------------------------------------------------------------------------------------
# the stage


def log_task_plots(live, y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], task: str, f1: dict) -> None:
    """Log the PNG confusion matrix and F1 bars and DVC's confusion-matrix plot of one task into ``live``."""
    confusion, bars = figures(y_true, y_pred, labels, task, f1)
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


def run_info(checkpoint: dict, encoders: dict[str, dict], network) -> dict:
    """What produced the figures: best epoch, the encoders of the features (pretrained, weights,
    revisions), library versions and the graph kernels that ran."""
    return {
        "best_epoch": checkpoint["best_epoch"],
        "encoders_pretrained": {m: bool(info.get("pretrained")) for m, info in encoders.items()},
        "encoder_weights": {m: info.get("weights_id") for m, info in encoders.items()},
        "encoder_revisions": {m: info.get("revision") for m, info in encoders.items()},
        "versions": library_versions(),
        "graph_backend": network.graph_backend_used,
    }


def run(
    params: Params, prepared: Path, features: Path, graphs: Path, model: Path, metrics: Path, predictions: Path
) -> None:
    """Score the checkpoint ``model`` on the test split of ``prepared``; write metrics and plots into
    ``metrics`` and the per-utterance predictions into ``predictions/test.csv``.

    When the data's class lists (``prepared/labels.json``) are not the checkpoint's, the scoring is
    cross-corpus (see the module docstring): through ``evaluate.label_map``, on features and graphs
    checked against the checkpoint's settings (:func:`check_target_features`).

    Raises:
        FileNotFoundError: an input is missing. ValueError: the test split is empty; cross-corpus: a
            missing or wrong ``evaluate.label_map``, data made with other settings or encoders, or no
            test utterance with a mapped gold class.
    """
    from dvclive import Live

    checkpoint = load_checkpoint(model)
    emotions, sentiments = checkpoint["emotions"], checkpoint["sentiments"]
    labels = prepared / LABELS_FILE
    target = load_labels(labels)
    cross = list(target["emotions"]) != list(emotions) or list(target["sentiments"]) != list(sentiments)
    mappings = class_mappings(params, checkpoint, target, model, labels) if cross else None  # before the long part
    if not cross and params.evaluate.label_map:
        log.info("evaluate.label_map is not used: %s has the model's classes", labels)
    device = default_device()
    network = build_model(checkpoint, device)
    graph_table, num_relations = load_graphs(graphs)
    splits, encoders = load_dialogues(
        target["emotions"], target["sentiments"], load_utterances(prepared / UTTERANCES_FILE), features, graph_table
    )
    if not splits.get("test"):
        raise ValueError("the test split has no dialogues; check data.root and the prepare report")
    test = splits["test"]
    if cross:
        check_target_features(checkpoint, model, params, encoders, features, graphs, num_relations, test[0])
        # run_model's loss takes labels of the model's classes: the data's gold goes around it
        gold = {task: torch.cat([getattr(d, task) for d in test]) for task in TASKS}
        test = [replace(d, emotion=torch.zeros_like(d.emotion), sentiment=torch.zeros_like(d.sentiment)) for d in test]
    out = run_model(network, test, params, device)
    if cross:
        out.update(gold)
        write_cross_corpus(
            out, checkpoint, target, mappings, prepared, metrics, predictions, run_info(checkpoint, encoders, network)
        )
        return
    results = {}
    with Live(str(metrics), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for task, classes in (("emotion", emotions), ("sentiment", sentiments)):
            y_true = out[task].numpy()
            y_pred = out[f"{task}_prob"].argmax(-1).numpy()
            results[task] = classification_metrics(y_true, y_pred, classes)
            log_task_plots(live, y_true, y_pred, classes, task, results[task]["f1"])
        live.summary.update(
            {"test": results, "test_utterances": len(out["utterance_ids"]), **run_info(checkpoint, encoders, network)}
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
    warn_random_encoders(encoders)


def warn_random_encoders(encoders: dict[str, dict]) -> None:
    """Log a warning naming the modalities whose features came from randomly initialised encoders."""
    not_pretrained = [m for m, info in encoders.items() if not info.get("pretrained")]
    if not_pretrained:
        log.warning("these figures use features from RANDOMLY INITIALISED encoders: %s", ", ".join(not_pretrained))


def write_cross_corpus(
    out: dict,
    checkpoint: dict,
    target: dict[str, list[str]],
    mappings: dict[str, dict[str, str] | None],
    prepared: Path,
    metrics: Path,
    predictions: Path,
    info: dict,
) -> None:
    """Write the cross-corpus scores of ``out`` (:func:`pipeline.inference.run_model` on the data of
    ``prepared``) into ``metrics`` (DVCLive: ``metrics.json`` with ``test`` and ``cross_corpus``, plots of
    the mapped classes) and ``predictions/test.csv``.

    Raises:
        ValueError: no test utterance has a gold emotion that the map reaches (nothing to score).
    """
    from dvclive import Live

    n = len(out["utterance_ids"])
    scores = {
        task: score_mapped(
            out[f"{task}_prob"].numpy(), out[task].numpy(), checkpoint[f"{task}s"], target[f"{task}s"], mapping
        )
        for task, mapping in mappings.items()
        if mapping is not None
    }
    emotion = scores["emotion"]
    if emotion["metrics"] is None:
        raise ValueError(
            f"none of the {n} test utterances of {prepared} has a gold emotion that evaluate.label_map reaches "
            f"({', '.join(emotion['classes'])}; left out per class: {emotion['report']['unmapped_target']}); "
            "map model classes onto the classes the data's test split holds"
        )
    report = {
        "data": str(prepared),
        "label_map": mappings["emotion"],
        "model_classes": {"emotion": checkpoint["emotions"], "sentiment": checkpoint["sentiments"]},
        "target_classes": {"emotion": target["emotions"], "sentiment": target["sentiments"]},
    }
    results = {}
    with Live(str(metrics), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for task in TASKS:
            score = scores.get(task)
            if score is None or score["metrics"] is None:
                why = (
                    f"the model's {task} classes ({', '.join(checkpoint[f'{task}s'])}) are not the data's "
                    f"({', '.join(target[f'{task}s'])})"
                    if score is None
                    else f"no labelled test utterance with a {task} class of the model"
                )
                report[task] = {"not_scored": why}
                log.warning("evaluate: %s not scored: %s", task, why)
                continue
            results[task] = score["metrics"]
            report[task] = {"classes": score["classes"], **score["report"]}
            scored = score["scored"]
            log_task_plots(
                live, score["gold"][scored], score["pred"][scored], score["classes"], task, results[task]["f1"]
            )
        live.summary.update({"test": results, "test_utterances": n, "cross_corpus": report, **info})
    model_emotions, target_emotions = checkpoint["emotions"], target["emotions"]
    model_sentiments, target_sentiments = checkpoint["sentiments"], target["sentiments"]
    sentiment = scores.get("sentiment")
    with atomic_path(predictions / "test.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "utterance_id",
                "emotion",
                "emotion_pred",
                "emotion_prob",
                "emotion_model_pred",
                "emotion_scored",
                "sentiment",
                "sentiment_pred",
            ]
        )
        for i, uid in enumerate(out["utterance_ids"]):
            e_gold, s_gold = int(out["emotion"][i]), int(out["sentiment"][i])
            e_pred = int(emotion["pred"][i])
            writer.writerow(
                [
                    uid,
                    target_emotions[e_gold] if e_gold >= 0 else "",
                    emotion["classes"][e_pred],
                    f"{float(emotion['prob'][i, e_pred]):.4f}",
                    model_emotions[int(out["emotion_prob"][i].argmax())],
                    int(emotion["scored"][i]),
                    target_sentiments[s_gold] if s_gold >= 0 else "",
                    sentiment["classes"][int(sentiment["pred"][i])]
                    if sentiment is not None
                    else model_sentiments[int(out["sentiment_prob"][i].argmax())],
                ]
            )
    e, r = results["emotion"], report["emotion"]
    log.info(
        "evaluate (cross-corpus, %s): emotion weighted F1 %.4f (chance: majority %.4f), accuracy %.4f over %d "
        "of %d test utterances; left out (target classes nothing maps to): %s; model classes dropped: %s%s",
        prepared,
        e["weighted_f1"],
        e["chance"]["majority_weighted_f1"],
        e["accuracy"],
        r["scored_utterances"],
        n,
        ", ".join(f"{c} {k}" for c, k in r["unmapped_target"].items()) or "none",
        ", ".join(r["unmapped_model"]) or "none",
        f"; sentiment weighted F1 {results['sentiment']['weighted_f1']:.4f}" if "sentiment" in results else "",
    )
    warn_random_encoders({m: {"pretrained": p} for m, p in info["encoders_pretrained"].items()})


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
