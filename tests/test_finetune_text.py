"""finetune_text: the optional stage that fine-tunes the text encoder on the train utterances (a tiny
random BERT built here), and extract_text encoding with the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_bert

from pipeline import finetune_text, text_features
from pipeline.config import parse_params
from pipeline.feature_table import load_table
from pipeline.resume import ResumeCheckpoint
from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, Utterance, write_utterances

WORDS = "i am happy sad so very hate this cat dog love the train leaves great awful".split()
EMOTIONS = ["neutral", "joy", "sadness"]
SENTIMENTS = ["negative", "neutral", "positive"]
LINES = {  # emotion -> sentiment, words: learnable from the words
    "joy": ("positive", ["i am happy", "love the cat", "so very great", "happy dog"]),
    "sadness": ("negative", ["i am sad", "hate this train", "so awful", "sad cat"]),
    "neutral": ("neutral", ["the train leaves", "this dog", "the cat", "i am"]),
}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_bert")
    save_tiny_bert(path, WORDS, num_hidden_layers=1, max_position_embeddings=32)
    return path


def corpus(test_emotion: str | None = None) -> list[Utterance]:
    """Three splits of two-speaker dialogues; ``test_emotion`` overrides every test label."""
    out = []
    for split, dialogues in (("train", 6), ("dev", 2), ("test", 2)):
        for d in range(dialogues):
            for u, emotion in enumerate(EMOTIONS * 2):
                sentiment, lines = LINES[emotion]
                text = lines[(d + u) % len(lines)]
                label = test_emotion if split == "test" and test_emotion else emotion
                speaker = "AB"[u % 2]
                out.append(
                    Utterance(f"{split}/dia{d}_utt{u}", split, f"{split}/{d}", u, speaker, text, label, sentiment)
                )
    return out


def write_prepared(root: Path, utterances: list[Utterance]) -> Path:
    prepared = root / "prepared"
    write_utterances(utterances, prepared / UTTERANCES_FILE)
    (prepared / LABELS_FILE).write_text(json.dumps({"emotions": EMOTIONS, "sentiments": SENTIMENTS}))
    return prepared


def params_for(model: Path, **finetune):
    settings = {"enabled": True, "epochs": 8, "lr": 1e-2, "batch_size": 8, "patience": None, **finetune}
    return parse_params({"text": {"model": str(model), "max_length": 16, "finetune": settings}})


def test_off_writes_only_a_note_and_extraction_uses_the_base_model(tmp_path: Path, tiny_bert: Path):
    params = parse_params({"text": {"model": str(tiny_bert)}})
    finetune_text.run(params, tmp_path / "missing_prepared", tmp_path / "out", tmp_path / "resume")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["finetune.json"]
    assert json.loads((tmp_path / "out" / "finetune.json").read_text()) == {"enabled": False}
    assert text_features.encoder_spec(params, tmp_path / "out") == str(tiny_bert)
    # On, without a fine-tuned encoder: a clear error naming the stage to run.
    on = params_for(tiny_bert)
    with pytest.raises(FileNotFoundError, match="run the finetune_text stage first"):
        text_features.encoder_spec(on, tmp_path / "out")


def test_finetuning_learns_selects_on_dev_and_never_reads_test_labels(tmp_path: Path, tiny_bert: Path):
    params = params_for(tiny_bert)
    out = tmp_path / "a" / "encoder"
    finetune_text.run(params, write_prepared(tmp_path / "a", corpus()), out, tmp_path / "a" / "resume")
    info = json.loads((out / "finetune.json").read_text())
    assert info["enabled"] and info["base_model"] == str(tiny_bert) and len(info["epochs"]) == 8
    assert info["best_epoch"] == max(info["epochs"], key=lambda e: e["dev_weighted_f1"])["epoch"]
    assert max(e["dev_weighted_f1"] for e in info["epochs"]) > 0.6  # three classes: chance is about 0.33
    assert {"config.json", "model.safetensors", "classifier.safetensors", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (tmp_path / "a" / "resume" / "last.pt").exists()  # deleted once the output is written
    # Other test labels: the same bytes (test labels are never read; the run is deterministic).
    other = tmp_path / "b" / "encoder"
    finetune_text.run(params, write_prepared(tmp_path / "b", corpus("sadness")), other, tmp_path / "b" / "resume")
    for name in ("model.safetensors", "classifier.safetensors", "finetune.json"):
        assert (out / name).read_bytes() == (other / name).read_bytes(), name


def test_extract_text_encodes_with_the_finetuned_encoder(tmp_path: Path, tiny_bert: Path):
    utterances = corpus()
    params = params_for(tiny_bert, epochs=1)
    encoder = tmp_path / "encoder"
    finetune_text.run(params, write_prepared(tmp_path, utterances), encoder, tmp_path / "resume")
    tuned = text_features.extract(utterances, params, tmp_path / "tuned", tmp_path / "cache", text_encoder=encoder)
    base_params = parse_params({"text": {"model": str(tiny_bert), "max_length": 16}})
    base = text_features.extract(utterances, base_params, tmp_path / "base", tmp_path / "cache", text_encoder=encoder)
    assert tuned["encoder"]["fine_tuned_from"] == str(tiny_bert) and "fine_tuned_from" not in base["encoder"]
    assert tuned["encoder"]["weights_id"] != base["encoder"]["weights_id"]
    a, b = load_table(tmp_path / "tuned" / "text.safetensors"), load_table(tmp_path / "base" / "text.safetensors")
    assert a.utterance_ids == b.utterance_ids and not torch.allclose(a.features, b.features)


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path: Path, tiny_bert: Path, monkeypatch):
    params = params_for(tiny_bert)
    prepared = write_prepared(tmp_path, corpus())
    finetune_text.run(params, prepared, tmp_path / "whole", tmp_path / "resume_whole")

    real_save = ResumeCheckpoint.save

    def save_then_die(self, state):
        real_save(self, state)
        if state["epoch"] == 5:
            raise KeyboardInterrupt  # killed after the fifth epoch's checkpoint

    monkeypatch.setattr(ResumeCheckpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune_text.run(params, prepared, tmp_path / "resumed", tmp_path / "resume")
    assert (tmp_path / "resume" / "last.pt").exists() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(ResumeCheckpoint, "save", real_save)
    epochs_run = []
    real_batches = finetune_text.training_batches

    def counting(*args, **kwargs):
        epochs_run.append(1)
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(finetune_text, "training_batches", counting)
    finetune_text.run(params, prepared, tmp_path / "resumed", tmp_path / "resume")
    assert len(epochs_run) == 3  # only epochs 6 to 8 ran again
    for name in ("model.safetensors", "classifier.safetensors", "finetune.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
