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

Two readers: :func:`load_table` reads a whole file into memory (a :class:`FeatureTable`);
:func:`open_table` maps it (a :class:`MappedFeatureTable`) so that training and evaluation read only
the rows of the dialogues they need, when they need them, and a corpus's features need not fit in
memory. The mapped reader parses the safetensors layout itself (the format's spec:
https://github.com/huggingface/safetensors#format): 8 bytes, the little-endian length ``H`` of a JSON
header; the header (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` plus ``__metadata__``);
then the data buffer, with tensor ``name`` at bytes ``8 + H + begin`` to ``8 + H + end`` of the file,
row-major, little-endian.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
        rows = torch.tensor(_row_numbers(self._index, utterance_ids), dtype=torch.long)
        return self.features[rows], self.mask[rows]

    def reason_counts(self) -> dict[str, int]:
        return {r: self.reasons.count(r) for r in REASONS if r in self.reasons}


def _row_numbers(index: dict[str, int], utterance_ids: list[str]) -> list[int]:
    """The row of each id (``index``: id -> row), in the order given.

    Raises:
        ValueError: an id has no row (the feature file is stale: rerun ``dvc repro``).
    """
    missing = [u for u in utterance_ids if u not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} utterances have no row in this feature file (e.g. {missing[:3]}); "
            "the features are stale: rerun `dvc repro`"
        )
    return [index[u] for u in utterance_ids]


# Rows of a mapped table: a slice when they are consecutive and ascending (one contiguous read), else
# an int64 array of row numbers (a gather).
Rows = slice | np.ndarray


class MappedFeatureTable:
    """A feature file mapped into memory: the features are read from the file only when rows are asked for.

    What :func:`open_table` returns; the same lookups as :class:`FeatureTable` (:meth:`rows`,
    :attr:`utterance_ids`, :attr:`info`, :attr:`dim`, :attr:`reasons`, :meth:`reason_counts`), without
    holding the ``[N, D]`` features in memory: the operating system pages in the parts of the file
    that are read, and can drop them again under memory pressure (they are clean file pages, not
    process memory), so the features of a corpus need not fit in RAM. The small per-row arrays (ids,
    ``mask``, reasons) are read when the file is opened.

    The mapping is taken when the file is opened and stays valid if the file is later replaced (the
    stages write by rename, and the open mapping keeps the old file's data), or the working directory
    changes. Pickling (for example to a worker process) does not copy the features: the table is
    reopened from its path in the other process, and a ValueError says so if the file changed since.

    Attributes:
        path: the (absolute) path of the file.
        utterance_ids: row order, length N.
        mask: ``[N]`` bool, True where the modality is present.
        reasons: length-N reason codes from :data:`REASONS`.
        info: what produced the features.
        array: ``[N, D]`` read-only float32 ``numpy.memmap`` of the features (no data read until indexed).
    """

    def __init__(
        self,
        path: Path,
        utterance_ids: list[str],
        array: np.ndarray,
        mask: torch.Tensor,
        reasons: list[str],
        info: dict[str, Any],
        identity: tuple[int, ...],
    ) -> None:
        self.path, self.utterance_ids, self.array = path, utterance_ids, array
        self.mask, self.reasons, self.info = mask, reasons, info
        self._identity = identity  # (device, inode, size, mtime): which file was mapped
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.utterance_ids)

    def __repr__(self) -> str:
        return f"MappedFeatureTable({str(self.path)!r}, rows={len(self)}, dim={self.dim})"

    def __reduce__(self):
        # np.memmap pickles as a full in-memory copy of the array: reopen the file instead.
        return _reopen, (str(self.path), self._identity)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def locate(self, utterance_ids: list[str]) -> Rows:
        """Where the given ids' rows are, in that order: ``slice(a, b)`` when they are the consecutive
        rows ``a .. b-1`` (a dialogue usually is), else an int64 array of row numbers. For
        :meth:`read` and :meth:`read_mask`; look rows up once and read them many times.

        Raises:
            ValueError: an id is not in the table (the feature file is stale: rerun ``dvc repro``).
        """
        if self._index is None:
            self._index = {u: i for i, u in enumerate(self.utterance_ids)}
        numbers = np.asarray(_row_numbers(self._index, utterance_ids), dtype=np.int64)
        if len(numbers) and np.array_equal(numbers, np.arange(numbers[0], numbers[0] + len(numbers))):
            return slice(int(numbers[0]), int(numbers[0]) + len(numbers))
        return numbers

    def share_ids(self, other: MappedFeatureTable) -> None:
        """Use ``other``'s id list and id -> row lookup when this table has the same ids in the same
        order (the feature files of one run do): one copy in memory instead of one per file (the ids
        and their lookup take about 0.2 KB per utterance). Does nothing when the ids differ."""
        if other is not self and self.utterance_ids == other.utterance_ids:
            if other._index is None:
                other._index = {u: i for i, u in enumerate(other.utterance_ids)}
            self.utterance_ids, self._index = other.utterance_ids, other._index

    def read(self, rows: Rows, out: torch.Tensor | None = None) -> torch.Tensor:
        """The features of ``rows`` (from :meth:`locate`): ``[n, D]`` float32, a writable copy read
        from the file now (a slice reads one contiguous range of the file, an array gathers rows).

        Args:
            out: a contiguous ``[n, D]`` float32 CPU tensor to read into (and return) instead of a new
                one (:func:`pipeline.data.collate` reads a batch's rows straight into the batch).
        """
        count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        if out is None:
            out = torch.empty((count, self.dim), dtype=torch.float32)
        elif tuple(out.shape) != (count, self.dim) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, expected contiguous float32 {(count, self.dim)}")
        np.copyto(out.numpy(), self.array[rows])
        return out

    def read_mask(self, rows: Rows) -> torch.Tensor:
        """The mask of ``rows`` (from :meth:`locate`): ``[n]`` bool, a copy."""
        return self.mask[rows].clone() if isinstance(rows, slice) else self.mask[torch.from_numpy(rows)]

    def rows(self, utterance_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[len(ids), D]`` float32 (a writable copy) and mask ``[len(ids)]`` bool for the
        given ids, in that order; only these rows are read from the file.

        Raises:
            ValueError: an id is not in the table (the feature file is stale: rerun ``dvc repro``).
        """
        rows = self.locate(utterance_ids)
        return self.read(rows), self.read_mask(rows)

    def reason_counts(self) -> dict[str, int]:
        return {r: self.reasons.count(r) for r in REASONS if r in self.reasons}


# safetensors' dtype names -> numpy dtypes (little-endian), for the tensors a feature file holds.
_DTYPES = {"F32": np.dtype("<f4"), "U8": np.dtype("u1"), "BOOL": np.dtype("u1")}
_ALLOWED = {"features": ("F32",), "mask": ("U8", "BOOL"), "reason": ("U8",)}
_MAX_HEADER = 100 * 2**20  # safetensors refuses larger headers too


def open_table(path: str | Path) -> MappedFeatureTable:
    """Map a feature file written by :func:`save_table`, reading only its header, ids, mask and reasons.

    The features (``[N, D]`` float32, most of the file) are mapped with ``numpy.memmap``, read-only:
    nothing of them is read until rows are asked for (:meth:`MappedFeatureTable.rows`), which is why
    training and evaluation use this rather than :func:`load_table` (safetensors is memory-mappable:
    the tensors are stored raw, row-major, at offsets the header gives).

    Raises:
        FileNotFoundError: with the stage that writes it, when the file does not exist.
        ValueError: the file is not a complete feature file of this pipeline (truncated, corrupt
            header, wrong dtype or shape, sizes that disagree with the file's length, unknown reason
            codes); the message names the file and says to rerun its stage.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: feature file not found; run its extraction stage (`dvc repro`)")

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a complete feature file ({why}); rerun the stage that writes it (`dvc repro`)")

    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        size = stat.st_size
        if size < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > min(size - 8, _MAX_HEADER):
            raise bad(f"header length {header_size} but {size - 8} bytes follow")
        try:
            header = json.loads(f.read(header_size))
            erc = json.loads(header["__metadata__"]["erc"])
            utterance_ids, info = erc["utterance_ids"], erc["info"]
            if not isinstance(utterance_ids, list) or not all(isinstance(u, str) for u in utterance_ids):
                raise TypeError("the header or the utterance ids are not what save_table writes")
        except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise bad(f"no readable header with 'erc' metadata: {type(err).__name__}: {err}") from None
        data_start, n = 8 + header_size, len(utterance_ids)
        spans, arrays = {}, {}
        for name, dtypes in _ALLOWED.items():
            entry = header.get(name)
            if not isinstance(entry, dict):
                raise bad(f"no '{name}' tensor")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if dtype not in dtypes:
                raise bad(f"'{name}' is {dtype}, expected {' or '.join(dtypes)}")
            rank = 2 if name == "features" else 1
            if (
                not isinstance(shape, list)
                or len(shape) != rank
                or not all(isinstance(s, int) and s >= 0 for s in shape)
                or shape[0] != n
            ):
                raise bad(f"'{name}' has shape {shape}, expected {rank}-D with {n} rows (one per utterance id)")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                raise bad(f"'{name}' has data_offsets {offsets}")
            begin, end = offsets
            nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
            if not 0 <= begin <= end or end - begin != nbytes:
                raise bad(f"'{name}' spans bytes {begin}..{end} of the data, but its shape {shape} needs {nbytes}")
            spans[name] = (begin, end)
        needed = data_start + max(end for _, end in spans.values())
        if needed != size:  # the spec: the data buffer is fully indexed, no holes, nothing after it
            state = "truncated" if size < needed else "trailing bytes after the data"
            raise bad(f"{state}: the header describes {needed} bytes, the file has {size}")
        for name in ("mask", "reason"):
            begin, end = spans[name]
            f.seek(data_start + begin)
            arrays[name] = np.frombuffer(f.read(end - begin), dtype=np.uint8).copy()
        begin, _ = spans["features"]
        shape = tuple(header["features"]["shape"])
        if shape[0] * shape[1] == 0:  # mmap cannot map zero bytes
            array = np.zeros(shape, dtype=_DTYPES["F32"])
        else:
            array = np.memmap(f, dtype=_DTYPES["F32"], mode="r", offset=data_start + begin, shape=shape)
    codes = arrays["reason"]
    if len(codes) and int(codes.max()) >= len(REASONS):
        raise bad(f"reason code {int(codes.max())} is not one of the {len(REASONS)} known codes")
    return MappedFeatureTable(
        path,
        utterance_ids,
        array,
        torch.from_numpy(arrays["mask"]).bool(),
        [REASONS[i] for i in codes.tolist()],
        info,
        (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns),
    )


def _reopen(path: str, identity: tuple[int, ...]) -> MappedFeatureTable:
    """Unpickle a :class:`MappedFeatureTable`: map its file again, if it is still the same file."""
    table = open_table(path)
    if table._identity != identity:
        raise ValueError(
            f"{path} changed since its feature table was opened (a stage rewrote it): reload the dialogues"
        )
    return table


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
    """Read a feature file written by :func:`save_table`, all of it (for the rows of some utterances,
    :func:`open_table` maps the file instead and reads only those rows).

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
