"""Frozen TF GraphDef import (``aiop.cg.tf_import``) on ``.pb`` files the tests write themselves."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from tf_fixtures import const, node, placeholder, resnet_stem, small_cnn, write_pb

from aiop.cg import tf_graphdef as pb
from aiop.cg.flops import node_flops
from aiop.cg.graph import CGError, ComputeGraph
from aiop.cg.tf_import import from_tf_pb, load_graphdef

CNN_OPS = [
    "Input",
    "Conv",
    "BatchNormalization",
    "Clip",
    "Conv",
    "Relu",
    "Add",
    "GlobalAveragePool",
    "Flatten",
    "Gemm",
    "Softmax",
]


@pytest.fixture()
def cnn_pb(tmp_path: Path) -> Path:
    return write_pb(tmp_path / "small_cnn.pb", small_cnn())


def _by_op(cg: ComputeGraph, op: str) -> list:
    return [n for n in cg.nodes if n.op == op]


# -- the small CNN -------------------------------------------------------------------
def test_small_cnn_structure_and_nchw_shapes(cnn_pb: Path) -> None:
    cg = from_tf_pb(cnn_pb)
    cg.validate()
    assert [n.op for n in cg.nodes] == CNN_OPS
    assert cg.name == "small_cnn" and cg.source == "tf"
    assert cg.inputs[0].shape == (1, 3, 32, 32)
    assert [o.shape for o in cg.outputs] == [(1, 10)]
    conv, dw = _by_op(cg, "Conv")
    assert conv.input_shapes == [(1, 3, 32, 32), (16, 3, 3, 3), (16,)]  # bias merged
    assert conv.output_shapes == [(1, 16, 16, 16)]
    # SAME with stride 2 on 32 px: TF pads 0 before, 1 after (ONNX begin..., end...).
    assert conv.attrs == {
        "dilations": [1, 1],
        "group": 1,
        "kernel_shape": [3, 3],
        "pads": [0, 0, 1, 1],
        "strides": [2, 2],
    }
    assert dw.attrs["group"] == 16 and dw.attrs["pads"] == [1, 1, 1, 1]
    assert dw.input_shapes[1] == (16, 1, 3, 3)  # depthwise (H, W, C, 1) → (C, 1, kh, kw)
    bn = _by_op(cg, "BatchNormalization")[0]
    assert bn.output_shapes[0] == (1, 16, 16, 16)
    assert bn.attrs["epsilon"] == pytest.approx(1e-3)
    assert _by_op(cg, "GlobalAveragePool")[0].output_shapes == [(1, 16, 1, 1)]
    gemm = _by_op(cg, "Gemm")[0]
    assert gemm.input_shapes == [(1, 16), (10, 16), (10,)] and gemm.attrs["transB"] == 1
    assert _by_op(cg, "Softmax")[0].attrs == {"axis": 1}
    # the residual: the Add reads the depthwise branch and the ReLU6 output
    add = cg.nodes.index(_by_op(cg, "Add")[0])
    srcs = sorted(cg.nodes[e.src].op for e in cg.edges if e.dst == add)
    assert srcs == ["Clip", "Relu"]
    assert all(e.shape == cg.nodes[e.src].output_shapes[0] for e in cg.edges)
    assert cg.meta["layout"] == "NHWC" and cg.meta["producer"] == 27
    assert conv.param_names == ["conv1/kernel", "conv1/bias"] and conv.scope == "conv1"


def test_small_cnn_params_and_flops_exact(cnn_pb: Path) -> None:
    cg = from_tf_pb(cnn_pb)
    params = {n.name: n.params for n in cg.nodes if n.params}
    assert params == {
        "conv1/Conv2D": 3 * 3 * 3 * 16 + 16,
        "bn/FusedBatchNormV3": 2 * 16,
        "dw/depthwise": 3 * 3 * 16,
        "fc/MatMul": 16 * 10 + 10,
    }
    assert cg.total_params == 794 and cg.total_buffers == 32
    # By hand, 2 x MACs with aiop.cg.flops' (thop's) rules.
    by_hand = {
        "Conv": 2 * (16 * 16 * 16 * 3 * 9) + 2 * (16 * 16 * 16 * 1 * 9),
        "BatchNormalization": 2 * (2 * 4096 * 2),
        "Add": 2 * 4096,
        "GlobalAveragePool": 2 * (256 + 1) * 16,
        "Gemm": 2 * 16 * 10,
        "Softmax": 2 * (3 * 10 - 1),
    }
    got: dict[str, int] = {}
    for n in cg.nodes:
        got[n.op] = got.get(n.op, 0) + n.flops
        assert n.flops == node_flops(n.op, n.attrs, n.input_shapes, n.output_shapes)
    assert {k: v for k, v in got.items() if v} == by_hand
    assert cg.total_flops == sum(by_hand.values()) == 344474


def _torch_twin():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, 2, 1)
            self.bn = nn.BatchNorm2d(16, eps=1e-3)
            self.act = nn.ReLU6()
            self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            y = self.act(self.bn(self.conv(x)))
            h = torch.flatten(self.pool(self.relu(self.dw(y)) + y), 1)
            return torch.softmax(self.fc(h), dim=1)

    return Twin()


def test_torch_twin_has_the_same_parameter_count(cnn_pb: Path) -> None:
    twin = _torch_twin()
    assert sum(p.numel() for p in twin.parameters()) == from_tf_pb(cnn_pb).total_params
    assert sum(b.numel() for k, b in twin.named_buffers() if "running" in k) == 32


def test_same_network_exported_from_pytorch_gives_same_totals(cnn_pb: Path) -> None:
    twin = _torch_twin()
    try:
        from aiop.cg.torch_import import from_torch
    except ImportError:
        pytest.skip("aiop.cg.torch_import is not available")
    ref = from_torch(twin, (1, 3, 32, 32))
    cg = from_tf_pb(cnn_pb)
    assert cg.total_flops == ref.total_flops
    assert cg.total_params == ref.total_params
    assert cg.total_buffers == ref.total_buffers
    assert [n.op for n in cg.nodes] == [n.op for n in ref.nodes]
    assert [n.output_shapes for n in cg.nodes] == [n.output_shapes for n in ref.nodes]
    assert [n.input_shapes for n in cg.nodes] == [n.input_shapes for n in ref.nodes]
    assert sorted((e.src, e.dst) for e in cg.edges) == sorted((e.src, e.dst) for e in ref.edges)
    assert cg.total_activation_bytes == ref.total_activation_bytes


def test_bytes_input_json_round_trip_and_fingerprint(cnn_pb: Path) -> None:
    cg = from_tf_pb(cnn_pb.read_bytes(), name="net")
    assert cg.name == "net"
    back = ComputeGraph.from_json(cg.to_json())
    assert back.fingerprint == cg.fingerprint == from_tf_pb(cnn_pb).fingerprint


def test_text_format_pbtxt(tmp_path: Path) -> None:
    from google.protobuf import text_format

    path = tmp_path / "g.pbtxt"
    path.write_text(text_format.MessageToString(small_cnn()))
    assert [n.op for n in from_tf_pb(path).nodes] == CNN_OPS


def test_field_numbers_match_tensorflow_wire_format() -> None:
    """Bytes encoded by hand from TF's .proto field numbers parse into the right fields."""

    def key(field: int, wire: int) -> bytes:
        return bytes([field << 3 | wire])

    def ld(field: int, payload: bytes) -> bytes:  # length-delimited
        return key(field, 2) + bytes([len(payload)]) + payload

    dim = ld(2, key(1, 0) + bytes([7]))  # TensorShapeProto.dim{size=7}
    shape_attr = ld(5, ld(1, b"shape") + ld(2, ld(7, dim)))  # AttrValue.shape = 7
    dtype_attr = ld(5, ld(1, b"dtype") + ld(2, key(6, 0) + bytes([pb.DT_HALF])))
    tensor = key(1, 0) + bytes([pb.DT_INT32]) + ld(2, dim) + ld(7, bytes([1, 2, 3]))
    value_attr = ld(5, ld(1, b"value") + ld(2, ld(8, tensor)))  # AttrValue.tensor = 8
    ints_attr = ld(5, ld(1, b"ks") + ld(2, ld(1, ld(3, bytes([1, 3, 3, 1])))))  # list.i = 3
    nd = ld(1, b"x") + ld(2, b"Placeholder") + ld(3, b"a:1") + ld(4, b"/cpu:0")
    data = ld(1, nd + shape_attr + dtype_attr + value_attr + ints_attr)
    data += ld(4, key(1, 0) + bytes([27]))  # versions{producer=27}
    g = load_graphdef(data)
    n = g.node[0]
    assert (n.name, n.op, list(n.input), n.device) == ("x", "Placeholder", ["a:1"], "/cpu:0")
    assert n.attr["shape"].shape.dim[0].size == 7
    assert n.attr["dtype"].type == 19
    t = n.attr["value"].tensor
    assert t.dtype == 3 and list(t.int_val) == [1, 2, 3]
    assert list(n.attr["ks"].list.i) == [1, 3, 3, 1]
    assert g.versions.producer == 27


# -- shapes ------------------------------------------------------------------------
def test_unknown_batch_becomes_one(tmp_path: Path) -> None:
    cg = from_tf_pb(write_pb(tmp_path / "g.pb", small_cnn((-1, 32, 32, 3))))
    assert cg.inputs[0].shape == (1, 3, 32, 32)
    assert cg.total_flops == 344474


def test_input_shape_nchw_overrides_dynamic_placeholder(tmp_path: Path) -> None:
    path = write_pb(tmp_path / "dyn.pb", small_cnn((-1, -1, -1, 3)))
    with pytest.raises(CGError, match=r"no static shape.*input_shape") as err:
        from_tf_pb(path)
    assert "\n" not in str(err.value)
    cg = from_tf_pb(path, input_shape=(2, 3, 64, 64))
    assert cg.inputs[0].shape == (2, 3, 64, 64)
    assert _by_op(cg, "Conv")[0].output_shapes == [(2, 16, 32, 32)]
    assert cg.outputs[0].shape == (2, 10)


def test_unknown_rank_placeholder_needs_input_shape(tmp_path: Path) -> None:
    path = write_pb(tmp_path / "norank.pb", small_cnn(None))
    with pytest.raises(CGError, match="no static shape"):
        from_tf_pb(path)
    assert from_tf_pb(path, input_shape=(1, 3, 32, 32)).total_params == 794


def test_bad_input_shape_rank(cnn_pb: Path) -> None:
    with pytest.raises(CGError, match="rank 4"):
        from_tf_pb(cnn_pb, input_shape=(1, 3, 32))
    with pytest.raises(CGError, match="positive"):
        from_tf_pb(cnn_pb, input_shape=(1, 0, 32, 32))


# -- bad files -----------------------------------------------------------------------
def _one_line_error(model) -> str:
    with pytest.raises(CGError) as err:
        from_tf_pb(model)
    text = str(err.value)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def test_bad_inputs_give_one_clear_line(tmp_path: Path, cnn_pb: Path) -> None:
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    assert "empty" in _one_line_error(empty)
    assert "no such file" in _one_line_error(tmp_path / "missing.pb")
    assert "no such file" in _one_line_error(tmp_path)  # a directory
    assert "empty" in _one_line_error(b"")
    data = cnn_pb.read_bytes()
    for cut in (7, len(data) // 3, len(data) // 2, len(data) - 5):
        trunc = tmp_path / f"trunc{cut}.pb"
        trunc.write_bytes(data[:cut])
        _one_line_error(trunc)
    rng = np.random.default_rng(1)
    for i in range(20):
        junk = tmp_path / f"junk{i}.pb"
        junk.write_bytes(
            rng.integers(0, 256, size=int(rng.integers(1, 4000)), dtype=np.uint8).tobytes()
        )
        _one_line_error(junk)
    onnx_like = tmp_path / "text.pb"
    onnx_like.write_bytes(b"this is not a protobuf at all\n" * 10)
    _one_line_error(onnx_like)


def test_structurally_broken_graphs(tmp_path: Path) -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 8, 8, 3))
    node(g, "r", "Relu", ["nowhere:0"])
    assert "nowhere" in _one_line_error(g.SerializeToString())
    g = pb.GraphDef()
    node(g, "a", "Relu", ["b"])
    node(g, "b", "Relu", ["a"])
    assert "cycle" in _one_line_error(g.SerializeToString())
    g = pb.GraphDef()
    const(g, "c", np.ones(3, np.float32))
    assert "Placeholder" in _one_line_error(g.SerializeToString())
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 8, 8, 3))
    k = const(g, "k", np.ones((3, 3, 4, 8), np.float32))  # 4 input channels, the input has 3
    node(g, "c", "Conv2D", [x, k], strides=[1, 1, 1, 1], padding="SAME")
    assert "channels" in _one_line_error(g.SerializeToString())


# -- unknown ops and other TF ops ------------------------------------------------------
def test_unknown_op_is_kept_with_its_shape_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 8, 8, 3))
    w = const(g, "w", np.ones((3, 5), np.float32))
    node(g, "custom", "MyFancyOp", [x, w], _output_shapes=[[-1, 4, 4, 5]])
    node(g, "custom2", "OtherOp", ["custom"])  # no _output_shapes: keeps its input's shape
    node(g, "r", "Relu", ["custom2"])
    with caplog.at_level(logging.WARNING, logger="aiop.cg.tf_import"):
        cg = from_tf_pb(g.SerializeToString())
    assert [n.op for n in cg.nodes] == ["Input", "MyFancyOp", "OtherOp", "Relu"]
    fancy = cg.nodes[1]
    assert fancy.source_op == "MyFancyOp"
    assert fancy.output_shapes == [(1, 5, 4, 4)]  # NHWC → NCHW
    assert fancy.params == 15 and fancy.param_names == ["w"]
    assert cg.nodes[2].output_shapes == [(1, 5, 4, 4)]
    assert cg.meta["unknown_ops"] == ["MyFancyOp", "OtherOp"]
    text = caplog.text
    assert "MyFancyOp" in text and "OtherOp" in text and "out-of-vocabulary" in text
    from aiop.cg.vocab import OOV_INDEX, op_index

    assert op_index(fancy.op) == OOV_INDEX


def test_zero_pad_folds_into_conv_and_mirror_pad_stays(tmp_path: Path) -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 16, 16, 3))
    p = const(g, "p", np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32))
    node(g, "pad", "Pad", [x, p], Tpaddings=("type", pb.DT_INT32))
    k = const(g, "k", np.ones((3, 3, 3, 8), np.float32))
    node(g, "conv", "Conv2D", ["pad", k], strides=[1, 2, 2, 1], padding="VALID")
    node(g, "mpad", "MirrorPad", ["conv", p], mode="REFLECT")
    node(g, "pool", "MaxPool", ["mpad"], ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID")
    cg = from_tf_pb(write_pb(tmp_path / "pad.pb", g))
    assert [n.op for n in cg.nodes] == ["Input", "Conv", "Pad", "MaxPool"]
    conv = cg.nodes[1]
    assert conv.attrs["pads"] == [1, 1, 1, 1] and conv.input_shapes[0] == (1, 3, 16, 16)
    assert conv.output_shapes == [(1, 8, 8, 8)]
    assert cg.nodes[2].attrs == {"mode": "reflect", "pads": [0, 0, 1, 1, 0, 0, 1, 1]}
    assert cg.nodes[2].output_shapes == [(1, 8, 10, 10)]
    assert cg.nodes[3].output_shapes == [(1, 8, 5, 5)]
    assert cg.meta["folded_pads"] == 1


def test_pad_with_other_consumer_is_emitted_once() -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 8, 8, 4))
    p = const(g, "p", np.array([[0, 0], [2, 2], [2, 2], [0, 0]], np.int32))
    node(g, "pad", "Pad", [x, p])
    node(g, "r", "Relu", ["pad"])
    node(g, "s", "Sigmoid", ["pad"])
    node(g, "add", "AddV2", ["r", "s"])
    cg = from_tf_pb(g.SerializeToString())
    assert [n.op for n in cg.nodes] == ["Input", "Pad", "Relu", "Sigmoid", "Add"]
    assert cg.nodes[1].attrs["pads"] == [0, 0, 2, 2, 0, 0, 2, 2]
    assert cg.nodes[4].output_shapes == [(1, 4, 12, 12)]


def test_keras_flatten_shape_plumbing_swish_and_misc_ops() -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (-1, 8, 8, 4))
    node(g, "sig", "Sigmoid", [x])
    node(g, "swish", "Mul", [x, "sig"])  # swish: x * sigmoid(x)
    pool_attrs = {"ksize": [1, 3, 3, 1], "strides": [1, 2, 2, 1], "padding": "SAME"}
    node(g, "avg", "AvgPool", ["swish"], **pool_attrs)
    node(g, "max", "MaxPool", ["swish"], **pool_attrs)
    ax = const(g, "axis", np.array(3, np.int32))
    node(g, "cat", "ConcatV2", ["avg", "max", ax], N=2)
    size = const(g, "size", np.array([8, 8], np.int32))
    node(g, "up", "ResizeBilinear", ["cat", size], align_corners=False, half_pixel_centers=True)
    # Keras Flatten: Reshape(x, Pack(StridedSlice(Shape(x), [0], [1], [1]), -1))
    node(g, "shape", "Shape", ["up"], out_type=("type", pb.DT_INT32))
    b, e, s = (const(g, n, np.array([v], np.int32)) for n, v in (("b", 0), ("e", 1), ("s", 1)))
    node(g, "ss", "StridedSlice", ["shape", b, e, s], shrink_axis_mask=1, T=("type", pb.DT_INT32))
    m1 = const(g, "m1", np.array(-1, np.int32))
    node(g, "pack", "Pack", ["ss", m1], N=2, axis=0, T=("type", pb.DT_INT32))
    node(g, "flat", "Reshape", ["up", "pack"])
    w = const(g, "w", np.ones((512, 3), np.float32))
    node(g, "fc", "MatMul", ["flat", w])
    node(g, "sm", "Softmax", ["fc"])
    cg = from_tf_pb(g.SerializeToString())
    ops = [n.op for n in cg.nodes]
    assert ops == ["Input", "Sigmoid", "Mul", "AveragePool", "MaxPool", "Concat", "Resize",
                   "Flatten", "Gemm", "Softmax"]  # fmt: skip
    mul = cg.nodes.index(_by_op(cg, "Mul")[0])
    assert sorted(e.src for e in cg.edges if e.dst == mul) == [0, 1]
    assert _by_op(cg, "AveragePool")[0].output_shapes == [(1, 4, 4, 4)]
    assert _by_op(cg, "AveragePool")[0].attrs["pads"] == [0, 0, 1, 1]
    assert _by_op(cg, "Concat")[0].attrs == {"axis": 1}
    assert _by_op(cg, "Concat")[0].output_shapes == [(1, 8, 4, 4)]
    resize = _by_op(cg, "Resize")[0]
    assert resize.output_shapes == [(1, 8, 8, 8)] and resize.attrs["mode"] == "linear"
    assert resize.flops == 2 * 11 * 512
    assert _by_op(cg, "Flatten")[0].output_shapes == [(1, 512)]
    assert _by_op(cg, "Gemm")[0].params == 1536


def test_slicing_transpose_squeeze_and_split() -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 6, 6, 8))
    b, e, s = (const(g, n, np.array(v, np.int32)) for n, v in
               (("b", [0, 1, 1, 0]), ("e", [0, 5, 5, 4]), ("s", [1, 2, 2, 1])))  # fmt: skip
    node(g, "ss", "StridedSlice", [x, b, e, s], begin_mask=1, end_mask=1)
    ax = const(g, "ax", np.array(3, np.int32))
    node(g, "split", "Split", [ax, "ss"], num_split=2)
    node(g, "r", "Relu", ["split:1"])
    perm = const(g, "perm", np.array([0, 3, 1, 2], np.int32))
    node(g, "t", "Transpose", ["r", perm])
    axes = const(g, "axes", np.array([1, 2], np.int32))
    node(g, "mean", "Mean", ["split", axes], keep_dims=True)
    node(g, "sq", "Squeeze", ["mean"], squeeze_dims=[1, 2])
    cg = from_tf_pb(g.SerializeToString())
    sl = _by_op(cg, "Slice")[0]
    assert sl.output_shapes == [(1, 4, 2, 2)]  # NHWC (1, 2, 2, 4)
    split = _by_op(cg, "Split")[0]
    assert split.output_shapes == [(1, 2, 2, 2), (1, 2, 2, 2)] and split.attrs["axis"] == 1
    t = _by_op(cg, "Transpose")[0]
    assert t.output_shapes == [(1, 2, 2, 2)]
    gap = _by_op(cg, "GlobalAveragePool")[0]
    assert gap.output_shapes == [(1, 2, 1, 1)]
    sq = _by_op(cg, "Squeeze")[0]
    assert sq.attrs == {"axes": [2, 3]} and sq.output_shapes == [(1, 2)]
    cg.validate()


def test_unused_placeholder_and_identity_chain_are_dropped() -> None:
    g = small_cnn()
    placeholder(g, "keras_learning_phase", None)
    node(g, "out2", "Identity", ["output"])
    cg = from_tf_pb(g.SerializeToString())
    assert [n.op for n in cg.nodes] == CNN_OPS
    assert len(cg.inputs) == 1


def test_nchw_graph_keeps_its_layout() -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 3, 16, 16))
    k = const(g, "k", np.ones((3, 3, 3, 8), np.float32))
    node(g, "conv", "Conv2D", [x, k], strides=[1, 1, 2, 2], padding="SAME", data_format="NCHW")
    node(g, "bias", "BiasAdd", ["conv", const(g, "bb", np.ones(8))], data_format="NCHW")
    cg = from_tf_pb(g.SerializeToString(), input_shape=(1, 3, 32, 32))
    conv = cg.nodes[1]
    assert conv.output_shapes == [(1, 8, 16, 16)] and conv.attrs["strides"] == [2, 2]
    assert conv.params == 3 * 3 * 3 * 8 + 8
    assert cg.meta["layout"] == "NCHW"


def _torch_stem():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(8, eps=1e-5)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.bra = nn.Conv2d(8, 4, 1)
            self.brb = nn.Conv2d(8, 12, 1)
            self.head = nn.Conv2d(16, 5, 1)

        def forward(self, x):
            y = self.pool(torch.relu(self.bn1(self.conv1(x))))
            y = torch.cat([torch.relu(self.bra(y)), torch.relu(self.brb(y))], 1)
            # TF's Mean over H, W is imported as global pooling, whatever keep_dims says
            return torch.flatten(nn.functional.adaptive_avg_pool2d(self.head(y), 1), 1)

    return Stem()


def test_resnet_stem_pads_fold_like_pytorch_padding(tmp_path: Path) -> None:
    cg = from_tf_pb(write_pb(tmp_path / "stem.pb", resnet_stem()))
    ops = [n.op for n in cg.nodes]
    assert ops == ["Input", "Conv", "BatchNormalization", "Relu", "MaxPool", "Conv", "Relu",
                   "Conv", "Relu", "Concat", "Conv", "GlobalAveragePool", "Flatten"]  # fmt: skip
    conv1, pool = cg.nodes[1], cg.nodes[4]
    assert conv1.attrs["pads"] == [3, 3, 3, 3] and conv1.output_shapes == [(1, 8, 32, 32)]
    assert pool.attrs == {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    assert pool.output_shapes == [(1, 8, 16, 16)]
    assert cg.nodes[9].attrs == {"axis": 1} and cg.nodes[9].output_shapes == [(1, 16, 16, 16)]
    head = cg.nodes[10]
    assert head.params == 16 * 5 + 5 and head.param_names == ["head/kernel", "head/bias"]
    assert cg.outputs[0].shape == (1, 5)
    assert cg.meta["folded_pads"] == 2


def test_resnet_stem_matches_pytorch_export(tmp_path: Path) -> None:
    stem = _torch_stem()
    try:
        from aiop.cg.torch_import import from_torch
    except ImportError:
        pytest.skip("aiop.cg.torch_import is not available")
    ref = from_torch(stem, (1, 3, 64, 64))
    cg = from_tf_pb(write_pb(tmp_path / "stem.pb", resnet_stem()))
    assert sum(p.numel() for p in stem.parameters()) == cg.total_params == ref.total_params
    assert cg.total_flops == ref.total_flops
    assert [n.op for n in cg.nodes] == [n.op for n in ref.nodes]
    assert [n.output_shapes for n in cg.nodes] == [n.output_shapes for n in ref.nodes]
    for mine, theirs in zip(cg.nodes, ref.nodes):
        for key in ("kernel_shape", "pads", "strides", "group", "axis"):
            if key in theirs.attrs:
                assert mine.attrs.get(key) == theirs.attrs[key], (mine.name, key)


def test_conv_transpose_same_and_explicit_padding() -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 8, 8, 4))
    sizes = const(g, "sizes", np.array([1, 16, 16, 2], np.int32))
    k = const(g, "k", np.ones((3, 3, 2, 4), np.float32))  # (kh, kw, out, in)
    node(g, "up", "Conv2DBackpropInput", [sizes, k, x], strides=[1, 2, 2, 1], padding="SAME")
    node(g, "up/bias", "BiasAdd", ["up", const(g, "ub", np.zeros(2))])
    k2 = const(g, "k2", np.ones((3, 3, 2, 6), np.float32))
    node(g, "c", "Conv2D", ["up/bias", k2], strides=[1, 1, 1, 1], padding="EXPLICIT",
         explicit_paddings=[0, 0, 2, 0, 1, 1, 0, 0])  # fmt: skip
    cg = from_tf_pb(g.SerializeToString())
    up, c = cg.nodes[1], cg.nodes[2]
    assert up.op == "ConvTranspose" and up.output_shapes == [(1, 2, 16, 16)]
    assert up.input_shapes == [(1, 4, 8, 8), (4, 2, 3, 3), (2,)]
    assert up.attrs["pads"] == [0, 0, 1, 1] and up.attrs["output_padding"] == [0, 0]
    assert up.params == 3 * 3 * 2 * 4 + 2
    assert c.attrs["pads"] == [2, 1, 0, 1] and c.output_shapes == [(1, 6, 16, 16)]


def test_no_shape_mismatch_warning_on_consistent_output_shapes(
    cnn_pb: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aiop.cg.tf_import"):
        from_tf_pb(cnn_pb)
    assert caplog.text == ""
    g = small_cnn()
    for nd in g.node:
        if nd.name == "act/Relu6":
            for dims in ([-1, 8, 8, 16],):  # wrong on purpose
                sp = nd.attr["_output_shapes"].list.shape.add()
                for d in dims:
                    sp.dim.add().size = d
    with caplog.at_level(logging.WARNING, logger="aiop.cg.tf_import"):
        from_tf_pb(g.SerializeToString())
    assert "differ from the file's _output_shapes" in caplog.text


def test_more_ops_shapes() -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (2, 6, 6, 4))
    node(g, "lrelu", "LeakyRelu", [x], alpha=0.1)
    node(g, "elu", "Elu", ["lrelu"])
    node(g, "sum3", "AddN", ["elu", "lrelu", x], N=3)
    ks, st = (
        const(g, "ks", np.array([1, 2, 2, 1], np.int32)),
        const(g, "st", np.array([1, 2, 2, 1], np.int32)),
    )
    node(g, "mp", "MaxPoolV2", ["sum3", ks, st], padding="VALID")  # (2, 3, 3, 4)
    pads = const(g, "pads", np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32))
    node(g, "pad2", "PadV2", ["mp", pads, const(g, "cv", np.array(1.0, np.float32))])
    b, sz = (
        const(g, "b", np.array([0, 1, 1, 0], np.int32)),
        const(g, "sz", np.array([-1, 3, 3, 2], np.int32)),
    )
    node(g, "slice", "Slice", ["pad2", b, sz], Index=("type", pb.DT_INT32))  # (2, 3, 3, 2)
    sizes, ax = (
        const(g, "sizes", np.array([1, -1], np.int32)),
        const(g, "ax", np.array(-1, np.int32)),
    )
    node(g, "splitv", "SplitV", ["slice", sizes, ax], num_split=2)
    node(g, "stack", "Pack", ["splitv", "splitv:1"], N=2, axis=1)  # (2, 2, 3, 3, 1)
    rs = const(g, "rs", np.array([2, 9, 2], np.int32))
    node(g, "r3", "Reshape", ["stack", rs])
    w = const(g, "w", np.ones((2, 5), np.float32))
    node(g, "bmm", "BatchMatMulV2", ["r3", w])  # (2, 9, 5)
    e = const(g, "e", np.array(1, np.int32))
    node(g, "ed", "ExpandDims", ["bmm", e])  # (2, 1, 9, 5): rank 4, shown NCHW
    node(g, "cast", "Cast", ["ed"], SrcT=("type", pb.DT_FLOAT), DstT=("type", pb.DT_HALF))
    # shape plumbing on constants only: Fill, Range, ShapeN disappear
    dims = const(g, "dims", np.array([2, 3], np.int32))
    node(g, "fill", "Fill", [dims, const(g, "one", np.array(1.0, np.float32))])
    lim = const(g, "lim", np.array(5, np.int32))
    node(
        g,
        "rng",
        "Range",
        [const(g, "z", np.array(0, np.int32)), lim, e],
        Tidx=("type", pb.DT_INT32),
    )
    cg = from_tf_pb(g.SerializeToString())
    shapes = {n.name: n.output_shapes for n in cg.nodes}
    assert [n.op for n in cg.nodes] == ["Input", "LeakyRelu", "Elu", "Add", "MaxPool", "Pad",
                                        "Slice", "Split", "Concat", "Reshape", "MatMul",
                                        "Unsqueeze", "Cast"]  # fmt: skip
    assert cg.nodes[1].attrs == {"alpha": pytest.approx(0.1)}
    assert shapes["sum3"] == [(2, 4, 6, 6)] and shapes["mp"] == [(2, 4, 3, 3)]
    assert shapes["pad2"] == [(2, 4, 5, 5)] and cg.nodes[5].attrs["value"] == 1.0
    assert shapes["slice"] == [(2, 2, 3, 3)]
    assert shapes["splitv"] == [(2, 1, 3, 3), (2, 1, 3, 3)]
    assert shapes["stack"] == [(2, 2, 3, 3, 1)] and shapes["r3"] == [(2, 9, 2)]
    assert shapes["bmm"] == [(2, 9, 5)] and cg.nodes[10].params == 10
    assert shapes["ed"] == [(2, 5, 1, 9)]
    assert cg.nodes[-1].output_dtypes == ["float16"]
    assert sorted(cg.nodes[i].name for i in range(len(cg.nodes)) if cg.nodes[i].op == "Input") == [
        "x"
    ]
    split = cg.nodes.index(_by_op(cg, "Split")[0])
    assert sum(1 for e in cg.edges if e.src == split) == 2  # two tensors, one edge each


def test_unfrozen_graph_and_graph_ending_in_pad() -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 4, 4, 2))
    node(g, "v", "VariableV2", [], shape=[2], dtype=("type", pb.DT_FLOAT))
    node(g, "add", "Add", [x, "v"])
    assert "not a frozen graph" in _one_line_error(g.SerializeToString())
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 4, 4, 2))
    node(g, "r", "Relu", [x])
    p = const(g, "p", np.array([[0, 0], [1, 0], [0, 2], [0, 0]], np.int32))
    node(g, "pad", "Pad", ["r", p])
    cg = from_tf_pb(g.SerializeToString())
    assert [n.op for n in cg.nodes] == ["Input", "Relu", "Pad"]
    assert cg.nodes[2].attrs["pads"] == [0, 0, 1, 0, 0, 0, 0, 2]
    assert cg.outputs[0].shape == (1, 2, 5, 6)


# -- building trainable PyTorch modules from imported GraphDefs (aiop.cg.to_torch) --------

torch = pytest.importorskip("torch")
tfx = pytest.importorskip("tf_fixtures")
from aiop.cg.to_torch import module_from_file, to_torch  # noqa: E402

BUILD_TOL = 1e-4
FIXTURES = ["small_cnn", "resnet_stem", "mixed_cnn", "layout_ops", "decoder"]


def _nchw(t):
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


def _check_against_reference(g, batch: int | None = None, training: bool = False) -> None:
    """The built module (NCHW in, NCHW out) computes what the GraphDef computes in NHWC."""
    cg = from_tf_pb(g.SerializeToString())
    module = to_torch(cg, weights="file")
    module.train(training)
    shape = cg.inputs[0].shape
    x = torch.randn(batch or shape[0], *shape[1:], generator=torch.Generator().manual_seed(0))
    ref = tfx.run_reference(g, {cg.inputs[0].name: x.permute(0, 2, 3, 1)}, training=training)
    with torch.no_grad():
        out = module(x)
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(cg.outputs)
    for spec, got in zip(cg.outputs, outs):
        want = ref[spec.name.removesuffix("/flatten")]
        want = _nchw(want[0] if isinstance(want, list) else want)
        assert got.shape == want.shape, spec.name
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        assert err <= BUILD_TOL, (spec.name, err)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_built_module_matches_the_graphdef(fixture: str) -> None:
    _check_against_reference(getattr(tfx, fixture)())


@pytest.mark.parametrize("fixture", ["mixed_cnn", "layout_ops"])
def test_built_module_follows_the_batch(fixture: str) -> None:
    """Built at the file's batch, run at another (shape constants with the batch scale)."""
    _check_against_reference(getattr(tfx, fixture)(), batch=5)


@pytest.mark.parametrize("fixture", ["training_bn", "mixed_cnn"])
def test_training_mode_uses_batch_statistics(fixture: str) -> None:
    """In train() BatchNorm normalises with the batch's statistics, as TF training does;
    a training graph's empty moving statistics start at 0 and 1."""
    _check_against_reference(getattr(tfx, fixture)(), training=True)
    if fixture == "training_bn":
        module = to_torch(from_tf_pb(tfx.training_bn().SerializeToString()))
        bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert torch.equal(bn.running_mean, torch.zeros(6))
        assert torch.equal(bn.running_var, torch.ones(6))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_weights_and_gradients(fixture: str) -> None:
    """Every learned TF weight is a parameter (same count as the CG), and trains."""
    cg = from_tf_pb(getattr(tfx, fixture)().SerializeToString())
    module = to_torch(cg)
    params = list(module.parameters())
    assert sum(p.numel() for p in params) == cg.total_params
    module.train()
    inputs, targets = module.make_batch(3, generator=torch.Generator().manual_seed(1))
    module.loss(module(*inputs), targets).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_weight_layouts_are_converted() -> None:
    """HWIO kernels → OIHW, depthwise HWIM → (C·M, 1, kh, kw), Dense (K, N) → (N, K)."""
    g = tfx.mixed_cnn()
    cg = from_tf_pb(g.SerializeToString())
    ref = {
        nd.name: np.frombuffer(nd.attr["value"].tensor.tensor_content, "<f4")
        for nd in g.node
        if nd.op == "Const" and nd.attr["value"].tensor.tensor_content
    }
    module = to_torch(cg)
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    c1, dw = convs[0], convs[1]
    k = ref["c1/kernel"].reshape(3, 3, 3, 8)
    assert np.allclose(c1.weight.detach().numpy(), k.transpose(3, 2, 0, 1))
    d = ref["dw/kernel"].reshape(3, 3, 8, 2)
    assert dw.groups == 8 and dw.weight.shape == (16, 1, 3, 3)
    assert np.allclose(dw.weight.detach().numpy()[2 * 3 + 1, 0], d[:, :, 3, 1])
    fc = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
    assert np.allclose(fc.weight.detach().numpy(), ref["fc1/kernel"].reshape(30, 12).T)


def test_nchw_graph_builds() -> None:
    g = pb.GraphDef()
    x = placeholder(g, "x", (1, 3, 15, 15))
    k = const(g, "k", np.arange(3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4) / 50)
    node(g, "conv", "Conv2D", [x, k], strides=[1, 1, 2, 2], padding="SAME", data_format="NCHW")
    node(g, "bias", "BiasAdd", ["conv", const(g, "bb", np.arange(4.0))], data_format="NCHW")
    node(g, "act", "Relu", ["bias"])
    shift = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    node(g, "shift", "BiasAdd", ["act", const(g, "sh", shift)], data_format="NCHW")
    cg = from_tf_pb(g.SerializeToString())
    xin = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        got = to_torch(cg).eval()(xin)
    kernel = np.arange(3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4) / 50
    w = torch.from_numpy(kernel).permute(3, 2, 0, 1)
    # SAME for 15 at stride 2 and k 3: out 8, total pad 2 → 1 before, 1 after
    want = torch.relu(torch.nn.functional.conv2d(xin, w, torch.arange(4.0), 2, 1))
    want = want + torch.from_numpy(shift).reshape(4, 1, 1)  # an unmerged NCHW BiasAdd
    assert torch.allclose(got, want, atol=1e-5)


def test_unbuildable_op_is_named_and_predict_still_answers(tmp_path: Path) -> None:
    g = tfx.small_cnn()
    node(g, "odd", "Cumprod", ["out/Softmax", const(g, "odd/axis", np.array(1, np.int32))],
         _output_shapes=[[1, 10]])  # fmt: skip
    path = write_pb(tmp_path / "odd.pb", g)
    cg = from_tf_pb(path)
    assert cg.nodes[-1].op == "Cumprod" and cg.total_params > 0
    with pytest.raises(CGError, match=r"cannot build a PyTorch module for op\(s\) tf::Cumprod"):
        module_from_file(path)


def test_profile_a_pb_file_through_the_built_module(tmp_path: Path) -> None:
    profiler = pytest.importorskip("aiop.profiler")
    path = write_pb(tmp_path / "mixed.pb", tfx.mixed_cnn())
    full = profiler.profile(str(path), "bs=8,mb=4", mode="meta", flops=False)
    last = profiler.profile(str(path), "bs=8,mb=4,method=last", mode="meta", flops=False)
    cg = from_tf_pb(path)
    assert full.peak_memory_bytes > last.peak_memory_bytes > 0
    assert full.breakdown["params"] == 4 * cg.total_params
    assert full.trainable_params == cg.total_params


def test_tf_and_pytorch_copies_of_a_network_profile_the_same() -> None:
    """NHWC becomes NCHW at the input, not by transposes around every op, so the module
    built from the TF file spends what the same network's PyTorch export spends."""
    profiler = pytest.importorskip("aiop.profiler")
    from aiop.cg.torch_import import from_torch

    twin = from_torch(_torch_stem(), (1, 3, 64, 64))
    tf = from_tf_pb(resnet_stem().SerializeToString())
    for config in ("bs=8,mb=8", "bs=8,mb=4,freeze=0.5,opt=adamw", "bs=8,mb=8,method=last"):
        a = profiler.profile(lambda: to_torch(twin), config, mode="meta", flops=False)
        b = profiler.profile(lambda: to_torch(tf), config, mode="meta", flops=False)
        assert a.peak_memory_bytes == b.peak_memory_bytes, config


def test_asymmetric_same_padding_costs_its_padded_copy() -> None:
    """TF's SAME at stride 2 pads (0, 1): PyTorch convolutions pad symmetrically, so the
    built module pads explicitly and autograd keeps the padded input instead of the input
    (the twin pads (1, 1), a different computation at the same cost otherwise)."""
    profiler = pytest.importorskip("aiop.profiler")
    from aiop.cg.torch_import import from_torch

    twin = from_torch(_torch_twin(), (1, 3, 32, 32))
    tf = from_tf_pb(small_cnn().SerializeToString())
    a = profiler.profile(lambda: to_torch(twin), "bs=8,mb=8", mode="meta", flops=False)
    b = profiler.profile(lambda: to_torch(tf), "bs=8,mb=8", mode="meta", flops=False)
    padded, image = 8 * 3 * 33 * 33 * 4, 8 * 3 * 32 * 32 * 4
    assert b.peak_memory_bytes - a.peak_memory_bytes == padded - image


@pytest.mark.slow
def test_cli_profile_and_predict_a_pb_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``aiop profile FILE.pb`` measures the built module; an op that cannot be built is
    named on one line (exit 2) while ``aiop predict`` still answers from the CG."""
    import json

    from aiop.cli import main

    good = write_pb(tmp_path / "mixed.pb", tfx.mixed_cnn())
    assert main(["profile", str(good), "--config", "bs=8,mb=4,freeze=0.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["peak_memory_bytes"] > 0 and 0 < result["trainable_params"] < result["params"]
    g = tfx.small_cnn()
    node(g, "odd", "Cumprod", ["out/Softmax", const(g, "odd/axis", np.array(1, np.int32))],
         _output_shapes=[[1, 10]])  # fmt: skip
    odd = write_pb(tmp_path / "odd.pb", g)
    assert main(["profile", str(odd), "--config", "bs=8,mb=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "aiop: error: cannot build a PyTorch module for op(s) tf::Cumprod (1 node)"
    assert main(["predict", str(odd), "--config", "bs=8,mb=4", "--json"]) == 0
    assert "peak_memory_bytes" in capsys.readouterr().out
