"""FLOPs of one node, counted as 2 × multiply-accumulates.

The counting rules follow thop's (``thop.profile``) so that a CG's total
matches ``2 * thop MACs`` on convolutional networks:

* Conv / ConvTranspose: ``out_elems × Cin/groups × prod(kernel)`` MACs (bias free).
* Gemm / MatMul: ``prod(A) × N`` MACs (batched matmuls included, e.g. attention).
* BatchNorm / LayerNorm / InstanceNorm / GroupNorm: ``2 × elems``, doubled when
  affine. (thop counts no GroupNorm; we do, as the norm it is.)
* Softmax: ``rows × (3 × features − 1)``; AveragePool: one per output;
  GlobalAveragePool: ``(window + 1)`` per output; Resize: 1 (nearest), 5
  (linear), 11 (bilinear) per output.
* Elementwise arithmetic (Add, Mul, ...): one per output element (thop counts
  these only on its traced path; they are a small share on CNNs).
* Activations, max-pooling, layout ops, Dropout: zero, as in thop.

Every importer maps its ops to the ONNX names of :mod:`aiop.cg.vocab` and its
attributes to ONNX's (``kernel_shape``, ``group``, ``mode``, ``axis``) before
calling :func:`node_flops`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Shape = Sequence[int]

_ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Exp", "Log", "Abs", "Reciprocal",
     "Where", "Max", "Min", "Erf"}
)  # fmt: skip
_NORMS = frozenset(
    {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization"}
)
_RESIZE_OPS_PER_OUTPUT = {"nearest": 1, "linear": 11, "cubic": 259}


def _prod(shape: Shape) -> int:
    return math.prod(int(d) for d in shape)


def node_macs(
    op: str,
    attrs: dict[str, Any],
    input_shapes: Sequence[Shape],
    output_shapes: Sequence[Shape],
    affine: bool = True,
) -> int:
    """Multiply-accumulate equivalents of one node (see the module docstring)."""
    if not output_shapes or not output_shapes[0]:
        return 0
    out = output_shapes[0]
    out_elems = _prod(out)
    x = input_shapes[0] if input_shapes else ()
    if op in ("Conv", "ConvTranspose"):
        if len(input_shapes) < 2 or len(x) < 2:
            return 0
        w = input_shapes[1]
        groups = int(attrs.get("group", 1))
        return out_elems * (int(x[1]) // groups) * _prod(w[2:])
    if op in ("Gemm", "MatMul"):
        if len(input_shapes) < 2 or not x:
            return 0
        if op == "Gemm":
            b = input_shapes[1]
            n = int(b[0] if attrs.get("transB", 0) else b[-1])
            return _prod(x) * n
        return _prod(x) * int(out[-1])
    if op in _NORMS:
        return 2 * _prod(x or out) * (2 if affine else 1)
    if op == "Softmax":
        axis = int(attrs.get("axis", -1))
        feats = int(out[axis])
        return (out_elems // max(feats, 1)) * (3 * feats - 1)
    if op == "AveragePool":
        return out_elems
    if op == "GlobalAveragePool" or (op == "ReduceMean" and len(x) == 4 and len(out) == 4):
        window = _prod(x[2:]) // max(_prod(out[2:]), 1) if len(x) > 2 else 1
        return (window + 1) * out_elems
    if op == "Resize":
        mode = attrs.get("mode", "nearest")
        if isinstance(mode, bytes):
            mode = mode.decode()
        return _RESIZE_OPS_PER_OUTPUT.get(str(mode), 1) * out_elems
    if op in _ELEMENTWISE:
        return out_elems
    return 0


def node_flops(
    op: str,
    attrs: dict[str, Any],
    input_shapes: Sequence[Shape],
    output_shapes: Sequence[Shape],
    affine: bool = True,
) -> int:
    """FLOPs of one node: 2 × :func:`node_macs`."""
    return 2 * node_macs(op, attrs, input_shapes, output_shapes, affine)
