"""The resume cache of the extraction stages, and what its keys cover.

An extraction stage stores each utterance's result as soon as it has it, so a killed run resumes where
it stopped. A cached result is reused only when everything that determines it is unchanged:

* the utterance's input (its text, or its media file's path, size, modification time and segment);
* the stage's settings (its ``params.yaml`` section, without the :data:`RUNTIME_ONLY` keys);
* the stage's own code: the source of the ``pipeline/`` files that ``dvc.yaml`` lists as the stage's
  dependencies (one list: :func:`stage_code_files` reads it from ``dvc.yaml``), so a code fix
  recomputes the features instead of re-emitting stale ones;
* the identity of the encoder weights (``info["weights_id"]``: the resolved Hugging Face revision,
  or a hash of the local files; see :mod:`pipeline.encoders`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.atomic import atomic_path
from pipeline.feature_table import REASONS, FeatureTable

PACKAGE_DIR = Path(__file__).resolve().parent
DVC_YAML = PACKAGE_DIR.parent / "dvc.yaml"

CACHE_DIR = Path("data/interim/cache")
# Stage settings that change how fast features are made, or whether the stage accepts them, not what
# they are (up to float rounding): left out of the resume-cache key (lowering a batch size after a CUDA
# out-of-memory error keeps the cache) and of predict's comparison with a checkpoint.
RUNTIME_ONLY = frozenset(
    {"batch_size", "shard_size", "cuda_dtype", "batch_frames", "clips_per_batch", "max_masked_share"}
)


def stage_code_files(stage: str, dvc_yaml: Path = DVC_YAML) -> list[Path]:
    """The ``pipeline/`` source files that ``dvc.yaml`` lists as dependencies of ``stage``, sorted.

    Without a ``dvc.yaml`` beside the package (an installed copy), or for a stage it does not name,
    every module of the package counts: a conservative key that any code change invalidates.
    """
    try:
        stages = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"]
        deps = stages[stage]["deps"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return sorted(PACKAGE_DIR.glob("*.py"))
    root = Path(dvc_yaml).parent
    files = [root / d for d in deps if isinstance(d, str) and d.startswith("pipeline/") and d.endswith(".py")]
    return sorted(files)


def code_fingerprint(stage: str, dvc_yaml: Path = DVC_YAML) -> str:
    """A hash of the source of :func:`stage_code_files` (names and contents)."""
    digest = hashlib.sha256()
    for path in stage_code_files(stage, dvc_yaml):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def file_signature(*paths: str) -> list:
    """What identifies a media input for the cache: path, size and modification time of each file."""
    out = []
    for p in paths:
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        out.append([p, st.st_size if st else None, st.st_mtime_ns if st else None])
    return out


class ExtractionCache:
    """Resumable per-utterance results of one extraction stage.

    Layout: ``<root>/<modality>/<key>/shard-<n>.safetensors`` where ``key`` hashes the stage's
    settings (its params section without :data:`RUNTIME_ONLY` keys), the output size, the stage's
    code (:func:`code_fingerprint` of ``extract_<modality>``) and the weights' identity
    (``weights_id``). Each shard holds ``features`` ``[n, D]`` float32, ``reason`` ``[n]`` uint8 and,
    in its metadata, the utterance ids, their input signatures (text, or media path/size/mtime and
    segment) and per-utterance diagnostics. A result counts as done only
    when both the id and the signature match, so an edited transcript or a replaced clip is redone.

    Results are buffered and written as a new shard, atomically, every ``flush_every`` utterances or
    ``flush_seconds`` seconds, and on leaving the ``with`` block (even on an exception or Ctrl-C).
    A killed stage therefore loses at most the unflushed results; rerunning it skips the rest.
    """

    def __init__(
        self,
        modality: str,
        settings: dict,
        dim: int,
        root: Path = CACHE_DIR,
        flush_every: int = 64,
        flush_seconds: float = 30.0,
        weights_id: str | None = None,
        code: str | None = None,
    ):
        settings = {k: v for k, v in settings.items() if k not in RUNTIME_ONLY}
        code = code if code is not None else code_fingerprint(f"extract_{modality}")
        blob = json.dumps(
            {"settings": settings, "dim": dim, "code": code, "weights": weights_id}, sort_keys=True, default=str
        )
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.modality, self.dir = modality, Path(root) / modality / self.key
        self.dim, self.flush_every, self.flush_seconds = dim, flush_every, flush_seconds
        self._clock = time.monotonic
        self._last_flush = self._clock()
        self._done: dict[str, tuple[str, torch.Tensor, str, dict]] = {}  # id -> (signature, vector, reason, diag)
        self._pending: list[str] = []
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(blob + "\n", encoding="utf-8")
        self._shards = 0
        self.resumed = 0  # utterances reused from the cache (set by pipeline.sharding.extract_units)
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            self._load_shard(shard)
            self._shards += 1

    def _load_shard(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["erc"])
                features, reasons = f.get_tensor("features"), f.get_tensor("reason")
        except Exception:  # a shard from a crash mid-rename cannot exist (atomic), but a foreign file can
            return
        for i, uid in enumerate(meta["ids"]):
            self._done[uid] = (meta["signatures"][i], features[i], REASONS[int(reasons[i])], meta["diagnostics"][i])

    @staticmethod
    def signature(value: Any) -> str:
        """A short stable hash of any JSON-serialisable input description."""
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def is_done(self, utterance_id: str, signature: str) -> bool:
        entry = self._done.get(utterance_id)
        return entry is not None and entry[0] == signature

    def log_resumed(self, total: int) -> None:
        """Say how many of ``total`` utterances came from the cache (:attr:`resumed`; nothing if none)."""
        if self.resumed:
            logging.getLogger(f"pipeline.extract_{self.modality}").info(
                "resumed: %d of %d utterances came from the cache %s", self.resumed, total, self.dir
            )

    def put(
        self,
        utterance_id: str,
        signature: str,
        vector: torch.Tensor | None,
        reason: str = "ok",
        diagnostics: dict | None = None,
    ) -> None:
        """Record one utterance's result: its ``[D]`` vector (None when masked) and reason code."""
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}; known: {REASONS}")
        if vector is None:
            vector = torch.zeros(self.dim)
        elif vector.shape != (self.dim,):
            raise ValueError(f"{utterance_id}: feature of shape {tuple(vector.shape)}, expected ({self.dim},)")
        self._done[utterance_id] = (signature, vector.detach().float().cpu(), reason, diagnostics or {})
        self._pending.append(utterance_id)
        if len(self._pending) >= self.flush_every or self._clock() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered results as a new shard (atomically)."""
        self._last_flush = self._clock()
        if not self._pending:
            return
        ids, self._pending = self._pending, []
        entries = [self._done[u] for u in ids]
        tensors = {
            "features": torch.stack([e[1] for e in entries]).contiguous(),
            "reason": torch.tensor([REASONS.index(e[2]) for e in entries], dtype=torch.uint8),
        }
        meta = {"ids": ids, "signatures": [e[0] for e in entries], "diagnostics": [e[3] for e in entries]}
        while (self.dir / f"shard-{self._shards:06d}.safetensors").exists():
            self._shards += 1
        with atomic_path(self.dir / f"shard-{self._shards:06d}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"erc": json.dumps(meta)})
        self._shards += 1

    def __enter__(self) -> ExtractionCache:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.flush()

    def table(self, utterance_ids: list[str], info: dict) -> tuple[FeatureTable, dict[str, dict]]:
        """The finished feature table in ``utterance_ids`` order, and the diagnostics per utterance.

        Raises:
            KeyError: an utterance has no result (the stage did not finish it).
        """
        missing = [u for u in utterance_ids if u not in self._done]
        if missing:
            raise KeyError(f"{len(missing)} utterances have no cached result (e.g. {missing[:3]})")
        entries = [self._done[u] for u in utterance_ids]
        features = torch.stack([e[1] for e in entries]) if entries else torch.zeros(0, self.dim)
        reasons = [e[2] for e in entries]
        table = FeatureTable(
            list(utterance_ids), features, torch.tensor([r == "ok" for r in reasons], dtype=torch.bool), reasons, info
        )
        return table, {u: e[3] for u, e in zip(utterance_ids, entries) if e[3]}
