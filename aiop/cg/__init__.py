"""Computational graphs: import from ONNX, PyTorch and TensorFlow; export to PyG and graphviz.

>>> from aiop.cg import from_torch, to_pyg
>>> cg = from_torch(model, (1, 3, 64, 64))   # doctest: +SKIP
>>> data = to_pyg(cg)                         # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from aiop.cg.draw import draw, to_dot
from aiop.cg.graph import CGError, ComputeGraph, ConstTensor, Edge, Node, TensorSpec
from aiop.cg.onnx_import import from_onnx, load_onnx
from aiop.cg.resolve import graph_for_model, parse_input_shape

# Names whose modules import torch (seconds): loaded on first use, so that tools
# which only read graphs (the cache, the service's store) start fast.
_LAZY = {
    "from_torch": "aiop.cg.torch_import",
    "export_onnx_bytes": "aiop.cg.torch_import",
    "to_pyg": "aiop.cg.pyg",
    "FEATURE_VERSION": "aiop.cg.pyg",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aiop.cg' has no attribute {name!r}")


def from_tf_pb(path: Any, *args: Any, **kwargs: Any) -> ComputeGraph:
    """Read a frozen TensorFlow GraphDef ``.pb`` (see :mod:`aiop.cg.tf_import`)."""
    from aiop.cg.tf_import import from_tf_pb as _from_tf_pb

    return _from_tf_pb(path, *args, **kwargs)


__all__ = [
    "FEATURE_VERSION",
    "CGError",
    "ComputeGraph",
    "ConstTensor",
    "Edge",
    "Node",
    "TensorSpec",
    "draw",
    "export_onnx_bytes",
    "from_onnx",
    "from_tf_pb",
    "from_torch",
    "graph_for_model",
    "load_onnx",
    "parse_input_shape",
    "to_dot",
    "to_pyg",
]
