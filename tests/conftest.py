"""Shared fixtures: repository paths, the real-data folder, offline settings, tiny MELD releases,
test clips written with imageio-ffmpeg's ffmpeg binary, and a helper to write utterance tables."""

from __future__ import annotations

import csv
import io
import os
import subprocess
from pathlib import Path

# Nothing may be downloaded: set before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DGLBACKEND", "pytorch")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
DEMO = REPO / "data" / "raw" / "demo"

MELD_CSVS = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
MELD_CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
MELD_HEADER = [
    "Sr No.",
    "Utterance",
    "Speaker",
    "Emotion",
    "Sentiment",
    "Dialogue_ID",
    "Utterance_ID",
    "Season",
    "Episode",
    "StartTime",
    "EndTime",
]


# A one-layer 16-d wav2vec2 (a few thousand parameters): audio.random_init for tests (no download).
TINY_AUDIO = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "conv_dim": [8] * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (real data); tests using it skip cleanly when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real data for development only)")
    return SHARED


@pytest.fixture(scope="session")
def meld_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "meld"
    if not all((path / name).is_file() for name in MELD_CSVS.values()):
        pytest.skip(f"{path} does not hold MELD's three CSVs")
    return path


@pytest.fixture(scope="session")
def demo_root() -> Path:
    if not (DEMO / "train_sent_emo.csv").is_file():
        pytest.skip(f"{DEMO}: bundled demo data not found")
    return DEMO


def row(
    d: int,
    u: int,
    text: str = "Hello there.",
    speaker: str = "Ross",
    emotion: str = "neutral",
    sentiment: str = "neutral",
) -> dict:
    """One MELD CSV row (the columns prepare needs; the rest filled like the real release)."""
    return {
        "Utterance": text,
        "Speaker": speaker,
        "Emotion": emotion,
        "Sentiment": sentiment,
        "Dialogue_ID": d,
        "Utterance_ID": u,
        "Season": 1,
        "Episode": 1,
        "StartTime": "00:00:00,000",
        "EndTime": "00:00:01,000",
    }


def meld_csv_bytes(rows: list[dict], header: list[str] | None = None, line_end: str = "\r\n") -> bytes:
    """A MELD split CSV as UTF-8 bytes (CRLF line ends, as the real release)."""
    header = header or MELD_HEADER
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, header, lineterminator=line_end, extrasaction="ignore")
    writer.writeheader()
    for i, r in enumerate(rows, start=1):
        writer.writerow({"Sr No.": i, **r})
    return buf.getvalue().encode("utf-8")


def write_meld(
    root: Path,
    splits: dict[str, list[dict]] | None = None,
    *,
    missing: set[str] = frozenset(),
    raw: dict[str, bytes] | None = None,
) -> Path:
    """Write a tiny MELD raw-release layout under ``root``.

    Args:
        splits: split -> rows (see :func:`row`); splits not given get one neutral row.
        missing: clip names ``"train/dia0_utt1"`` not to create (every other row gets an empty clip
            file: prepare only checks that the clip exists).
        raw: split -> exact CSV bytes, replacing the CSV written from ``splits`` (clips still from rows).
    """
    splits = dict(splits or {})
    for split in MELD_CSVS:
        splits.setdefault(split, [row(0, 0)])
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (root / MELD_CSVS[split]).write_bytes((raw or {}).get(split) or meld_csv_bytes(rows))
        clip_dir = root / MELD_CLIP_DIRS[split]
        clip_dir.mkdir(exist_ok=True)
        for r in rows:
            name = f"dia{r['Dialogue_ID']}_utt{r['Utterance_ID']}"
            if f"{split}/{name}" not in missing:
                (clip_dir / f"{name}.mp4").write_bytes(b"")
    return root


@pytest.fixture
def stage_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run a stage in an empty directory: stages write data/prepared, data/features, data/graphs."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Where the tests that run stages in :func:`stage_dir` put their outputs (relative to the cwd), as dvc.yaml's
# ``vars`` do; stages take every path on their command line / as ``run()`` arguments.
PREPARED = Path("data/prepared")
UTTERANCES = PREPARED / "utterances.csv"
FEATURES = Path("data/features")
GRAPHS = Path("data/graphs")


def write_utterances(items: list[tuple], path: Path = UTTERANCES) -> list:
    """Write the utterance table ``path`` (default ``data/prepared/utterances.csv``, relative to the cwd) from
    ``(utterance_id, text, speaker, clip)`` tuples; dialogue id and index come from the id."""
    from pipeline.utterances import Utterance
    from pipeline.utterances import write_utterances as write

    utterances = []
    for uid, text, speaker, clip in items:
        split, name = uid.split("/")
        d, u = name[3:].split("_utt")
        utterances.append(
            Utterance(
                uid, split, f"{split}/{d}", int(u), speaker, text, "neutral", "neutral", str(clip) if clip else ""
            )
        )
    write(utterances, path)
    return utterances


def run_extraction_stage(stage, params, utterances: Path = UTTERANCES, out: Path = FEATURES) -> dict:
    """Run an extraction stage (``pipeline.extract_text`` ...) as dvc.yaml does, modality guard included, and
    return what its ``extract(...)`` returned: the report as written, plus the run facts under ``"run"``
    (timings, device, utterances resumed from the cache), which the report file no longer holds."""
    returned = []
    real = stage.extract

    def spy(*args, **kwargs):
        returned.append(real(*args, **kwargs))
        return returned[-1]

    stage.extract = spy
    try:
        stage.run(params, utterances=Path(utterances), out=Path(out))
    finally:
        stage.extract = real
    assert len(returned) == 1
    return returned[0]


def save_tiny_bert(path: Path, words: list[str], num_hidden_layers: int, max_position_embeddings: int):
    """Save a randomly initialised (seed 0) 16-d BERT with a word-level BertTokenizer over ``words``
    (after the 5 special tokens) as a local model directory; returns the tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    # transformers 5 ignores vocab files passed by name: give the vocabulary as a dict.
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=max_position_embeddings,
        )
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="session")
def ffmpeg():
    """A function running imageio-ffmpeg's ffmpeg binary with the given arguments."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    exe = imageio_ffmpeg.get_ffmpeg_exe()

    def run(*args: str) -> None:
        subprocess.run(
            [exe, "-y", "-nostdin", "-loglevel", "error", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    return run


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory, ffmpeg) -> dict[str, Path]:
    """Small clips with known content:

    * ``stereo44k``: 1.5 s AAC, 44.1 kHz stereo, left a 440 Hz sine (amplitude 0.5), right silent;
    * ``loud_stereo``: 1.0 s AAC, 44.1 kHz stereo, both channels the same 440 Hz sine at 0.9;
    * ``ramp``: 3 s H.264 64x48 at 10 fps (30 frames), frame ``n`` has luma ``8 n``; no audio;
    * ``red``: 1 s H.264 64x48, pure red;
    * ``short_audio``: an AAC track of 15 ms (240 samples at 16 kHz), shorter than wav2vec2's receptive field.
    """
    out = tmp_path_factory.mktemp("clips")
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "aevalsrc=0.5*sin(2*PI*440*t)|0:s=44100:d=1.5",
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        str(out / "stereo44k.mp4"),
    )
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "aevalsrc=0.9*sin(2*PI*440*t)|0.9*sin(2*PI*440*t):s=44100:d=1",
        "-c:a",
        "aac",
        "-b:a",
        "192k",
        str(out / "loud_stereo.mp4"),
    )
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=black:s=64x48:r=10:d=3",
        "-vf",
        "geq=lum='N*8':cb=128:cr=128,format=yuv420p",
        "-c:v",
        "libx264",
        str(out / "ramp.mp4"),
    )
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=red:s=64x48:r=10:d=1",
        "-pix_fmt",
        "yuv420p",
        "-c:v",
        "libx264",
        str(out / "red.mp4"),
    )
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=16000:duration=0.015",
        "-c:a",
        "aac",
        str(out / "short_audio.mp4"),
    )
    return {p.stem: p for p in out.glob("*.mp4")}


@pytest.fixture(scope="session")
def bad_clips(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict[str, Path]:
    """Undecodable clips: zero bytes, random bytes, and a demo clip truncated to 30 %."""
    import random

    out = tmp_path_factory.mktemp("bad_clips")
    (out / "empty.mp4").write_bytes(b"")
    rng = random.Random(0)
    (out / "random.mp4").write_bytes(bytes(rng.randrange(256) for _ in range(20000)))
    good = (demo_root / "train_splits" / "dia0_utt0.mp4").read_bytes()
    (out / "truncated.mp4").write_bytes(good[: int(len(good) * 0.3)])
    return {p.stem: p for p in out.glob("*.mp4")}
