"""Which blocks of a graph take TinyTL's lite residual, read from the graph alone."""

from __future__ import annotations

from collections.abc import Sequence

from aiop.cg.graph import Node
from aiop.models.layers import LiteSpec


def block_lite_spec(
    nodes: Sequence[Node], x: Sequence[int] | None, y: Sequence[int] | None
) -> LiteSpec | None:
    """Which lite residual TinyTL gives a block of ``nodes`` from input shape ``x`` to ``y``.

    One rule for both places that need it: the CG → PyTorch builder's blocks declare it
    (so :func:`aiop.models.tinytl.insert_lite_residual` wraps them) and the analytic
    model adds the same branches to the graph
    (:func:`aiop.predictor.analytic.with_lite_branches`). A convolutional block (NCHW in
    and out, two or more convolutions, no attention — residual, inverted-residual and
    dense layers, not transitions) takes a conv branch; a transformer block (B×N×D in and
    out, attention and LayerNorm) a token branch; anything else none.
    """
    if x is None or y is None:
        return None
    ops = {n.op for n in nodes}
    attention = "Softmax" in ops
    if len(x) == 4 and len(y) == 4 and sum(n.op == "Conv" for n in nodes) >= 2 and not attention:
        stride = max(1, round(x[2] / y[2])) if y[2] else 1
        return LiteSpec("conv", int(x[1]), int(y[1]), stride)
    if len(x) == 3 and tuple(x) == tuple(y) and attention and "LayerNormalization" in ops:
        return LiteSpec("tokens", int(x[2]), int(y[2]))
    return None
