"""ComputeGraph → ``torch_geometric.data.Data``: the features a predictor learns from.

Node features ``x`` (``float32``, ``NUM_NODE_FEATURES`` columns) are, in order:

1. one-hot op type over :data:`aiop.cg.vocab.OP_VOCAB` plus one out-of-vocabulary
   slot (``len(OP_VOCAB) + 1`` columns);
2. the numeric features of :data:`NUMERIC_FEATURES`, each log-scaled and
   divided by a fixed constant so typical values fall in [0, 1]:

   ========== ============================================= =================
   name       meaning                                       scaling
   ========== ============================================= =================
   flops      FLOPs of the node at batch 1 (2 × MACs)       log10(1+v) / 12
   params     learned parameters                            log10(1+v) / 9
   buffers    non-learned state (BN running stats)          log10(1+v) / 9
   act_bytes  bytes of the node's outputs at batch 1        log10(1+v) / 10
   c_in       channels of the first input (dim 1)           log2(1+v) / 12
   c_out      channels of the first output (dim 1)          log2(1+v) / 12
   h_in/w_in  spatial size of the first input (rank 4)      log2(1+v) / 10
   h_out/w_out spatial size of the first output (rank 4)    log2(1+v) / 10
   kernel     largest kernel dimension (1 if none)          log2(1+v) / 4
   stride     largest stride (1 if none)                    log2(1+v) / 3
   groups     convolution groups (1 if none)                log2(v) / 12
   depthwise  1 when groups == c_in > 1                     as is
   has_bias   1 when a parameter named ``*bias`` feeds it   as is
   is_view    1 when PyTorch returns a view (no storage)    as is
   ========== ============================================= =================

3. the per-node flags an m-configuration sets (:data:`FLAG_FEATURES`):
   ``trainable`` (autograd keeps this node's activations for a trainable
   parameter at or before it) and ``recomputed`` (inside a gradient-checkpoint
   segment). Without a configuration: trainable 1, recomputed 0 (plain full
   training).

``edge_index`` is ``[2, E]`` (source, target); ``edge_attr`` is ``[E, 1]``:
log10(1 + tensor bytes at batch 1) / 10. ``op_index`` is the vocabulary index
of each node (for embedding layers). ``graph_attr`` is ``[1, 4]``: log10 of
1 + total FLOPs / 12, params / 9, activation bytes / 10, and log2(1 + nodes) / 12.
``config`` is ``[1, D]``: the configuration's ``as_vector()`` (zeros of width 0
without one).

``FEATURE_VERSION`` names this layout; predictors record it and refuse graphs
featurised under another version.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from aiop.cg.graph import ComputeGraph, Node
from aiop.cg.vocab import OOV_INDEX, OP_VOCAB, op_index

FEATURE_VERSION = 1

NUMERIC_FEATURES: tuple[str, ...] = (
    "flops",
    "params",
    "buffers",
    "act_bytes",
    "c_in",
    "c_out",
    "h_in",
    "w_in",
    "h_out",
    "w_out",
    "kernel",
    "stride",
    "groups",
    "depthwise",
    "has_bias",
    "is_view",
)
FLAG_FEATURES: tuple[str, ...] = ("trainable", "recomputed")
NUM_OP_SLOTS = OOV_INDEX + 1
NUM_NODE_FEATURES = NUM_OP_SLOTS + len(NUMERIC_FEATURES) + len(FLAG_FEATURES)
NUM_EDGE_FEATURES = 1
NUM_GRAPH_FEATURES = 4


class NodeAnnotator(Protocol):
    """What ``to_pyg`` needs of an m-configuration (``aiop.mconfig.MConfig`` provides it)."""

    def node_flags(self, cg: ComputeGraph) -> dict[str, list[bool]]: ...

    def as_vector(self) -> list[float]: ...


def _l10(v: float, scale: float) -> float:
    return math.log10(1.0 + max(v, 0.0)) / scale


def _l2(v: float, scale: float) -> float:
    return math.log2(1.0 + max(v, 0.0)) / scale


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of a tensor shape; rank < 4 gives the last dim as channels."""
    if len(shape) == 4:
        return shape[1], shape[2], shape[3]
    if len(shape) >= 2:
        return shape[-1], 1, 1
    if len(shape) == 1:
        return shape[0], 1, 1
    return 0, 0, 0


def numeric_features(node: Node) -> list[float]:
    """The :data:`NUMERIC_FEATURES` of one node, scaled."""
    in_shape = node.input_shapes[0] if node.input_shapes else ()
    out_shape = node.output_shapes[0] if node.output_shapes else ()
    c_in, h_in, w_in = _dims(tuple(in_shape))
    c_out, h_out, w_out = _dims(tuple(out_shape))
    attrs = node.attrs
    kernel = max(attrs.get("kernel_shape") or [1])
    stride = max(attrs.get("strides") or [1])
    groups = int(attrs.get("group", 1) or 1)
    return [
        _l10(node.flops, 12),
        _l10(node.params, 9),
        _l10(node.buffers, 9),
        _l10(node.output_bytes, 10),
        _l2(c_in, 12),
        _l2(c_out, 12),
        _l2(h_in, 10),
        _l2(w_in, 10),
        _l2(h_out, 10),
        _l2(w_out, 10),
        _l2(kernel, 4),
        _l2(stride, 3),
        math.log2(max(groups, 1)) / 12,
        1.0 if groups > 1 and groups == c_in else 0.0,
        1.0 if any(n.endswith("bias") for n in node.param_names) else 0.0,
        1.0 if node.is_view else 0.0,
    ]


def node_feature_matrix(cg: ComputeGraph, flags: dict[str, list[bool]] | None = None) -> np.ndarray:
    """``[N, NUM_NODE_FEATURES]`` node features (see the module docstring)."""
    n = cg.num_nodes
    x = np.zeros((n, NUM_NODE_FEATURES), dtype=np.float32)
    x[np.arange(n), [op_index(node.op) for node in cg.nodes]] = 1.0
    start = NUM_OP_SLOTS
    x[:, start : start + len(NUMERIC_FEATURES)] = np.asarray(
        [numeric_features(node) for node in cg.nodes], dtype=np.float32
    ).reshape(n, len(NUMERIC_FEATURES))
    start += len(NUMERIC_FEATURES)
    if flags is None:
        x[:, start] = 1.0
    else:
        for k, name in enumerate(FLAG_FEATURES):
            column = flags.get(name)
            if column is None or len(column) != n:
                raise ValueError(f"node flag {name!r} must give one value per node ({n})")
            x[:, start + k] = np.asarray(column, dtype=np.float32)
    return x


def graph_features(cg: ComputeGraph) -> list[float]:
    return [
        _l10(cg.total_flops, 12),
        _l10(cg.total_params, 9),
        _l10(cg.total_activation_bytes, 10),
        _l2(cg.num_nodes, 12),
    ]


def to_pyg(cg: ComputeGraph, mconfig: NodeAnnotator | None = None):
    """The PyG ``Data`` of ``cg``, with the per-node flags and vector of ``mconfig`` if given."""
    from torch_geometric.data import Data

    flags = mconfig.node_flags(cg) if mconfig is not None else None
    x = node_feature_matrix(cg, flags)
    if cg.edges:
        edge_index = np.asarray([[e.src, e.dst] for e in cg.edges], dtype=np.int64).T
        edge_attr = np.asarray([[_l10(e.bytes, 10)] for e in cg.edges], dtype=np.float32)
    else:
        edge_index = np.zeros((2, 0), dtype=np.int64)
        edge_attr = np.zeros((0, NUM_EDGE_FEATURES), dtype=np.float32)
    config = mconfig.as_vector() if mconfig is not None else []
    return Data(
        x=torch.from_numpy(x),
        edge_index=torch.from_numpy(np.ascontiguousarray(edge_index)),
        edge_attr=torch.from_numpy(edge_attr),
        op_index=torch.tensor([op_index(node.op) for node in cg.nodes], dtype=torch.long),
        graph_attr=torch.tensor([graph_features(cg)], dtype=torch.float32),
        config=torch.tensor([config], dtype=torch.float32),
        num_nodes=cg.num_nodes,
    )


__all__ = [
    "FEATURE_VERSION",
    "FLAG_FEATURES",
    "NUMERIC_FEATURES",
    "NUM_EDGE_FEATURES",
    "NUM_GRAPH_FEATURES",
    "NUM_NODE_FEATURES",
    "NUM_OP_SLOTS",
    "OP_VOCAB",
    "graph_features",
    "node_feature_matrix",
    "numeric_features",
    "to_pyg",
]
