"""Write small frozen TensorFlow GraphDef ``.pb`` files for the tests, without TensorFlow.

The builders mirror what ``tf.compat.v1.graph_util.convert_variables_to_constants``
writes for Keras layers: float weights as ``Const`` with ``tensor_content``,
``Identity`` ``.../read`` nodes, NHWC ``data_format`` attrs, int32 shape consts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aiop.cg import tf_graphdef as pb

_NP_TO_DT = {
    np.dtype(np.float32): pb.DT_FLOAT,
    np.dtype(np.int32): pb.DT_INT32,
    np.dtype(np.int64): pb.DT_INT64,
    np.dtype(np.bool_): pb.DT_BOOL,
}


def _set_attr(av: Any, value: Any) -> None:
    if isinstance(value, bool):
        av.b = value
    elif isinstance(value, int):
        av.i = value
    elif isinstance(value, float):
        av.f = value
    elif isinstance(value, str):
        av.s = value.encode()
    elif isinstance(value, (list, tuple)):
        av.list.i.extend(int(v) for v in value)
    else:
        raise TypeError(f"attr value {value!r}")


def node(graph: Any, name: str, op: str, inputs: Sequence[str] = (), **attrs: Any) -> Any:
    """Append a NodeDef; ``T``/``dtype`` are typed as DT_FLOAT unless given as ('type', n)."""
    nd = graph.node.add()
    nd.name, nd.op = name, op
    nd.input.extend(inputs)
    for key, value in attrs.items():
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "type":
            nd.attr[key].type = value[1]
        elif key == "_output_shapes":
            for shape in value:
                sp = nd.attr[key].list.shape.add()
                for d in shape:
                    sp.dim.add().size = d
        else:
            _set_attr(nd.attr[key], value)
    if op not in ("Const", "Placeholder", "NoOp") and "T" not in attrs:
        nd.attr["T"].type = pb.DT_FLOAT
    return nd


def const(graph: Any, name: str, array: Any, *, with_read: bool = False) -> str:
    """A Const node (float arrays in tensor_content, ints in int_val); returns the tensor name."""
    arr = np.asarray(array)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    nd = graph.node.add()
    nd.name, nd.op = name, "Const"
    dt = _NP_TO_DT[arr.dtype]
    nd.attr["dtype"].type = dt
    t = nd.attr["value"].tensor
    t.dtype = dt
    for d in arr.shape:
        t.tensor_shape.dim.add().size = d
    if arr.dtype == np.float32:
        t.tensor_content = arr.astype("<f4").tobytes()
    elif arr.dtype == np.int64:
        t.int64_val.extend(int(v) for v in arr.reshape(-1))
    elif arr.dtype == np.bool_:
        t.bool_val.extend(bool(v) for v in arr.reshape(-1))
    else:
        t.int_val.extend(int(v) for v in arr.reshape(-1))
    if with_read:
        node(graph, f"{name}/read", "Identity", [name])
        return f"{name}/read"
    return name


def placeholder(graph: Any, name: str, shape: Sequence[int] | None) -> str:
    nd = graph.node.add()
    nd.name, nd.op = name, "Placeholder"
    nd.attr["dtype"].type = pb.DT_FLOAT
    sp = nd.attr["shape"].shape
    if shape is None:
        sp.unknown_rank = True
    else:
        for d in shape:
            sp.dim.add().size = d
    return name


def small_cnn(input_shape: Sequence[int] | None = (1, 32, 32, 3), seed: int = 0) -> Any:
    """Conv 3x3/s2 + bias + BN + ReLU6, depthwise 3x3 + ReLU, residual add, mean, dense, softmax."""
    rng = np.random.default_rng(seed)
    g = pb.GraphDef()
    g.versions.producer = 27
    x = placeholder(g, "input", input_shape)
    k = const(g, "conv1/kernel", rng.standard_normal((3, 3, 3, 16)), with_read=True)
    conv_attrs = {"strides": [1, 2, 2, 1], "padding": "SAME", "data_format": "NHWC"}
    node(g, "conv1/Conv2D", "Conv2D", [x, k], dilations=[1, 1, 1, 1], **conv_attrs)
    b = const(g, "conv1/bias", rng.standard_normal(16), with_read=True)
    node(g, "conv1/BiasAdd", "BiasAdd", ["conv1/Conv2D", b], data_format="NHWC")
    bn = [
        const(g, f"bn/{n}", rng.random(16) + 0.5, with_read=True)
        for n in ("gamma", "beta", "moving_mean", "moving_variance")
    ]
    node(
        g,
        "bn/FusedBatchNormV3",
        "FusedBatchNormV3",
        ["conv1/BiasAdd", *bn],
        epsilon=0.001,
        is_training=False,
        data_format="NHWC",
        U=("type", pb.DT_FLOAT),
        _output_shapes=[[-1, 16, 16, 16], [16], [16], [16], [16], [-1]],
    )
    node(g, "act/Relu6", "Relu6", ["bn/FusedBatchNormV3"])
    dk = const(g, "dw/depthwise_kernel", rng.standard_normal((3, 3, 16, 1)))
    node(
        g,
        "dw/depthwise",
        "DepthwiseConv2dNative",
        ["act/Relu6", dk],
        strides=[1, 1, 1, 1],
        padding="SAME",
        data_format="NHWC",
        dilations=[1, 1, 1, 1],
    )
    node(g, "dw/Relu", "Relu", ["dw/depthwise"])
    node(g, "add/add", "AddV2", ["dw/Relu", "act/Relu6"])
    axes = const(g, "gap/Mean/reduction_indices", np.array([1, 2], np.int32))
    node(g, "gap/Mean", "Mean", ["add/add", axes], keep_dims=False, Tidx=("type", pb.DT_INT32))
    w = const(g, "fc/kernel", rng.standard_normal((16, 10)), with_read=True)
    node(g, "fc/MatMul", "MatMul", ["gap/Mean", w], transpose_a=False, transpose_b=False)
    fb = const(g, "fc/bias", rng.standard_normal(10), with_read=True)
    node(g, "fc/BiasAdd", "BiasAdd", ["fc/MatMul", fb], data_format="NHWC")
    node(g, "out/Softmax", "Softmax", ["fc/BiasAdd"])
    node(g, "output", "Identity", ["out/Softmax"])
    node(g, "init", "NoOp", ["^input"])
    return g


def write_pb(path: Path, graph: Any) -> Path:
    path.write_bytes(graph.SerializeToString())
    return path


def resnet_stem(seed: int = 0) -> Any:
    """Keras-ResNet-style stem: ZeroPadding2D + VALID conv 7x7/s2, BN, ReLU, ZeroPadding2D +
    MaxPool 3x3/s2, two 1x1 branches concatenated, 1x1 conv, mean (keep dims), reshape."""
    rng = np.random.default_rng(seed)
    g = pb.GraphDef()
    x = placeholder(g, "input_1", (-1, 64, 64, 3))
    p3 = const(g, "conv1_pad/Pad/paddings", np.array([[0, 0], [3, 3], [3, 3], [0, 0]], np.int32))
    node(g, "conv1_pad/Pad", "Pad", [x, p3], Tpaddings=("type", pb.DT_INT32))
    k = const(g, "conv1/kernel", rng.standard_normal((7, 7, 3, 8)))
    node(g, "conv1/Conv2D", "Conv2D", ["conv1_pad/Pad", k], strides=[1, 2, 2, 1], padding="VALID")
    bn = [const(g, f"bn1/{n}", rng.random(8) + 0.5) for n in ("g", "b", "m", "v")]
    node(g, "bn1/FusedBatchNormV3", "FusedBatchNormV3", ["conv1/Conv2D", *bn], epsilon=1e-5)
    node(g, "relu1", "Relu", ["bn1/FusedBatchNormV3"])
    p1 = const(g, "pool1_pad/paddings", np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32))
    node(g, "pool1_pad/Pad", "Pad", ["relu1", p1])
    node(g, "pool1/MaxPool", "MaxPool", ["pool1_pad/Pad"], ksize=[1, 3, 3, 1],
         strides=[1, 2, 2, 1], padding="VALID")  # fmt: skip
    for br, c in (("a", 4), ("b", 12)):
        kb = const(g, f"br{br}/kernel", rng.standard_normal((1, 1, 8, c)))
        node(g, f"br{br}/Conv2D", "Conv2D", ["pool1/MaxPool", kb], strides=[1, 1, 1, 1],
             padding="SAME")  # fmt: skip
        bb = const(g, f"br{br}/bias", rng.standard_normal(c))
        node(g, f"br{br}/BiasAdd", "BiasAdd", [f"br{br}/Conv2D", bb])
        node(g, f"br{br}/Relu", "Relu", [f"br{br}/BiasAdd"])
    ax = const(g, "cat/axis", np.array(-1, np.int32))
    node(g, "cat", "ConcatV2", ["bra/Relu", "brb/Relu", ax], N=2)
    k2 = const(g, "head/kernel", rng.standard_normal((1, 1, 16, 5)))
    node(g, "head/Conv2D", "Conv2D", ["cat", k2], strides=[1, 1, 1, 1], padding="VALID")
    hb = const(g, "head/bias", rng.standard_normal(5))
    node(g, "head/add", "AddV2", ["head/Conv2D", hb])  # bias written as Add
    axes = const(g, "gap/axes", np.array([1, 2], np.int32))
    node(g, "gap/Mean", "Mean", ["head/add", axes], keep_dims=True)
    shape = const(g, "logits/shape", np.array([-1, 5], np.int32))
    node(g, "logits", "Reshape", ["gap/Mean", shape])
    return g


def mixed_cnn(seed: int = 0, batch: int = 1) -> Any:
    """A Keras-style NHWC network with every layout-sensitive op a frozen graph holds.

    Conv SAME + BiasAdd, FusedBatchNormV3, swish (Sigmoid × x), depthwise ×2 stride 2
    with ReLU6, squeeze-excitation (Mean keep_dims, 1×1 convs, Mul), MaxPool/AvgPool
    SAME concatenated, a reflect MirrorPad + VALID conv, a StridedSlice crop, Keras
    Flatten of a spatial map (Reshape to (-1, H·W·C)), Dense + ReLU, Dense with an
    Add bias, Softmax.
    """
    rng = np.random.default_rng(seed)
    g = pb.GraphDef()
    x = placeholder(g, "x", (batch, 12, 12, 3))

    def w(name: str, *shape: int, scale: float = 0.3) -> str:
        return const(g, name, rng.standard_normal(shape) * scale, with_read=True)

    same = {"strides": [1, 1, 1, 1], "padding": "SAME", "data_format": "NHWC"}
    node(g, "c1/Conv2D", "Conv2D", [x, w("c1/kernel", 3, 3, 3, 8)], **same)
    node(g, "c1/BiasAdd", "BiasAdd", ["c1/Conv2D", w("c1/bias", 8)])
    stats = [const(g, f"bn1/{n}", rng.random(8) + 0.5) for n in ("gamma", "beta", "mean", "var")]
    node(g, "bn1/FusedBatchNormV3", "FusedBatchNormV3", ["c1/BiasAdd", *stats], epsilon=1e-3,
         is_training=False, data_format="NHWC")  # fmt: skip
    node(g, "swish/Sigmoid", "Sigmoid", ["bn1/FusedBatchNormV3"])
    node(g, "swish/mul", "Mul", ["bn1/FusedBatchNormV3", "swish/Sigmoid"])
    node(g, "dw/depthwise", "DepthwiseConv2dNative", ["swish/mul", w("dw/kernel", 3, 3, 8, 2)],
         strides=[1, 2, 2, 1], padding="SAME", data_format="NHWC")  # fmt: skip
    node(g, "dw/Relu6", "Relu6", ["dw/depthwise"])
    axes = const(g, "se/axes", np.array([1, 2], np.int32))
    node(g, "se/Mean", "Mean", ["dw/Relu6", axes], keep_dims=True)
    node(g, "se/c1", "Conv2D", ["se/Mean", w("se/k1", 1, 1, 16, 4)], **same)
    node(g, "se/relu", "Relu", ["se/c1"])
    node(g, "se/c2", "Conv2D", ["se/relu", w("se/k2", 1, 1, 4, 16)], **same)
    node(g, "se/b2", "BiasAdd", ["se/c2", w("se/bias2", 16)])
    node(g, "se/gate", "Sigmoid", ["se/b2"])
    node(g, "se/mul", "Mul", ["dw/Relu6", "se/gate"])
    pool = {"ksize": [1, 3, 3, 1], "padding": "SAME", "data_format": "NHWC"}
    node(g, "mp", "MaxPool", ["se/mul"], strides=[1, 2, 2, 1], **pool)
    node(g, "ap", "AvgPool", ["mp"], strides=[1, 1, 1, 1], **pool)
    scale = const(g, "ap/scale", rng.random(16).astype(np.float32) + 0.5)  # per channel
    node(g, "ap/mul", "Mul", ["ap", scale])
    cat_axis = const(g, "cat/axis", np.array(3, np.int32))
    node(g, "cat", "ConcatV2", ["mp", "ap/mul", cat_axis], N=2)
    pads = const(g, "pad/paddings", np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32))
    node(g, "pad", "MirrorPad", ["cat", pads], mode="REFLECT")
    node(g, "c2/Conv2D", "Conv2D", ["pad", w("c2/kernel", 3, 3, 32, 6)], strides=[1, 1, 1, 1],
         padding="VALID")  # fmt: skip
    node(g, "c2/relu", "Relu", ["c2/Conv2D"])
    begin = const(g, "crop/begin", np.array([0, 0, 1, 0], np.int32))
    end = const(g, "crop/end", np.array([0, 3, 3, 5], np.int32))
    step = const(g, "crop/strides", np.array([1, 1, 1, 1], np.int32))
    node(g, "crop", "StridedSlice", ["c2/relu", begin, end, step], begin_mask=9, end_mask=1,
         Index=("type", pb.DT_INT32))  # fmt: skip
    shape = const(g, "flatten/shape", np.array([-1, 3 * 2 * 5], np.int32))
    node(g, "flatten", "Reshape", ["crop", shape])
    node(g, "fc1/MatMul", "MatMul", ["flatten", w("fc1/kernel", 30, 12)])
    node(g, "fc1/BiasAdd", "BiasAdd", ["fc1/MatMul", w("fc1/bias", 12)])
    node(g, "fc1/Relu", "Relu", ["fc1/BiasAdd"])
    node(g, "fc2/MatMul", "MatMul", ["fc1/Relu", w("fc2/kernel", 12, 7)])
    node(g, "fc2/add", "AddV2", ["fc2/MatMul", w("fc2/bias", 7)])
    node(g, "prob", "Softmax", ["fc2/add"])
    return g


def layout_ops(seed: int = 0) -> Any:
    """Ops whose result depends on NHWC element order: channel shuffle through a 5-D
    Reshape/Transpose, Squeeze/ExpandDims beside channels, Mean without keep_dims over
    one spatial axis, a rank-dropping StridedSlice, a layer norm over channels
    (Mean, SquaredDifference, Rsqrt), AddN, Sub/RealDiv by per-channel constants, a
    bias added to a (N, C) tensor broadcast over a feature map, Pack, Transpose."""
    rng = np.random.default_rng(seed)
    g = pb.GraphDef()
    x = placeholder(g, "x", (2, 4, 6, 8))
    k = const(g, "c/kernel", rng.standard_normal((1, 1, 8, 8)))
    node(g, "c", "Conv2D", [x, k], strides=[1, 1, 1, 1], padding="VALID")
    s5 = const(g, "shuf/s1", np.array([-1, 4, 6, 2, 4], np.int32))
    node(g, "shuf/r1", "Reshape", ["c", s5])
    perm = const(g, "shuf/perm", np.array([0, 1, 2, 4, 3], np.int32))
    node(g, "shuf/t", "Transpose", ["shuf/r1", perm])
    s4 = const(g, "shuf/s2", np.array([-1, 4, 6, 8], np.int32))
    node(g, "shuf/r2", "Reshape", ["shuf/t", s4])
    ch = const(g, "ln/axis", np.array([3], np.int32))
    node(g, "ln/mean", "Mean", ["shuf/r2", ch], keep_dims=True)
    node(g, "ln/sqd", "SquaredDifference", ["shuf/r2", "ln/mean"])
    node(g, "ln/var", "Mean", ["ln/sqd", ch], keep_dims=True)
    eps = const(g, "ln/eps", np.array(1e-3, np.float32))
    node(g, "ln/add", "AddV2", ["ln/var", eps])
    node(g, "ln/rsqrt", "Rsqrt", ["ln/add"])
    node(g, "ln/sub", "Sub", ["shuf/r2", "ln/mean"])
    node(g, "ln/mul", "Mul", ["ln/sub", "ln/rsqrt"])
    shift = const(g, "aff/shift", rng.standard_normal(8).astype(np.float32))
    node(g, "aff/sub", "Sub", ["ln/mul", shift])
    div = const(g, "aff/divisor", rng.random(8).astype(np.float32) + 0.5)
    node(g, "aff/div", "RealDiv", ["aff/sub", div])
    h = const(g, "row/axis", np.array([1], np.int32))
    node(g, "row/mean", "Mean", ["aff/div", h], keep_dims=True)  # (2, 1, 6, 8)
    node(g, "row/sq", "Squeeze", ["row/mean"], squeeze_dims=[1])  # (2, 6, 8)
    dim = const(g, "row/dim", np.array(1, np.int32))
    node(g, "row/ex", "ExpandDims", ["row/sq", dim], Tdim=("type", pb.DT_INT32))  # (2,1,6,8)
    node(g, "sum", "AddN", ["aff/div", "row/ex", "shuf/r2"], N=3)
    w_ax = const(g, "col/axis", np.array([2], np.int32))
    node(g, "col/mean", "Mean", ["sum", w_ax], keep_dims=False)  # (2, 4, 8)
    begin = const(g, "pick/begin", np.array([0, 1, 0], np.int32))
    end = const(g, "pick/end", np.array([0, 2, 0], np.int32))
    one = const(g, "pick/strides", np.array([1, 1, 1], np.int32))
    node(g, "pick", "StridedSlice", ["col/mean", begin, end, one], begin_mask=5, end_mask=5,
         shrink_axis_mask=2)  # fmt: skip  # (2, 8)
    gate = const(g, "gate/bias", rng.standard_normal(8).astype(np.float32))
    node(g, "gate/add", "AddV2", ["pick", gate])
    s_nc = const(g, "gate/shape", np.array([-1, 1, 1, 8], np.int32))
    node(g, "gate/r", "Reshape", ["gate/add", s_nc])
    node(g, "gated", "Mul", ["sum", "gate/r"])
    node(g, "stack", "Pack", ["pick", "gate/add"], axis=1, N=2)  # (2, 2, 8)
    tp = const(g, "out/perm", np.array([0, 2, 1], np.int32))
    node(g, "out/t", "Transpose", ["stack", tp])
    perm4 = const(g, "map/perm", np.array([0, 3, 1, 2], np.int32))
    node(g, "map/t", "Transpose", ["gated", perm4])  # to NCHW by hand: (2, 8, 4, 6)
    flat = const(g, "map/shape", np.array([-1, 192], np.int32))
    node(g, "map/flat", "Reshape", ["map/t", flat])
    # attention-style 4-D matmuls: (2, 4, 6, 8) @ (2, 4, 8, 6) → (2, 4, 6, 6), softmax, @ v
    node(g, "att/scores", "BatchMatMulV2", ["gated", "gated"], adj_x=False, adj_y=True)
    node(g, "att/p", "Softmax", ["att/scores"])
    node(g, "att/mix", "BatchMatMulV2", ["att/p", "gated"], adj_x=False, adj_y=False)
    return g


def training_bn(seed: int = 0) -> Any:
    """A training graph: FusedBatchNormV3 with ``is_training`` and empty statistics."""
    rng = np.random.default_rng(seed)
    g = pb.GraphDef()
    x = placeholder(g, "x", (4, 8, 8, 3))
    k = const(g, "c/kernel", rng.standard_normal((3, 3, 3, 6)))
    node(g, "c", "Conv2D", [x, k], strides=[1, 1, 1, 1], padding="SAME")
    gamma = const(g, "bn/gamma", rng.random(6) + 0.5)
    beta = const(g, "bn/beta", rng.standard_normal(6))
    empty = [const(g, f"bn/{n}", np.zeros(0, np.float32)) for n in ("mean", "var")]
    node(g, "bn", "FusedBatchNormV3", ["c", gamma, beta, *empty], epsilon=1e-3, is_training=True)
    node(g, "act", "Relu", ["bn"])
    axes = const(g, "gap/axes", np.array([1, 2], np.int32))
    node(g, "gap", "Mean", ["act", axes], keep_dims=False)
    return g


def decoder(seed: int = 0) -> Any:
    """Upsampling paths: Conv2DBackpropInput (SAME, stride 2: asymmetric crop) + BiasAdd +
    Tanh, ResizeNearestNeighbor (legacy) and ResizeBilinear (half-pixel centres and TF1's
    legacy sampling), Maximum,
    a zero Pad folded into a VALID convolution, Split/SplitV on channels (second outputs),
    and a VALID AvgPool."""
    rng = np.random.default_rng(seed)
    g = pb.GraphDef()
    x = placeholder(g, "z", (1, 5, 5, 4))
    sizes = const(g, "up/sizes", np.array([1, 10, 10, 6], np.int32))
    k = const(g, "up/kernel", rng.standard_normal((3, 3, 6, 4)) * 0.3)
    node(g, "up", "Conv2DBackpropInput", [sizes, k, x], strides=[1, 2, 2, 1], padding="SAME")
    node(g, "up/bias", "BiasAdd", ["up", const(g, "up/b", rng.standard_normal(6))])
    node(g, "up/tanh", "Tanh", ["up/bias"])
    size = const(g, "nn/size", np.array([10, 10], np.int32))
    node(g, "nn", "ResizeNearestNeighbor", [x, size], align_corners=False,
         half_pixel_centers=False)  # fmt: skip
    node(g, "bl", "ResizeBilinear", [x, size], align_corners=False, half_pixel_centers=True)
    node(g, "bl1", "ResizeBilinear", [x, size], align_corners=False)  # TF1's legacy sampling
    node(g, "mix0", "Maximum", ["nn", "bl"])
    node(g, "mix", "AddV2", ["mix0", "bl1"])
    pads = const(g, "pad/p", np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32))
    node(g, "pad", "Pad", ["mix", pads])  # (1, 12, 12, 4)
    k2 = const(g, "c/kernel", rng.standard_normal((3, 3, 4, 6)) * 0.3)
    node(g, "c", "Conv2D", ["pad", k2], strides=[1, 1, 1, 1], padding="VALID")
    node(g, "sum", "AddV2", ["c", "up/tanh"])
    axis = const(g, "halves/axis", np.array(3, np.int32))
    node(g, "halves", "Split", [axis, "sum"], num_split=2)
    sizes2 = const(g, "parts/sizes", np.array([1, -1], np.int32))
    node(g, "parts", "SplitV", ["halves:1", sizes2, axis], num_split=2)
    node(g, "parts/cat", "ConcatV2", ["parts:1", "parts", axis], N=2)
    node(g, "halves/add", "AddV2", ["halves", "parts/cat"])
    node(g, "pool", "AvgPool", ["halves/add"], ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1],
         padding="VALID")  # fmt: skip
    return g


# -- a reference: the GraphDef run op by op in TF's own (NHWC) layout ------------------


def _same(size: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def run_reference(graph: Any, feeds: dict[str, Any], training: bool = False) -> dict[str, Any]:
    """Every node's value, computed with torch in NHWC as TF defines each op.

    Independent of aiop's importer (no layout conversion: images stay NHWC and
    every op is written from TF's definition); used as the oracle for the
    modules built from imported GraphDefs. ``training`` makes FusedBatchNorm use
    batch statistics whatever ``is_training`` says.
    """
    import torch
    import torch.nn.functional as F

    from aiop.cg.tf_import import _decode_tensor

    vals: dict[str, Any] = {}

    def get(ref: str) -> Any:
        name, _, port = ref.partition(":")
        v = vals[name]
        return v[int(port)] if port else (v[0] if isinstance(v, list) else v)

    def a(nd: Any, key: str) -> Any:
        if key not in nd.attr:
            return None
        av = nd.attr[key]
        kind = av.WhichOneof("value")
        if kind == "list":
            return list(av.list.i)
        return getattr(av, kind) if kind else None

    def window(nd: Any, x: Any, k: Sequence[int], fill: float) -> tuple[Any, list[int]]:
        strides = list(nd.attr["strides"].list.i)[1:3]
        dil = list(nd.attr["dilations"].list.i)[1:3] if "dilations" in nd.attr else [1, 1]
        if nd.attr["padding"].s == b"SAME":
            ph = _same(x.shape[1], k[0], strides[0], dil[0])
            pw = _same(x.shape[2], k[1], strides[1], dil[1])
            x = F.pad(x, (0, 0, pw[0], pw[1], ph[0], ph[1]), value=fill)
        return x, strides

    for nd in graph.node:
        op, ins = nd.op, [get(r) for r in nd.input if not r.startswith("^")]
        if op == "Const":
            arr = _decode_tensor(nd.attr["value"].tensor, nd.name)
            vals[nd.name] = torch.from_numpy(np.array(arr))
        elif op == "Placeholder":
            vals[nd.name] = feeds[nd.name]
        elif op in ("Identity", "NoOp"):
            vals[nd.name] = ins[0] if ins else None
        elif op in ("Conv2D", "DepthwiseConv2dNative"):
            x, k = ins
            x, strides = window(nd, x, k.shape[:2], 0.0)
            dil = list(nd.attr["dilations"].list.i)[1:3] if "dilations" in nd.attr else [1, 1]
            if op == "Conv2D":
                w, groups = k.permute(3, 2, 0, 1), 1
            else:  # filter (kh, kw, C, M): output channel c·M + m
                kh, kw, c, m = k.shape
                w, groups = k.permute(2, 3, 0, 1).reshape(c * m, 1, kh, kw), c
            y = F.conv2d(x.permute(0, 3, 1, 2), w, None, strides, 0, dil, groups)
            vals[nd.name] = y.permute(0, 2, 3, 1)
        elif op == "BiasAdd":
            vals[nd.name] = ins[0] + ins[1]
        elif op == "FusedBatchNormV3":
            x, scale, offset, mean, var = ins
            if training or a(nd, "is_training"):
                mean = x.mean((0, 1, 2))
                var = x.var((0, 1, 2), unbiased=False)
            y = (x - mean) / torch.sqrt(var + a(nd, "epsilon")) * scale + offset
            vals[nd.name] = [y, mean, var]
        elif op in ("MaxPool", "AvgPool"):
            k = list(nd.attr["ksize"].list.i)[1:3]
            xp, strides = window(nd, ins[0], k, float("-inf") if op == "MaxPool" else 0.0)
            xc = xp.permute(0, 3, 1, 2)
            if op == "MaxPool":
                y = F.max_pool2d(xc, k, strides)
            else:  # SAME averages over the real elements only
                ones, _ = window(nd, torch.ones_like(ins[0][..., :1]), k, 0.0)
                y = F.avg_pool2d(xc, k, strides) / F.avg_pool2d(ones.permute(0, 3, 1, 2), k,
                                                                strides)  # fmt: skip
            vals[nd.name] = y.permute(0, 2, 3, 1)
        elif op == "Conv2DBackpropInput":
            sizes, k, x = ins
            s = list(nd.attr["strides"].list.i)[1:3]
            out_hw = [int(v) for v in sizes[1:3]]
            y = F.conv_transpose2d(x.permute(0, 3, 1, 2), k.permute(3, 2, 0, 1), None, s)
            if nd.attr["padding"].s == b"SAME":  # the forward conv's SAME pads, cropped
                tops = [_same(o, kk, st)[0] for o, kk, st in zip(out_hw, k.shape[:2], s)]
            else:
                tops = [0, 0]
            y = y[:, :, tops[0] : tops[0] + out_hw[0], tops[1] : tops[1] + out_hw[1]]
            vals[nd.name] = y.permute(0, 2, 3, 1)
        elif op == "ResizeNearestNeighbor":  # legacy: source index floor(i · in / out)
            x, (oh, ow) = ins[0], [int(v) for v in ins[1]]
            rows = torch.arange(oh) * x.shape[1] // oh
            cols = torch.arange(ow) * x.shape[2] // ow
            vals[nd.name] = x[:, rows][:, :, cols]
        elif op == "ResizeBilinear":  # by hand: half-pixel centres or TF1's legacy i·in/out
            x, (oh, ow) = ins[0], [int(v) for v in ins[1]]
            half = bool(a(nd, "half_pixel_centers"))

            def taps(n_out: int, n_in: int, half: bool = half) -> tuple[Any, Any, Any]:
                if not half:
                    src = torch.arange(n_out) * n_in / n_out
                    lo = src.floor().long()
                    return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).unsqueeze(-1)
                src = ((torch.arange(n_out) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
                lo = src.floor().long().clamp(max=n_in - 1)
                return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).unsqueeze(-1)

            r0, r1, fr = taps(oh, x.shape[1])
            c0, c1, fc = taps(ow, x.shape[2])
            rows = x[:, r0] * (1 - fr.unsqueeze(-1)) + x[:, r1] * fr.unsqueeze(-1)
            vals[nd.name] = rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc
        elif op == "Maximum":
            vals[nd.name] = torch.maximum(ins[0], ins[1])
        elif op == "Tanh":
            vals[nd.name] = torch.tanh(ins[0])
        elif op == "Relu":
            vals[nd.name] = torch.clamp(ins[0], min=0)
        elif op == "Relu6":
            vals[nd.name] = torch.clamp(ins[0], 0, 6)
        elif op == "Sigmoid":
            vals[nd.name] = 1 / (1 + torch.exp(-ins[0]))
        elif op == "Rsqrt":
            vals[nd.name] = 1 / torch.sqrt(ins[0])
        elif op in ("Add", "AddV2", "AddN"):
            total = ins[0]
            for t in ins[1:]:
                total = total + t
            vals[nd.name] = total
        elif op == "Sub":
            vals[nd.name] = ins[0] - ins[1]
        elif op == "Mul":
            vals[nd.name] = ins[0] * ins[1]
        elif op == "RealDiv":
            vals[nd.name] = ins[0] / ins[1]
        elif op == "SquaredDifference":
            vals[nd.name] = (ins[0] - ins[1]) ** 2
        elif op in ("MatMul", "BatchMatMulV2"):
            x, y = ins
            if a(nd, "adj_x") or a(nd, "transpose_a"):
                x = x.transpose(-1, -2)
            if a(nd, "adj_y") or a(nd, "transpose_b"):
                y = y.transpose(-1, -2)
            vals[nd.name] = x @ y
        elif op == "Mean":
            dims = [int(d) for d in ins[1].reshape(-1)]
            vals[nd.name] = ins[0].mean(dims, keepdim=bool(a(nd, "keep_dims")))
        elif op == "ConcatV2":
            vals[nd.name] = torch.cat(ins[:-1], int(ins[-1]))
        elif op == "Split":
            vals[nd.name] = list(torch.chunk(ins[1], a(nd, "num_split"), int(ins[0])))
        elif op == "SplitV":
            x, sizes, ax = ins
            sizes = [int(v) for v in sizes]
            if -1 in sizes:
                sizes[sizes.index(-1)] = x.shape[int(ax)] - sum(v for v in sizes if v != -1)
            vals[nd.name] = list(torch.split(x, sizes, int(ax)))
        elif op == "Pack":
            vals[nd.name] = torch.stack(ins, a(nd, "axis"))
        elif op == "Reshape":
            vals[nd.name] = ins[0].reshape([int(d) for d in ins[1]])
        elif op == "Transpose":
            vals[nd.name] = ins[0].permute([int(d) for d in ins[1]])
        elif op == "Squeeze":
            vals[nd.name] = ins[0].squeeze(tuple(a(nd, "squeeze_dims")))
        elif op == "ExpandDims":
            vals[nd.name] = ins[0].unsqueeze(int(ins[1]))
        elif op in ("Pad", "MirrorPad"):
            p = ins[1].tolist()
            torch_pads = [v for pair in reversed(p[1:3]) for v in pair]
            mode = "reflect" if op == "MirrorPad" else "constant"
            y = F.pad(ins[0].permute(0, 3, 1, 2), torch_pads, mode=mode)
            vals[nd.name] = y.permute(0, 2, 3, 1)
        elif op == "StridedSlice":
            x, begin, end, strides = ins
            index: list[Any] = []
            for i in range(len(begin)):
                bit = 1 << i
                if a(nd, "shrink_axis_mask") and a(nd, "shrink_axis_mask") & bit:
                    index.append(int(begin[i]))
                    continue
                b = None if (a(nd, "begin_mask") or 0) & bit else int(begin[i])
                e = None if (a(nd, "end_mask") or 0) & bit else int(end[i])
                index.append(slice(b, e, int(strides[i])))
            vals[nd.name] = x[tuple(index)]
        elif op == "Softmax":
            vals[nd.name] = torch.softmax(ins[0], -1)
        else:
            raise NotImplementedError(f"reference: op {op}")
    return vals
