"""Resumable, reproducible training runs: seeds and deterministic kernels, the per-epoch resume
checkpoint, and the random generators' state (used by the ``train`` and ``finetune_text`` stages).

A run that gets killed (pre-empted GPU time) resumes after its last finished epoch from
``<resume dir>/last.pt`` when that file was written for the same run (:class:`ResumeCheckpoint`,
keyed by a fingerprint of params, inputs, code and runtime), and then writes the same bytes as an
uninterrupted run on the CPU. The design follows SpeechBrain's Checkpointer (model, optimizer,
scheduler and epoch recovered together).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.encoders import default_device

log = logging.getLogger(__name__)

RESUME_FILE = "last.pt"
# cuBLAS needs a fixed workspace for reproducible results (CUDA >= 10.2): one of these two values.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
# What torch says (warn_only=True) for an op that has no deterministic kernel.
_NONDETERMINISTIC = re.compile(r"^\s*(?P<op>\S+?)\s+does not have a deterministic implementation")


def set_seed(seed: int, device: torch.device | str | None = None) -> None:
    """Seed Python, NumPy and torch (every CUDA device too), and ask torch for deterministic algorithms.

    On CUDA (``device``, default :func:`default_device`) also set ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
    unless it already holds a deterministic value. cuBLAS reads it once, at its first call in the
    process, so this must run before any CUDA matrix product (the train stage's process makes none
    before). cuDNN's autotuner is switched off (it may pick another kernel per run). Ops without a
    deterministic kernel only warn (``warn_only=True``); :func:`log_nondeterministic_ops` logs them.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if current not in CUBLAS_DETERMINISTIC:
            if current is not None:
                log.warning("CUBLAS_WORKSPACE_CONFIG=%s is not deterministic; using :4096:8", current)
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device as well
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def log_nondeterministic_ops() -> Iterator[set[str]]:
    """Turn torch's warnings about ops without a deterministic (CUDA) kernel into one log line per op.

    Yields the set of such ops seen so far. Other warnings are shown as usual.
    """
    seen: set[str] = set()
    with warnings.catch_warnings():  # restores the filters and warnings.showwarning on exit
        warnings.filterwarnings("always", message=r".*does not have a deterministic implementation")
        warnings.filterwarnings("always", message=r".*CUBLAS_WORKSPACE_CONFIG")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            match = _NONDETERMINISTIC.match(text)
            if match:
                op = match.group("op")
                if op not in seen:
                    seen.add(op)
                    log.warning(
                        "op %s has no deterministic CUDA kernel: results may differ run to run in the last digits", op
                    )
                return
            if "CUBLAS_WORKSPACE_CONFIG" in text:
                if "cublas" not in seen:
                    seen.add("cublas")
                    log.warning(
                        "cuBLAS started before CUBLAS_WORKSPACE_CONFIG was set (something used CUDA "
                        "matrix products before training): results may differ run to run in the last "
                        "digits; run the stage in a fresh process"
                    )
                return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield seen


def digest(*chunks: bytes | str) -> hashlib._Hash:
    """A sha256 over ``chunks`` (strings UTF-8 encoded), each followed by a NUL separator."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.encode() if isinstance(chunk, str) else chunk)
        digest.update(b"\0")
    return digest


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's dtype, shape and raw bytes (for a fingerprint of training inputs)."""
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes()


class ResumeCheckpoint:
    """The resume checkpoint of one training run: ``<directory>/last.pt``.

    Opening it loads ``last.pt`` when it exists and was written for ``fingerprint`` (named hashes of
    what the run depends on: params, inputs, code, runtime); a stale or unreadable one is deleted.
    Either way the log says which and why (``stage`` names the run in the log). :meth:`save` writes
    it atomically (a kill mid-write leaves the previous one); :meth:`finish` deletes it once the run's
    outputs are written.
    """

    def __init__(self, directory: str | Path, fingerprint: dict[str, str], stage: str = "train"):
        self.path = Path(directory) / RESUME_FILE
        self.stage = stage
        self.log = logging.getLogger(f"pipeline.{stage}")  # the stage's own log
        self.fingerprint = dict(fingerprint)
        self.state: dict | None = self._load()

    @property
    def resuming(self) -> bool:
        return self.state is not None

    def _discard(self, why: str) -> None:
        self.log.warning("%s: starting fresh: %s %s; deleted", self.stage, self.path, why)
        self.path.unlink(missing_ok=True)

    def _load(self) -> dict | None:
        if not self.path.exists():
            self.log.info("%s: starting fresh (no resume checkpoint %s)", self.stage, self.path)
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            written_for = dict(state["fingerprint"])
            epoch = int(state["epoch"])
        except Exception as err:  # noqa: BLE001 - any unreadable file means: start over
            self._discard(f"cannot be read ({type(err).__name__}: {err})")
            return None
        differ = [
            k for k in sorted(set(written_for) | set(self.fingerprint)) if written_for.get(k) != self.fingerprint.get(k)
        ]
        if differ:
            details = "; ".join(f"{k}: {written_for.get(k)} there, {self.fingerprint.get(k)} now" for k in differ)
            self._discard(f"was written for another run ({details})")
            return None
        self.log.info(
            "%s: resuming after epoch %d from %s (written for the same params, inputs and code)",
            self.stage,
            epoch,
            self.path,
        )
        return state

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            torch.save({**state, "fingerprint": self.fingerprint}, f)

    def finish(self) -> None:
        """Delete ``last.pt`` (and its folder when that is left empty)."""
        self.path.unlink(missing_ok=True)
        self.state = None
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()


def rng_state(shuffle: random.Random, device: torch.device) -> dict:
    """Every random generator's state (Python, ``shuffle``, NumPy, torch, CUDA on ``device``), for a checkpoint."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "shuffle": shuffle.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, shuffle: random.Random, device: torch.device) -> None:
    """Put back the generators :func:`rng_state` saved."""
    random.setstate(state["python"])
    shuffle.setstate(state["shuffle"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
