"""The one place that imports DGL. Everything else does ``from pipeline.dgl_compat import dgl``.

Why: the newest Linux wheel on PyPI, dgl 2.1.0, ships graphbolt (its new sampling layer) compiled only
for torch <= 2.2.1, and ``dgl/__init__`` always imports graphbolt, so ``import dgl`` fails on a modern
torch with ``FileNotFoundError: Cannot find DGL C++ graphbolt library``. This project uses only DGL's
graph core (``dgl.graph``, ``dgl.batch``, message passing, ``dgl.nn`` convolutions, ``save_graphs``),
which works once graphbolt's import is satisfied. So, when the real graphbolt cannot load, a stand-in
module is registered under ``dgl.graphbolt`` before the first ``import dgl``; any use of it raises.
See ``../shared/notes/dependencies.md`` (measured facts) and the README's "Dependencies" section.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

os.environ.setdefault("DGLBACKEND", "pytorch")


class _GraphboltStandIn(types.ModuleType):
    """Stands in for ``dgl.graphbolt``; every attribute lookup fails with AttributeError.

    AttributeError (not ImportError) matters: transformers and others probe module attributes such as
    ``__file__`` with ``hasattr`` and break on any other exception.
    """

    def __getattr__(self, name: str):
        raise AttributeError(
            f"dgl.graphbolt.{name} is unavailable: graphbolt has no build for this torch "
            "(see pipeline/dgl_compat.py); this project uses only DGL's graph core"
        )


def _graphbolt_loads() -> bool:
    spec = importlib.util.find_spec("dgl")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    gb_dir = os.path.join(spec.submodule_search_locations[0], "graphbolt")
    version = torch.__version__.split("+")[0]
    return os.path.exists(os.path.join(gb_dir, f"libgraphbolt_pytorch_{version}.so"))


if "dgl" not in sys.modules and not _graphbolt_loads():
    stand_in = _GraphboltStandIn("dgl.graphbolt")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("dgl.graphbolt", loader=None)
    stand_in.__path__ = []  # a package, so that ``import dgl.graphbolt.x`` fails cleanly
    sys.modules["dgl.graphbolt"] = stand_in

import dgl  # noqa: E402  (must follow the stand-in)
import dgl.function as fn  # noqa: E402
from dgl.nn.pytorch import GraphConv, RelGraphConv  # noqa: E402
from dgl.nn.functional import edge_softmax  # noqa: E402

__all__ = ["dgl", "fn", "GraphConv", "RelGraphConv", "edge_softmax"]
