"""The validated pipeline configuration: ``params.yaml`` read through one pydantic schema.

Every stage calls :func:`load_params` and receives a :class:`Params` object; no stage reads the YAML
itself. Unknown keys and bad values are rejected with a message that names the key (``train.lr``).
Numbers written as strings are accepted as numbers, because ``dvc exp run -S train.lr=1e-4`` writes
``1e-4`` and PyYAML (YAML 1.1) reads that as the string ``"1e-4"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """Raised when ``params.yaml`` is missing, is not YAML, or does not match the schema."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """Reject ``true``/``false`` where a number is expected (pydantic would read them as 1/0)."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if (
                    isinstance(value, bool)
                    and field is not None
                    and field.annotation in (int, float, int | None, float | None)
                ):
                    raise ValueError(f"{key}: expected a number, got {value!r}")
        return data


class DataParams(_Section):
    """``data``: which dataset ``prepare`` reads and how its labels become classes (stage ``prepare``).

    Label sets are data: each layout declares its emotion classes (MELD: 7, IEMOCAP: the standard 6,
    a manifest: the labels it contains). ``label_map`` renames or merges raw labels first
    (``{exc: hap}`` merges IEMOCAP's excited into happy); ``emotions`` / ``sentiments``, when given,
    fix the class list and its order (index = model output), otherwise the dataset's own list is used.
    """

    layout: Literal["meld", "iemocap", "manifest"] = "meld"
    # meld / iemocap: the release folder. manifest: a .csv / .jsonl file, or a folder holding
    # manifest.csv or manifest.jsonl (media paths in it are relative to the manifest's folder).
    root: Path = Path("data/raw/demo")
    # A row whose clip is missing from the release: keep it with text only (audio/visual masked)
    # or leave the utterance out. Either way it is listed in the prepare report.
    missing_clip: Literal["text_only", "skip"] = "text_only"
    # An emotion (after label_map) outside the class list: stop with an error naming the row, or
    # leave the utterance out and count it in the report.
    unknown_label: Literal["error", "skip"] = "error"
    label_map: dict[str, str] = Field(default_factory=dict)
    emotions: list[str] | None = Field(None, min_length=2)
    sentiments: list[str] | None = Field(None, min_length=2)
    # emotion -> sentiment for datasets without sentiment labels (IEMOCAP, manifests without a
    # sentiment column); merged over the built-in map (GraphSmile's IEMOCAP mapping + common names).
    sentiment_map: dict[str, str] = Field(default_factory=dict)
    # IEMOCAP has no dev split: this many Session 1-4 dialogues, drawn with dev_seed, are dev
    # (COSMIC's split: 108 train / 12 dev / 31 test dialogues, Session 5 = test).
    dev_dialogues: int = Field(12, ge=1)
    dev_seed: int = 0

    @field_validator("emotions", "sentiments")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        v = [label.strip().lower() for label in v]  # labels are compared lower-cased
        if len(set(v)) != len(v):
            raise ValueError(f"labels must be unique (case-insensitive), got {v}")
        return v

    @field_validator("label_map", "sentiment_map")
    @classmethod
    def _lower(cls, v: dict[str, str]) -> dict[str, str]:
        return {str(k).strip().lower(): str(val).strip().lower() for k, val in v.items()}


class FinetuneParams(_Section):
    """``text.finetune``: fine-tune the text encoder on the train dialogues (stage ``finetune_text``)."""

    # Off: finetune_text only records that it is off and extract_text uses text.model as it is.
    enabled: bool = False
    epochs: int = Field(4, ge=1)
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)  # share of the steps with a linear warm-up, then linear decay
    batch_size: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)  # before the classification heads
    sentiment_weight: float = Field(0.5, ge=0)  # loss = CE(emotion) + sentiment_weight * CE(sentiment)
    class_weights: Literal["none", "inverse_frequency"] = "none"
    patience: int | None = Field(2, ge=1)  # early stopping on dev emotion weighted F1 (null: all epochs)
    seed: int = 0


class TextParams(_Section):
    """``text``: the utterance text encoder (stages ``finetune_text`` and ``extract_text``)."""

    # Hugging Face id, a local directory, or ``package:<module>/<dir>`` for a model a pip package ships.
    model: str = "roberta-base"
    # Hub revision (branch, tag or commit) passed to every from_pretrained; pin a commit for
    # reproducible runs. The commit it resolved to is recorded in the report and the metrics.
    # Ignored for local directories and package: models (their files are hashed instead).
    revision: str = "main"
    pooling: Literal["cls", "mean"] = "mean"
    # Layer selection: 1 = the last hidden layer; k > 1 = the mean of the last k layers.
    last_k_layers: int = Field(1, ge=1)
    # Dialogue context: this many previous and next utterances ("Speaker: text") go into the encoder
    # input as a second segment (context-aware RoBERTa ERC, e.g. EmoBERTa). 0 = off.
    context_window: int = Field(0, ge=0)
    max_length: int = Field(128, ge=8, le=4096)
    batch_size: int = Field(32, ge=1)
    # Utterances per work unit (pipeline/sharding.py): units are fixed before any worker sees them.
    shard_size: int = Field(256, ge=1)
    # autocast dtype on CUDA (ignored on the CPU, which always runs float32).
    cuda_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    # The stage fails when more than this share of utterances has no usable text (empty transcripts).
    max_masked_share: float = Field(0.5, ge=0, le=1)
    # Fine-tuning on the train split's utterances before extraction (EmoBERTa / CoMPM practice); its
    # input is the extraction's (text.context_window, pooling, last_k_layers, max_length).
    finetune: FinetuneParams = FinetuneParams()


class AudioParams(_Section):
    """``audio``: the speech features (stage ``extract_audio``)."""

    # ``wav2vec2``: any Hugging Face audio encoder (wav2vec2, HuBERT, WavLM), mean-pooled over valid
    # frames; ``opensmile``: openSMILE functionals (``opensmile_set``), no model download; ``prosody``:
    # librosa log-mel, pYIN pitch and RMS energy functionals (90-d, see pipeline.audio_features), no download.
    backend: Literal["wav2vec2", "opensmile", "prosody"] = "wav2vec2"
    model: str = "facebook/wav2vec2-base"
    revision: str = "main"  # Hub revision of audio.model (see text.revision)
    # When set, build a randomly initialised wav2vec2 with this config instead of loading weights
    # (offline demos and tests). Logged loudly and recorded in the stage report and metrics.
    random_init: dict[str, Any] | None = None
    last_k_layers: int = Field(1, ge=1)
    opensmile_set: Literal["IS10", "eGeMAPSv02", "ComParE_2016"] = "IS10"
    # backend prosody: the pitch (pYIN) search range in Hz; speech F0 lies within about 65-500 Hz.
    prosody_fmin: float = Field(65.0, gt=0)
    prosody_fmax: float = Field(500.0, gt=0)
    sample_rate: int = Field(16000, ge=8000)
    # Long utterances are cut into chunks of at most this many seconds; the encoder's frames of all
    # chunks are pooled together. max_seconds (null = no cap) drops audio beyond it.
    chunk_seconds: float = Field(15.0, gt=0)
    max_seconds: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    # Utterances per work unit (pipeline/sharding.py).
    shard_size: int = Field(64, ge=1)
    cuda_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    # A clip cut short (its audio decodes to far less than its header declares, for the clip or the
    # utterance's segment; see pipeline.media.is_truncated): ``mask`` masks its audio (reason
    # ``truncated``); ``use_partial`` encodes the part that decoded, logs a warning and lists the
    # utterance under ``partial`` in audio_report.json. Part of the features' cache key.
    on_truncated: Literal["mask", "use_partial"] = "mask"
    # The stage fails when more than this share of the utterances of data that has audio lost it
    # (missing, corrupt, truncated, silent clips): a broken decoder or a wrong folder, not bad clips.
    max_masked_share: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _prosody_range(self) -> AudioParams:
        if not self.prosody_fmin < self.prosody_fmax <= self.sample_rate / 2:
            raise ValueError(
                f"prosody_fmin ({self.prosody_fmin}) must be below prosody_fmax ({self.prosody_fmax}), "
                f"and prosody_fmax at most sample_rate / 2 ({self.sample_rate / 2})"
            )
        return self


class VisualParams(_Section):
    """``visual``: face detection and embedding (stage ``extract_visual``)."""

    fps: float = Field(2.0, gt=0)
    max_frames: int = Field(8, ge=1)
    # Frames are downscaled to at most this many pixels on their longer side as they are decoded, before
    # face detection, on every device: memory and detection time stay bounded whatever the resolution.
    max_frame_side: int = Field(1280, ge=160)
    # ``vggface2`` / ``casia-webface``: facenet-pytorch's download; a path: a local state dict;
    # ``random``: random initialisation (logged loudly and recorded in the report and metrics).
    face_weights: str = "vggface2"
    min_face_prob: float = Field(0.9, ge=0, le=1)
    # Which face is the speaker's: the largest, the most confident, or the most central detection
    # starts the track; the other frames follow it (nearest face to the previous one).
    face_select: Literal["largest", "confident", "central"] = "largest"
    batch_frames: int = Field(16, ge=1)
    # Face detection batches frames across this many consecutive clips (a fixed plan: the same batches
    # whatever is resumed; see pipeline.visual_features.detection_groups). Larger feeds a GPU better.
    clips_per_batch: int = Field(4, ge=1)
    # Utterances per work unit (pipeline/sharding.py), rounded up to whole clips_per_batch groups.
    shard_size: int = Field(16, ge=1)
    # As audio.on_truncated, for the frames of a clip cut short: ``mask`` (reason ``truncated``) or
    # ``use_partial`` (the frames that decoded; listed under ``partial`` in visual_report.json).
    on_truncated: Literal["mask", "use_partial"] = "mask"
    # As audio.max_masked_share, for video (no face counts as lost; an audio-only file does not).
    max_masked_share: float = Field(0.5, ge=0, le=1)


class GraphParams(_Section):
    """``graph``: the dialogue graphs (stage ``build_graphs``); see :mod:`pipeline.graphs`."""

    window_past: int = Field(10, ge=0)
    window_future: int = Field(10, ge=0)
    relations: Literal["speaker_pair", "same_other"] = "same_other"
    # speaker_pair: a cap. The relation types are sized for the most speakers in any prepared dialogue
    # (2 * n^2), n <= max_speakers; a dialogue with more speakers than the cap is an error.
    max_speakers: int = Field(9, ge=1)


MODALITY_ORDER = ("text", "audio", "visual")  # pipeline.data.MODALITIES: the order the model uses them in


class ModelParams(_Section):
    """``model``: the fusion + graph network (stage ``train``); see :mod:`pipeline.modeling`."""

    # Which utterance features the model reads: a non-empty subset of text, audio, visual (given in any
    # order, used in the order text, audio, visual). The others get no parameters and are ignored.
    # cross_attention needs two: with one modality it falls back to concat (logged; the fusion that
    # ran is recorded in the checkpoint and the train metrics as ``fusion``).
    modalities: list[Literal["text", "audio", "visual"]] = Field(default_factory=lambda: list(MODALITY_ORDER))
    hidden_size: int = Field(128, ge=8, multiple_of=2)
    context: Literal["gru", "transformer", "none"] = "gru"
    fusion: Literal["concat", "cross_attention", "joint_vectors"] = "cross_attention"
    num_joint_vectors: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    graph: Literal["none", "gcn", "adaptive"] = "adaptive"
    num_bases: int = Field(4, ge=1)
    dropout: float = Field(0.3, ge=0, lt=1)
    # Kernels of the graph layers: DGL's (CPU-only in the PyPI build), plain torch scatter ops (any
    # device), or auto = DGL where the installed DGL supports the device, torch otherwise. Both give
    # the same parameters (state_dict) and outputs.
    graph_backend: Literal["auto", "dgl", "torch"] = "auto"

    @field_validator("modalities")
    @classmethod
    def _modality_set(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"name at least one modality of {list(MODALITY_ORDER)}")
        if len(set(v)) != len(v):
            raise ValueError(f"each modality at most once, got {v}")
        return [m for m in MODALITY_ORDER if m in v]

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class LossParams(_Section):
    """``loss``: CE(emotion) + sentiment_weight * CE(sentiment) + contrastive_weight * contrastive."""

    sentiment_weight: float = Field(0.5, ge=0)
    class_weights: Literal["none", "inverse_frequency"] = "none"
    contrastive: Literal["none", "supcon", "interclass"] = "supcon"
    contrastive_weight: float = Field(0.1, ge=0)
    temperature: float = Field(0.1, gt=0)
    # Projections of this many earlier training utterances join each batch's contrastive candidates (a
    # queue, MoCo-style): rare classes find partners outside their batch. 0: the batch alone.
    contrastive_queue: int = Field(0, ge=0)


class TrainParams(_Section):
    """``train``: optimisation (stage ``train``)."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(40, ge=1)
    warmup_epochs: int = Field(2, ge=0)
    # After the linear warm-up: ``constant`` lr; ``cosine`` decay to min_lr_ratio * lr at the last epoch
    # (per step; Loshchilov & Hutter 2017, without restarts); ``plateau``: lr * plateau_factor once
    # plateau_patience epochs in a row bring no better dev weighted F1 (torch's ReduceLROnPlateau), not
    # below min_lr_ratio * lr. See pipeline.train.LRSchedule.
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(2, ge=1)
    patience: int | None = Field(None, ge=1)  # early stopping: epochs without a better dev weighted F1
    batch_dialogues: int = Field(4, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    # Mixed precision for the training steps on CUDA (autocast; float16 adds a GradScaler). Ignored, with
    # a log line, on the CPU, which always trains in float32. Dev scoring runs in float32.
    amp: Literal["none", "bfloat16", "float16"] = "none"


class EvaluateParams(_Section):
    """``evaluate``: scoring a model on prepared data with other emotion classes than the model's
    (cross-corpus evaluation, e.g. an IEMOCAP model on MELD; see :mod:`pipeline.evaluate`)."""

    # model emotion class -> target emotion class, read only when the data evaluate scores has other
    # classes than the checkpoint. Probabilities of the model classes mapped to one target class are
    # summed; a model class left out is dropped; target utterances whose class nothing maps to are
    # left out of the scores and counted. Keys must be model classes, values target classes.
    label_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("label_map")
    @classmethod
    def _lower(cls, v: dict[str, str]) -> dict[str, str]:
        return {str(k).strip().lower(): str(val).strip().lower() for k, val in v.items()}  # as prepare's labels


class RuntimeParams(_Section):
    """``runtime``: how the stages run on this machine, not what they compute. No stage lists it in
    ``dvc.yaml``, so changing it re-runs nothing."""

    # torch's intra-op CPU threads in every stage (torch.set_num_threads). null: torch's default (one
    # per core). On a machine shared with other work, 1 avoids oversubscription (measured on a busy
    # 2-core machine: 225 s per training epoch with the default, 28.8 s with 1, identical numbers).
    # The last float digits of CPU results can depend on the thread count.
    threads: int | None = Field(None, ge=1)
    # Where the extraction stages' work units run (pipeline/sharding.py): local (this process), torchrun
    # (one process per worker on this node; one GPU each where there are GPUs), ray (an actor pool on a
    # local or existing Ray cluster: RAY_ADDRESS=host:port). Outputs do not depend on it.
    backend: Literal["local", "torchrun", "ray"] = "local"
    # Extraction: processes (torchrun) or actors (ray). Training: with workers > 1, `python -m
    # pipeline.train` relaunches itself under torchrun with this many processes (DDP).
    workers: int = Field(1, ge=1)
    # ray: GPUs reserved per actor (0 on a CPU-only cluster; fractions share a GPU). torchrun: one GPU
    # per process whenever CUDA is present, whatever this says.
    gpus_per_worker: float = Field(0.0, ge=0)


# Environment variables that override ``runtime.*`` (a cluster job script sets these, not params.yaml).
RUNTIME_ENV = {
    "backend": "ERC_RUNTIME_BACKEND",
    "workers": "ERC_RUNTIME_WORKERS",
    "gpus_per_worker": "ERC_GPUS_PER_WORKER",
}


class Params(_Section):
    """The whole ``params.yaml``: one section per stage, and ``runtime``."""

    data: DataParams = DataParams()
    text: TextParams = TextParams()
    audio: AudioParams = AudioParams()
    visual: VisualParams = VisualParams()
    graph: GraphParams = GraphParams()
    model: ModelParams = ModelParams()
    loss: LossParams = LossParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    runtime: RuntimeParams = RuntimeParams()


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping (as read from YAML).

    Raises:
        ParamsError: naming every offending key, e.g. ``params.yaml: train.lr: Input should be
            greater than 0 (got -1)``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
            lines.append(f"{source}: {key}: {e['msg']}{got}")
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml``; :data:`RUNTIME_ENV` variables that are set override ``runtime.*``.

    Raises:
        ParamsError: the file is missing, is not valid YAML, or breaks the schema.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the repository root or pass --params") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot be read as a UTF-8 params file ({err})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    overrides = {key: os.environ[var] for key, var in RUNTIME_ENV.items() if os.environ.get(var)}
    if overrides and isinstance(raw, dict):
        raw = {**raw, "runtime": {**(raw.get("runtime") or {}), **overrides}}
    return parse_params(
        raw, str(path) + (f" (with {', '.join(RUNTIME_ENV[k] for k in overrides)})" if overrides else "")
    )
