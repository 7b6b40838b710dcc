"""The fixed op vocabulary of computational graphs.

Ops are named after ONNX operators (the richest common ground between PyTorch,
ONNX and TensorFlow exports). Importers map their framework's ops onto these
names; anything else is kept as its own name in ``Node.op`` but indexes the
out-of-vocabulary slot when it becomes a feature. The order of ``OP_VOCAB`` is
part of the feature format: append only, and bump ``FEATURE_VERSION`` in
``aiop.cg.pyg`` when it changes.
"""

from __future__ import annotations

_GROUPS: dict[str, tuple[str, ...]] = {
    "input": ("Input",),
    "conv": ("Conv", "ConvTranspose"),
    "linear": ("Gemm", "MatMul"),
    "norm": (
        "BatchNormalization",
        "GroupNormalization",
        "LayerNormalization",
        "InstanceNormalization",
    ),
    # Clip is how ReLU6 exports.
    "activation": (
        "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu",
        "Softmax", "Erf", "Elu", "Selu", "Softplus", "Mish",
    ),
    "elementwise": (
        "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Exp", "Log", "Abs", "Reciprocal",
        "Where", "Max", "Min",
    ),
    "pool": (
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
        "ReduceSum", "ReduceMax",
    ),
    # layout ops and plumbing that moves data
    "layout": (
        "Concat", "Split", "Slice", "Gather", "Reshape", "Flatten", "Transpose", "Squeeze",
        "Unsqueeze", "Expand", "Pad", "Resize", "DepthToSpace", "SpaceToDepth", "Tile", "Cast",
    ),
    "dropout": ("Dropout",),
}  # fmt: skip

OP_VOCAB: tuple[str, ...] = tuple(op for ops in _GROUPS.values() for op in ops)
OP_KIND: dict[str, str] = {op: kind for kind, ops in _GROUPS.items() for op in ops}

OOV_INDEX = len(OP_VOCAB)  # the out-of-vocabulary slot
_INDEX = {name: i for i, name in enumerate(OP_VOCAB)}

# Ops whose parameters are learned weights (kernel features apply to these).
NORM_OPS = frozenset(_GROUPS["norm"])
WEIGHTED_OPS = frozenset(_GROUPS["conv"] + _GROUPS["linear"] + _GROUPS["norm"])
# Ops that only re-view their input in PyTorch (no new storage in training).
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"})


def op_index(op: str) -> int:
    """Index of ``op`` in the vocabulary, or ``OOV_INDEX`` when it is not in it."""
    return _INDEX.get(op, OOV_INDEX)


def op_kind(op: str) -> str:
    """Coarse kind of an op (conv, linear, norm, activation, ...), ``other`` when unknown."""
    return OP_KIND.get(op, "other")
