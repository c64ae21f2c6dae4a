"""model.modalities: any non-empty subset of text/audio/visual. The model has parameters for those only,
reads only their features, records them in the checkpoint, and rebuilds from it; cross_attention with a
single modality falls back to concat (logged, recorded)."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from test_model import EMOTIONS, LABELS, SIZES, make_dialogues, small_params

from pipeline.config import ParamsError, parse_params
from pipeline.data import MODALITIES, collate
from pipeline.graphs import num_relations
from pipeline.inference import build_model, run_model
from pipeline.losses import batch_loss
from pipeline.modeling import ERCModel, resolve_fusion
from pipeline.train import train

FUSIONS = ["concat", "cross_attention", "joint_vectors"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mentions(key: str, modalities: list[str]) -> bool:
    """Whether a state-dict key belongs to one of ``modalities`` (``encoders.text.``, ``attend.text_audio.``)."""
    return any(m in part.split("_") for part in key.split(".") for m in modalities)


def model_for(modalities: list[str], fusion: str = "cross_attention", **overrides) -> tuple[ERCModel, object]:
    params = small_params(**{"model.modalities": modalities, "model.fusion": fusion, **overrides})
    torch.manual_seed(0)
    return ERCModel(SIZES, len(EMOTIONS), 3, num_relations(params.graph), params.model).eval(), params


# --- params ---------------------------------------------------------------------------------------------


def test_default_is_all_three_in_the_data_order():
    assert parse_params({}).model.modalities == list(MODALITIES) == ["text", "audio", "visual"]


def test_modalities_from_a_dvc_list_override_and_in_any_order():
    # `dvc exp run -S 'model.modalities=[audio]'` writes a YAML list
    raw = yaml.safe_load("model:\n  modalities: [audio]\n")
    assert parse_params(raw).model.modalities == ["audio"]
    assert parse_params({"model": {"modalities": ["visual", "text"]}}).model.modalities == ["text", "visual"]


@pytest.mark.parametrize(
    ("value", "detail"),
    [([], "at least one modality"), (["speech"], "'text', 'audio' or 'visual'"), (["audio", "audio"], "at most once")],
)
def test_bad_modalities_are_rejected_naming_the_key(value, detail):
    with pytest.raises(ParamsError) as err:
        parse_params({"model": {"modalities": value}})
    assert "model.modalities" in str(err.value) and detail in str(err.value)


def test_cross_attention_with_one_modality_falls_back_to_concat(caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.modeling")
    assert resolve_fusion("cross_attention", ["text", "audio"]) == "cross_attention"
    assert resolve_fusion("joint_vectors", ["audio"]) == "joint_vectors"
    assert caplog.text == ""
    assert resolve_fusion("cross_attention", ["audio"]) == "concat"
    assert "model.fusion=cross_attention needs at least 2 modalities" in caplog.text
    assert "fusing with concat" in caplog.text


# --- the model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_audio_only_model_has_no_text_or_visual_parameters(fusion):
    model, _ = model_for(["audio"], fusion)
    assert model.modalities == ("audio",)
    assert model.fusion_used == ("concat" if fusion == "cross_attention" else fusion)
    keys = list(model.state_dict())
    assert [k for k in keys if mentions(k, ["text", "visual"])] == []
    assert {k.split(".")[1] for k in keys if k.startswith("encoders.")} == {"audio"}
    # the fusion's input is one stream (concat: [N, H] -> [N, H])
    if model.fusion_used == "concat":
        assert model.fusion.out[0].in_features == 16


def test_all_three_keep_the_text_anchored_pairs():
    model, _ = model_for(list(MODALITIES))
    assert model.fusion.pairs == [("text", "audio"), ("text", "visual"), ("audio", "text"), ("visual", "text")]
    no_text, _ = model_for(["audio", "visual"])
    assert no_text.fusion.pairs == [("audio", "visual"), ("visual", "audio")]
    assert not [k for k in no_text.state_dict() if mentions(k, ["text"])]
    assert [k for k in model.state_dict() if mentions(k, ["text"])]  # the helper does see them


def scramble(batch, modalities) -> None:
    """Replace the features and masks of ``modalities`` in ``batch`` by other random values."""
    for m in modalities:
        batch.features[m] = torch.randn_like(batch.features[m]) * 100
        batch.masks[m] = ~batch.masks[m]


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize(
    ("modalities", "ignored"), [(["audio"], ["text", "visual"]), (["text", "audio"], ["visual"])], ids=str
)
def test_features_of_other_modalities_change_nothing(fusion, modalities, ignored):
    model, params = model_for(modalities, fusion)
    batch = collate(make_dialogues(3, seed=2, params=params))
    with torch.no_grad():
        before = model(batch).emotion_logits
        scramble(batch, ignored)
        assert torch.equal(model(batch).emotion_logits, before)
        for m in ignored:  # not even read: the batch may lack them
            del batch.features[m], batch.masks[m]
        assert torch.equal(model(batch).emotion_logits, before)
        batch.features["audio"][batch.masks["audio"]] += 5.0  # while a used modality does matter
        assert not torch.allclose(model(batch).emotion_logits, before, atol=1e-4)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("modalities", [["audio"], ["text", "visual"], ["audio", "visual"]], ids=str)
def test_every_parameter_of_a_subset_model_gets_a_gradient(fusion, modalities):
    model, params = model_for(modalities, fusion, **{"graph.max_speakers": 3})
    model.train()
    batch = collate(make_dialogues(3, seed=1, params=params))
    for m in modalities:
        batch.masks[m][0] = False  # the "missing" embedding is used too
    loss, _ = batch_loss(model(batch), batch, params.loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


# --- training and the checkpoint ----------------------------------------------------------------------------


def test_training_with_one_modality_records_it_and_rebuilds(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.modeling")
    params = small_params(**{"model.modalities": ["audio"], "train.epochs": 2})
    splits = {"train": make_dialogues(6, seed=4, params=params), "dev": make_dialogues(3, seed=5, params=params)}
    checkpoint = train(params, splits, num_relations(params.graph), LABELS)
    assert "fusing with concat" in caplog.text
    assert checkpoint["modalities"] == ["audio"] and checkpoint["model"]["modalities"] == ["audio"]
    assert checkpoint["fusion"] == "concat" and checkpoint["model"]["fusion"] == "cross_attention"
    assert not [k for k in checkpoint["state_dict"] if mentions(k, ["text", "visual"])]
    # through the file, as evaluate / predict read it
    torch.save(checkpoint, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    model = build_model(loaded)  # load_state_dict is strict: same parameters, none more
    assert model.modalities == ("audio",) and model.fusion_used == "concat"
    out = run_model(model, splits["dev"], params, torch.device("cpu"))
    for d in splits["dev"]:
        scramble(d, ["text", "visual"])
    again = run_model(model, splits["dev"], params, torch.device("cpu"))
    assert torch.equal(out["emotion_prob"], again["emotion_prob"])


def test_a_checkpoint_without_modalities_rebuilds_with_all_three():
    params = small_params(**{"train.epochs": 1})
    splits = {"train": make_dialogues(2, seed=4, params=params), "dev": make_dialogues(2, seed=5, params=params)}
    checkpoint = train(params, splits, num_relations(params.graph), LABELS)
    assert checkpoint["modalities"] == list(MODALITIES) and checkpoint["fusion"] == "cross_attention"
    del checkpoint["model"]["modalities"]  # as trained before model.modalities existed
    assert build_model(checkpoint).modalities == MODALITIES
