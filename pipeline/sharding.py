"""Sharded extraction: a fixed plan of work units, run locally, under torchrun, or on a Ray actor pool.

Why a fixed plan: an encoder's output for an utterance can depend, in the last float digits, on which
other utterances share its batch (padding, MTCNN's batched detection). When an engine chooses the
batches, 1 and 2 workers write different bytes (measured with Ray Data: 2 of 50 rows differed by
1e-7). Here the plan is made before any engine sees the work, from the utterance table alone:

* a **work unit** is ``shard_size`` consecutive rows of the utterance table (:func:`plan_units`), the
  same whatever the number of workers or what the resume cache holds;
* a unit with any row still to extract is computed **whole** (:func:`units_to_run`), its finished rows
  along, so a resumed run batches every input exactly as an uninterrupted one;
* workers are **pure**: a payload (utterance ids, texts or media paths and segments) in, a list of
  :class:`UnitResult` out; they load their encoder once and write nothing;
* the **driver** (this process, or rank 0 under torchrun) alone owns the resume cache
  (:class:`pipeline.extraction_cache.ExtractionCache`) and the final safetensors file, and receives the
  results in plan order (:func:`map_units`).

Backends (``runtime.backend``, ``runtime.workers``):

* ``local``: the units run one after the other in this process;
* ``torchrun``: the stage relaunches itself with ``python -m torch.distributed.run --standalone
  --nproc_per_node W`` (:func:`relaunch_under_torchrun`); rank 0 drives, every rank (rank 0 included)
  computes units ``k * W + rank``; payloads and results travel as objects over a gloo process group
  (``broadcast_object_list`` / ``gather_object``), one round of W units at a time; each rank uses
  ``cuda:LOCAL_RANK`` when there are GPUs;
* ``ray``: an ``ActorPool`` of W actors (``num_gpus=runtime.gpus_per_worker`` each) on the cluster of
  ``RAY_ADDRESS`` (``host:port``; a local one when unset); results come back in submission order.
  Ray is an optional extra (``pip install -e .[ray]``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.config import RuntimeParams

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")  # set by torchrun in every process it starts


@dataclass(frozen=True)
class WorkUnit:
    """One unit of the plan: ``rows`` are consecutive row indices of the utterance table."""

    index: int
    rows: range


@dataclass
class UnitResult:
    """A worker's result for one utterance.

    Attributes:
        utterance_id: the utterance.
        vector: ``[D]`` float32 features, or None when the modality is masked.
        reason: a reason code of :data:`pipeline.feature_table.REASONS` (``ok`` when ``vector`` is set).
        diagnostics: per-utterance facts for the report (JSON-serialisable).
        warning: a message for the driver's log (a masked clip and why), or None.
    """

    utterance_id: str
    vector: Any
    reason: str = "ok"
    diagnostics: dict = field(default_factory=dict)
    warning: str | None = None


class UnitWorker(Protocol):
    """What an engine runs: picklable before it has loaded anything, called once per payload."""

    def __call__(self, payload: Any) -> tuple[list[UnitResult], dict]:
        """Compute one unit: (one result per item of the payload, in order; timing facts to sum up)."""
        ...


def plan_units(n_rows: int, shard_size: int, align: int = 1) -> list[WorkUnit]:
    """The fixed plan: consecutive units of ``shard_size`` rows (rounded up to a multiple of ``align``).

    Args:
        n_rows: rows of the utterance table.
        shard_size: rows per unit (``<modality>.shard_size``).
        align: units hold whole groups of this many rows (the visual stage's detection groups,
            ``visual.clips_per_batch``), so that no group straddles two units.

    Raises:
        ValueError: ``shard_size`` or ``align`` below 1.
    """
    if shard_size < 1 or align < 1:
        raise ValueError(f"shard_size and align must be at least 1, got {shard_size} and {align}")
    size = -(-shard_size // align) * align
    return [WorkUnit(k, range(start, min(start + size, n_rows))) for k, start in enumerate(range(0, n_rows, size))]


def units_to_run(units: Sequence[WorkUnit], pending_rows: set[int]) -> list[WorkUnit]:
    """The units that hold a row still to extract (each is computed whole), in plan order."""
    return [u for u in units if any(r in pending_rows for r in u.rows)]


# ---------------------------------------------------------------------------------------------------
# torchrun


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (``torch.distributed.run``)."""
    return all(os.environ.get(k) is not None for k in TORCHRUN_ENV)


def rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from torchrun's environment; ``(0, 1)`` outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def relaunch_under_torchrun(workers: int, argv: list[str] | None = None, keep_threads: bool = True) -> None:
    """Replace this process by ``python -m torch.distributed.run --standalone --nproc_per_node W -m <module> argv``.

    Does nothing when already under torchrun or with one worker. ``<module>`` is the ``-m`` module this
    process runs (``pipeline.extract_text``, ``pipeline.train``): the stage's own command line is kept,
    so ``dvc.yaml``'s commands do not change. ``--standalone`` runs one node with a free local port.
    ``keep_threads``: the processes keep this process's torch thread count (extraction: the bytes
    depend on it) instead of torchrun's one thread each (training: W processes share the cores).

    Raises:
        RuntimeError: this process was not started with ``python -m`` (no module to relaunch).
    """
    if workers <= 1 or under_torchrun():
        return
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise RuntimeError("runtime.backend torchrun needs the stage to run as `python -m pipeline.<stage>`")
    args = sys.argv[1:] if argv is None else argv
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}"]
    command += ["-m", spec.name, *args]
    log.info("runtime: relaunching under torchrun with %d processes: %s", workers, " ".join(command[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    import torch

    # torchrun gives each process one thread unless OMP_NUM_THREADS is set: keep this process's count,
    # so that the workers compute as a one-process run does (CPU results depend on the thread count)
    env = dict(os.environ)
    if keep_threads:
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    os.execve(sys.executable, command, env)


def _object_group():
    """The process group for Python objects (gloo; created on first use from torchrun's environment)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.get_backend() == "gloo":
        return None  # the default group
    global _GLOO
    if _GLOO is None:
        _GLOO = dist.new_group(backend="gloo")
    return _GLOO


_GLOO = None


def _broadcast(message: Any) -> Any:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0, group=_object_group())
    return box[0]


def _torchrun_rounds(worker: UnitWorker | None, payloads: list | None) -> Iterator[tuple[list[UnitResult], dict]]:
    """Every rank: compute units ``k * W + rank``; rank 0 yields all results in plan order."""
    import torch
    import torch.distributed as dist

    rank, world = rank_and_world()
    if rank == 0:
        _broadcast((worker, payloads, torch.get_num_threads()))
    else:
        worker, payloads, threads = _broadcast(None)
        torch.set_num_threads(threads)  # the driver's: CPU results depend on the thread count
    group = _object_group()
    for first in range(0, len(payloads), world):
        k = first + rank
        mine = worker(payloads[k]) if k < len(payloads) else None
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0, group=group)
        if rank == 0:
            yield from (g for g in gathered if g is not None)


def serve() -> None:
    """A torchrun rank other than 0: compute this rank's share of each :func:`map_units` call of rank 0
    until rank 0 says the stage is over (:func:`release`)."""
    while _broadcast(None) == "go":
        for _ in _torchrun_rounds(None, None):
            pass
    close_process_group()


def release() -> None:
    """Rank 0 under torchrun: tell the other ranks that the stage is over (nothing elsewhere)."""
    if under_torchrun() and rank_and_world()[1] > 1:
        _broadcast("done")
        close_process_group()


def close_process_group() -> None:
    """Wait for every rank, then destroy the process group: no rank exits while another still reads
    from it (gloo aborts a process whose peer has gone mid-collective)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=_object_group())
        dist.destroy_process_group()
        global _GLOO
        _GLOO = None


# ---------------------------------------------------------------------------------------------------
# ray


def _ray_results(worker: UnitWorker, payloads: list, runtime: RuntimeParams) -> Iterator[tuple[list[UnitResult], dict]]:
    """Run the payloads on an ``ActorPool`` of ``runtime.workers`` actors; results in submission order."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ValueError("runtime.backend is ray but ray is not installed: pip install -e '.[ray]'") from None
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS") or None
        log.info("runtime: ray on %s with %d actors", address or "a local cluster", runtime.workers)
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=True)
    try:
        import torch

        threads = torch.get_num_threads()
        actor = ray.remote(num_cpus=1, num_gpus=runtime.gpus_per_worker)(_RayUnitActor)
        pool = ActorPool([actor.remote(worker, threads) for _ in range(min(runtime.workers, len(payloads)))])
        yield from pool.map(lambda a, p: a.run.remote(p), payloads)
    finally:
        if started:
            ray.shutdown()


class _RayUnitActor:
    """A Ray actor that holds one worker (and so one loaded encoder) for all its units."""

    def __init__(self, worker: UnitWorker, threads: int):
        import torch

        torch.set_num_threads(threads)  # the driver's: CPU results depend on the thread count
        self.worker = worker

    def run(self, payload: Any) -> tuple[list[UnitResult], dict]:
        return self.worker(payload)


# ---------------------------------------------------------------------------------------------------


def map_units(worker: UnitWorker, payloads: list, runtime: RuntimeParams) -> Iterator[tuple[list[UnitResult], dict]]:
    """Run ``worker`` on every payload with ``runtime.backend``; yield its results in payload order.

    Called by the driver only (under torchrun: rank 0, while the other ranks are in :func:`serve`).
    ``worker`` must be picklable before it is first called (it loads its encoder lazily), because the
    ``torchrun`` and ``ray`` backends send it to the other processes. Every worker computes with the
    driver's torch thread count (``runtime.threads``, or torch's default where the driver runs): on the
    CPU the last bits of a matrix product depend on it (measured: 2,000 MELD utterances, 1 and 2
    threads write different ``text.safetensors`` bytes), whereas torchrun and Ray would give each
    worker one thread.

    Raises:
        ValueError: ``ray`` is asked for but not installed.
    """
    if not payloads:
        return
    if runtime.backend == "ray":
        yield from _ray_results(worker, payloads, runtime)
    elif under_torchrun() and rank_and_world()[1] > 1:
        _broadcast("go")
        yield from _torchrun_rounds(worker, payloads)
    else:
        yield from (worker(p) for p in payloads)


def extract_units(
    cache,
    utterance_ids: list[str],
    signatures: list[str],
    no_input: Callable[[int], str | None],
    plan: list[WorkUnit],
    payload_item: Callable[[int], Any],
    worker: UnitWorker,
    runtime: RuntimeParams,
    desc: str,
) -> dict:
    """The driver of an extraction stage: plan, resume, dispatch, and store every result in ``cache``.

    Args:
        cache: the stage's :class:`pipeline.extraction_cache.ExtractionCache` (written here only).
        utterance_ids, signatures: per row of the utterance table, its id and input signature.
        no_input: ``row -> reason or None``: the reason code of a row with nothing to encode
            (``empty_text``, ``missing_clip``), recorded here without a worker.
        plan: :func:`plan_units` of the table.
        payload_item: ``row -> item``: what a worker needs of a row (ids, text, paths, segment).
        worker: the stage's :class:`UnitWorker`.
        desc: the progress bar's label.

    Returns:
        ``resumed`` (rows reused from the cache), ``computed`` (rows sent to workers), ``units`` (units
        run) and the workers' timing facts summed over units.
    """
    from tqdm import tqdm

    n = len(utterance_ids)
    cached = {r for r in range(n) if cache.is_done(utterance_ids[r], signatures[r])}
    pending = set()
    for r in range(n):
        if r in cached:
            continue
        reason = no_input(r)
        if reason:
            cache.put(utterance_ids[r], signatures[r], None, reason)
        else:
            pending.add(r)
    todo = units_to_run(plan, pending)
    rows = [[r for r in unit.rows if not no_input(r)] for unit in todo]
    cache.resumed = len(cached - {r for unit_rows in rows for r in unit_rows})  # reused, not sent again
    cache.log_resumed(n)
    facts: dict[str, float] = {}
    payloads = [[payload_item(r) for r in unit_rows] for unit_rows in rows]
    with tqdm(total=sum(map(len, rows)), desc=desc, unit="utt") as bar:
        for unit_rows, (results, unit_facts) in zip(rows, map_units(worker, payloads, runtime)):
            for r, result in zip(unit_rows, results, strict=True):
                if result.utterance_id != utterance_ids[r]:
                    raise RuntimeError(
                        f"work unit out of order: {result.utterance_id} for row {r} ({utterance_ids[r]})"
                    )
                if result.warning:
                    log.warning("%s", result.warning)
                vector = None if result.vector is None else _as_tensor(result.vector)
                cache.put(result.utterance_id, signatures[r], vector, result.reason, result.diagnostics)
            for key, value in unit_facts.items():
                facts[key] = facts.get(key, 0.0) + value
            bar.update(len(unit_rows))
    return {"resumed": cache.resumed, "computed": sum(map(len, rows)), "units": len(todo), **facts}


def _as_tensor(vector: Any):
    """A worker's vector as a tensor (numpy arrays copied: Ray hands out read-only ones)."""
    import torch

    return vector if isinstance(vector, torch.Tensor) else torch.tensor(vector)
