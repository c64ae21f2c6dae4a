"""Feature storage: one safetensors file per modality, read by utterance id; atomic JSON/file writes.

Format (``data/features/<modality>.safetensors``):

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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

# Why a modality is missing for an utterance. ``ok`` means present.
# Append only: a reason's index is stored in the feature files.
REASONS = ("ok", "missing_clip", "no_audio", "no_face", "decode_error", "empty_text", "no_video")


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
            raise ValueError(f"feature table rows disagree: {n} ids, features {tuple(self.features.shape)}, "
                             f"mask {tuple(self.mask.shape)}, {len(self.reasons)} reasons")
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
            raise ValueError(f"{len(missing)} utterances have no row in this feature file (e.g. {missing[:3]}); "
                           "the features are stale: rerun `dvc repro`")
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


class atomic_path:
    """Context manager yielding a temporary path next to ``path``; renamed onto it on success.

    A crash or kill mid-write leaves the previous file (or none), never a truncated one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically, pretty-printed, numpy scalars converted."""
    def default(o: Any) -> Any:
        if isinstance(o, (np.integer, np.floating)):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n", encoding="utf-8")


FEATURES_DIR = Path("data/features")
CACHE_DIR = Path("data/interim/cache")
# Stage settings that change how fast features are made, not what they are (up to float rounding):
# left out of the resume-cache key (lowering a batch size after a CUDA out-of-memory error keeps the
# cache) and of predict's comparison with a checkpoint.
RUNTIME_ONLY = frozenset({"batch_size", "cuda_dtype", "batch_frames"})


def feature_path(modality: str, features_dir: Path = FEATURES_DIR) -> Path:
    """``<features_dir>/<modality>.safetensors``."""
    return Path(features_dir) / f"{modality}.safetensors"


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
    """Resumable per-utterance results of one extraction stage (utterance id + stage settings as key).

    Layout: ``<root>/<modality>/<key>/shard-<n>.safetensors`` where ``key`` hashes the stage's
    settings (its params section without :data:`RUNTIME_ONLY` keys, and the output size). Each shard holds ``features`` ``[n, D]`` float32,
    ``reason`` ``[n]`` uint8 and, in its metadata, the utterance ids, their input signatures (text,
    or media path/size/mtime and segment) and per-utterance diagnostics. A result counts as done only
    when both the id and the signature match, so an edited transcript or a replaced clip is redone.

    Results are buffered and written as a new shard, atomically, every ``flush_every`` utterances or
    ``flush_seconds`` seconds, and on leaving the ``with`` block (even on an exception or Ctrl-C).
    A killed stage therefore loses at most the unflushed results; rerunning it skips the rest.
    """

    def __init__(self, modality: str, settings: dict, dim: int, root: Path = CACHE_DIR,
                 flush_every: int = 64, flush_seconds: float = 30.0):
        import hashlib
        import time

        settings = {k: v for k, v in settings.items() if k not in RUNTIME_ONLY}
        blob = json.dumps({"settings": settings, "dim": dim}, sort_keys=True, default=str)
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
        self.resumed = 0  # utterances found done by pending()
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
        import hashlib

        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def is_done(self, utterance_id: str, signature: str) -> bool:
        entry = self._done.get(utterance_id)
        return entry is not None and entry[0] == signature

    def pending(self, utterance_id: str, signature: str, media: str | None = None) -> bool:
        """Whether an utterance still needs extracting.

        False when its result is cached (counted in :attr:`resumed`), or when ``media`` is given but
        empty: the utterance has no clip, recorded here as ``missing_clip``.
        """
        if self.is_done(utterance_id, signature):
            self.resumed += 1
            return False
        if media is not None and not media:
            self.put(utterance_id, signature, None, "missing_clip")
            return False
        return True

    def pending_media(self, utterances: list, media: str) -> list[tuple[int, str]]:
        """``(row, signature)`` of the utterances still to extract from a media file, in table order.

        ``media`` names the utterance attribute that holds the file (``clip``, ``audio_source``); the
        signature covers the file (path, size, modification time) and the segment bounds
        (``start``, ``end``). Cached utterances are skipped and missing files recorded, as in
        :meth:`pending`.
        """
        todo = []
        for row, utt in enumerate(utterances):
            path = getattr(utt, media)
            signature = self.signature([file_signature(path), utt.start, utt.end])
            if self.pending(utt.utterance_id, signature, path):
                todo.append((row, signature))
        self.log_resumed(len(utterances))
        return todo

    def log_resumed(self, total: int) -> None:
        """Say how many of ``total`` utterances :meth:`pending` found in the cache (nothing if none)."""
        if self.resumed:
            import logging

            logging.getLogger(f"pipeline.extract_{self.modality}").info(
                "resumed: %d of %d utterances came from the cache %s", self.resumed, total, self.dir)

    def put(self, utterance_id: str, signature: str, vector: torch.Tensor | None, reason: str = "ok",
            diagnostics: dict | None = None) -> None:
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
        tensors = {"features": torch.stack([e[1] for e in entries]).contiguous(),
                   "reason": torch.tensor([REASONS.index(e[2]) for e in entries], dtype=torch.uint8)}
        meta = {"ids": ids, "signatures": [e[0] for e in entries], "diagnostics": [e[3] for e in entries]}
        while (self.dir / f"shard-{self._shards:06d}.safetensors").exists():
            self._shards += 1
        with atomic_path(self.dir / f"shard-{self._shards:06d}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"erc": json.dumps(meta)})
        self._shards += 1

    def __enter__(self) -> "ExtractionCache":
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
        table = FeatureTable(list(utterance_ids), features, torch.tensor([r == "ok" for r in reasons], dtype=torch.bool),
                             reasons, info)
        return table, {u: e[3] for u, e in zip(utterance_ids, entries) if e[3]}


def finish_extraction(modality: str, table: FeatureTable, seconds: float, extra: dict | None = None,
                      features_dir: Path = FEATURES_DIR) -> dict:
    """Write a modality's feature file and its report (``<modality>_report.json``); log a summary line.

    The report holds counts per reason code, the masked utterance ids per reason, wall time,
    throughput (utterances/s) and which weights were used (``table.info``).
    """
    import logging

    save_table(table, feature_path(modality, features_dir))
    masked: dict[str, list[str]] = {}
    for uid, reason in zip(table.utterance_ids, table.reasons):
        if reason != "ok":
            masked.setdefault(reason, []).append(uid)
    n = len(table.utterance_ids)
    report = {
        "modality": modality, "utterances": n, "dim": table.dim, "reasons": table.reason_counts(),
        "masked": masked, "seconds": round(seconds, 2),
        "utterances_per_second": round(n / seconds, 2) if seconds > 0 else None,
        "encoder": table.info, **(extra or {}),
    }
    write_json(report, Path(features_dir) / f"{modality}_report.json")
    resumed = (extra or {}).get("resumed_from_cache", 0)
    logging.getLogger(f"pipeline.extract_{modality}").info(
        "%s: %d utterances (%d from the resume cache), %d present, masked %s, %.1f s (%.1f utt/s), "
        "encoder %s (pretrained=%s)",
        modality, n, resumed, int(table.mask.sum()), {k: len(v) for k, v in masked.items()} or "none", seconds,
        report["utterances_per_second"] or 0, table.info.get("model"), table.info.get("pretrained"))
    return report
