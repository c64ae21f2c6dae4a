"""The real profile's feature loaders on tiny random models, on CUDA (step 3 of scripts/gpu_check.sh).

Builds a tiny random RoBERTa (with a byte-level BPE tokenizer), a tiny random wav2vec2 (group-norm
feature encoder, as wav2vec2-base) and a random InceptionResnetV1 state dict, saves them into a temporary
folder the way a downloaded model is stored (``save_pretrained`` / a ``.pt`` file), points
``profiles/real.yaml``'s ``text.model``, ``audio.model`` and ``visual.face_weights`` at them and runs
``pipeline.text_features.extract``, ``pipeline.audio_features.extract`` and
``pipeline.visual_features.extract`` on a few demo clips. Checks: the stage ran on the expected device,
features are finite, masked rows are zero, the text of every utterance and the audio and face of most
clips are present. Nothing is downloaded (the pretrained weights are replaced by random ones of the
same kind; the loading, decoding, autocast and pooling code is the real one).

    python scripts/gpu_loaders.py [--utterances 6] [--allow-cpu] [--json out.json]

Exit status 0 when every check passes, 1 otherwise (the failures are printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline import audio_features, text_features, visual_features  # noqa: E402
from pipeline.config import Params, parse_params  # noqa: E402
from pipeline.feature_table import feature_path, load_table  # noqa: E402
from pipeline.utterances import Utterance  # noqa: E402

DEMO_CLIPS = REPO / "data" / "raw" / "demo" / "train_splits"
TEXTS = [
    "I am so happy today, this is wonderful!",
    "How dare you lie to me like that?",
    "Oh no, I really miss her.",
    "Wait, what? You got married?",
    "Okay. Fine. Whatever.",
    "That is disgusting, take it away.",
    "I'm scared, did you hear that noise?",
    "Hello there.",
]


def tiny_roberta(path: Path, max_length: int) -> None:
    """A random 2-layer RoBERTa with a byte-level BPE tokenizer trained on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TEXTS, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    path.mkdir(parents=True)
    bpe.save_model(str(path))
    merges = [
        tuple(line.split())
        for line in (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    # transformers 5 ignores vocabulary files passed by name: give vocabulary and merges as objects
    tokenizer = RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    model = RobertaModel(
        RobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=max_length + 2,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(path)


def tiny_wav2vec2(path: Path) -> None:
    """A random 2-layer wav2vec2 with wav2vec2-base's group-norm feature encoder and feature extractor."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    model = Wav2Vec2Model(
        Wav2Vec2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=[32] * 7,
            feat_extract_norm="group",
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        )
    )
    model.save_pretrained(path)
    # wav2vec2-base's preprocessor_config.json: normalised input, no attention mask
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=False).save_pretrained(path)


def random_face_weights(path: Path) -> None:
    """A random InceptionResnetV1 state dict, stored as facenet's vggface2 .pt file is."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), path)


def utterances(n: int) -> list[Utterance]:
    clips = sorted(DEMO_CLIPS.glob("dia*_utt*.mp4"))[:n]
    if len(clips) < n:
        raise SystemExit(f"error: {DEMO_CLIPS} holds {len(clips)} demo clips, {n} needed")
    out = []
    for i, clip in enumerate(clips):
        d, u = clip.stem[3:].split("_utt")
        out.append(
            Utterance(
                f"train/{clip.stem}",
                "train",
                f"train/{d}",
                int(u),
                "ABC"[i % 3],
                TEXTS[i % len(TEXTS)],
                "neutral",
                "neutral",
                str(clip),
            )
        )
    return out


def real_params(models: Path) -> Params:
    raw = yaml.safe_load((REPO / "profiles" / "real.yaml").read_text(encoding="utf-8"))
    raw["text"]["model"] = str(models / "roberta")
    raw["audio"]["model"] = str(models / "wav2vec2")
    raw["audio"]["random_init"] = None
    raw["visual"]["face_weights"] = str(models / "vggface2-random.pt")
    return parse_params(raw, "profiles/real.yaml (models replaced by tiny random ones)")


def check(modality: str, report: dict, features_dir: Path, n: int, device: torch.device) -> tuple[list[str], dict]:
    """The checks of one stage's output; returns (problems, summary row)."""
    problems = []
    table = load_table(feature_path(modality, features_dir))
    ran_on = report.get("run", {}).get("device")
    if ran_on is not None and torch.device(ran_on).type != device.type:
        problems.append(f"{modality}: ran on {ran_on}, expected {device.type}")
    if len(table.utterance_ids) != n:
        problems.append(f"{modality}: {len(table.utterance_ids)} rows for {n} utterances")
    if not torch.isfinite(table.features).all():
        problems.append(
            f"{modality}: non-finite features in rows "
            f"{sorted({int(i) for i in (~torch.isfinite(table.features)).nonzero()[:, 0]})}"
        )
    if table.features[~table.mask].abs().sum() != 0:
        problems.append(f"{modality}: masked rows are not zero")
    if (table.mask != torch.tensor([r == "ok" for r in table.reasons])).any():
        problems.append(f"{modality}: mask and reason codes disagree")
    present = int(table.mask.sum())
    needed = n if modality == "text" else (n + 1) // 2  # a demo clip may lack audio or a face
    if present < needed:
        problems.append(f"{modality}: only {present} of {n} utterances present (reasons {table.reason_counts()})")
    if table.info.get("pretrained") is not True:
        problems.append(f"{modality}: the features do not come from the real (pretrained-weights) loader path")
    row = {
        "modality": modality,
        "dim": table.dim,
        "present": f"{present}/{n}",
        "reasons": table.reason_counts(),
        "device": ran_on,
        "seconds": report.get("run", {}).get("seconds"),
        "norm_mean": round(float(table.features[table.mask].norm(dim=1).mean()), 4) if present else None,
    }
    return problems, row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=6, help="demo clips to run (default 6)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when CUDA is not available")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.allow_cpu:
        print("error: CUDA is not available (pass --allow-cpu to run these checks on the CPU)", file=sys.stderr)
        return 2
    print(
        f"gpu_loaders: device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else " (no CUDA: CPU run)")
    )
    problems, rows = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_loaders-") as tmp:
        tmp = Path(tmp)
        models = tmp / "models"
        tiny_roberta(models / "roberta", max_length=128)
        tiny_wav2vec2(models / "wav2vec2")
        random_face_weights(models / "vggface2-random.pt")
        params = real_params(models)
        utts = utterances(args.utterances)
        for modality, module in (("text", text_features), ("audio", audio_features), ("visual", visual_features)):
            start = time.perf_counter()
            try:
                report = module.extract(utts, params, tmp / "features", cache_root=tmp / "cache")
            except Exception as err:  # noqa: BLE001 - report every stage, then fail
                problems.append(f"{modality}: extract failed: {type(err).__name__}: {err}")
                continue
            stage_problems, row = check(modality, report, tmp / "features", len(utts), device)
            row["wall_seconds"] = round(time.perf_counter() - start, 2)
            problems += stage_problems
            rows.append(row)
    print(f"\n{'modality':9} {'dim':>5} {'present':>8} {'device':>8} {'seconds':>8}  reasons")
    for row in rows:
        print(
            f"{row['modality']:9} {row['dim']:5d} {row['present']:>8} {str(row['device']):>8} "
            f"{row['wall_seconds']:8.2f}  {row['reasons']}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"device": str(device), "rows": rows, "problems": problems}, indent=2) + "\n", encoding="utf-8"
        )
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"gpu_loaders: all checks passed on {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
