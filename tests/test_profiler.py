"""Profiler: meta = real memory, agreement with PyTorch's MemTracker, breakdown, FLOPs, latency."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from aiop.mconfig import MConfig, MConfigError, make_optimizer, prepare, train_step
from aiop.models.base import BlockNet
from aiop.profiler import (
    CATEGORIES,
    ProfilerError,
    frozen_safe_memtracker,
    measure_memory,
    profile,
)


class ResNetLike(BlockNet):
    """Residual blocks with BatchNorm, ReLU (in place) and dropout."""

    input_size = (3, 16, 16)
    num_classes = 10

    def __init__(self, n_blocks: int = 6, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)
        )

        class Res(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
                self.bn1 = nn.BatchNorm2d(width)
                self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
                self.bn2 = nn.BatchNorm2d(width)
                self.drop = nn.Dropout(0.1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = torch.relu(self.bn1(self.conv1(x)))
                return torch.relu(x + self.drop(self.bn2(self.conv2(y))))

        self.blocks = nn.ModuleList(Res() for _ in range(n_blocks))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


class MLP(BlockNet):
    """Linear layers only: every byte is easy to count by hand."""

    input_size = (1, 4, 8)
    num_classes = 5

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Flatten()
        self.blocks = nn.ModuleList([nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 32)])
        self.head = nn.Linear(32, 5)


CONFIGS = [
    "bs=8",
    "bs=8,mb=2,ckpt=3",
    "bs=8,mb=4,freeze=0.4,ckpt=2,opt=adam",
    "bs=8,method=bias,opt=adamw",
    "bs=8,mb=2,method=lite+bias,ckpt=2,prec=bf16,opt=adam",
    "bs=4,method=norm+last,prec=fp16",
    "bs=4,freeze=1.0",
]


@pytest.mark.parametrize("spec", CONFIGS)
def test_meta_equals_real_on_small_net(spec: str) -> None:
    meta = profile(ResNetLike, spec, "meta", flops=False)
    real = profile(ResNetLike, spec, "real", flops=False)
    assert meta.peak_memory_bytes == pytest.approx(real.peak_memory_bytes, rel=0.005)
    for key in CATEGORIES:
        assert meta.breakdown[key] == pytest.approx(real.breakdown[key], rel=0.005, abs=64)
    assert sum(meta.breakdown.values()) == meta.peak_memory_bytes
    assert meta.plan.segments == real.plan.segments
    # meta mode runs at most two micro-batches; real runs them all, and they agree
    assert real.micro_batches_run == MConfig.parse(spec).accum_steps


def _zoo_names() -> list:
    models = pytest.importorskip("aiop.models", reason="the zoo is not written yet")
    fast = {"mobilenet_v2", "clip_vit"}
    return [
        pytest.param(n, marks=() if n in fast else pytest.mark.slow)
        for n in getattr(models, "ZOO_NAMES", ())
    ]


@pytest.mark.parametrize("name", _zoo_names())
def test_meta_equals_real_on_zoo(name: str) -> None:
    from aiop.models import build

    def factory() -> nn.Module:
        return build(f"zoo:{name}", resolution=64, num_classes=10)

    for spec in ("bs=2", "bs=4,mb=2,ckpt=2,freeze=0.3,method=lite+bias,prec=bf16,opt=adam"):
        meta = profile(factory, spec, "meta", flops=False)
        real = profile(factory, spec, "real", flops=False)
        assert meta.peak_memory_bytes == pytest.approx(real.peak_memory_bytes, rel=0.005), spec


@pytest.mark.parametrize(
    "spec", ["bs=4,ckpt=2,opt=adam", "bs=4,freeze=0.5,ckpt=2", "bs=4,method=bias,opt=adamw"]
)
def test_agrees_with_pytorch_memtracker(spec: str) -> None:
    """Our tracker's total peak equals (frozen-safe) MemTracker's on the same second step."""
    cfg = MConfig.parse(spec)  # MemTracker allows one forward per step: no micro-batches
    ours = profile(ResNetLike, cfg, "real", flops=False)
    torch.manual_seed(0)
    model = ResNetLike()
    prepare(model, cfg)
    opt = make_optimizer(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker = frozen_safe_memtracker()
    tracker.track_external(model, opt)
    gen = torch.Generator().manual_seed(0)
    with tracker:
        train_step(model, opt, cfg, micro_batches=lambda i: model.make_batch(4, generator=gen))
    theirs = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert ours.peak_memory_bytes == pytest.approx(theirs, rel=0.001)


def test_breakdown_counts_by_hand() -> None:
    n_params = sum(p.numel() for p in MLP().parameters())
    sgd = profile(MLP, "bs=4", "meta", flops=False)
    b = sgd.breakdown
    assert set(b) == set(CATEGORIES) and b["buffers"] == 0
    assert b["params"] == 4 * n_params
    assert b["optimizer"] >= 4 * n_params  # one momentum buffer per parameter
    adam = profile(MLP, "bs=4,opt=adam", "meta", flops=False)
    assert adam.breakdown["optimizer"] >= 8 * n_params + 4 * 8  # two moments + 8 step scalars
    assert adam.peak_memory_bytes > sgd.peak_memory_bytes
    frozen = profile(MLP, "bs=4,freeze=1.0", "meta", flops=False)
    assert frozen.breakdown["grads"] == frozen.breakdown["optimizer"] == 0
    assert frozen.trainable_params == 0 and frozen.params == n_params


def test_each_technique_reduces_memory() -> None:
    def peak(spec: str) -> dict:
        r = profile(lambda: ResNetLike(n_blocks=9, width=32), spec, "meta", flops=False)
        return {"peak": r.peak_memory_bytes, **r.breakdown}

    base = peak("bs=16")
    ckpt = peak("bs=16,ckpt=3")
    micro = peak("bs=16,mb=4")
    frozen = peak("bs=16,freeze=0.5")
    bf16 = peak("bs=16,prec=bf16")
    assert ckpt["activations"] < base["activations"] / 2 and ckpt["peak"] < base["peak"]
    assert micro["activations"] < base["activations"] / 2 and micro["inputs"] < base["inputs"]
    assert frozen["peak"] < base["peak"] and frozen["optimizer"] < base["optimizer"]
    assert bf16["activations"] < base["activations"]


def test_result_dict_is_complete_json() -> None:
    r = profile(ResNetLike, "bs=4,mb=2,ckpt=2,freeze=0.2", "meta", latency=True, latency_steps=2)
    d = json.loads(json.dumps(r.to_dict()))
    for key in (
        "peak_memory_bytes",
        "breakdown",
        "flops",
        "params",
        "trainable_params",
        "latency_s",
        "mode",
        "config",
        "model",
        "device",
        "tool_version",
        "checkpointed_blocks",
    ):
        assert key in d, key
    assert d["config"] == "bs=4,mb=2,freeze=0.2,ckpt=2,method=full,prec=fp32,opt=sgd"
    assert d["model"] == "ResNetLike" and d["mode"] == "meta" and d["resolution"] == 16
    assert d["latency_s"] > 0 and len(d["latency_samples_s"]) == 2
    assert d["checkpointed_blocks"] == r.plan.checkpointed_blocks and d["checkpointed_blocks"]
    # FLOPs of one forward pass of one sample, thop's 2 × MACs: check the convs by hand
    convs = 16 * 16 * (3 * 16 * 9 + 12 * 16 * 16 * 9)
    assert d["flops_thop"] >= 2 * convs and d["flops"] == d["flops_thop"]
    assert d["params_thop"] == d["params"] == sum(p.numel() for p in ResNetLike().parameters())


def test_cg_flops_agree_with_thop() -> None:
    pytest.importorskip("aiop.cg.torch_import", reason="the CG importer is not written yet")
    r = profile(ResNetLike, "bs=2", "meta")
    assert r.flops_cg is not None, r.flops_cg_error
    assert r.flops_rel_diff is not None and r.flops_rel_diff < 0.05


def test_module_instance_is_not_changed() -> None:
    model = ResNetLike()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = profile(model, "bs=4,freeze=0.5,ckpt=2,opt=adam", "meta", flops=False)
    real = profile(model, "bs=4,freeze=0.5,ckpt=2,opt=adam", "real", flops=False)
    assert meta.peak_memory_bytes == real.peak_memory_bytes
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.blocks) is nn.ModuleList
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ProfilerError, match="unknown mode"):
        profile(ResNetLike, "bs=2", "gpu")
    with pytest.raises(MConfigError, match="more checkpoint segments than the 6 blocks"):
        profile(ResNetLike, "bs=2,ckpt=7", "meta")
    with pytest.raises(MConfigError, match="must divide"):
        profile(ResNetLike, "bs=6,mb=4", "meta")
    with pytest.raises(ProfilerError, match="not a module"):
        profile(lambda: 3, "bs=2", "meta")
    with pytest.raises(ProfilerError, match="make_batch"):
        measure_memory(lambda: nn.Linear(2, 2), MConfig(), "real")
    with pytest.raises(ProfilerError):
        profile(ResNetLike, "bs=2", "meta", resolution=0)
    if not torch.cuda.is_available():
        with pytest.raises(ProfilerError, match="CUDA"):
            profile(ResNetLike, "bs=2", "cuda")


def test_zoo_spec_string() -> None:
    models = pytest.importorskip("aiop.models", reason="the zoo is not written yet")
    if not hasattr(models, "build"):
        pytest.skip("aiop.models.build is not written yet")
    r = profile("zoo:mobilenet_v2", "bs=2,ckpt=2", "meta", flops=False, resolution=64)
    assert r.model == "zoo:mobilenet_v2" and r.params > 3_000_000
    with pytest.raises(ValueError):
        profile("zoo:no_such_net", "bs=2", "meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mode_matches_tracker() -> None:
    spec = "bs=8,mb=4,ckpt=2,prec=bf16,opt=adam"
    r = profile(ResNetLike, spec, "cuda", latency=True, latency_steps=3)
    meta = profile(ResNetLike, spec, "meta", flops=False)
    assert r.cuda["max_allocated"] == r.peak_memory_bytes <= r.cuda["max_reserved"]
    # the allocator also holds library workspaces the tracker cannot see; the tracker
    # rounds every block up to 512 bytes as the allocator does, so it is >= the meta count
    assert r.peak_memory_bytes >= 0.9 * r.tracker_peak_bytes
    assert meta.peak_memory_bytes <= r.tracker_peak_bytes
    assert r.latency_s is not None and r.latency_s > 0
