"""Task heads on zoo/family backbones: shapes, losses, checkpointing, CG export, profiling."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from aiop.models import build
from aiop.models.examples import TinyResNet
from aiop.tasks.heads import (
    TASKS,
    ElasticConv2d,
    HeadError,
    TaskModel,
    build_head,
    load_head_state,
    probe_backbone,
)
from aiop.tasks.train import build_task_model


def tiny(task: str, resolution: int = 32) -> TaskModel:
    torch.manual_seed(0)
    return TaskModel(TinyResNet(in_chans=3, resolution=resolution), task, width=16)


@pytest.mark.parametrize("task", TASKS)
def test_outputs_and_loss(task: str) -> None:
    model = tiny(task)
    (x,), y = model.make_batch(2, generator=torch.Generator().manual_seed(0))
    out = model(x)
    if task == "classification":
        assert out.shape == (2, 10)
    elif task == "semantic":
        assert out.shape == (2, 11, 32, 32)
    elif task == "pose":
        assert out.shape == (2, 14, model.output_size, model.output_size)
    else:
        h = model.output_size
        assert [tuple(o.shape) for o in out[:3]] == [(2, 10, h, h), (2, 2, h, h), (2, 2, h, h)]
        if task == "instance":
            assert out[3].shape == (2, 1, 32, 32)
        if task == "panoptic":
            assert out[3].shape == (2, 11, 32, 32)
    loss = model.loss(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    # the head and the first backbone layer both receive gradients
    assert model.head.parameters().__next__().grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stem.parameters())


def test_family_backbones_feed_four_levels() -> None:
    for spec in ("family:ofa_mbv3:0", "family:ofa_resnet:1"):
        model = build_task_model(spec, "detection", resolution=32)
        assert len(model.info.channels) == 4
        assert model.info.sizes[0] == 8  # stride 4 at 32 px
        assert model.feature_indices == tuple(build(spec).feature_indices)


def test_incompatible_backbone_is_named() -> None:
    with pytest.raises(HeadError, match=r"CLIPDualEncoder.*no spatial"):
        TaskModel(build("zoo:clip_vit", resolution=32), "semantic")
    with pytest.raises(HeadError, match="unknown task 'depth'"):
        TaskModel(TinyResNet(in_chans=3, resolution=32), "depth")
    with pytest.raises(HeadError, match="BlockNet"):
        probe_backbone(torch.nn.Conv2d(3, 3, 1))


def test_checkpointed_blocks_give_exact_features_and_grads() -> None:
    from aiop.mconfig import prepare

    model = build_task_model("family:ofa_mbv3:0", "detection", resolution=32)
    ckpt = copy.deepcopy(model)  # hooks survive a deep copy (the profiler copies modules)
    (x,), y = model.make_batch(2, generator=torch.Generator().manual_seed(1))
    model.loss(model(x), y).backward()
    plan = prepare(ckpt, "bs=2,ckpt=3")
    assert plan.segments, "checkpointing must be on"
    ckpt.loss(ckpt(x), y).backward()
    grads = dict(model.named_parameters())
    for name, p in ckpt.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-6), name


def test_cg_export_and_meta_profile() -> None:
    from aiop.cg import from_torch
    from aiop.profiler import profile

    model = tiny("instance")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cg = from_torch(model, (1, 3, 32, 32))
    ops = [n.op for n in cg.nodes]
    assert "Resize" in ops and "BatchNormalization" in ops  # head upsampling, training mode
    names = {name for n in cg.nodes for name in n.param_names}
    assert any(n.startswith("head.") for n in names) and any(n.startswith("blocks.") for n in names)
    plain = from_torch(tiny("classification"), (1, 3, 32, 32))
    assert cg.fingerprint != plain.fingerprint
    result = profile(model, "bs=4", mode="meta", flops=False)
    heavier = profile(model, "bs=16", mode="meta", flops=False)
    assert 0 < result.peak_memory_bytes < heavier.peak_memory_bytes
    # micro-batches cut the dense targets like the images; freezing and checkpointing apply
    saved = profile(model, "bs=16,mb=4,freeze=0.3,ckpt=2", mode="meta", flops=False)
    assert saved.peak_memory_bytes < heavier.peak_memory_bytes


def test_elastic_laterals_and_head_transfer() -> None:
    conv = ElasticConv2d(8, 4, 1)
    x = torch.randn(1, 5, 3, 3)
    ref = torch.nn.functional.conv2d(x, conv.weight[:, :5], conv.bias)
    assert torch.allclose(conv(x), ref)
    with pytest.raises(HeadError, match="widest"):
        conv(torch.randn(1, 9, 3, 3))
    wide = build_head("semantic", (32, 64, 128), width=16)
    narrow = build_head("semantic", (16, 64, 96), width=16)
    load_head_state(narrow, wide.state_dict())
    w = wide.state_dict()["fpn.laterals.0.weight"]
    assert torch.equal(narrow.state_dict()["fpn.laterals.0.weight"], w[:, :16])
    with pytest.raises(HeadError, match="shape"):
        load_head_state(wide, narrow.state_dict())
    with pytest.raises(HeadError, match="lacks"):
        load_head_state(narrow, {})


def test_task_names_match_the_data_contract() -> None:
    from aiop.tasks import data

    assert TASKS == data.TASKS
