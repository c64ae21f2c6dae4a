"""Feature storage: one safetensors file per modality, read by utterance id.

Format (``<features dir>/<modality>.safetensors``):

* ``features``: ``[num_utterances, dim]`` float32; the row of a masked utterance is zeros and must
  never be read as a signal (the ``mask`` says so);
* ``mask``: ``[num_utterances]`` uint8, 1 = the modality is present for this utterance;
* ``reason``: ``[num_utterances]`` uint8, an index into :data:`REASONS`;
* metadata ``erc``: one JSON object with ``utterance_ids`` (row order) and ``info`` (encoder, weights,
  pretrained). One key, because safetensors writes several metadata keys in an arbitrary order and
  the file's bytes (and so its DVC hash) would change from run to run.

Why safetensors: no pickle (safe to load from anyone), memory-mappable, one file per modality that
DVC hashes as a unit, and the format Hugging Face users already know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_path

# Why a modality is missing for an utterance. ``ok`` means present. ``corrupt``: the file does not
# decode (PyAV / OpenCV say why in the log); ``truncated``: it decodes to far less than its header
# declares; ``decode_error``: any other decoding failure.
# Append only: a reason's index is stored in the feature files.
REASONS = (
    "ok",
    "missing_clip",
    "no_audio",
    "no_face",
    "decode_error",
    "empty_text",
    "no_video",
    "corrupt",
    "truncated",
)


@dataclass
class FeatureTable:
    """Per-utterance features of one modality.

    Attributes:
        utterance_ids: row order, length N.
        features: ``[N, D]`` float32.
        mask: ``[N]`` bool, True where the modality is present.
        reasons: length-N reason codes from :data:`REASONS`.
        info: what produced the features (encoder id, pretrained or random, ...).
    """

    utterance_ids: list[str]
    features: torch.Tensor
    mask: torch.Tensor
    reasons: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.utterance_ids)
        if self.features.shape[0] != n or self.mask.shape[0] != n or len(self.reasons) != n:
            raise ValueError(
                f"feature table rows disagree: {n} ids, features {tuple(self.features.shape)}, "
                f"mask {tuple(self.mask.shape)}, {len(self.reasons)} reasons"
            )
        unknown = set(self.reasons) - set(REASONS)
        if unknown:
            raise ValueError(f"unknown reason codes {sorted(unknown)}; known: {REASONS}")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def rows(self, utterance_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[len(ids), D]`` and mask ``[len(ids)]`` for the given ids, in that order.

        Raises:
            ValueError: an id is not in the table (the feature file is stale: rerun ``dvc repro``).
        """
        if not hasattr(self, "_index"):
            self._index = {u: i for i, u in enumerate(self.utterance_ids)}
        index = self._index
        missing = [u for u in utterance_ids if u not in index]
        if missing:
            raise ValueError(
                f"{len(missing)} utterances have no row in this feature file (e.g. {missing[:3]}); "
                "the features are stale: rerun `dvc repro`"
            )
        rows = torch.tensor([index[u] for u in utterance_ids], dtype=torch.long)
        return self.features[rows], self.mask[rows]

    def reason_counts(self) -> dict[str, int]:
        return {r: self.reasons.count(r) for r in REASONS if r in self.reasons}


def save_table(table: FeatureTable, path: str | Path) -> None:
    """Write a :class:`FeatureTable` atomically (temporary file + rename)."""
    tensors = {
        "features": table.features.to(torch.float32).contiguous(),
        "mask": table.mask.to(torch.uint8).contiguous(),
        "reason": torch.tensor([REASONS.index(r) for r in table.reasons], dtype=torch.uint8),
    }
    metadata = {"erc": json.dumps({"utterance_ids": table.utterance_ids, "info": table.info}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_table(path: str | Path) -> FeatureTable:
    """Read a feature file written by :func:`save_table`.

    Raises:
        FileNotFoundError: with the stage that writes it, when the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: feature file not found; run its extraction stage (`dvc repro`)")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    if not metadata or "erc" not in metadata:
        raise ValueError(f"{path}: not a feature file of this pipeline (no 'erc' metadata); rerun its stage")
    meta = json.loads(metadata["erc"])
    return FeatureTable(
        utterance_ids=meta["utterance_ids"],
        features=tensors["features"],
        mask=tensors["mask"].bool(),
        reasons=[REASONS[int(i)] for i in tensors["reason"]],
        info=meta["info"],
    )


def feature_path(modality: str, features_dir: str | Path) -> Path:
    """``<features_dir>/<modality>.safetensors``."""
    return Path(features_dir) / f"{modality}.safetensors"
