"""Model, losses and training loop on small synthetic dialogues (no files, no encoders)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.config import parse_params
from pipeline.data import MODALITIES, Dialogue, collate
from pipeline.graphs import build_dialogue_graph, num_relations
from pipeline.inference import build_model, run_model
from pipeline.losses import class_centre_loss, erc_loss, inverse_frequency, supcon_loss
from pipeline.modeling import ERCModel, pad_dialogues, unpad_dialogues
from pipeline.train import train

SIZES = {"text": 12, "audio": 6, "visual": 8}
EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
LABELS = {"emotions": EMOTIONS, "sentiments": ["negative", "neutral", "positive"]}


def make_dialogues(n: int, seed: int, params, learnable: bool = True) -> list[Dialogue]:
    """Random dialogues whose text features encode the emotion (so a model can learn it)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(len(EMOTIONS), SIZES["text"], generator=torch.Generator().manual_seed(99))
    out = []
    for d in range(n):
        t = int(torch.randint(3, 7, (1,), generator=g))
        emotion = torch.randint(0, len(EMOTIONS), (t,), generator=g)
        speakers = [["A", "B", "C"][int(i)] for i in torch.randint(0, 3, (t,), generator=g)]
        features = {m: torch.randn(t, s, generator=g) for m, s in SIZES.items()}
        if learnable:
            features["text"] = prototypes[emotion] + 0.3 * features["text"]
        masks = {m: torch.rand(t, generator=g) > 0.2 for m in MODALITIES}
        masks["text"][:] = True
        out.append(
            Dialogue(
                f"x/{d}",
                [f"x/dia{d}_utt{i}" for i in range(t)],
                features,
                masks,
                emotion,
                torch.div(emotion, 3, rounding_mode="floor"),
                build_dialogue_graph(speakers, params.graph),
            )
        )
    return out


def small_params(**overrides):
    raw = {
        "model": {"hidden_size": 16, "num_heads": 2, "dropout": 0.1},
        "train": {"epochs": 3, "batch_dialogues": 2, "lr": 3e-3},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    return parse_params(raw)


def make_model(params) -> ERCModel:
    torch.manual_seed(0)
    return ERCModel(SIZES, len(EMOTIONS), 3, num_relations(params.graph), params.model)


def test_pad_unpad_roundtrip():
    x = torch.arange(12.0).reshape(6, 2)
    padded, valid = pad_dialogues(x, [2, 4])
    assert padded.shape == (2, 4, 2)
    assert valid.tolist() == [[True, True, False, False], [True] * 4]
    assert torch.equal(unpad_dialogues(padded, valid), x)


CONFIGURATIONS = [
    *[
        {"model.fusion": f, "model.graph": g, "graph.relations": r}
        for f, g, r in itertools.product(
            ["concat", "cross_attention", "joint_vectors"], ["none", "gcn", "adaptive"], ["same_other", "speaker_pair"]
        )
    ],
    *[{"model.context": c} for c in ("transformer", "none")],
    *[
        {"loss.contrastive": c, "loss.class_weights": w}
        for c, w in itertools.product(["none", "interclass"], ["none", "inverse_frequency"])
    ],
    {"loss.sentiment_weight": 0.0},
]


@pytest.mark.parametrize("overrides", CONFIGURATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_configuration_shapes_and_gradients(overrides):
    params = small_params(**{"graph.max_speakers": 3, **overrides})
    model = make_model(params)
    batch = collate(make_dialogues(3, seed=1, params=params))
    batch.masks["text"][0] = False  # so that every modality's "missing" embedding is used
    out = model(batch)
    n = sum(batch.lengths)
    assert out.emotion_logits.shape == (n, len(EMOTIONS))
    assert out.sentiment_logits.shape == (n, 3)
    assert out.projections.shape == (n, 16)
    assert torch.allclose(out.projections.norm(dim=-1), torch.ones(n), atol=1e-5)
    loss, parts = erc_loss(
        out.emotion_logits,
        out.sentiment_logits,
        out.projections,
        batch.emotion,
        batch.sentiment,
        params.loss,
        inverse_frequency(batch.emotion, len(EMOTIONS)),
    )
    loss.backward()
    unused = set()
    if params.loss.contrastive == "none" or params.loss.contrastive_weight == 0:
        unused |= {n for n, _ in model.named_parameters() if n.startswith("projection.")}
    if params.loss.sentiment_weight == 0:
        unused |= {"sentiment_head.weight", "sentiment_head.bias"}
    no_grad = {name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert no_grad == unused, (
        f"parameters without gradient: {no_grad - unused}; unexpected gradient: {unused - no_grad}"
    )
    assert set(parts) == {"emotion", "sentiment", "contrastive"}


@pytest.mark.parametrize("fusion", ["concat", "cross_attention", "joint_vectors"])
def test_masked_modality_features_change_nothing(fusion):
    params = small_params(**{"model.fusion": fusion})
    model = make_model(params).eval()
    dialogues = make_dialogues(2, seed=2, params=params)
    batch = collate(dialogues)
    with torch.no_grad():
        before = model(batch).emotion_logits
        for m in ("audio", "visual"):
            masked = ~batch.masks[m]
            assert masked.any()
            batch.features[m][masked] = torch.randn(int(masked.sum()), SIZES[m]) * 100
        after = model(batch).emotion_logits
        assert torch.allclose(before, after, atol=1e-5)
        # ...while a present modality's features do matter
        batch.features["audio"][batch.masks["audio"]] += 5.0
        assert not torch.allclose(after, model(batch).emotion_logits, atol=1e-4)


def test_graphs_with_more_relation_types_than_the_model_are_refused():
    # a model for two-speaker speaker_pair graphs (8 relation types) given graphs built for max_speakers=3 (18)
    params = small_params(**{"graph.relations": "speaker_pair", "graph.max_speakers": 3})
    torch.manual_seed(0)
    model = ERCModel(SIZES, len(EMOTIONS), 3, num_relations(params.graph, 2), params.model).eval()
    batch = collate(make_dialogues(3, seed=1, params=params))
    assert int(batch.rel_type.max()) >= 8
    with torch.no_grad(), pytest.raises(ValueError, match="relation type .* the model 8 relation types"):
        model(batch)


def test_dialogue_with_modality_missing_everywhere_is_finite():
    params = small_params()
    model = make_model(params).eval()
    batch = collate(make_dialogues(2, seed=3, params=params))
    batch.masks["visual"][:] = False
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out.emotion_logits).all()


def test_supcon_loss_prefers_clustered_embeddings():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), dim=-1)
    mixed = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1.0], [0.9, 0.1], [0.1, 0.9]]), dim=-1)
    assert supcon_loss(clustered, labels, 0.1) < supcon_loss(mixed, labels, 0.1)
    # hand computation for two anchors with one positive each and tau = 1
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    expected = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))
    assert supcon_loss(z, torch.tensor([0, 0, 1]), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_supcon_without_positives_is_zero_with_gradient():
    z = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    loss = supcon_loss(z, torch.tensor([0, 1, 2]), 0.1)
    assert loss.item() == 0.0
    loss.backward()


def test_training_learns_and_is_repeatable():
    params = small_params(**{"train.epochs": 25})
    splits = {"train": make_dialogues(16, seed=4, params=params), "dev": make_dialogues(6, seed=5, params=params)}
    first = train(params, splits, num_relations(params.graph), LABELS)
    second = train(params, splits, num_relations(params.graph), LABELS)
    assert first["best_dev_weighted_f1"] == second["best_dev_weighted_f1"]
    assert first["best_epoch"] == second["best_epoch"]
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    assert first["best_dev_weighted_f1"] > 0.6  # chance is about 1/7
    model = build_model(first)
    out = run_model(model, splits["dev"], params, torch.device("cpu"))
    assert out["emotion_prob"].shape == (sum(len(d) for d in splits["dev"]), len(EMOTIONS))


def test_training_on_shuffled_labels_stays_near_chance():
    params = small_params(**{"train.epochs": 25})
    splits = {
        "train": make_dialogues(16, seed=4, params=params, learnable=False),
        "dev": make_dialogues(6, seed=5, params=params, learnable=False),
    }
    assert train(params, splits, num_relations(params.graph), LABELS)["best_dev_weighted_f1"] < 0.5


def test_train_refuses_empty_dev_split():
    params = small_params()
    with pytest.raises(ValueError, match="dev split"):
        train(params, {"train": make_dialogues(2, seed=1, params=params), "dev": []}, 5, LABELS)


def test_class_centre_loss_prefers_separated_centres():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    weights = torch.ones(3)
    apart = torch.nn.functional.normalize(torch.eye(3).repeat_interleave(2, 0), dim=-1)
    close = torch.nn.functional.normalize(torch.eye(3).repeat_interleave(2, 0) + 2.0, dim=-1)
    assert class_centre_loss(apart, labels, 0.5, weights) < class_centre_loss(close, labels, 0.5, weights)
    assert class_centre_loss(apart, torch.zeros(6, dtype=torch.long), 0.5, weights).item() == 0.0


def test_inverse_frequency_weights_rare_classes_up():
    weights = inverse_frequency(torch.tensor([0, 0, 0, 1]), 3)
    assert weights[1] > weights[0] > 0
    assert weights[2] == 0  # absent class
    assert weights[0].item() == pytest.approx(4 / (3 * 3))


def test_early_stopping_stops_after_patience():
    params = small_params(**{"train.epochs": 40, "train.patience": 2})
    splits = {"train": make_dialogues(8, seed=4, params=params), "dev": make_dialogues(4, seed=5, params=params)}
    result = train(params, splits, num_relations(params.graph), LABELS)
    assert result["epochs_run"] < 40
    assert result["epochs_run"] - result["best_epoch"] == 2


def test_supcon_queue_gives_a_lone_anchor_its_partner():
    from pipeline.losses import ContrastiveQueue

    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two classes, one utterance each: no positive in the batch
    labels = torch.tensor([0, 1])
    assert supcon_loss(z, labels, 1.0).item() == 0.0
    queue = ContrastiveQueue(size=2)
    queue.extend(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([5, 1, 0]))
    assert queue.labels.tolist() == [1, 0] and queue.projections.shape == (2, 2)  # the newest 2 kept
    # each anchor: candidates = the other batch utterance (similarity 0) + the queue (one positive, sim 1)
    expected = -math.log(math.e / (math.e + 1 + 1))
    assert supcon_loss(z, labels, 1.0, queue=queue).item() == pytest.approx(expected, rel=1e-6)
    z.requires_grad_()
    supcon_loss(z, labels, 1.0, queue=queue).backward()
    assert z.grad is not None and not queue.projections.requires_grad
    # erc_loss appends the batch to the queue after the loss
    logits = torch.zeros(2, len(EMOTIONS))
    erc_loss(logits, torch.zeros(2, 3), z.detach(), labels, labels, small_params().loss, None, queue)
    assert queue.labels.tolist() == [0, 1]
