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
