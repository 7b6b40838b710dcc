"""aiop.cg.to_torch: modules rebuilt from CGs compute what the file computes (onnxruntime),
train (gradients reach every parameter), follow the batch rule, and fail clearly."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from aiop.cg import CGError, export_onnx_bytes, from_onnx
from aiop.cg.to_torch import GraphModule, module_factory, module_from_file, to_torch

ort = pytest.importorskip("onnxruntime")

TOL = 1e-4


# -- networks in the styles a user's file comes in ------------------------------------


class SE(nn.Module):
    def __init__(self, c: int, gate: str = "sigmoid") -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class MobileStyle(nn.Module):
    """Conv-BN-ReLU6, depthwise, dilated and grouped convs, SE (sigmoid, hard-sigmoid),
    HardSwish, SiLU, residual, classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        self.se = SE(16)
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.dil = nn.Sequential(
            nn.Conv2d(24, 24, 3, 1, 2, dilation=2, groups=4), nn.BatchNorm2d(24), nn.SiLU()
        )
        self.se2 = SE(24, gate="hard")
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(24, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.dw(self.stem(x)))
        x = self.pw(x)
        x = x + self.se2(self.dil(x))
        return self.head(x)


class UNetish(nn.Module):
    """MaxPool/AvgPool down, Upsample (nearest, bilinear) and ConvTranspose up, skip concat,
    reflect/constant Pad, channel and pixel shuffle, GroupNorm, LeakyReLU, Slice/Split."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.down = nn.Conv2d(16, 32, 3, padding=1)
        self.up_t = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.mix = nn.Conv2d(48, 16, 3)
        self.ps = nn.Conv2d(16, 16, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = F.leaky_relu(self.gn(self.enc(x)), 0.1)
        d = F.relu(self.down(F.max_pool2d(e, 2)))
        d2 = F.avg_pool2d(d, 3, 1, 1, count_include_pad=False)
        u1 = self.up_t(d2)
        u2 = F.interpolate(d, scale_factor=2, mode="nearest")[:, :16]
        u3 = F.interpolate(e, size=e.shape[-2:], mode="bilinear", align_corners=False)
        y = torch.cat([u1, u2, u3], 1)
        y = self.mix(F.pad(y, (1, 1, 1, 1), mode="reflect"))
        b, c, h, w = y.shape  # channel shuffle (2 groups)
        y = y.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        y = F.pixel_shuffle(self.ps(y), 2)  # 16 → 4 channels at 2× size
        y = F.pad(y, (0, 1, 2, 0), value=0.5)
        a, bb = y.split([2, 2], 1)
        z = torch.cat([a, bb.flip(1), y.flip(1)[:, :4:2], y[:, -2:]], 1)
        return self.out(z)[..., 1:-1:2, ::2]


class Transformer(nn.Module):
    """Patch embed, CLS token, one pre-norm block (LayerNorm, attention matmuls, softmax, GELU),
    token-mean and CLS heads."""

    def __init__(self, dim: int = 32, heads: int = 4, num_classes: int = 7) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, num_classes)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        b, n, d = x.shape
        x = torch.cat([self.cls.expand(b, -1, -1), x], 1) + self.pos
        h = self.heads
        qkv = self.qkv(self.norm1(x)).reshape(b, n + 1, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1) * (d // h) ** -0.5).softmax(-1)
        x = x + self.drop(self.attn_proj((att @ v).transpose(1, 2).reshape(b, n + 1, d)))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x[:, 0] + x[:, 1:].mean(1))


NETS = {"mobile": MobileStyle, "unet": UNetish, "transformer": Transformer}


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so eval-mode checks test them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _ort(data: bytes, *xs: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)}
    return sess.run(None, feeds)


def _rel_err(ref: np.ndarray, out: torch.Tensor) -> float:
    ref = np.asarray(ref)
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(ref - out.detach().numpy()).max() / scale)


def _no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout) or getattr(m, "op", "") == "Dropout":
            m.eval()


# -- correctness against onnxruntime -----------------------------------------------------


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("folded", [False, True])
def test_eval_export_matches_onnxruntime(net: str, opset: int, folded: bool) -> None:
    """Eval exports, with constant folding (BatchNorm folded into convs, transposed
    weights) or without, at opsets 13, 17 and 20."""
    model = _init(NETS[net]()).eval()
    x = torch.randn(1, 3, 16, 16)
    data = export_onnx_bytes(model, (x,), training=False, opset=opset, do_constant_folding=folded)
    built = to_torch(from_onnx(data)).eval()
    (ref,) = _ort(data, x)
    with torch.no_grad():
        assert _rel_err(ref, built(x)) <= TOL
        # and the original network itself
        assert _rel_err(model(x).numpy(), built(x)) <= TOL


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("folded", [False, True])
def test_training_export_matches_onnxruntime_and_original(net: str, folded: bool) -> None:
    """Training exports (BatchNormalization training_mode=1, Dropout) run in ORT with batch
    statistics; the built module in train mode (dropout off) computes the same."""
    model = _init(NETS[net]())
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # ORT's training-mode dropout is random
    x = torch.randn(2, 3, 16, 16)
    data = export_onnx_bytes(model, (x,), training=True, opset=17, do_constant_folding=folded)
    cg = from_onnx(data)
    built = to_torch(cg).train()
    (ref,) = _ort(data, x)
    with torch.no_grad():
        out = built(x)
        assert _rel_err(ref, out) <= TOL
        model.train()
        assert _rel_err(model(x).numpy(), out) <= TOL


def test_dynamic_batch_export_and_batch_rule() -> None:
    """A file with a dynamic batch axis, imported at batch 1, runs at batch 5 (Reshape
    constants baked at batch 1 follow the call's batch) and matches ORT at batch 5."""
    model = _init(Transformer()).eval()
    x = torch.randn(5, 3, 16, 16)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x[:1],), buf, input_names=["x"], output_names=["y"], opset_version=17,
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    data = buf.getvalue()
    built = to_torch(from_onnx(data, input_shape=(1, 3, 16, 16))).eval()
    (ref,) = _ort(data, x)
    with torch.no_grad():
        assert built(x).shape == (5, 7)
        assert _rel_err(ref, built(x)) <= TOL


def test_opset20_gelu_and_fused_patterns() -> None:
    """Opset 20 exports GELU as one Gelu op; opset 17 as Erf arithmetic, which the builder
    fuses back into F.gelu (and MatMul+Add into F.linear, x*sigmoid(x) into F.silu)."""
    model = _init(Transformer())
    x = torch.randn(1, 3, 16, 16)
    ops20 = from_onnx(export_onnx_bytes(model, (x,), opset=20)).op_counts()
    assert "Gelu" in ops20
    cg17 = from_onnx(export_onnx_bytes(model, (x,), opset=17))
    assert "Erf" in cg17.op_counts()
    built = to_torch(cg17)
    kinds = [getattr(m, "op", type(m).__name__) for m in built.modules()]
    assert "Gelu" in kinds and "Erf" not in kinds
    assert sum(isinstance(m, nn.Linear) for m in built.modules()) == 5  # qkv, proj, fc1, fc2, head


# -- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("net", sorted(NETS))
def test_gradients_reach_every_parameter(net: str) -> None:
    model = NETS[net]()
    x = torch.randn(1, 3, 16, 16)
    built = to_torch(from_onnx(export_onnx_bytes(model, (x,), training=True)))
    built.train()
    inputs, targets = built.make_batch(4, generator=torch.Generator().manual_seed(0))
    loss = built.loss(built(*inputs), targets)
    loss.backward()
    missing = [n for n, p in built.named_parameters() if p.grad is None]
    assert not missing
    n_orig = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in built.parameters()) == n_orig


def test_weights_parameters_and_structure() -> None:
    """Weights come from the file; parameter names follow the original's; BlockNet-style
    graphs get the original's stem / blocks / head split."""
    from aiop.models.examples import TinyResNet

    model = TinyResNet()
    cg = from_onnx(export_onnx_bytes(model, model.make_batch(1)[0], training=True))
    built = to_torch(cg)
    assert isinstance(built, GraphModule)
    assert len(built.blocks) == len(model.blocks)
    orig = dict(model.named_parameters())
    names = [n for n, _ in built.named_parameters()]
    assert any(n.startswith("blocks.0.") for n in names)
    assert {n.split(".")[0] for n in names} >= {"stem", "blocks", "head"}
    w = built.blocks[0].conv1.weight
    assert torch.equal(w, orig["blocks.0.conv1.weight"])
    assert isinstance(built.blocks[0].conv1, nn.Conv2d)
    # BN in train mode uses batch statistics and updates running stats
    bn = built.blocks[0].bn1
    assert isinstance(bn, nn.BatchNorm2d)
    before = bn.running_mean.clone()
    built.train()
    built(*built.make_batch(4)[0])
    assert not torch.equal(before, bn.running_mean)
    # same computation as the original in train mode, at another batch
    model.train()
    x = torch.randn(3, *model.input_size)
    with torch.no_grad():
        assert torch.allclose(model(x), built(x), atol=1e-5)
    # deepcopy is faithful (no closures over modules)
    twin = copy.deepcopy(built).eval()
    built.eval()
    with torch.no_grad():
        assert torch.equal(twin(x), built(x))


def test_make_batch_loss_and_blocks_are_checkpointable() -> None:
    from aiop.models.examples import SmallCNN

    model = SmallCNN()
    built = to_torch(from_onnx(export_onnx_bytes(model, model.make_batch(1)[0], training=True)))
    assert built.input_size == model.input_size and built.num_classes == model.num_classes
    inputs, targets = built.make_batch(6, resolution=28)
    assert inputs[0].shape == (6, *model.input_size) and targets.shape == (6,)
    assert built.example_input_shape(2) == (2, *model.input_size)
    # each block is single-tensor-in/out: run them as the profiler's checkpointing does
    from torch.utils.checkpoint import checkpoint

    x = inputs[0]
    built.eval()  # running statistics, no dropout: the two passes are comparable
    ref = built(x)
    h = x
    for mod in built.stem.children():
        h = mod(h)
    for block in built.blocks:
        h = checkpoint(block, h, use_reentrant=False)
    for mod in built.head.children():
        h = mod(h)
    assert torch.allclose(h, ref, atol=1e-5)


def test_unparameterised_user_graph_gets_segments() -> None:
    """A plain ONNX file (not from aiop, initializer names like onnx::Conv_3) still gets
    stem / blocks / head at the cut points where one activation is live."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 5),
    )  # fmt: skip
    x = torch.randn(1, 3, 16, 16)
    data = export_onnx_bytes(model, (x,), training=False, do_constant_folding=True)
    built = to_torch(from_onnx(data))
    assert len(built.blocks) >= 1
    assert any(True for _ in built.head.parameters())
    (ref,) = _ort(data, x)
    assert _rel_err(ref, built.eval()(x)) <= TOL


# -- errors, files, fake mode ------------------------------------------------------------


def _custom_op_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Hardmax", ["a"], ["b"]),
        helper.make_node("Hardmax", ["b"], ["c"]),
        helper.make_node("Det", ["c"], ["d"], name="det") if False else
        helper.make_node("Shrink", ["c"], ["y"]),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_unsupported_ops_are_named_in_one_error() -> None:
    cg = from_onnx(_custom_op_model())
    with pytest.raises(CGError, match=r"op\(s\) Hardmax, Shrink \(3 nodes\)"):
        to_torch(cg)
    with pytest.raises(CGError, match="Hardmax"):
        module_factory(cg)


def test_module_from_file_and_factory_under_fake_mode(tmp_path) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _init(MobileStyle()).eval()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "m.onnx"
    path.write_bytes(export_onnx_bytes(model, (x,), training=True))
    built = module_from_file(path)
    with torch.no_grad():
        assert built.train()(x).shape == (1, 10)
    factory = module_factory(path)
    with FakeTensorMode():
        fake = factory()
        inputs, targets = fake.make_batch(8)
        loss = fake.loss(fake(*inputs), targets)
        loss.backward()
    assert all(p.grad is not None for p in fake.parameters())
    with pytest.raises(CGError, match="no such file"):
        module_from_file(tmp_path / "missing.onnx")
    bad = tmp_path / "m.txt"
    bad.write_text("x")
    with pytest.raises(CGError, match=r"\.onnx or \.pb"):
        module_from_file(bad)


def test_tf_pb_builds_from_file_and_under_fake_mode(tmp_path) -> None:
    """A frozen TF GraphDef builds like an ONNX file (its numerics: tests/test_cg_tf.py)."""
    import sys
    from pathlib import Path

    from torch._subclasses.fake_tensor import FakeTensorMode

    sys.path.insert(0, str(Path(__file__).parent))
    tf_fixtures = pytest.importorskip("tf_fixtures")
    path = tf_fixtures.write_pb(tmp_path / "m.pb", tf_fixtures.small_cnn())
    module = module_from_file(path, weights="file")
    assert sum(p.numel() for p in module.parameters()) == 16 * 27 + 16 + 32 + 144 + 170
    with FakeTensorMode():
        fake = module_factory(path)()
        inputs, targets = fake.make_batch(2)
        fake.loss(fake(*inputs), targets).backward()
    assert all(p.grad is not None for p in fake.parameters())


def test_graph_without_operands_is_refused() -> None:
    cg = from_onnx(export_onnx_bytes(nn.Sequential(nn.Conv2d(3, 4, 3)), (torch.randn(1, 3, 8, 8),)))
    for n in cg.nodes:
        if n.op != "Input":
            n.inputs = []
    with pytest.raises(CGError, match="no operands"):
        to_torch(cg)


def test_handwritten_onnx_ops() -> None:
    """Ops torch rarely exports, written directly: Slice with steps and negative indices,
    Split with sizes, Gather, Expand, Where, Pow, ReduceMean (axes input, opset 18), Resize
    with sizes, Clip bounds, Squeeze/Unsqueeze, Cast, Softmax axis, DepthToSpace DCR."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
    f32 = lambda name, v: helper.make_tensor(name, TensorProto.FLOAT, list(v.shape), v.ravel())  # noqa: E731
    inits = [
        i64("st", [7, -1]), i64("en", [0, -5]), i64("ax", [1, 3]), i64("sp", [-2, -1]),
        i64("sizes", [2, 3, 3]), i64("gi", [2, 0]), i64("shp", [2, 2, 4, 4]), i64("a1", [1]),
        i64("rax", [2, 3]), i64("rsz", [2, 2, 6, 6]), i64("u", [0]),
        f32("lo", np.array(-0.5, np.float32)), f32("hi", np.array(0.7, np.float32)),
        f32("two", np.array(2.0, np.float32)),
        f32("w", rng.standard_normal((1, 8, 1, 1)).astype(np.float32)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s"]),  # [2,4,4,2]
        helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=1),
        helper.make_node("Gather", ["b", "gi"], ["g"], axis=1),  # [2,2,4,4]
        helper.make_node("ReduceMax", ["c", "a1"], ["c1"], keepdims=1),  # [2,1,4,4]
        helper.make_node("Expand", ["c1", "shp"], ["e"]),  # [2,2,4,4]
        helper.make_node("Greater", ["a", "g"], ["cond"]),
        helper.make_node("Where", ["cond", "a", "e"], ["wh"]),
        helper.make_node("Pow", ["wh", "two"], ["pw"]),
        helper.make_node("ReduceMean", ["pw", "rax"], ["rm"], keepdims=1),
        helper.make_node("Mul", ["x", "w"], ["xw"]),
        helper.make_node("DepthToSpace", ["xw"], ["d2s"], blocksize=2, mode="DCR"),  # [2,2,8,8]
        helper.make_node("Resize", ["pw", "", "", "rsz"], ["rs"], mode="linear"),
        helper.make_node("Clip", ["rs", "lo", "hi"], ["cl"]),
        helper.make_node("Softmax", ["cl"], ["sm"], axis=1),
        helper.make_node("ReduceMean", ["d2s", "rax"], ["rm2"], keepdims=0),
        helper.make_node("Unsqueeze", ["rm2", "u"], ["un"]),
        helper.make_node("Squeeze", ["un", "u"], ["sq"]),
        helper.make_node("Cast", ["sq"], ["ca"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["sm"], ["r1"], keepdims=0),
        helper.make_node("ReduceSum", ["s"], ["r2"], keepdims=0),
        helper.make_node("ReduceSum", ["rm"], ["r3"], keepdims=0),
        helper.make_node("ReduceSum", ["ca"], ["r4"], keepdims=0),
        helper.make_node("Sum", ["r1", "r2", "r3", "r4"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "ops", [x], [y], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    xv = torch.randn(2, 8, 4, 4)
    (ref,) = _ort(data, xv)
    built = to_torch(from_onnx(data)).eval()
    with torch.no_grad():
        assert _rel_err(ref, built(xv)) <= TOL


def test_zoo_models_match_original(tmp_path) -> None:
    """Two zoo models (conv and attention) rebuilt from their training CGs compute what the
    originals compute, at the CG's batch and another (train mode, dropout off)."""
    models = pytest.importorskip("aiop.models")
    for name in ("resnet18", "mobilevit_xxs"):
        original = models.build(f"zoo:{name}", resolution=64)
        from aiop.cg import from_torch

        built = to_torch(from_torch(original))
        original.train()
        built.train()
        _no_dropout(original)
        _no_dropout(built)
        x = torch.randn(3, 3, 64, 64)
        with torch.no_grad():
            a, b = original(x), built(x)
        assert float((a - b).abs().max() / a.abs().max()) <= TOL, name
        assert sum(p.numel() for p in built.parameters()) == sum(
            p.numel() for p in original.parameters()
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["resnet50", "resnext50_32x4d", "mobilenet_v2", "proxylessnas_mobile", "densenet121",
     "mobilevit_xs", "mobilevit_s", "clip_vit"],
)  # fmt: skip
def test_every_zoo_model_eval_export_matches_onnxruntime(name: str) -> None:
    models = pytest.importorskip("aiop.models")
    original = models.build(f"zoo:{name}", resolution=64).eval()
    inputs, _ = original.make_batch(1, generator=torch.Generator().manual_seed(0))
    data = export_onnx_bytes(original, tuple(inputs), training=False)
    built = to_torch(from_onnx(data)).eval()
    refs = _ort(data, *inputs)
    with torch.no_grad():
        out = built(*inputs)
    assert _rel_err(refs[0], out if isinstance(out, torch.Tensor) else out[0]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "config"),
    [
        ("zoo:resnet18", "bs=8,mb=8"),
        ("zoo:mobilevit_xxs", "bs=8,mb=8,method=last"),  # needs Python-like lifetimes
        ("family:ofa_resnet:2", "bs=8,mb=8,method=last,opt=adamw"),
        ("family:ofa_mbv3:3", "bs=16,mb=8,freeze=0.3"),  # a frozen prefix, no autograd
        ("zoo:clip_vit", "bs=8,mb=8,method=last"),  # temporaries vs locals
        ("zoo:clip_vit", "bs=8,mb=8,freeze=0.7,opt=adamw"),  # attribute-read parameters
    ],
)
def test_memory_fidelity_meta_profiler(spec: str, config: str) -> None:
    """The profiler's meta peak of the rebuilt module is within 1% of the original's."""
    profiler = pytest.importorskip("aiop.profiler")
    models = pytest.importorskip("aiop.models")
    from aiop.cg import from_torch

    res = 64 if spec.startswith("zoo:") else None
    cg = from_torch(models.build(spec, resolution=res) if res else models.build(spec))
    a = profiler.profile(spec, config, mode="meta", flops=False, resolution=res)
    b = profiler.profile(lambda: to_torch(cg), config, mode="meta", flops=False)
    assert abs(b.peak_memory_bytes - a.peak_memory_bytes) <= 0.01 * a.peak_memory_bytes


def test_freezing_counts_the_same_layers_as_the_original() -> None:
    """Parameters read as attributes of never-called modules (CLIP's tokens, logit scale)
    live in never-called holders: forward order, layer count and the layers a freeze
    rate selects are the original's."""
    models = pytest.importorskip("aiop.models")
    from aiop.cg import from_torch
    from aiop.mconfig.apply import forward_order, prepare

    original = models.build("zoo:clip_vit", resolution=32)
    rebuilt = to_torch(from_torch(original))

    def units(model: nn.Module) -> list[tuple[str, ...]]:
        return [
            tuple(sorted(n for n, _ in m.named_parameters(recurse=False)))
            for _, m in forward_order(model)
        ]

    a, b = units(original), units(rebuilt)
    assert a == b  # the never-called three come last, in registration order
    assert a[-3:] == [("cls_token", "pos_embed"), ("pos_embed",), ("logit_scale",)]
    names = dict(rebuilt.named_parameters())
    assert "stem.tokens.cls_token" in names and "head.temperature.logit_scale" in names
    for rate in (0.3, 0.7, 0.99):
        pa = prepare(original, f"bs=2,mb=2,freeze={rate}")
        pb = prepare(rebuilt, f"bs=2,mb=2,freeze={rate}")
        count = dict(original.named_parameters())
        assert sum(count[n].numel() for n in pa.trainable_params) == sum(
            names[n].numel() for n in pb.trainable_params
        )
    prepare(rebuilt, "bs=2,mb=2")  # everything trains again
    inputs, targets = rebuilt.make_batch(2, generator=torch.Generator().manual_seed(0))
    rebuilt.loss(rebuilt(*inputs), targets).backward()  # borrowed parameters still train
    assert names["stem.tokens.cls_token"].grad is not None


def test_child_results_held_only_by_the_return_expression() -> None:
    """``x = x + self.f(x)`` then more code: f's result is a temporary, freed at its
    use; ``return self.act(out + identity)``: out and identity live until return."""
    from aiop.cg.to_torch import _plan_steps, _release_points

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(8, 8)
            self.g = nn.Linear(8, 8)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x * 2 + self.f(x)  # an earlier statement: f(x) is a temporary
            out = self.g(x)
            return self.act(out + x)  # the return expression: out lives until return

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x))

    from aiop.cg import from_torch

    cg = from_torch(Net(), (2, 8))
    steps = _plan_steps(cg)
    last: dict[str, int] = {}
    for k, s in enumerate(steps):
        for t in s.inputs:
            last[t] = k
    release = _release_points(steps, last, "locals")
    produced = {o: s for s in steps for o in s.outputs}
    f_out = next(o for o, s in produced.items() if s.node.scope.endswith("block/f"))
    g_out = next(o for o, s in produced.items() if s.node.scope.endswith("block/g"))
    block_end = max(k for k, s in enumerate(steps) if s.node.scope.startswith("block"))
    assert release[f_out] == last[f_out]  # freed right after the add that uses it
    assert release[g_out] == block_end  # held until the block returns


@pytest.mark.parametrize("spec", ["family:ofa_pn:1", "zoo:mobilevit_xxs"])
def test_rebuilt_blocks_declare_the_originals_lite_spec(spec: str) -> None:
    """TinyTL's lite methods wrap the same blocks of a rebuilt graph as of the original
    (conv blocks, MobileViT's transformer-free MV2 blocks; not the others)."""
    models = pytest.importorskip("aiop.models")
    from aiop.cg import from_torch

    original = models.build(spec, resolution=64)
    rebuilt = to_torch(from_torch(original))

    def specs(model: nn.Module) -> list[tuple | None]:
        out = []
        for block in model.blocks:
            s = getattr(block, "lite_spec", lambda: None)()
            out.append(None if s is None else (s.kind, s.in_channels, s.out_channels, s.stride))
        return out

    expected = specs(original)
    assert any(e is not None for e in expected)
    assert specs(rebuilt) == expected


@pytest.mark.slow
def test_lite_method_memory_of_rebuilt_graph_matches_original() -> None:
    profiler = pytest.importorskip("aiop.profiler")
    models = pytest.importorskip("aiop.models")
    from aiop.cg import from_torch

    cg = from_torch(models.build("zoo:resnet18", resolution=64))
    for config in ("bs=8,method=lite", "bs=8,method=lite+bias,freeze=0.5,ckpt=1"):
        a = profiler.profile("zoo:resnet18", config, mode="meta", flops=False, resolution=64)
        b = profiler.profile(lambda: to_torch(cg), config, mode="meta", flops=False)
        assert b.peak_memory_bytes == a.peak_memory_bytes
