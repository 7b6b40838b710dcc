"""Zoo: reference parameter counts, forward/backward, ONNX training export, fake-mode build."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from aiop.models import (
    FAMILY_NAMES,
    REFERENCE_PARAMS,
    ZOO_NAMES,
    BlockNet,
    ModelSpecError,
    build,
    count_params,
    parameterised_modules,
    zoo_table,
)

SMALL = 32  # px: every zoo model runs at 32 px (stride-32 nets end at 1×1)
LIGHT = {"width_mult": 0.25, "num_classes": 10, "resolution": SMALL}


def export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
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
    return f.getvalue()


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_reference_param_counts(name):
    with torch.device("meta"):  # shapes only: no weight init, instant
        model = build(f"zoo:{name}", num_classes=1000)
    assert count_params(model) == REFERENCE_PARAMS[name]


def test_reference_numbers_are_the_published_ones():
    # guards the table itself against edits
    assert REFERENCE_PARAMS["resnet18"] == 11_689_512
    assert REFERENCE_PARAMS["resnet50"] == 25_557_032
    assert REFERENCE_PARAMS["mobilenet_v2"] == 3_504_872
    assert REFERENCE_PARAMS["densenet121"] == 7_978_856
    assert REFERENCE_PARAMS["resnext50_32x4d"] == 25_028_904
    assert REFERENCE_PARAMS["proxylessnas_mobile"] == 4_080_512
    assert REFERENCE_PARAMS["mobilevit_xxs"] == 1_272_024
    assert REFERENCE_PARAMS["mobilevit_xs"] == 2_317_848
    assert REFERENCE_PARAMS["mobilevit_s"] == 5_578_632
    assert set(REFERENCE_PARAMS) | {"clip_vit"} == set(ZOO_NAMES)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_contract_and_options(name):
    with torch.device("meta"):
        model = build(f"zoo:{name}", num_classes=7, in_chans=1, resolution=SMALL)
        wide = build(f"zoo:{name}", width_mult=0.5)
        base = build(f"zoo:{name}")
    assert isinstance(model, BlockNet)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) >= 6
    assert model.input_size == (1, SMALL, SMALL) and model.num_classes == 7
    assert count_params(wide) < count_params(base)
    # no parameters directly on the top module: structure lives in stem/blocks/head(/text)
    assert not list(model.parameters(recurse=False))
    assert all(0 <= i < len(model.blocks) for i in model.feature_indices)
    assert list(model.feature_indices) == sorted(model.feature_indices)
    if name != "clip_vit":
        assert len(model.feature_indices) == 4


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_forward_backward_onnx_small(name):
    """Every zoo model trains a step and exports (training mode, legacy exporter) at 32 px."""
    torch.manual_seed(0)
    model = build(f"zoo:{name}", **LIGHT)
    model.train()
    inputs, targets = model.make_batch(2, generator=torch.Generator().manual_seed(0))
    out = model(*inputs)
    loss = model.loss(out, targets)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    onnx_bytes = export_onnx(model, inputs)
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    ops = {n.op_type for n in graph.node}
    assert "BatchNormalization" in ops or "LayerNormalization" in ops or "ReduceMean" in ops
    if name.startswith(("mobilevit", "clip")):
        assert {"MatMul", "Softmax"} <= ops  # attention stays visible


def test_multiscale_features_strides():
    model = build("zoo:resnet18", **LIGHT)
    feats = model.multiscale_features(torch.randn(2, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_clip_batch_and_loss():
    model = build("zoo:clip_vit", num_classes=32, resolution=32, width_mult=0.34)
    (image, tokens), targets = model.make_batch(3)
    assert tokens.dtype == torch.long and targets.tolist() == [0, 1, 2]
    logits = model(image, tokens)
    assert logits.shape == (3, 3)
    emb = model(image)
    assert emb.shape == (3, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    loss = model.loss(logits, targets)
    # symmetric: equals the mean of the two directions
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(loss, 0.5 * (ce(logits, targets) + ce(logits.t(), targets)))


@pytest.mark.parametrize("spec", [f"zoo:{n}" for n in ZOO_NAMES] + ["family:ofa_resnet:1"])
def test_forward_order_is_registration_order(spec):
    """Freezing walks parameterised modules in registration order: forward must agree."""
    model = build(spec, **(LIGHT if spec.startswith("zoo:") else {})).eval()
    units = [n for n, _ in parameterised_modules(model)]
    modules = dict(model.named_modules())
    called: list[str] = []
    hooks = [
        modules[n].register_forward_pre_hook(lambda m, i, n=n: called.append(n)) for n in units
    ]
    inputs, _ = model.make_batch(2)
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    first_calls = list(dict.fromkeys(called))
    # parameter holders that are never called (CLIP's position tables) keep their place
    assert first_calls == [n for n in units if n in set(called)]
    assert len(first_calls) >= len(units) - 3


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_builds_in_fake_tensor_mode(name):
    with FakeTensorMode():
        model = build(f"zoo:{name}", resolution=SMALL)
    assert count_params(model) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_full_width_forward_backward_onnx(name):
    model = build(f"zoo:{name}", resolution=64)
    inputs, targets = model.make_batch(2)
    model.loss(model(*inputs), targets).backward()
    assert len(export_onnx(model, inputs)) > count_params(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilevit_xxs"])
def test_default_resolution_forward(name):
    model = build(f"zoo:{name}").eval()
    with torch.no_grad():
        (x,), _ = model.make_batch(1)
        assert model(x).shape == (1, 1000)


def test_bad_specs_raise_one_line_errors():
    for spec, needle in [
        ("zoo:resnet19", "resnet18"),
        ("family:ofa_foo:1", "ofa_mbv3"),
        ("family:ofa_mbv3:x", "SEED"),
        ("nonsense", "zoo:NAME"),
    ]:
        with pytest.raises(ModelSpecError) as info:
            build(spec)
        msg = str(info.value)
        assert needle in msg and "\n" not in msg
    with pytest.raises(ModelSpecError, match="width_mult"):
        build("zoo:resnet18", width_mult=-1)
    with pytest.raises(ModelSpecError, match="valid"):
        build("zoo:resnet18", colour="red")
    with pytest.raises(ModelSpecError, match="num_classes"):
        build("zoo:resnet18", num_classes=0)
    assert issubclass(ModelSpecError, ValueError)


def test_zoo_table_rows_subset():
    rows = zoo_table(["mobilevit_xxs", "ofa_pn"])
    assert [r["name"] for r in rows] == ["zoo:mobilevit_xxs", "family:ofa_pn"]
    zoo, fam = rows
    assert zoo["kind"] == "zoo" and zoo["params"] == 1_272_024
    assert zoo["input_size"] == [3, 256, 256]
    # timm reports ≈0.36 GMACs for MobileViT-XXS at 256 px; thop counts the same order
    assert 0.5e9 < zoo["flops"] < 1.0e9
    assert fam["kind"] == "family" and fam["default_sample"] == "family:ofa_pn:0"
    assert "ProxylessNAS" in fam["space"] and fam["flops"] > 0
    assert zoo["description"] and fam["description"]
    json.dumps(rows)


@pytest.mark.slow
def test_zoo_table_full():
    rows = zoo_table()
    assert len(rows) == len(ZOO_NAMES) + len(FAMILY_NAMES)
    by = {r["name"]: r for r in rows}
    assert by["zoo:resnet18"]["flops"] == pytest.approx(2 * 1.819e9, rel=0.01)  # thop's 1.82 G
    assert by["zoo:mobilenet_v2"]["flops"] == pytest.approx(2 * 0.3e9, rel=0.15)
