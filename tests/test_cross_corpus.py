"""Cross-corpus evaluation (pipeline.evaluate with another dataset's prepared data and evaluate.label_map): the
mapping arithmetic on hand-made probabilities, the checks of the map and of the data, and one end-to-end run: a
tiny model trained on IEMOCAP-like classes scored on MELD-like data through the stages as dvc.yaml runs them."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny_bert
from sklearn.metrics import accuracy_score, f1_score

from pipeline import evaluate
from pipeline.config import parse_params

REPO = Path(__file__).resolve().parents[1]
IEMOCAP = ["hap", "sad", "neu", "ang", "exc", "fru"]
MELD = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
SENTIMENTS = ["negative", "neutral", "positive"]
LABEL_MAP = {"hap": "joy", "exc": "joy", "sad": "sadness", "neu": "neutral", "ang": "anger"}  # fru: dropped
MAPPED = ["neutral", "sadness", "joy", "anger"]  # the MELD classes some IEMOCAP class maps to, in MELD's order


# --- the mapping arithmetic -----------------------------------------------------------------------------------


def test_map_probabilities_sums_mapped_classes_and_drops_the_rest():
    prob = np.array(
        [
            # hap   sad   neu   ang   exc   fru
            [0.25, 0.40, 0.05, 0.05, 0.25, 0.00],  # sad alone is the top class; hap + exc = 0.50 wins as joy
            [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],  # fru (dropped) is the top class
            [0.00, 0.00, 1.00, 0.00, 0.00, 0.00],
        ]
    )
    mapped, classes = evaluate.map_probabilities(prob, IEMOCAP, LABEL_MAP, MELD)
    assert classes == MAPPED
    np.testing.assert_allclose(
        mapped,
        [
            # neutral sadness joy anger
            [0.05, 0.40, 0.50, 0.05],
            [0.10, 0.10, 0.20, 0.10],  # sums to 0.5: fru's 0.5 is dropped
            [1.00, 0.00, 0.00, 0.00],
        ],
    )
    assert [classes[i] for i in mapped.argmax(-1)] == ["joy", "joy", "neutral"]


def test_score_mapped_leaves_out_unmapped_gold_classes_and_counts_both_sides():
    prob = np.array(
        [
            [0.25, 0.40, 0.05, 0.05, 0.25, 0.00],  # gold joy -> predicted joy (summed)
            [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],  # gold surprise: left out; fru is its top class
            [0.00, 0.00, 1.00, 0.00, 0.00, 0.00],  # gold neutral -> neutral
            [0.00, 0.70, 0.00, 0.20, 0.00, 0.10],  # gold anger -> sadness
            [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],  # gold disgust: left out
            [0.00, 0.00, 0.00, 1.00, 0.00, 0.00],  # unlabelled (-1)
        ]
    )
    gold = np.array([MELD.index(c) for c in ("joy", "surprise", "neutral", "anger", "disgust")] + [-1])
    score = evaluate.score_mapped(prob, gold, IEMOCAP, MELD, LABEL_MAP)
    assert score["classes"] == MAPPED
    assert score["scored"].tolist() == [True, False, True, True, False, False]
    assert [MAPPED[i] for i in score["gold"][score["scored"]]] == ["joy", "neutral", "anger"]
    assert [MAPPED[i] for i in score["pred"]] == ["joy", "joy", "neutral", "sadness", "joy", "anger"]
    report = score["report"]
    assert report["scored_utterances"] == 3 and report["left_out_utterances"] == 2
    assert report["unlabelled_utterances"] == 1
    assert report["unmapped_target"] == {"surprise": 1, "fear": 0, "disgust": 1}  # MELD's order, 0 included
    assert report["unmapped_model"] == {"fru": {"top_class": 2, "mean_probability": pytest.approx(1.1 / 6)}}
    metrics = score["metrics"]
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert set(metrics["f1"]) == set(MAPPED)
    # joy: 1 true positive, no false positive -> 1; neutral -> 1; anger: missed -> 0; sadness: one false positive
    assert metrics["f1"] == {"neutral": 1.0, "sadness": 0.0, "joy": 1.0, "anger": 0.0}
    assert metrics["weighted_f1"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)


def test_identity_mapping_reorders_the_same_classes():
    prob = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    reordered = ["positive", "negative", "neutral"]
    mapped, classes = evaluate.map_probabilities(prob, SENTIMENTS, {c: c for c in SENTIMENTS}, reordered)
    assert classes == reordered
    np.testing.assert_allclose(mapped, prob[:, [2, 0, 1]])


# --- checks of the map --------------------------------------------------------------------------------------


def params_with_map(label_map: dict) -> object:
    return parse_params({"evaluate": {"label_map": label_map}})


def test_label_map_keys_must_be_model_classes_and_values_target_classes():
    checkpoint = {"emotions": IEMOCAP, "sentiments": SENTIMENTS}
    target = {"emotions": MELD, "sentiments": SENTIMENTS}
    labels = Path("other/data/prepared/labels.json")
    with pytest.raises(ValueError) as err:
        evaluate.class_mappings(
            params_with_map({"Happy": "joy", "sad": "sadness", "neu": "calm"}),
            checkpoint,
            target,
            Path("models/model.pt"),
            labels,
        )
    message = str(err.value)
    assert "evaluate.label_map" in message
    assert "key 'happy' is not an emotion class of the model models/model.pt (hap, sad, neu, ang, exc, fru)" in message
    assert f"neu: 'calm' is not an emotion class of the data {labels} ({', '.join(MELD)})" in message
    assert "'sad'" not in message  # the valid entry is not named
    with pytest.raises(ValueError, match="set evaluate.label_map in the --params file"):
        evaluate.class_mappings(params_with_map({}), checkpoint, target, Path("m.pt"), labels)


def test_class_mappings_identity_when_the_classes_agree_and_sentiment_only_when_they_do():
    checkpoint = {"emotions": IEMOCAP, "sentiments": SENTIMENTS}
    same_classes = {"emotions": list(reversed(IEMOCAP)), "sentiments": list(reversed(SENTIMENTS))}
    maps = evaluate.class_mappings(params_with_map({}), checkpoint, same_classes, Path("m.pt"), Path("l.json"))
    assert maps == {"emotion": {c: c for c in IEMOCAP}, "sentiment": {c: c for c in SENTIMENTS}}
    other_sentiments = {"emotions": MELD, "sentiments": ["neg", "pos"]}
    maps = evaluate.class_mappings(
        params_with_map(LABEL_MAP), checkpoint, other_sentiments, Path("m.pt"), Path("l.json")
    )
    assert maps == {"emotion": LABEL_MAP, "sentiment": None}


# --- end to end: two tiny prepared datasets -------------------------------------------------------------------

WORDS = "i am so happy sad fine angry excited annoyed wow what gross scared okay great".split()
TEXT = {  # an utterance's words follow its class, so the model has something to learn
    "hap": "i am so happy",
    "exc": "wow i am so excited",
    "sad": "i am so sad",
    "neu": "i am fine",
    "ang": "i am so angry",
    "fru": "i am annoyed",
    "joy": "great i am so happy",
    "sadness": "i am sad",
    "neutral": "okay i am fine",
    "anger": "i am angry",
    "surprise": "wow what",
    "disgust": "gross",
    "fear": "i am scared",
}
SENTIMENT_OF = {"joy": "positive", "neutral": "neutral", "surprise": "positive"}


def write_manifest(path: Path, dialogues: dict[str, list[list[str]]], sentiment: bool) -> Path:
    """A manifest CSV (text only): split -> dialogues, each a list of emotions; speakers alternate A, B."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["dialogue_id", "utterance_id", "speaker", "text", "emotion", "split"] + (
        ["sentiment"] if sentiment else []
    )
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for split, items in dialogues.items():
            for d, emotions in enumerate(items):
                for u, emotion in enumerate(emotions):
                    row = [f"{split}{d}", f"{split}{d}_{u}", "AB"[u % 2], TEXT[emotion], emotion, split]
                    writer.writerow(row + ([SENTIMENT_OF.get(emotion, "negative")] if sentiment else []))
    return path


def build(raw: dict, root: Path) -> dict[str, Path]:
    """prepare, extract_text/audio/visual and build_graphs into ``root``, as dvc.yaml runs them."""
    from pipeline import build_graphs, prepare
    from pipeline.audio_features import extract as extract_audio
    from pipeline.text_features import extract as extract_text
    from pipeline.utterances import UTTERANCES_FILE, load_utterances
    from pipeline.visual_features import extract as extract_visual

    params = parse_params(raw)
    paths = {"prepared": root / "prepared", "features": root / "features", "graphs": root / "graphs"}
    prepare.run(params, out=paths["prepared"])
    utterances = load_utterances(paths["prepared"] / UTTERANCES_FILE)
    for extract in (extract_text, extract_audio, extract_visual):
        extract(utterances, params, paths["features"])
    build_graphs.run(params, utterances=paths["prepared"] / UTTERANCES_FILE, out=paths["graphs"])
    return paths


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> dict:
    """A tiny model trained on IEMOCAP-like data (6 classes), and MELD-like data (7 classes, MELD's order,
    no fear utterance) prepared, extracted and built with the same settings: the cwd during the tests."""
    from pipeline import train

    root = tmp_path_factory.mktemp("cross_corpus")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)  # the stages' caches and DVCLive work from the cwd
    torch.set_num_threads(1)
    try:
        save_tiny_bert(root / "bert", WORDS, num_hidden_layers=1, max_position_embeddings=64)
        raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))  # audio/visual: tiny random
        raw["text"].update(model=str(root / "bert"), max_length=32)
        raw["model"].update(hidden_size=16, num_heads=2)
        raw["train"].update(epochs=2, batch_dialogues=2, warmup_epochs=1)
        cycle = IEMOCAP * 2
        source = write_manifest(
            root / "iemocap.csv",
            {
                "train": [cycle[i : i + 6] for i in range(4)],
                "dev": [cycle[1:5], cycle[3:7]],
                "test": [cycle[2:8]],
            },
            sentiment=False,  # derived from the emotion, as for IEMOCAP
        )
        target_test = [
            ["neutral", "joy", "surprise", "sadness", "anger"],
            ["joy", "disgust", "neutral", "surprise"],
            ["anger", "sadness", "joy"],
        ]
        target = write_manifest(
            root / "meld.csv",
            {"train": [["neutral", "joy", "anger"]], "dev": [["sadness", "neutral"]], "test": target_test},
            sentiment=True,
        )
        data = {"layout": "manifest", "missing_clip": "text_only"}
        source_raw = {**raw, "data": {**raw["data"], **data, "root": str(source), "emotions": IEMOCAP}}
        target_raw = {**raw, "data": {**raw["data"], **data, "root": str(target), "emotions": MELD}}
        paths = {"source": build(source_raw, root / "iemocap"), "target": build(target_raw, root / "meld")}
        train.run(
            parse_params(source_raw),
            prepared=paths["source"]["prepared"],
            features=paths["source"]["features"],
            graphs=paths["source"]["graphs"],
            model=root / "models" / "model.pt",
            metrics=root / "metrics" / "train",
            resume_dir=root / "data" / "interim" / "train",
        )
        yield {
            "root": root,
            "model": root / "models" / "model.pt",
            "raw": source_raw,
            "target_raw": target_raw,
            "target_test": [e for dialogue in target_test for e in dialogue],
            **paths,
        }
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def run_evaluate(run_dir: dict, label_map: dict, data: dict, name: str) -> tuple[dict, list[dict]]:
    raw = {**run_dir["raw"], "evaluate": {"label_map": label_map}}
    metrics, predictions = run_dir["root"] / "metrics" / name, run_dir["root"] / "predictions" / name
    evaluate.run(parse_params(raw), **data, model=run_dir["model"], metrics=metrics, predictions=predictions)
    with open(predictions / "test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return json.loads((metrics / "metrics.json").read_text(encoding="utf-8")), rows


def test_cross_corpus_run_writes_mapped_metrics_and_predictions(run_dir: dict):
    from pipeline.data import load_dialogues
    from pipeline.graphs import load_graphs
    from pipeline.inference import build_model, load_checkpoint, run_model
    from pipeline.utterances import UTTERANCES_FILE, load_utterances

    metrics, rows = run_evaluate(run_dir, LABEL_MAP, run_dir["target"], "cross")
    gold = run_dir["target_test"]
    scored_gold = [g for g in gold if g in MAPPED]
    cross = metrics["cross_corpus"]
    assert cross["label_map"] == LABEL_MAP
    assert cross["model_classes"]["emotion"] == IEMOCAP and cross["target_classes"]["emotion"] == MELD
    emotion = cross["emotion"]
    assert emotion["classes"] == MAPPED
    assert emotion["scored_utterances"] == len(scored_gold) == 9 and emotion["left_out_utterances"] == 3
    assert emotion["unmapped_target"] == {"surprise": 2, "fear": 0, "disgust": 1}
    assert list(emotion["unmapped_model"]) == ["fru"]
    assert 0 <= emotion["unmapped_model"]["fru"]["top_class"] <= len(gold)
    assert metrics["test_utterances"] == len(gold)
    assert set(metrics["test"]["emotion"]["f1"]) == set(MAPPED)
    # sentiment: the same three classes on both sides, scored directly
    assert cross["sentiment"]["scored_utterances"] == len(gold) and cross["sentiment"]["unmapped_target"] == {}
    assert "sentiment" in metrics["test"]

    # the predictions, against the model's own probabilities summed here by hand
    assert [r["emotion"] for r in rows] == gold
    checkpoint = load_checkpoint(run_dir["model"])
    graphs, _ = load_graphs(run_dir["target"]["graphs"])
    splits, _ = load_dialogues(
        MELD,
        SENTIMENTS,
        load_utterances(run_dir["target"]["prepared"] / UTTERANCES_FILE),
        run_dir["target"]["features"],
        graphs,
    )
    # gold labels of the data are no class indices of the model: its loss gets zeros
    test = [
        replace(d, emotion=torch.zeros_like(d.emotion), sentiment=torch.zeros_like(d.sentiment)) for d in splits["test"]
    ]
    out = run_model(build_model(checkpoint), test, parse_params(run_dir["raw"]), torch.device("cpu"))
    for i, row in enumerate(rows):
        sums = {c: 0.0 for c in MAPPED}
        for source, target in LABEL_MAP.items():
            sums[target] += float(out["emotion_prob"][i, IEMOCAP.index(source)])
        best = max(MAPPED, key=lambda c: sums[c])
        assert row["utterance_id"] == out["utterance_ids"][i]
        assert row["emotion_pred"] == best and float(row["emotion_prob"]) == pytest.approx(sums[best], abs=1e-4)
        assert row["emotion_model_pred"] == IEMOCAP[int(out["emotion_prob"][i].argmax())]
        assert row["emotion_scored"] == ("1" if row["emotion"] in MAPPED else "0")
    scored = [r for r in rows if r["emotion_scored"] == "1"]
    y_true, y_pred = [r["emotion"] for r in scored], [r["emotion_pred"] for r in scored]
    assert metrics["test"]["emotion"]["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["test"]["emotion"]["weighted_f1"] == pytest.approx(
        f1_score(y_true, y_pred, average="weighted", zero_division=0)
    )
    assert (run_dir["root"] / "metrics" / "cross" / "plots" / "sklearn" / "confusion_emotion.json").is_file()


def test_same_corpus_evaluation_is_unchanged(run_dir: dict):
    metrics, rows = run_evaluate(run_dir, LABEL_MAP, run_dir["source"], "same")  # the map is not used
    assert "cross_corpus" not in metrics
    assert set(metrics["test"]["emotion"]["f1"]) == set(IEMOCAP)
    assert list(rows[0]) == ["utterance_id", "emotion", "emotion_pred", "emotion_prob", "sentiment", "sentiment_pred"]


def test_a_wrong_or_missing_map_stops_before_scoring(run_dir: dict):
    with pytest.raises(ValueError, match="set evaluate.label_map"):
        run_evaluate(run_dir, {}, run_dir["target"], "no_map")
    with pytest.raises(ValueError, match=r"key 'happy' is not an emotion class of the model .*\(hap, sad, neu"):
        run_evaluate(run_dir, {"happy": "joy"}, run_dir["target"], "bad_key")
    assert not (run_dir["root"] / "metrics" / "no_map").exists()


def test_data_made_with_other_settings_is_refused(run_dir: dict):
    from pipeline import build_graphs
    from pipeline.text_features import extract as extract_text
    from pipeline.utterances import UTTERANCES_FILE, load_utterances

    target, root = run_dir["target"], run_dir["root"] / "meld_other"
    table = target["prepared"] / UTTERANCES_FILE
    other_text = {**run_dir["target_raw"], "text": {**run_dir["target_raw"]["text"], "pooling": "cls"}}
    features = root / "features"
    for m in ("audio", "visual"):
        features.mkdir(parents=True, exist_ok=True)
        (features / f"{m}.safetensors").write_bytes((target["features"] / f"{m}.safetensors").read_bytes())
    extract_text(load_utterances(table), parse_params(other_text), features)
    with pytest.raises(ValueError, match=r"text\.pooling: checkpoint 'mean', params 'cls'"):
        run_evaluate(run_dir, LABEL_MAP, {**target, "features": features}, "other_text")
    other_graph = {**run_dir["target_raw"], "graph": {**run_dir["target_raw"]["graph"], "relations": "speaker_pair"}}
    build_graphs.run(parse_params(other_graph), utterances=table, out=root / "graphs")
    with pytest.raises(ValueError, match=r"relation types: checkpoint 5, .* 8"):
        run_evaluate(run_dir, LABEL_MAP, {**target, "graphs": root / "graphs"}, "other_graphs")
