"""The command-line harness of every stage: ``--params``, the stage's paths, logging, clean errors.

Each stage module ends with ``run_stage(run, description, {"out": "help", ...})``: every path the stage
reads or writes is a required option, given on the stage's command line in ``dvc.yaml`` (the one place
where the pipeline's paths are written), as in DVC's example-get-started.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pipeline import sharding
from pipeline.config import DEFAULT_PARAMS, Params, ParamsError, load_params


def setup_logging() -> None:
    """INFO-level logging with times, the format every stage and command uses."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def apply_runtime(params: Params) -> None:
    """Apply ``runtime.*`` to this process: torch's CPU thread count (``runtime.threads``; unset: torch's default)."""
    if params.runtime.threads is not None:
        import torch

        torch.set_num_threads(params.runtime.threads)


def run_stage(
    stage: Callable[..., None],
    description: str,
    paths: dict[str, str],
    argv: list[str] | None = None,
    distributed: Literal["none", "units", "ddp"] = "none",
) -> None:
    """Parse ``--params`` and the stage's path options, then call ``stage(params, **paths)``.

    Args:
        paths: option name -> help text; ``{"out": ...}`` becomes a required ``--out PATH`` passed to
            ``stage`` as ``out=Path(...)`` (dashes in names become underscores).
        distributed: how the stage uses several processes (``runtime.workers``). ``units``: an
            extraction stage (:mod:`pipeline.sharding`); with ``runtime.backend: torchrun`` it
            relaunches itself under torchrun, rank 0 runs the stage and the other ranks serve its work
            units. ``ddp``: the training stage; with ``runtime.workers > 1`` it relaunches itself under
            torchrun and every rank runs the stage (DDP). ``none``: one process.

    Known input errors (bad params, a malformed dataset, a missing upstream file or model, stale
    features, a lost modality) are printed as one ``error:`` line naming the file and what to do,
    with exit status 1, not as a traceback.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    for name, help_text in paths.items():
        parser.add_argument(f"--{name}", type=Path, required=True, help=help_text)
    args = parser.parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        params: Params = load_params(args.params)
        apply_runtime(params)
        relaunch = (distributed == "units" and params.runtime.backend == "torchrun") or distributed == "ddp"
        if relaunch:
            sharding.relaunch_under_torchrun(params.runtime.workers, argv, keep_threads=distributed == "units")
        if distributed == "units" and sharding.rank_and_world()[0] > 0:
            sharding.serve()  # rank > 0 under torchrun: compute rank 0's units until it is done
            return
        try:
            stage(params, **{name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name in paths})
        finally:
            if distributed == "units":
                sharding.release()
        logging.getLogger(stage.__module__).info("stage finished in %.1f s", time.perf_counter() - start)
    except (ParamsError, OSError, ValueError) as err:  # OSError: missing files, unknown model ids
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
