"""ONNX and PyTorch import into ComputeGraph, on real exported networks."""

from __future__ import annotations

import io
import logging

import numpy as np
import onnx
import pytest
import thop
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from aiop.cg import CGError, ComputeGraph, export_onnx_bytes, from_onnx, from_torch
from aiop.models.examples import SmallCNN, TinyResNet


def thop_flops(model: nn.Module, shape) -> float:
    model = model.eval()
    macs, _ = thop.profile(model, (torch.randn(*shape),), verbose=False)
    return 2 * float(macs)


class Attention(nn.Module):
    """A pre-norm transformer block with explicit attention MatMuls."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .reshape(b, n, 3, self.heads, d // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize(
    "model_cls,shape",
    [(SmallCNN, (1, 1, 28, 28)), (TinyResNet, (1, 3, 32, 32))],
)
def test_conv_nets_match_thop_and_param_count(model_cls, shape):
    model = model_cls()
    cg = from_torch(model, shape)
    assert cg.total_params == sum(p.numel() for p in model.parameters())
    expected = thop_flops(model, shape)
    assert abs(cg.total_flops - expected) / expected < 0.01
    assert cg.nodes[0].op == "Input" and cg.inputs[0].shape == shape
    # the graph is the network: no Constant/Identity/Shape plumbing survives
    assert not {"Constant", "Identity", "Shape"} & set(cg.op_counts())
    # training-mode export keeps BatchNorm and Dropout visible
    assert cg.op_counts()["BatchNormalization"] == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    )
    cg.validate()


def test_tiny_resnet_structure():
    cg = from_torch(TinyResNet(), (1, 3, 32, 32))
    ops = cg.op_counts()
    assert ops["Conv"] == 1 + 3 * 2 + 2  # stem, two per block, two projection shortcuts
    assert ops["Add"] == 3  # one residual add per block
    adds = [i for i, n in enumerate(cg.nodes) if n.op == "Add"]
    preds = cg.predecessors()
    assert all(len(preds[i]) == 2 for i in adds)
    conv = next(n for n in cg.nodes if n.op == "Conv")
    assert conv.attrs["kernel_shape"] == [3, 3] and conv.attrs["strides"] == [1, 1]
    assert conv.param_names == ["stem.0.weight"]
    bn = next(n for n in cg.nodes if n.op == "BatchNormalization")
    assert bn.params == 2 * 16 and bn.buffers == 2 * 16
    assert bn.attrs.get("training_mode") == 1
    # every edge carries the producer's tensor
    for e in cg.edges:
        assert (
            e.shape == cg.nodes[e.src].output_shapes[0] or e.shape in cg.nodes[e.src].output_shapes
        )


def test_depthwise_and_grouped_conv_flops():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2),
        nn.ConvTranspose2d(16, 8, 2, stride=2),
    )
    cg = from_torch(model, (1, 8, 10, 10))
    dw, grouped, up = [n for n in cg.nodes if n.op in ("Conv", "ConvTranspose")]
    assert dw.flops == 2 * (8 * 10 * 10) * 1 * 9
    assert grouped.flops == 2 * (16 * 10 * 10) * 4 * 9
    assert grouped.attrs["dilations"] == [2, 2] and grouped.attrs["group"] == 2
    assert up.op == "ConvTranspose" and up.output_shapes[0] == (1, 8, 20, 20)
    assert up.flops == 2 * (8 * 20 * 20) * 16 * 4


def test_transformer_block_params_and_attention_matmuls():
    block = Attention(32, 4)
    cg = from_torch(block, (1, 10, 32))
    assert cg.total_params == sum(p.numel() for p in block.parameters())
    matmuls = [n for n in cg.nodes if n.op == "MatMul"]
    attention = [n for n in matmuls if n.params == 0]
    assert len(attention) == 2  # QK^T and attn @ V
    assert all(n.flops == 2 * 4 * 10 * 10 * 8 for n in attention)
    assert cg.op_counts()["LayerNormalization"] == 2
    assert cg.op_counts()["Softmax"] == 1


def test_fingerprint_stable_across_exports_and_weights():
    a = from_torch(TinyResNet(), (1, 3, 32, 32))
    b = from_torch(TinyResNet(), (1, 3, 32, 32))  # other random weights, second export
    assert a.fingerprint == b.fingerprint
    c = from_torch(TinyResNet(width=8), (1, 3, 32, 32))
    assert c.fingerprint != a.fingerprint
    d = from_torch(TinyResNet(), (1, 3, 64, 64))
    assert d.fingerprint != a.fingerprint


def test_export_leaves_model_unchanged():
    model = TinyResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    from_torch(model, (1, 3, 32, 32))
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_onnx_and_torch_paths_agree(tmp_path):
    model = TinyResNet()
    data = export_onnx_bytes(model, (torch.randn(1, 3, 32, 32),))
    path = tmp_path / "net.onnx"
    path.write_bytes(data)
    via_file = from_onnx(path)
    via_proto = from_onnx(onnx.load_from_string(data))
    via_torch = from_torch(model, (1, 3, 32, 32))
    assert via_file.fingerprint == via_proto.fingerprint == via_torch.fingerprint
    assert via_file.name == "net"


def test_external_data(tmp_path):
    model = SmallCNN()
    proto = onnx.load_from_string(export_onnx_bytes(model, (torch.randn(1, 1, 28, 28),)))
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        proto, str(path), save_as_external_data=True, location="ext.data", size_threshold=0
    )
    assert (tmp_path / "ext.data").stat().st_size > 4 * 1000
    cg = from_onnx(path)
    assert cg.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("training", [True, False])
def test_exports_of_other_opsets_and_eval_mode(opset, training):
    model = SmallCNN()
    data = export_onnx_bytes(
        model,
        (torch.randn(1, 1, 28, 28),),
        training=training,
        opset=opset,
        do_constant_folding=not training,
    )
    cg = from_onnx(data)
    assert cg.meta["opset"] == opset
    convs = [n for n in cg.nodes if n.op == "Conv"]
    assert len(convs) == 5
    n_bn = cg.op_counts().get("BatchNormalization", 0)
    # eval exports fold BatchNorm into the convolutions: memory training spends is hidden
    assert n_bn == (5 if training else 0)
    train_cg = from_torch(model, (1, 1, 28, 28))
    bn_flops = sum(n.flops for n in train_cg.nodes if n.op == "BatchNormalization")
    assert cg.total_flops == train_cg.total_flops - (0 if training else bn_flops)


def test_dynamic_axes_need_input_shape(tmp_path):
    model = SmallCNN().eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.randn(1, 1, 28, 28),),
        buf,
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}},
    )
    with pytest.raises(CGError, match=r"no static shape.*--input-shape"):
        from_onnx(buf.getvalue())
    cg = from_onnx(buf.getvalue(), input_shape=(2, 1, 32, 32))
    assert cg.inputs[0].shape == (2, 1, 32, 32)
    assert cg.outputs[0].shape == (2, 10)
    with pytest.raises(CGError, match="rank"):
        from_onnx(buf.getvalue(), input_shape=(1, 32, 32))


def _tiny_model(op_type: str = "Relu", domain: str = "", shape=(1, 4)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node(op_type, ["h"], ["y"], name="odd", domain=domain),
    ]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=opsets)


def test_out_of_vocabulary_op_is_kept_with_warning(caplog):
    model = _tiny_model("Hardmax")  # a real ONNX op outside the vocabulary
    with caplog.at_level(logging.WARNING):
        cg = from_onnx(model)
    assert [n.op for n in cg.nodes] == ["Input", "MatMul", "Hardmax"]
    assert cg.nodes[2].output_shapes == [(1, 4)]
    assert "Hardmax" in caplog.text and "out-of-vocabulary" in caplog.text
    assert cg.meta["unknown_ops"] == ["Hardmax"]
    from aiop.cg.vocab import OOV_INDEX, op_index

    assert op_index(cg.nodes[2].op) == OOV_INDEX


def test_custom_domain_op_is_kept(caplog):
    model = _tiny_model("FancyAct", domain="com.example")
    with caplog.at_level(logging.WARNING):
        cg = from_onnx(model)
    assert cg.nodes[2].op == "com.example::FancyAct"
    assert "com.example::FancyAct" in caplog.text


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"", "empty"),
        (b"\x08\x07" + bytes(range(256)) * 4, "not an ONNX model|invalid|no graph nodes"),
        (b"hello world, this is not onnx", "not an ONNX model|no graph nodes|invalid"),
    ],
)
def test_bad_bytes(payload, match):
    with pytest.raises(CGError, match=match):
        from_onnx(payload)


def test_truncated_file(tmp_path):
    data = export_onnx_bytes(SmallCNN(), (torch.randn(1, 1, 28, 28),))
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CGError):
        from_onnx(path)


def test_missing_path():
    with pytest.raises(CGError, match="no such file"):
        from_onnx("/nonexistent/model.onnx")


def test_invalid_model_fails_checker():
    model = _tiny_model()
    model.graph.node[0].input[1] = "missing_weight"
    with pytest.raises(CGError, match="invalid ONNX model"):
        from_onnx(model)


def test_json_round_trip(tmp_path):
    cg = from_torch(TinyResNet(), (1, 3, 32, 32))
    again = ComputeGraph.from_json(cg.to_json())
    assert again.to_dict() == cg.to_dict()
    assert again.fingerprint == cg.fingerprint
    for suffix in (".json", ".json.gz"):
        path = cg.save(tmp_path / f"g{suffix}")
        assert ComputeGraph.load(path).fingerprint == cg.fingerprint


def test_json_tampering_is_detected(tmp_path):
    cg = from_torch(SmallCNN(), (1, 1, 28, 28))
    data = cg.to_dict()
    data["nodes"][1]["params"] += 1
    with pytest.raises(CGError, match="fingerprint"):
        ComputeGraph.from_dict(data)
    data = cg.to_dict()
    data["edges"][0] = [5, 1, [1], "float32"]
    with pytest.raises(CGError, match="topological"):
        ComputeGraph.from_dict(data)
    with pytest.raises(CGError, match="not valid JSON"):
        ComputeGraph.from_json("{nope")
    with pytest.raises(CGError, match="not a computational graph"):
        ComputeGraph.from_dict({"a": 1})
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(CGError, match="gzip"):
        ComputeGraph.load(bad)


class _Plumbing(nn.Module):
    """ReLU6 (Clip with constant bounds), a reshape and a split: the operands a builder needs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()

    def forward(self, x):
        y = self.act(self.conv(x))
        a, b = y.split(4, dim=1)
        return (b - a).reshape(y.shape[0], -1) * 0.5


def test_constants_ports_and_weights(tmp_path):
    model = _Plumbing()
    cg = from_torch(model, (1, 3, 4, 4))
    clip = next(n for n in cg.nodes if n.op == "Clip")
    bounds = [cg.constants[name].value for name in clip.inputs[1:]]
    assert bounds == [[0.0], [6.0]]
    reshape = next(n for n in cg.nodes if n.op == "Reshape")
    assert cg.constants[reshape.inputs[1]].value == [1, -1]
    assert reshape.output_shapes == [(1, 64)]
    split_i = next(i for i, n in enumerate(cg.nodes) if n.op == "Split")
    sub_i = next(i for i, n in enumerate(cg.nodes) if n.op == "Sub")
    into_sub = sorted(
        (e.src_port, e.dst_port) for e in cg.edges if e.src == split_i and e.dst == sub_i
    )
    assert into_sub == [(0, 1), (1, 0)]  # b - a: second output into the first position
    conv = next(n for n in cg.nodes if n.op == "Conv")
    weight_name = conv.inputs[1]
    assert cg.constants[weight_name].param_names == ["conv.weight"]
    assert cg.constants[weight_name].value is None  # weights never enter the JSON
    np.testing.assert_array_equal(cg.weights[weight_name], model.conv.weight.detach().numpy())
    # JSON carries the operands, safetensors the weights
    again = ComputeGraph.from_json(cg.to_json())
    assert again.constants == cg.constants and again.weights == {}
    again.load_weights(cg.save_weights(tmp_path / "w.safetensors"))
    np.testing.assert_array_equal(again.weights[weight_name], cg.weights[weight_name])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CGError, match="safetensors"):
        again.load_weights(tmp_path / "bad.safetensors")


def test_literal_constants_change_the_fingerprint():
    class Capped(nn.Module):
        def __init__(self, cap):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.cap = cap

        def forward(self, x):
            return self.conv(x).clamp(0, self.cap)

    assert (
        from_torch(Capped(6.0), (1, 3, 4, 4)).fingerprint
        != from_torch(Capped(1.0), (1, 3, 4, 4)).fingerprint
    )


def test_torch_transformer_encoder_layer():
    """nn.MultiheadAttention exports despite torch 2.13's is_causal tracing bug."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    cg = from_torch(layer, (1, 6, 32))
    assert cg.total_params == sum(p.numel() for p in layer.parameters())
    assert cg.op_counts()["Softmax"] == 1 and cg.op_counts()["LayerNormalization"] == 2
    assert (
        torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    )


def test_dynamo_exporter_needs_onnxscript():
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        with pytest.raises(CGError, match="onnxscript"):
            from_torch(SmallCNN(), (1, 1, 28, 28), dynamo=True)
    else:
        cg = from_torch(SmallCNN(), (1, 1, 28, 28), dynamo=True)
        assert cg.meta["exporter"] == "dynamo"


def test_batchnorm_after_global_pooling_exports_at_batch_one():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    cg = from_torch(model, (1, 3, 8, 8))
    assert cg.op_counts()["BatchNormalization"] == 1
    with pytest.raises(ValueError, match="more than 1 value"):
        model.train()(torch.randn(1, 3, 8, 8))  # the guard is back after the export
