"""The one place that imports DGL. Everything else does ``from pipeline.dgl_compat import dgl``.

Why: the newest Linux wheel on PyPI, dgl 2.1.0, ships graphbolt (its new sampling layer) compiled only
for torch <= 2.2.1, and ``dgl/__init__`` always imports graphbolt, so ``import dgl`` fails on a modern
torch with ``FileNotFoundError: Cannot find DGL C++ graphbolt library``. This project uses only DGL's
graph core (``dgl.graph``, ``dgl.batch``, message passing, ``dgl.nn`` convolutions, ``save_graphs``),
which works once graphbolt's import is satisfied. So, when the real graphbolt cannot load, a stand-in
module is registered under ``dgl.graphbolt`` before the first ``import dgl``; any use of it raises.
See ``../shared/notes/dependencies.md`` (measured facts) and the README's "Dependencies" section.

The same PyPI build has CPU kernels only. :func:`resolve_graph_backend` says which implementation of the
graph layers (``model.graph_backend``) runs on a device: DGL's where the installed DGL supports the
device, else the plain-torch layers of :mod:`pipeline.graph_layers`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from functools import cache

import torch

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
from dgl.nn.functional import edge_softmax  # noqa: E402
from dgl.nn.pytorch import GraphConv, RelGraphConv  # noqa: E402

GRAPH_BACKENDS = ("auto", "dgl", "torch")


@cache
def _dgl_supports(device_type: str, index: int) -> bool:
    if device_type == "cpu":
        return True
    if device_type != "cuda":
        return False  # DGL has kernels for CPU and CUDA only
    try:
        # True only when DGL was built with CUDA and the GPU exists; a CPU-only build has no CUDA device
        # API and answers False (DGL's runtime looks the API up with allow_missing).
        return bool(dgl.ndarray.gpu(index).exist)
    except Exception:  # any failure of the probe means: not usable
        return False


def dgl_supports_device(device: str | torch.device) -> bool:
    """Whether the installed DGL can run its graph kernels on ``device`` (CPU: always; CUDA: only a
    CUDA build of DGL with that GPU present; anything else: no). Never raises for a device torch knows."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return _dgl_supports(device.type, index or 0)


def resolve_graph_backend(name: str, device: str | torch.device) -> str:
    """The graph-layer implementation to run on ``device`` for ``model.graph_backend = name``.

    ``auto``: ``dgl`` where the installed DGL supports the device (:func:`dgl_supports_device`; the
    CPU with the PyPI build), ``torch`` otherwise; ``dgl`` and ``torch`` are taken as given, after
    checking that DGL can run on the device.

    Returns:
        ``"dgl"`` or ``"torch"``.

    Raises:
        ValueError: an unknown name, or ``dgl`` on a device the installed DGL has no kernels for.
    """
    if name not in GRAPH_BACKENDS:
        raise ValueError(f"model.graph_backend must be one of {', '.join(GRAPH_BACKENDS)}, got {name!r}")
    supported = dgl_supports_device(device)
    if name == "auto":
        return "dgl" if supported else "torch"
    if name == "dgl" and not supported:
        raise ValueError(
            f"model.graph_backend=dgl cannot run on {device}: the installed DGL {dgl.__version__} has no kernels "
            "for it (the PyPI build has CPU kernels only); set model.graph_backend to torch or auto"
        )
    return name


__all__ = [
    "dgl",
    "fn",
    "GraphConv",
    "RelGraphConv",
    "edge_softmax",
    "GRAPH_BACKENDS",
    "dgl_supports_device",
    "resolve_graph_backend",
]
