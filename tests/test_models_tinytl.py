"""TinyTL: lite residual (identity at init, trains), BN → GN, train methods on every model."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from aiop.models import (
    FAMILY_NAMES,
    TRAIN_METHODS,
    ZOO_NAMES,
    build,
    count_params,
    insert_lite_residual,
    replace_bn_with_gn,
    set_train_method,
)
from aiop.models.tinytl import LiteResidual, has_lite_residual

SMALL = {"width_mult": 0.25, "num_classes": 10, "resolution": 32}
ALL_SPECS = [f"zoo:{n}" for n in ZOO_NAMES] + [f"family:{f}:0" for f in FAMILY_NAMES]


def _small(spec: str) -> nn.Module:
    torch.manual_seed(0)
    return build(spec, **(SMALL if spec.startswith("zoo:") else {}))


def _lite_count(model: nn.Module) -> int:
    return sum(isinstance(b, LiteResidual) for b in model.blocks)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_lite_residual_is_identity_at_init(spec):
    model = _small(spec)
    inputs, _ = model.make_batch(2, generator=torch.Generator().manual_seed(1))
    before_params = count_params(model)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.manual_seed(2)  # same dropout masks (MobileNetV2's head) in both passes
        with torch.no_grad():
            ref = model(*inputs)
        if mode == "eval":
            insert_lite_residual(model)
            assert count_params(model) > before_params
        torch.manual_seed(2)
        with torch.no_grad():
            out = model(*inputs)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # every inverted-residual / bottleneck block (and ViT block) got one
    wanted = sum(callable(getattr(b, "lite_spec", None)) for b in model.blocks)
    assert _lite_count(model) == wanted > 0
    insert_lite_residual(model)  # idempotent
    assert _lite_count(model) == wanted


def test_lite_branch_layout_follows_tinytl():
    model = insert_lite_residual(_small("zoo:mobilenet_v2"))
    wrapped = [b for b in model.blocks if isinstance(b, LiteResidual)]
    assert len(wrapped) == len(model.blocks)  # all 17 are inverted residuals
    block = wrapped[1]  # 16 → 24 (x0.25: 8 → 8), stride 2
    pool, conv1, bn1, act, conv2, bn2 = block.lite
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2
    assert conv1.groups == 2 and conv1.stride == (block.main.stride,) * 2
    assert conv1.in_channels == block.main.in_channels
    assert conv2.kernel_size == (1, 1) and conv2.out_channels == block.main.out_channels
    assert isinstance(act, nn.ReLU) and isinstance(bn1, nn.BatchNorm2d)
    assert torch.count_nonzero(bn2.weight) == 0


def test_lite_residual_trains_and_freezes_the_rest():
    model = _small("zoo:mobilenet_v2")
    set_train_method(model, "lite")
    assert has_lite_residual(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lite = {n: p.detach().clone() for n, p in model.named_parameters() if ".lite." in n}
    assert lite and all(model.get_parameter(n).requires_grad for n in lite)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(0)
    (x,), y = model.make_batch(8, generator=g)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model.loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in frozen.items():
        assert torch.equal(p, model.get_parameter(n)), n
    assert any(not torch.equal(p, model.get_parameter(n)) for n, p in lite.items())


def test_lite_model_exports_to_onnx():
    model = insert_lite_residual(_small("family:ofa_pn:0"))
    inputs, _ = model.make_batch(2)
    f = io.BytesIO()
    torch.onnx.export(
        model,
        inputs,
        f,
        dynamo=False,
        training=torch.onnx.TrainingMode.TRAINING,
        do_constant_folding=False,
        opset_version=17,
    )
    import onnx

    ops = {n.op_type for n in onnx.load_from_string(f.getvalue()).graph.node}
    assert {"AveragePool", "Resize"} <= ops


@pytest.mark.parametrize("spec", ["zoo:resnet18", "zoo:densenet121", "family:ofa_mbv3:2"])
def test_replace_bn_with_gn(spec):
    model = _small(spec)
    n_params = count_params(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].weight.requires_grad_(False)
    with torch.no_grad():
        bns[0].bias.fill_(0.5)
    replace_bn_with_gn(model, channels_per_group=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == len(bns)
    assert count_params(model) == n_params  # same affine parameters
    assert not gns[0].weight.requires_grad and torch.all(gns[0].bias == 0.5)
    for gn in gns:
        assert gn.num_channels % gn.num_groups == 0
        if gn.num_channels % 8 == 0:
            assert gn.num_channels // gn.num_groups == 8
    inputs, y = model.make_batch(2)
    model.loss(model(*inputs), y).backward()


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_train_methods_on_every_model(spec):
    with torch.device("meta"):  # requires_grad bookkeeping only: no weights needed
        model = build(spec)
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    got = {}
    set_train_method(model, "lite")  # inserts the lite modules first
    for method in TRAIN_METHODS:
        set_train_method(model, method)
        got[method] = _trainable(model)
    all_names = {n for n, _ in model.named_parameters()}  # lite modules were inserted
    assert got["full"] == all_names
    assert got["last"] == head
    norms = {
        f"{mn}.{pn}"
        for mn, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm)
        for pn, _ in m.named_parameters(recurse=False)
    }
    assert got["norm+last"] == norms | head
    biases = {n for n in all_names if n.endswith("bias")}
    assert got["bias"] == biases | head
    lite = {n for n in all_names if ".lite." in n}
    assert lite  # every model gets lite modules (ViT blocks get the token analogue)
    assert got["lite"] == lite | head
    assert got["lite+bias"] == lite | biases | head
    assert head < got["bias"] < got["full"]


def test_bias_method_trains_only_norm_biases_and_head_on_convnets():
    model = _small("zoo:resnet18")
    set_train_method(model, "bias")
    for name in _trainable(model):
        assert name.startswith("head.") or name.endswith("bias")
        if not name.startswith("head."):  # convs have no bias: these are BN biases
            assert isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.BatchNorm2d)


def test_tinytl_inside_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = build("zoo:mobilenet_v2", resolution=32)
        set_train_method(model, "lite+bias")
        replace_bn_with_gn(model)
        clip = build("zoo:clip_vit")
        set_train_method(clip, "lite")
    assert has_lite_residual(model) and has_lite_residual(clip)


def test_lite_follows_model_dtype():
    model = _small("family:ofa_mbv3:1").double()
    insert_lite_residual(model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_unknown_method():
    model = _small("family:ofa_mbv3:0")
    with pytest.raises(ValueError, match=r"full, last, bias, lite, lite\+bias, norm\+last"):
        set_train_method(model, "everything")
    with pytest.raises(ValueError, match="blocks"):
        insert_lite_residual(nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["zoo:resnet50", "zoo:densenet121", "zoo:mobilenet_v2"])
def test_lite_residual_stays_small_on_wide_blocks(name):
    """TinyTL-L adds a lite branch per block; on wide blocks it must not dwarf the network."""
    from aiop.models import build

    with torch.device("meta"):
        model = build(name)
        before = sum(p.numel() for p in model.parameters())
        insert_lite_residual(model)
    after = sum(p.numel() for p in model.parameters())
    assert before < after <= 1.5 * before
