"""Extraction at scale: resumability (interrupt, SIGKILL, cache invalidation), text context and layer
selection, audio segments / chunking / openSMILE, face tracking, bad media, and flat memory.

Everything runs on tiny models built here (a 2-layer BERT, a random wav2vec2, random face weights).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FEATURES, TINY_AUDIO, UTTERANCES, run_extraction_stage, save_tiny_bert, write_utterances

from pipeline import audio_features, extract_audio, extract_visual, text_features, visual_features
from pipeline.config import load_params, parse_params
from pipeline.encoders import load_audio_encoder, load_face_models
from pipeline.extraction_cache import ExtractionCache, code_fingerprint, stage_code_files
from pipeline.feature_table import load_table
from pipeline.media import MediaError, load_audio, sample_frames
from pipeline.utterances import Utterance

CPU = torch.device("cpu")
WORDS = "i am happy sad so very hate this cat dog love the train leaves".split()
EXTRA = "a b c d : | hi there ok alone you me".split()


def utt(
    uid: str,
    text: str = "x",
    speaker: str = "A",
    clip: str | Path = "",
    start: float | None = None,
    end: float | None = None,
) -> Utterance:
    """An utterance; dialogue id and index come from ``split/diaD_uttU``."""
    split, name = uid.split("/")
    d, u = name[3:].split("_utt")
    return Utterance(
        uid,
        split,
        f"{split}/{d}",
        int(u),
        speaker,
        text,
        "neutral",
        "neutral",
        str(clip) if clip else "",
        "",
        start,
        end,
    )


def read_report(features_dir: Path, modality: str) -> dict:
    return json.loads((Path(features_dir) / f"{modality}_report.json").read_text(encoding="utf-8"))


def shard_ids(directory: Path) -> list[list[str]]:
    """The utterance ids of each cache shard under ``directory`` (any key), in shard order."""
    from safetensors import safe_open

    out = []
    for shard in sorted(Path(directory).glob("*/shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.append(json.loads(f.metadata()["erc"])["ids"])
    return out


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small shared machine, OpenMP threads spinning against other processes make
    the CPU encoders many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT with a word-level (fast) BertTokenizer, as a local model directory."""
    path = tmp_path_factory.mktemp("tiny_bert2")
    tokenizer = save_tiny_bert(path, [*WORDS, *EXTRA], num_hidden_layers=2, max_position_embeddings=64)
    assert tokenizer.is_fast and tokenizer("A: hi")["input_ids"] == [2, 19, 23, 25, 3]
    return path


@pytest.fixture(scope="module")
def bert(tiny_bert: Path):
    """(tokenizer, model) of :func:`tiny_bert`, for hand computations."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()


def text_params(model_dir: Path, **text):
    return parse_params({"text": {"model": str(model_dir), "max_length": 32, "batch_size": 4, **text}})


@pytest.fixture(scope="module")
def face_models():
    return load_face_models("random", 0.9, CPU)


@pytest.fixture
def cached_face_models(face_models, monkeypatch: pytest.MonkeyPatch):
    """The visual stage loads the module's face models instead of building them again (5 s each on a CPU).

    Valid for ``min_face_prob >= 0.7`` (MTCNN's last threshold is ``min(0.7, min_face_prob)``)."""
    monkeypatch.setattr(visual_features, "load_face_models", lambda weights, min_prob, device: face_models)
    return face_models


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, ffmpeg) -> dict[str, Path]:
    """Clips made here:

    * ``chirp16.wav`` / ``chirp44.wav``: 3 s of a chirp plus a tone, PCM at 16 / 44.1 kHz (no codec loss);
    * ``chirp16.m4a``: the same signal AAC-encoded at 16 kHz;
    * ``grey.mp4``: 1 s of a grey 64x48 picture (no face) with a 300 Hz tone;
    * ``long16.wav``: 10 s of 16 kHz noise (memory test).
    """
    out = tmp_path_factory.mktemp("scale_media")
    signal_expr = "0.5*sin(2*PI*(200+300*t)*t)+0.2*sin(2*PI*1234*t)"
    ffmpeg("-f", "lavfi", "-i", f"aevalsrc={signal_expr}:s=16000:d=3", "-c:a", "pcm_s16le", str(out / "chirp16.wav"))
    ffmpeg("-f", "lavfi", "-i", f"aevalsrc={signal_expr}:s=44100:d=3", "-c:a", "pcm_s16le", str(out / "chirp44.wav"))
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        f"aevalsrc={signal_expr}:s=16000:d=3",
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        str(out / "chirp16.m4a"),
    )
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=gray:s=64x48:r=10:d=1",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=300:sample_rate=16000:duration=1",
        "-pix_fmt",
        "yuv420p",
        "-c:v",
        "libx264",
        "-c:a",
        "aac",
        "-shortest",
        str(out / "grey.mp4"),
    )
    ffmpeg(
        "-f", "lavfi", "-i", "anoisesrc=d=10:c=white:r=16000:a=0.5:seed=1", "-c:a", "pcm_s16le", str(out / "long16.wav")
    )
    return {p.name: p for p in out.iterdir()}


# --- 1. resumability ------------------------------------------------------------------------------------------


def many_texts(n: int = 40, empty: tuple[int, ...] = (5, 17)) -> list[Utterance]:
    """``n`` utterances in dialogues of 4, random word sequences of 1-8 words; the rows in ``empty`` have no text."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        text = "" if i in empty else " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
        out.append(utt(f"train/dia{i // 4}_utt{i % 4}", text, "AB"[i % 2]))
    return out


def test_text_extraction_resumes_after_an_interrupt(tmp_path: Path, tiny_bert: Path, monkeypatch):
    # 40 utterances (rows 5 and 17 empty) in work units of 8 rows, batches of 4 inside a unit:
    # unit 0 encodes 7 texts (4 + 3), unit 1 8 (4 + 4), unit 2 7, units 3 and 4 8 each.
    utterances = many_texts()
    params = text_params(tiny_bert, batch_size=4, shard_size=8)
    cache_root, features = tmp_path / "cache", tmp_path / "features"
    monkeypatch.setattr(text_features, "ExtractionCache", functools.partial(ExtractionCache, flush_every=3))

    real_load, real_encode = text_features.load_text_encoder, text_features.encode_texts
    forwards = []

    def load_interrupted(spec, device, revision=None):
        tokenizer, model, info = real_load(spec, device, revision)

        def ctrl_c_after_five_batches(module, args, kwargs):
            forwards.append(kwargs["input_ids"].shape[0])
            if len(forwards) > 5:
                raise KeyboardInterrupt

        model.register_forward_pre_hook(ctrl_c_after_five_batches, with_kwargs=True)
        return tokenizer, model, info

    monkeypatch.setattr(text_features, "load_text_encoder", load_interrupted)
    with pytest.raises(KeyboardInterrupt):
        text_features.extract(utterances, params, features, cache_root)
    assert forwards == [4, 3, 4, 4, 4, 3]  # the 6th batch (unit 2's second) was interrupted before it ran
    assert not (features / "text.safetensors").exists() and not (features / "text_report.json").exists()
    # The driver stores whole units: the 2 empty texts, then units 0 and 1 (15 results) = 17 results,
    # in shards of 3 while running and the last one on the way out. Unit 2's first batch is lost.
    shards = shard_ids(cache_root / "text")
    assert [len(s) for s in shards] == [3] * 5 + [2]
    done = {u for s in shards for u in s}
    assert len(done) == 17 and {"train/dia1_utt1", "train/dia4_utt1"} <= done and "train/dia4_utt0" not in done

    monkeypatch.setattr(text_features, "load_text_encoder", real_load)
    encoded: list[int] = []

    def counting_encode(inputs, *args, **kwargs):
        encoded.append(len(inputs))
        return real_encode(inputs, *args, **kwargs)

    monkeypatch.setattr(text_features, "encode_texts", counting_encode)
    report = text_features.extract(utterances, params, features, cache_root)
    assert encoded == [7, 8, 8]  # only the unfinished units, each whole
    assert report["run"]["resumed_from_cache"] == 17 and report["run"]["encoded"] == 23
    resumed_bytes = (features / "text.safetensors").read_bytes()
    resumed = load_table(features / "text.safetensors")

    encoded.clear()
    fresh_report = text_features.extract(utterances, params, tmp_path / "fresh", tmp_path / "fresh_cache")
    assert encoded == [7, 8, 7, 8, 8] and fresh_report["run"]["resumed_from_cache"] == 0
    assert resumed.reasons.count("empty_text") == 2
    # The same bytes as an uninterrupted run: every batch held the same utterances.
    assert resumed_bytes == (tmp_path / "fresh" / "text.safetensors").read_bytes()


def test_visual_stage_killed_with_sigkill_resumes(
    stage_dir: Path, demo_root: Path, repo_root: Path, cached_face_models, caplog
):
    clips = sorted((demo_root / "train_splits").glob("*.mp4"))[:32]
    assert len(clips) == 32
    utterances = write_utterances([(f"train/dia{i}_utt0", "x", "A", clip) for i, clip in enumerate(clips)])
    (stage_dir / "params.yaml").write_text(
        "visual:\n  face_weights: random\n  max_frames: 1\n  fps: 2.0\n", encoding="utf-8"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(repo_root),
        "DGLBACKEND": "pytorch",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    log_path = stage_dir / "killed.log"
    shards = "data/interim/cache/visual/*/shard-*.safetensors"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.extract_visual",
                "--params",
                "params.yaml",
                "--utterances",
                str(UTTERANCES),
                "--out",
                str(FEATURES),
            ],
            cwd=stage_dir,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while not list(stage_dir.glob(shards)):  # visual flushes every 16 utterances
                assert proc.poll() is None, f"the stage ended before its first shard:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, "no shard after 240 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    assert not Path("data/features/visual.safetensors").exists()
    assert not Path("data/features/visual_report.json").exists()
    ids = [u.utterance_id for u in utterances]
    # One shard: the first 16 utterances (or fewer, when a slow machine reached flush_seconds first).
    shards = shard_ids(Path("data/interim/cache/visual"))
    assert len(shards) == 1 and 0 < len(shards[0]) <= 16 and shards[0] == ids[: len(shards[0])]
    done = len(shards[0])

    caplog.set_level(logging.INFO, logger="pipeline.extract_visual")
    returned = run_extraction_stage(extract_visual, load_params("params.yaml"))
    assert f"resumed: {done} of 32 utterances came from the cache" in caplog.text
    report = json.loads(Path("data/features/visual_report.json").read_text(encoding="utf-8"))
    assert returned["run"]["resumed_from_cache"] == done and report["utterances"] == 32
    assert set(report["per_clip"]) == set(ids)  # the diagnostics of resumed utterances came back from the shard
    assert report["per_clip"][ids[0]]["frames"] == 1
    table = load_table("data/features/visual.safetensors")
    assert table.utterance_ids == ids and set(table.reasons) <= {"ok", "no_face"}
    # A row written by the killed process equals the same utterance computed here.
    mtcnn, embedder, _ = cached_face_models
    settings = load_params("params.yaml").visual
    group = [sample_frames(clip, 2.0, 1) for clip in clips[: settings.clips_per_batch]]  # detected together
    embedding, _ = visual_features.embed_clips(group, mtcnn, embedder, settings, CPU)[0]
    assert table.reasons[0] == "ok" and torch.allclose(table.features[0], embedding, atol=1e-5)


def test_edited_text_reencodes_only_that_utterance(tmp_path: Path, tiny_bert: Path, bert, monkeypatch):
    utterances = many_texts(12, empty=())
    params = text_params(tiny_bert, shard_size=4)  # work units: rows 0-3, 4-7, 8-11
    encoded: list[str] = []
    real_encode = text_features.encode_texts

    def counting_encode(inputs, *args, **kwargs):
        encoded.extend(text for text, _ in inputs)
        return real_encode(inputs, *args, **kwargs)

    monkeypatch.setattr(text_features, "encode_texts", counting_encode)
    text_features.extract(utterances, params, tmp_path / "f", tmp_path / "c")
    before = load_table(tmp_path / "f" / "text.safetensors").features
    assert len(encoded) == 12

    encoded.clear()
    utterances[5] = utt(utterances[5].utterance_id, "love the train", utterances[5].speaker)
    report = text_features.extract(utterances, params, tmp_path / "f", tmp_path / "c")
    # Only the edited utterance's unit is encoded again, whole (its batches as in a fresh run).
    assert encoded == [utterances[i].text for i in range(4, 8)] and report["run"]["resumed_from_cache"] == 8
    after = load_table(tmp_path / "f" / "text.safetensors").features
    others = [i for i in range(12) if i not in range(4, 8)]
    assert torch.equal(after[others], before[others])
    assert torch.allclose(after[[4, 6, 7]], before[[4, 6, 7]], atol=1e-5)
    tokenizer, model = bert
    with torch.no_grad():
        reference = model(**tokenizer("love the train", return_tensors="pt")).last_hidden_state[0].mean(0)
    assert torch.allclose(after[5], reference, atol=1e-5) and not torch.allclose(after[5], before[5], atol=1e-3)

    # With dialogue context, an edit changes the input of the neighbours too: they are re-encoded.
    ctx = text_params(tiny_bert, context_window=1, shard_size=4)
    text_features.extract(utterances, ctx, tmp_path / "f", tmp_path / "c")
    encoded.clear()
    utterances[5] = utt(utterances[5].utterance_id, "the cat", utterances[5].speaker)  # dialogue 1: rows 4-7
    text_features.extract(utterances, ctx, tmp_path / "f", tmp_path / "c")
    # rows 4-6 changed input: their unit (rows 4-7) is encoded again
    assert encoded == [f"{utterances[i].speaker}: {utterances[i].text}" for i in range(4, 8)]
    assert utterances[5].text == "the cat"


def test_changed_text_params_use_a_new_cache_key(tmp_path: Path, tiny_bert: Path):
    utterances = many_texts(8, empty=())
    first = text_features.extract(utterances, text_params(tiny_bert, pooling="mean"), tmp_path / "f", tmp_path / "c")
    mean = load_table(tmp_path / "f" / "text.safetensors").features
    cls = text_features.extract(utterances, text_params(tiny_bert, pooling="cls"), tmp_path / "f", tmp_path / "c")
    first, cls = first["run"], cls["run"]
    assert cls["cache"] != first["cache"] and Path(cls["cache"]).parent == Path(first["cache"]).parent
    assert cls["resumed_from_cache"] == 0 and cls["encoded"] == 8
    assert not torch.allclose(load_table(tmp_path / "f" / "text.safetensors").features, mean, atol=1e-3)
    assert sorted(p.name for p in (tmp_path / "c" / "text").iterdir()) == sorted(
        [Path(first["cache"]).name, Path(cls["cache"]).name]
    )
    again = text_features.extract(utterances, text_params(tiny_bert, pooling="mean"), tmp_path / "f", tmp_path / "c")[
        "run"
    ]
    assert again["cache"] == first["cache"] and again["resumed_from_cache"] == 8 and again["encoded"] == 0
    assert torch.equal(load_table(tmp_path / "f" / "text.safetensors").features, mean)
    # runtime-only settings (batch size, CUDA dtype) keep the key: a smaller batch after an OOM resumes
    smaller = text_features.extract(
        utterances,
        text_params(tiny_bert, pooling="mean", batch_size=1, cuda_dtype="bfloat16"),
        tmp_path / "f",
        tmp_path / "c",
    )["run"]
    assert smaller["cache"] == first["cache"] and smaller["resumed_from_cache"] == 8


def copy_stage_code(stage: str, root: Path) -> Path:
    """Copy the ``pipeline/`` files that dvc.yaml lists for ``stage`` into ``root/pipeline/`` and write a
    ``root/dvc.yaml`` whose deps for ``stage`` are the copies; returns that dvc.yaml."""
    files = stage_code_files(stage)
    (root / "pipeline").mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, root / "pipeline" / f.name)
    deps = [f"pipeline/{f.name}" for f in files]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {stage: {"cmd": "-", "deps": deps}}}), encoding="utf-8")
    return root / "dvc.yaml"


def test_a_code_change_recomputes_every_utterance(tmp_path: Path, tiny_bert: Path, monkeypatch):
    utterances = many_texts(12, empty=(3,))
    params = text_params(tiny_bert)
    features, cache_root = tmp_path / "f", tmp_path / "c"
    encoded: list[int] = []
    real_encode = text_features.encode_texts

    def counting_encode(inputs, *args, **kwargs):
        encoded.append(len(inputs))
        return real_encode(inputs, *args, **kwargs)

    monkeypatch.setattr(text_features, "encode_texts", counting_encode)

    def run() -> dict:
        encoded.clear()
        return text_features.extract(utterances, params, features, cache_root)["run"]

    first = run()
    assert encoded == [11] and first["resumed_from_cache"] == 0
    reference = load_table(features / "text.safetensors").features
    # Nothing changed: everything resumes, the encoder is not called.
    again = run()
    assert encoded == [] and again["resumed_from_cache"] == 12 and again["cache"] == first["cache"]

    # The stage's code as dvc.yaml lists it, copied, keyed through a dvc.yaml listing the copies: same code,
    # same key, everything resumes.
    dvc_yaml = copy_stage_code("extract_text", tmp_path / "repo")
    assert code_fingerprint("extract_text", dvc_yaml) == code_fingerprint("extract_text")
    monkeypatch.setattr(
        text_features,
        "ExtractionCache",
        lambda *args, **kwargs: ExtractionCache(*args, code=code_fingerprint("extract_text", dvc_yaml), **kwargs),
    )
    copied = run()
    assert encoded == [] and copied["resumed_from_cache"] == 12 and copied["cache"] == first["cache"]

    # A one-line change of the stage's source (a code fix that happens to give the same numbers here):
    # a new key, and every utterance is computed again, the empty one included.
    source = tmp_path / "repo" / "pipeline" / "text_features.py"
    code = source.read_text(encoding="utf-8")
    line = "    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)\n"
    assert code.count(line) == 1
    source.write_text(code.replace(line, line.replace("clamp_min(1.0)", "clamp_min(1e-6)")), encoding="utf-8")
    assert code_fingerprint("extract_text", dvc_yaml) != code_fingerprint("extract_text")
    changed = run()
    assert changed["cache"] != first["cache"] and Path(changed["cache"]).parent == Path(first["cache"]).parent
    assert encoded == [11] and changed["resumed_from_cache"] == 0 and changed["encoded"] == 11
    table = load_table(features / "text.safetensors")
    assert table.reasons.count("empty_text") == 1 and torch.allclose(table.features, reference, atol=1e-6)
    assert run()["resumed_from_cache"] == 12 and encoded == []  # the changed code's results resume in turn

    # Any file the stage lists counts, not only its own module.
    fingerprint = code_fingerprint("extract_text", dvc_yaml)
    reports = tmp_path / "repo" / "pipeline" / "reports.py"
    reports.write_text(reports.read_text(encoding="utf-8").replace("NOT_LOST = ", "NOT_LOST  = ", 1), encoding="utf-8")
    assert code_fingerprint("extract_text", dvc_yaml) != fingerprint


def test_new_weights_recompute_every_utterance(tmp_path: Path, tiny_bert: Path):
    from transformers import AutoModel

    model_dir = tmp_path / "bert"
    shutil.copytree(tiny_bert, model_dir)
    utterances = many_texts(8, empty=())
    params = text_params(model_dir)
    first = text_features.extract(utterances, params, tmp_path / "f", tmp_path / "c")
    before = load_table(tmp_path / "f" / "text.safetensors").features
    again = text_features.extract(utterances, params, tmp_path / "f", tmp_path / "c")
    assert again["run"]["resumed_from_cache"] == 8 and again["encoder"]["weights_id"] == first["encoder"]["weights_id"]

    # Other weights in the same directory (text.* unchanged): another weights_id, so a new key.
    model = AutoModel.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(model_dir)
    changed = text_features.extract(utterances, params, tmp_path / "f", tmp_path / "c")
    assert changed["encoder"]["weights_id"] != first["encoder"]["weights_id"]
    assert changed["run"]["cache"] != first["run"]["cache"]
    assert changed["run"]["resumed_from_cache"] == 0 and changed["run"]["encoded"] == 8
    assert not torch.allclose(load_table(tmp_path / "f" / "text.safetensors").features, before, atol=1e-3)


def test_replaced_clip_is_extracted_again(tmp_path: Path, demo_root: Path, monkeypatch):
    train = demo_root / "train_splits"
    clips = []
    for name in ("dia0_utt0", "dia0_utt1", "dia0_utt2"):
        clips.append(tmp_path / f"{name}.mp4")
        shutil.copyfile(train / f"{name}.mp4", clips[-1])
    utterances = [utt(f"train/dia0_utt{i}", clip=clip) for i, clip in enumerate(clips)]
    params = parse_params({"audio": {"random_init": TINY_AUDIO, "shard_size": 1}})  # a unit per utterance
    decoded: list[str] = []
    real_load = audio_features.load_audio

    def counting_load(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(audio_features, "load_audio", counting_load)

    def run() -> tuple[dict, torch.Tensor]:
        decoded.clear()
        report = audio_features.extract(utterances, params, tmp_path / "f", tmp_path / "c")
        return report["run"], load_table(tmp_path / "f" / "audio.safetensors").features

    report, before = run()
    assert decoded == ["dia0_utt0.mp4", "dia0_utt1.mp4", "dia0_utt2.mp4"] and report["resumed_from_cache"] == 0
    report, same = run()
    assert decoded == [] and report["resumed_from_cache"] == 3 and torch.equal(same, before)

    # Another file under the same name (another size): only that utterance is redone.
    assert clips[1].stat().st_size != clips[2].stat().st_size
    shutil.copyfile(clips[2], clips[1])
    report, after = run()
    assert decoded == ["dia0_utt1.mp4"] and report["resumed_from_cache"] == 2
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    assert torch.allclose(after[1], before[2], atol=1e-5) and not torch.allclose(after[1], before[1], atol=1e-3)

    # Same size, new modification time (rewritten in place): redone, same features.
    stat = clips[0].stat()
    os.utime(clips[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    report, touched = run()
    assert decoded == ["dia0_utt0.mp4"] and report["resumed_from_cache"] == 2
    assert torch.allclose(touched, after, atol=1e-6)


# --- 2. text: layers and dialogue context ---------------------------------------------------------------------


def test_last_k_layers_is_the_mean_of_the_last_hidden_layers(tmp_path: Path, tiny_bert: Path, bert):
    utterances = [
        utt("train/dia0_utt0", "i am happy"),
        utt("train/dia0_utt1", "hate this cat dog", "B"),
        utt("train/dia1_utt0", "so sad"),
    ]
    report = text_features.extract(utterances, text_params(tiny_bert, last_k_layers=2), tmp_path, tmp_path / "c")
    table = load_table(tmp_path / "text.safetensors")
    assert table.info["last_k_layers"] == 2 and report["encoder"]["last_k_layers"] == 2
    tokenizer, model = bert
    for row, u in enumerate(utterances):
        with torch.no_grad():
            states = model(**tokenizer(u.text, return_tensors="pt"), output_hidden_states=True).hidden_states
        assert len(states) == 3  # embeddings + 2 layers
        expected = ((states[1][0] + states[2][0]) / 2).mean(0)
        assert torch.allclose(table.features[row], expected, atol=1e-5)
        assert not torch.allclose(table.features[row], states[2][0].mean(0), atol=1e-3)

    with pytest.raises(ValueError, match="last_k_layers=3 but the encoder has 2 layers"):
        text_features.extract(utterances, text_params(tiny_bert, last_k_layers=3), tmp_path / "x", tmp_path / "cx")
    assert not (tmp_path / "x" / "text.safetensors").exists()


DIALOGUES = [
    utt("train/dia0_utt0", "hi", "A"),
    utt("train/dia0_utt1", "there", "B"),
    utt("train/dia0_utt2", "ok", "A"),
    utt("train/dia1_utt0", "alone", "C"),
]


def test_encoder_inputs_with_dialogue_context():
    assert text_features.encoder_inputs(DIALOGUES, 0) == [("hi", None), ("there", None), ("ok", None), ("alone", None)]
    assert text_features.encoder_inputs(DIALOGUES, 1) == [
        ("A: hi", "B: there"),
        ("B: there", "A: hi | A: ok"),  # the past before the future
        ("A: ok", "B: there"),
        ("C: alone", None),  # alone in its dialogue: no context
    ]
    assert text_features.encoder_inputs(DIALOGUES, 2)[0] == ("A: hi", "B: there | A: ok")
    # Dialogues are grouped by id, not by adjacency in the table.
    shuffled = [DIALOGUES[0], DIALOGUES[3], DIALOGUES[1]]
    assert text_features.encoder_inputs(shuffled, 1) == [
        ("A: hi", "B: there"),
        ("C: alone", None),
        ("B: there", "A: hi"),
    ]
    # An empty neighbour contributes nothing; with no other neighbour the context is None.
    with_empty = [utt("dev/dia0_utt0", "", "A"), utt("dev/dia0_utt1", "you", "B")]
    assert text_features.encoder_inputs(with_empty, 1) == [("A: ", "B: you"), ("B: you", None)]


def test_context_skips_over_empty_neighbours():
    rows = [utt("dev/dia0_utt0", "hi", "A"), utt("dev/dia0_utt1", "", "B"), utt("dev/dia0_utt2", "ok", "C")]
    assert text_features.encoder_inputs(rows, 1)[2] == ("C: ok", "A: hi")


def test_context_mean_pools_only_the_utterance_tokens(tmp_path: Path, tiny_bert: Path, bert):
    text_features.extract(
        DIALOGUES[:3], text_params(tiny_bert, context_window=1, batch_size=8), tmp_path / "ctx", tmp_path / "c"
    )
    with_context = load_table(tmp_path / "ctx" / "text.safetensors")
    assert with_context.info["context_window"] == 1
    text_features.extract(DIALOGUES[:3], text_params(tiny_bert, batch_size=8), tmp_path / "plain", tmp_path / "c")
    plain = load_table(tmp_path / "plain" / "text.safetensors")
    tokenizer, model = bert
    for row, (text, context) in enumerate(text_features.encoder_inputs(DIALOGUES[:3], 1)):
        batch = tokenizer(text, context or "", truncation="longest_first", max_length=32, return_tensors="pt")
        own = torch.tensor([s == 0 for s in batch.sequence_ids(0)])
        # the utterance's own tokens: "a", ":", its word; not [CLS], the [SEP]s or the context
        assert int(own.sum()) == len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 3
        with torch.no_grad():
            states = model(**batch).last_hidden_state[0]
        assert torch.allclose(with_context.features[row], states[own].mean(0), atol=1e-5)
        assert not torch.allclose(with_context.features[row], states.mean(0), atol=1e-3)
        assert not torch.allclose(with_context.features[row], plain.features[row], atol=1e-3)


def test_context_features_of_a_lone_utterance_do_not_depend_on_the_batch(tmp_path: Path, tiny_bert: Path):
    alone = {}
    for batch_size in (1, 8):
        report = text_features.extract(
            DIALOGUES,
            text_params(tiny_bert, context_window=1, batch_size=batch_size),
            tmp_path / f"b{batch_size}",
            tmp_path / f"c{batch_size}",
        )
        assert report["run"]["encoded"] == len(DIALOGUES)  # separate caches: both really encode
        alone[batch_size] = load_table(tmp_path / f"b{batch_size}" / "text.safetensors").features
    assert torch.allclose(alone[1][:3], alone[8][:3], atol=1e-5)  # utterances with context agree
    assert torch.allclose(alone[1][3], alone[8][3], atol=1e-5), (alone[1][3] - alone[8][3]).abs().max()


def test_context_with_an_utterance_longer_than_max_length(tmp_path: Path, tiny_bert: Path):
    rows = [utt("train/dia0_utt0", " ".join(WORDS), "A"), utt("train/dia0_utt1", "hi", "B")]
    params = text_params(tiny_bert, context_window=1, max_length=8)
    report = text_features.extract(rows, params, tmp_path, tmp_path / "c")
    assert report["reasons"] == {"ok": 2}


# --- 3. audio -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, edge", [("chirp16.wav", 0), ("chirp44.wav", 8)])
def test_load_audio_segment_is_the_slice_of_the_full_decode(media: dict[str, Path], name: str, edge: int):
    full = load_audio(media[name])
    assert abs(full.numel() - 48000) <= 2
    for start, end in [(0.5, 1.5), (0.73, 2.41), (1.2, None), (2.0, 9.0), (None, 0.8)]:
        segment = load_audio(media[name], start=start, end=end)
        a = int(round((start or 0) * 16000))
        b = full.numel() if end is None else min(full.numel(), int(round(end * 16000)))
        assert abs(segment.numel() - (b - a)) <= 1, (start, end, segment.numel(), b - a)
        n = min(segment.numel(), b - a)
        inner = slice(edge, n - edge)  # resampling a segment differs from the full decode in a few edge samples
        assert torch.allclose(segment[:n][inner], full[a : a + n][inner], atol=1e-4), (start, end)
        if edge == 0:
            assert torch.equal(segment[:n], full[a : a + n])


def test_load_audio_aac_segment_is_the_slice_of_the_full_decode(media: dict[str, Path]):
    full = load_audio(media["chirp16.m4a"])
    for start, end in [(0.5, 1.5), (1.0, 2.0), (2.5, None)]:
        segment = load_audio(media["chirp16.m4a"], start=start, end=end)
        a = int(start * 16000)
        reference = full[a : a + segment.numel()]
        assert segment.numel() == reference.numel()
        assert torch.allclose(segment[4:-4], reference[4:-4], atol=1e-3), (start, (segment - reference).abs().max())


def test_load_audio_segment_past_the_end_is_no_audio(media: dict[str, Path], clips: dict[str, Path]):
    for path in (media["chirp16.wav"], clips["stereo44k"]):
        with pytest.raises(MediaError) as err:
            load_audio(path, start=5.0, end=6.0)
        assert err.value.reason == "no_audio" and "[5.0, 6.0]" in str(err.value)


def hand_encoded(waves: list[torch.Tensor], config: dict) -> torch.Tensor:
    """Each wave encoded alone (its own normalisation), hidden states averaged over all frames of all waves."""
    extractor, model, _ = load_audio_encoder("unused", config, CPU)
    total, frames = torch.zeros(config["hidden_size"]), 0
    with torch.no_grad():
        for wave in waves:
            values = extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt")["input_values"]
            states = model(values).last_hidden_state[0]
            total += states.sum(0)
            frames += states.shape[0]
    return total / frames


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_long_audio_is_chunked_and_frame_weighted(tmp_path: Path, clips: dict[str, Path], norm: str):
    config = {**TINY_AUDIO, "feat_extract_norm": norm}
    clip = clips["stereo44k"]  # 1.5 s
    wave = load_audio(clip)
    assert abs(wave.numel() - 24000) <= 16
    rows = [utt("train/dia0_utt0", clip=clip), utt("train/dia1_utt0", clip=clips["loud_stereo"])]  # 1.5 s, 1.0 s
    params = parse_params({"audio": {"random_init": config, "chunk_seconds": 0.4, "batch_size": 8}})
    report = audio_features.extract(rows, params, tmp_path / "f", tmp_path / "c")
    chunks = list(wave.split(6400))
    assert [c.numel() for c in chunks[:3]] == [6400] * 3 and len(chunks) == 4
    assert report["chunked"] == {"train/dia0_utt0": 4, "train/dia1_utt0": 3}
    table = load_table(tmp_path / "f" / "audio.safetensors")
    expected = hand_encoded(chunks, config)
    assert torch.allclose(table.features[0], expected, atol=1e-5), (table.features[0] - expected).abs().max()
    assert not torch.allclose(table.features[0], hand_encoded([wave], config), atol=1e-3)
    assert torch.allclose(
        table.features[1], hand_encoded(list(load_audio(clips["loud_stereo"]).split(6400)), config), atol=1e-5
    )

    # A tail shorter than the encoder's receptive field (400 samples) is dropped.
    chunk = 7875  # 0.4921875 s (exact in binary)
    assert 0 < wave.numel() - 3 * chunk < 400
    params = parse_params({"audio": {"random_init": config, "chunk_seconds": 0.4921875}})
    report = audio_features.extract(rows[:1], params, tmp_path / "g", tmp_path / "c")
    assert report["chunked"] == {"train/dia0_utt0": 3}
    assert torch.allclose(
        load_table(tmp_path / "g" / "audio.safetensors").features[0],
        hand_encoded(list(wave.split(chunk))[:3], config),
        atol=1e-5,
    )


def test_max_seconds_caps_the_audio(tmp_path: Path, demo_root: Path):
    clip = demo_root / "train_splits" / "dia0_utt0.mp4"  # 2.54 s
    params = parse_params({"audio": {"random_init": TINY_AUDIO, "max_seconds": 1.0, "chunk_seconds": 0.4}})
    report = audio_features.extract([utt("train/dia0_utt0", clip=clip)], params, tmp_path, tmp_path / "c")
    assert report["run"]["audio_seconds_decoded"] == 1.0
    assert report["chunked"] == {"train/dia0_utt0": 3}  # 0.4 + 0.4 + 0.2 s
    first_second = load_audio(clip)[:16000]
    assert torch.allclose(
        load_table(tmp_path / "audio.safetensors").features[0],
        hand_encoded(list(first_second.split(6400)), TINY_AUDIO),
        atol=1e-5,
    )


def test_opensmile_functionals(tmp_path: Path, demo_root: Path, clips: dict[str, Path]):
    pytest.importorskip("opensmile")
    rows = [
        utt("train/dia0_utt0", clip=demo_root / "train_splits" / "dia0_utt0.mp4"),
        utt("train/dia0_utt1", clip=clips["stereo44k"]),
        utt("train/dia0_utt2", clip=clips["short_audio"]),  # 15 ms: too short for the functionals
        utt("train/dia5_utt0", clip=demo_root / "train_splits" / "dia5_utt0.mp4"),
    ]  # no audio stream
    params = parse_params({"audio": {"backend": "opensmile", "opensmile_set": "eGeMAPSv02"}})
    with pytest.warns(UserWarning, match="too short"):
        report = audio_features.extract(rows, params, tmp_path / "e", tmp_path / "c")
    table = load_table(tmp_path / "e" / "audio.safetensors")
    assert table.dim == 88 and report["dim"] == 88
    assert table.reasons == ["ok", "ok", "no_audio", "no_audio"]
    assert torch.isfinite(table.features).all() and torch.count_nonzero(table.features[2:]) == 0
    assert not torch.allclose(table.features[0], table.features[1])
    assert report["masked"] == {"no_audio": ["train/dia0_utt2", "train/dia5_utt0"]}
    assert report["encoder"]["model"] == "opensmile eGeMAPSv02 functionals"

    params = parse_params({"audio": {"backend": "opensmile", "opensmile_set": "IS10"}})
    report = audio_features.extract(rows[:1], params, tmp_path / "i", tmp_path / "c")
    table = load_table(tmp_path / "i" / "audio.safetensors")
    assert table.features.shape == (1, 1582) and report["reasons"] == {"ok": 1}
    assert torch.isfinite(table.features).all()


# --- 4. visual ------------------------------------------------------------------------------------------------


def track(boxes, probs, select, min_prob=0.9, size=(100, 100)):
    boxes = [None if b is None else np.array(b, dtype=float) for b in boxes]
    probs = [None if p is None else np.array(p, dtype=float) for p in probs]
    return visual_features.face_track(boxes, probs, size, select, min_prob)


# Frame 0 has a large face (A), a central one (B), a confident one (C), and a huge one below min_prob (D);
# frame 1 lists A, B, C moved a little and in another order; frame 2 has no detection; in frame 3 A drops
# below min_prob.
BOXES = [
    [[0, 0, 40, 40], [45, 45, 55, 55], [70, 70, 90, 90], [0, 50, 100, 100]],
    [[46, 46, 56, 56], [71, 70, 91, 90], [2, 1, 42, 41]],
    None,
    [[4, 2, 44, 42], [72, 71, 92, 91], [47, 47, 57, 57]],
]
PROBS = [[0.95, 0.92, 0.999, 0.5], [0.93, 0.99, 0.96], None, [0.5, 0.99, 0.95]]


def test_face_track_start_selection_and_following():
    assert track(BOXES, PROBS, "largest") == [0, 2, None, 2]  # A, A, -, then the face nearest to A (B)
    assert track(BOXES, PROBS, "confident") == [2, 1, None, 1]  # C throughout
    assert track(BOXES, PROBS, "central") == [1, 0, None, 2]  # B throughout
    # D only counts once min_prob lets it in: it is then the largest.
    assert track(BOXES, PROBS, "largest", min_prob=0.4) == [3, 0, None, 2]
    assert track(BOXES, [[0.8] * 4, [0.8] * 3, None, [0.8] * 3], "largest") == [None] * 4
    assert track([None, None], [None, None], "central") == [None, None]
    # "central" measures against the frame's own centre.
    assert track(BOXES[:1], PROBS[:1], "central", size=(40, 40)) == [0]


def test_face_track_starts_anywhere_and_follows_both_ways():
    x, y = [0, 0, 20, 20], [60, 60, 80, 80]
    boxes = [
        [x, y],
        [[61, 61, 81, 81], [1, 1, 21, 21]],
        [[0, 0, 30, 30], [62, 62, 82, 82]],
        [[63, 63, 83, 83], [2, 2, 22, 22]],
        [[64, 64, 84, 84]],
    ]
    probs = [[0.99, 0.99], [0.99, 0.99], [0.99, 0.99], [0.99, 0.99], [0.99]]
    # The largest face is X in frame 2: the track runs back to frame 0 and on to frame 4 following X,
    # and takes Y in frame 4 where X is gone.
    assert track(boxes, probs, "largest") == [0, 1, 0, 1, 0]
    # The most central face is Y (frame 0 and on): the track follows Y.
    assert track(boxes, probs, "central", size=(140, 140)) == [1, 0, 1, 0, 0]


RAMP_LUMA_STEP = 8 * 255 / 219  # the ramp's luma 8n in limited range -> RGB brightness about 9.3 (n - 2)


def ramp_indices(frames: list[np.ndarray]) -> list[int]:
    """The ramp clip's frame numbers, read back from their brightness (valid from frame 3 on)."""
    return [int(round(float(f.mean()) / RAMP_LUMA_STEP)) + 2 for f in frames]


@pytest.mark.parametrize(
    "start, end, fps, max_frames, expected",
    [
        (1.0, 2.0, 10.0, 100, list(range(10, 20))),
        (1.0, 2.5, 2.0, 100, [10, 15, 20]),
        (1.0, 2.0, 10.0, 2, [10, 19]),  # spread over the whole segment
        (0.5, 1.2, 10.0, 100, list(range(5, 12))),
        (2.0, None, 10.0, 100, list(range(20, 30))),
        (2.5, 9.0, 10.0, 100, list(range(25, 30))),  # a segment running past the end of the clip
    ],
)
def test_sample_frames_reads_only_the_segment(clips: dict[str, Path], start, end, fps, max_frames, expected):
    assert ramp_indices(sample_frames(clips["ramp"], fps=100.0, max_frames=100))[3:] == list(range(3, 30))
    frames = sample_frames(clips["ramp"], fps, max_frames, start, end)
    assert ramp_indices(frames) == expected


def test_bad_media_are_masked_with_their_reason_and_never_raise(
    stage_dir: Path, demo_root: Path, clips, bad_clips, media, cached_face_models, monkeypatch
):
    cases = [  # (clip, audio reasons, visual reason)
        (bad_clips["empty"], {"corrupt"}, "corrupt"),
        (bad_clips["random"], {"corrupt"}, "corrupt"),
        (bad_clips["truncated"], {"truncated"}, "truncated"),  # header intact, packets gone
        (demo_root / "train_splits" / "dia5_utt0.mp4", {"no_audio"}, "ok"),  # a face, no audio stream
        (media["grey.mp4"], {"ok"}, "no_face"),
        (clips["ramp"], {"no_audio"}, "no_face"),  # video only
        (clips["stereo44k"], {"ok"}, "no_video"),  # audio only
        (clips["short_audio"], {"no_audio"}, "no_video"),  # 15 ms of audio, audio only
        (stage_dir / "deleted.mp4", {"missing_clip"}, "missing_clip"),  # listed, then removed
        ("", {"missing_clip"}, "missing_clip"),
    ]
    write_utterances([(f"test/dia{i}_utt0", "x", "A", clip) for i, (clip, _, _) in enumerate(cases)])
    # most of these clips lose a modality on purpose: the stages' modality guard is lifted here
    params = parse_params(
        {
            "audio": {"random_init": TINY_AUDIO, "max_masked_share": 1.0},
            "visual": {"face_weights": "random", "max_frames": 2, "fps": 2.0, "max_masked_share": 1.0},
        }
    )
    trims = []
    monkeypatch.setattr(visual_features, "TRIM_EVERY", 3)
    monkeypatch.setattr(visual_features, "trim_heap", lambda: trims.append(1))
    tables = {}
    for background in (False, True):  # decoding in the caller's thread, then in a decoding thread
        for module in (audio_features, visual_features):
            monkeypatch.setattr(
                module, "decode_depth", lambda device, depth, background=background: depth if background else 0
            )
        shutil.rmtree("data/interim", ignore_errors=True)  # nothing resumed
        extract_audio.run(params, utterances=UTTERANCES, out=FEATURES)
        extract_visual.run(params, utterances=UTTERANCES, out=FEATURES)
        tables[background] = [load_table(f"data/features/{m}.safetensors") for m in ("audio", "visual")]
    assert len(trims) == 2 * 3  # the heap trimmed every 3rd of the 9 clips decoded, in each run
    for inline, threaded in zip(tables[False], tables[True]):
        assert inline.reasons == threaded.reasons and torch.equal(inline.features, threaded.features)
    audio, visual = tables[True]
    for i, (clip, audio_reasons, visual_reason) in enumerate(cases):
        assert audio.reasons[i] in audio_reasons, (clip, audio.reasons[i])
        assert visual.reasons[i] == visual_reason, (clip, visual.reasons[i])
    for table in (audio, visual):
        assert table.mask.tolist() == [r == "ok" for r in table.reasons]
        assert torch.count_nonzero(table.features[~table.mask]) == 0
        assert torch.isfinite(table.features).all() and (table.features[table.mask].abs().sum(1) > 0).all()
    visual_report = read_report(Path("data/features"), "visual")
    assert visual_report["masked"]["no_video"] == ["test/dia6_utt0", "test/dia7_utt0"]
    assert visual_report["per_clip"]["test/dia4_utt0"]["faces_per_frame"] == [0, 0]


def test_face_selection_on_a_real_group_photo(shared_dir: Path, face_models):
    from PIL import Image

    path = shared_dir / "media" / "faces" / "multi_face.jpg"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    image = np.asarray(Image.open(path).convert("RGB"))
    mtcnn, embedder, _ = face_models
    boxes, probs = mtcnn.detect([image])
    boxes, probs = np.asarray(boxes[0], dtype=float), np.asarray(probs[0], dtype=float)
    assert len(boxes) >= 3 and (probs >= 0.9).sum() >= 3
    height, width = image.shape[:2]
    usable = probs >= 0.9
    areas = np.where(usable, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), -np.inf)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    distances = np.where(usable, np.linalg.norm(centres - [width / 2, height / 2], axis=1), np.inf)
    largest, central = int(np.argmax(areas)), int(np.argmin(distances))
    assert largest != central
    for select, expected in (("largest", largest), ("central", central)):
        tracked = visual_features.face_track([boxes, boxes], [probs, probs], (width, height), select, 0.9)
        assert tracked == [expected] * 2

    # Through embed_faces: the embedding is the chosen face's, and the two choices differ.
    settings = parse_params({"visual": {"face_weights": "random"}}).visual
    embeddings = {}
    for select, expected in (("largest", largest), ("central", central)):
        embeddings[select], diagnostics = visual_features.embed_faces(
            [image], mtcnn, embedder, settings.model_copy(update={"face_select": select}), CPU
        )
        assert diagnostics == {"frames": 1, "faces_per_frame": [int(usable.sum())], "frames_tracked": 1}
        with torch.no_grad():
            crop = mtcnn.extract(image, boxes[[expected]], None)
            assert torch.allclose(embeddings[select], embedder(crop)[0], atol=1e-5)
    # (random embedder weights: different faces give embeddings that differ, but only by about 1e-3)
    assert (embeddings["largest"] - embeddings["central"]).abs().max() > 1e-4


# --- 5. memory ------------------------------------------------------------------------------------------------


def malloc_in_use():
    """A function returning the bytes (MiB) glibc's malloc has handed out and not got back (all arenas and
    mmapped blocks: torch's CPU tensors and numpy's arrays), or None where glibc's ``mallinfo2`` is missing.
    Unlike the resident size, it does not hide new allocations that reuse memory freed earlier."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2

    def in_use() -> float:
        info = mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20

    return in_use


def test_audio_memory_does_not_grow_with_the_corpus(tmp_path: Path, media: dict[str, Path], monkeypatch):
    """200 utterances of a 10 s clip (625 KiB of float32 each at 16 kHz): if the stage kept the decoded
    waves, the heap would grow by about 120 MiB; it must stay flat. The encoder is replaced by a stub
    (the point is what the stage holds, not the model); a control run that does keep the waves shows
    that the measurement sees such growth."""
    in_use = malloc_in_use()
    if in_use is None:
        pytest.skip("needs glibc's mallinfo2 to measure the heap")
    clip = media["long16.wav"]
    params = parse_params({"audio": {"random_init": {**TINY_AUDIO, "feat_extract_norm": "layer"}, "batch_size": 8}})
    monkeypatch.setattr(
        audio_features,
        "encode_waves",
        lambda waves, *args: (torch.stack([w[:16].float() for w in waves]), torch.ones(len(waves))),
    )
    peak = [0.0]
    real_load = audio_features.load_audio

    def measuring_load(*args, **kwargs):
        peak[0] = max(peak[0], in_use())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(audio_features, "load_audio", measuring_load)

    def growth(n: int, tag: str) -> float:
        rows = [utt(f"train/dia{i}_utt0", clip=clip) for i in range(n)]
        base = peak[0] = in_use()
        report = audio_features.extract(rows, params, tmp_path / tag, tmp_path / f"cache_{tag}")
        assert report["reasons"] == {"ok": n} and abs(report["run"]["audio_seconds_decoded"] - 10.0 * n) < 0.1
        return max(peak[0], in_use()) - base

    growth(20, "warm")  # first use: allocator arenas, model, codecs
    small, large = growth(20, "small"), growth(200, "large")
    assert large < small + 16, (small, large)

    kept = []
    monkeypatch.setattr(audio_features, "load_audio", lambda *a, **k: kept.append(measuring_load(*a, **k)) or kept[-1])
    leaking = growth(200, "control")
    assert leaking > large + 100, (large, leaking)
    kept.clear()


# --- face detection across clips -----------------------------------------------------------------------------


def test_detection_groups_follow_the_table_rows():
    # Groups are row // clips_per_batch, whatever rows a unit holds (rows without a clip are absent).
    assert visual_features.detection_groups([0, 1, 2, 3, 4, 5, 6, 7], 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert visual_features.detection_groups([1, 2, 4, 6], 3) == [[1, 2], [4], [6]]
    assert visual_features.detection_groups([], 3) == []
    with pytest.raises(ValueError, match="clips_per_batch"):
        visual_features.detection_groups([0], 0)


def test_embed_clips_batches_frames_of_several_clips_and_sizes(face_models, demo_root: Path):
    import cv2

    face = sample_frames(demo_root / "train_splits" / "dia0_utt0.mp4", 2.0, 1)[0]
    blank = sample_frames(demo_root / "output_repeated_splits_test" / "dia1_utt2.mp4", 2.0, 1)[0]
    small = cv2.resize(face, (face.shape[1] * 3 // 4, face.shape[0] * 3 // 4))  # another frame size
    clips = [[face, blank], [blank], [small, small], [], [face]]
    mtcnn, embedder, _ = face_models
    settings = parse_params({"visual": {"face_weights": "random", "batch_frames": 4}}).visual
    calls = []

    def counting_detect(frames):
        calls.append({f.shape for f in frames})
        return real_detect(frames)

    real_detect, mtcnn.detect = mtcnn.detect, counting_detect
    try:
        together = visual_features.embed_clips(clips, mtcnn, embedder, settings, CPU)
        alone = [visual_features.embed_faces(frames, mtcnn, embedder, settings, CPU) for frames in clips if frames]
    finally:
        mtcnn.detect = real_detect
    # One MTCNN batch per frame size for the five clips (4 full-size frames, 2 small), one size per batch.
    assert len(calls[0]) == 1 and len(calls[1]) == 1 and calls[0] != calls[1]
    assert [d["frames_tracked"] for _, d in together] == [1, 0, 2, 0, 1]
    assert together[1][0] is None and together[3] == (None, {"frames": 0, "faces_per_frame": [], "frames_tracked": 0})
    for (emb, diag), (emb_alone, diag_alone) in zip([together[i] for i in (0, 1, 2, 4)], alone):
        assert diag == diag_alone
        assert (emb is None) == (emb_alone is None)
        if emb is not None:
            assert emb.shape == (512,) and torch.allclose(emb, emb_alone, atol=1e-4)
    assert torch.equal(together[0][0], together[4][0])  # the same face in the same batch


def test_interrupted_visual_extraction_resumes_with_the_same_batches(
    tmp_path: Path, demo_root: Path, cached_face_models, monkeypatch
):
    clips = sorted((demo_root / "train_splits").glob("*.mp4"))[:8]
    utterances = [
        Utterance(f"train/dia{i}_utt0", "train", f"train/{i}", 0, "A", "x", "neutral", "neutral", str(c))
        for i, c in enumerate(clips)
    ]
    # work units of 4 rows rounded up to whole detection groups of 3: rows 0-5 and 6-7
    params = parse_params(
        {"visual": {"face_weights": "random", "max_frames": 2, "clips_per_batch": 3, "shard_size": 4}}
    )
    groups: list[int] = []
    real_embed_clips = visual_features.embed_clips

    def spy(clips, *args, **kwargs):
        groups.append(len(clips))
        return real_embed_clips(clips, *args, **kwargs)

    monkeypatch.setattr(visual_features, "embed_clips", spy)
    visual_features.extract(utterances, params, tmp_path / "whole", tmp_path / "whole_cache")
    assert groups == [3, 3, 2]
    whole = (tmp_path / "whole" / "visual.safetensors").read_bytes()

    def interrupted_then_resumed(name: str, die_at: int) -> dict:
        real_put, puts = ExtractionCache.put, []

        def put_then_die(self, *args, **kwargs):
            real_put(self, *args, **kwargs)
            puts.append(args[0])
            if len(puts) == die_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(ExtractionCache, "put", put_then_die)
        with pytest.raises(KeyboardInterrupt):
            visual_features.extract(utterances, params, tmp_path / name, tmp_path / f"{name}_cache")
        monkeypatch.setattr(ExtractionCache, "put", real_put)
        groups.clear()
        report = visual_features.extract(utterances, params, tmp_path / name, tmp_path / f"{name}_cache")
        assert (tmp_path / name / "visual.safetensors").read_bytes() == whole  # the same bytes
        return report

    # Rows 0-4 cached: row 5's unit (rows 0-5) is recomputed whole, in the same groups; then rows 6-7.
    assert interrupted_then_resumed("mid_unit", 5)["run"]["resumed_from_cache"] == 0 and groups == [3, 3, 2]
    # Unit 0 finished and one row of unit 1: only unit 1 runs again.
    assert interrupted_then_resumed("after_unit", 7)["run"]["resumed_from_cache"] == 6 and groups == [2]
