"""Stage ``check_data``: check ``data.root`` before DVC looks at it.

DVC checks a stage's dependencies before it runs the stage, so a ``data.root`` that does not exist
stopped ``prepare`` with DVC's bare ``[Errno 2] No such file or directory`` instead of the project's
message. This stage depends only on ``data.root`` and ``data.layout`` (params) and runs first: it stops
the pipeline with a message that names the setting and what to do
(:func:`pipeline.datasets.check_root`), and writes the checked source, which ``prepare`` depends on.

Output: ``--out`` (``data/source.json``): ``{"layout": ..., "root": ...}``.

Run: ``python -m pipeline.check_data --out data/source.json``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.datasets import check_root


def run(params: Params, out: Path) -> None:
    """Check ``data.root`` for ``data.layout`` and record both in ``out``.

    Raises:
        DatasetError: ``data.root`` does not exist, or is a file where the layout needs a folder.
    """
    check_root(params.data)
    write_json({"layout": params.data.layout, "root": params.data.root.as_posix()}, out)


if __name__ == "__main__":
    run_stage(run, "Check data.root before the pipeline reads it.", {"out": "the checked source (JSON)"})
