"""Once-for-All-style elastic families, deterministic sampling and MOOFA-style balanced sampling.

Three spaces (OFA's, shrunk to fit 28–64 px inputs so CPU work stays cheap):

* ``ofa_mbv3``: MobileNetV3 backbone; per stage (5 stages) depth {2,3,4}, per
  block kernel {3,5,7} and expand ratio {3,4,6}; width multiplier {0.5,0.75,1.0};
  resolution {28,32,40,48,56,64}.
* ``ofa_pn``: ProxylessNAS backbone with the same elastic dimensions (plus the
  single 320-wide last block's kernel and expand ratio).
* ``ofa_resnet``: ResNet-50-like bottlenecks; depth {0,1,2} added to (2,2,4,2)
  per stage (and a stem depth that adds the stem's middle residual conv at 2),
  expand ratio {0.2,0.25,0.35} per block, width {0.65,0.8,1.0} for the stem and
  each stage; resolution as above.

An architecture is a JSON-serialisable dict with ``family``, ``seed`` and
``resolution``; ``sample_arch(family, seed)`` is ``family:FAMILY:SEED`` and
``sample(family, n, seed)[i] == sample_arch(family, seed + i)``.
``arch_stats`` gives parameters and MOOFA's memory measure (peak inference
activation in elements at batch 1) analytically, without building a model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from aiop.models.base import BlockNet
from aiop.models.errors import ModelSpecError
from aiop.models.layers import (
    ClassifierHead,
    ConvBNAct,
    InvertedResidual,
    LiteSpec,
    feature_indices_from_strides,
    make_divisible,
)

RESOLUTIONS = (28, 32, 40, 48, 56, 64)
KERNELS = (3, 5, 7)
EXPANDS = (3, 4, 6)
DEPTHS = (2, 3, 4)
MB_WIDTHS = (0.5, 0.75, 1.0)
RESNET_DEPTHS = (0, 1, 2)
RESNET_EXPANDS = (0.2, 0.25, 0.35)
RESNET_WIDTHS = (0.65, 0.8, 1.0)
DEFAULT_NUM_CLASSES = 10

md = make_divisible


# --------------------------------------------------------------------------- analytic counts
def _conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> int:
    return cin // groups * cout * k * k + 2 * cout


def _out(h: int, s: int) -> int:
    return (h - 1) // s + 1  # 'same' padding: ceil(h / s)


@dataclass
class _Tally:
    """Running parameter count and activation peak (elements, batch 1)."""

    params: int = 0
    memory: int = 0

    def peak(self, *elems: int) -> None:
        self.memory = max(self.memory, sum(elems))

    def ir(self, cin: int, cout: int, mid: int, k: int, s: int, h: int, se: bool = False) -> int:
        """Add an inverted residual at input size h; returns the output size."""
        ho = _out(h, s)
        keep = cin * h * h if (s == 1 and cin == cout) else 0
        if mid != cin:
            self.params += _conv_bn(cin, mid, 1)
            self.peak(cin * h * h, mid * h * h)
        self.params += _conv_bn(mid, mid, k, mid)
        self.peak(mid * h * h, mid * ho * ho, keep)
        if se:
            r = md(mid // 4, 8)
            self.params += mid * r + r + r * mid + mid
        self.params += _conv_bn(mid, cout, 1)
        self.peak(mid * ho * ho, cout * ho * ho, keep)
        return ho


# --------------------------------------------------------------------------- OFA MobileNetV3
_MBV3_WIDTHS = (24, 40, 80, 112, 160)
_MBV3_STRIDES = (2, 2, 2, 1, 2)
_MBV3_ACTS = ("relu", "relu", "h_swish", "h_swish", "h_swish")
_MBV3_SE = (False, True, False, True, True)

_PN_WIDTHS = (24, 40, 80, 96, 192)
_PN_STRIDES = (2, 2, 2, 1, 2)


def _sample_mb(rng: random.Random, family: str, seed: int, n_stages: int) -> dict[str, Any]:
    d = [rng.choice(DEPTHS) for _ in range(5)]
    depths = d + [1] * (n_stages - 5)
    return {
        "family": family,
        "seed": seed,
        "resolution": rng.choice(RESOLUTIONS),
        "width_mult": rng.choice(MB_WIDTHS),
        "d": d,
        "ks": [[rng.choice(KERNELS) for _ in range(n)] for n in depths],
        "e": [[rng.choice(EXPANDS) for _ in range(n)] for n in depths],
    }


def _mb_stages(arch: dict[str, Any], n_stages: int) -> list[list[tuple[int, int]]]:
    """Validated [(kernel, expand)] per stage."""
    d, ks, es = arch["d"], arch["ks"], arch["e"]
    depths = list(d) + [1] * (n_stages - 5)
    if len(d) != 5 or len(ks) != n_stages or len(es) != n_stages:
        raise ModelSpecError(f"{arch['family']}: arch needs d (5), ks and e ({n_stages} stages)")
    out = []
    for n, k, e in zip(depths, ks, es):
        if len(k) != n or len(e) != n:
            raise ModelSpecError(
                f"{arch['family']}: each stage needs one kernel and expand per block"
            )
        if any(x not in KERNELS for x in k) or any(x not in EXPANDS for x in e):
            raise ModelSpecError(f"{arch['family']}: kernels in {KERNELS}, expands in {EXPANDS}")
        out.append(list(zip(k, e)))
    return out


class OFAMobileNetV3(BlockNet):
    """An ``ofa_mbv3`` subnet: h-swish stem, 16-wide first block, 5 elastic stages, 960→1280."""

    def __init__(self, arch: dict[str, Any], num_classes: int, in_chans: int) -> None:
        super().__init__()
        w = float(arch["width_mult"])
        stages = _mb_stages(arch, 5)
        c = md(16 * w)
        self.stem = ConvBNAct(in_chans, c, 3, 2, act="h_swish")
        blocks: list[nn.Module] = [InvertedResidual(c, c, c, 3, 1, act="relu")]
        strides, total = [2], 2
        for width, s, act, se, stage in zip(
            _MBV3_WIDTHS, _MBV3_STRIDES, _MBV3_ACTS, _MBV3_SE, stages
        ):
            cout = md(width * w)
            for j, (k, e) in enumerate(stage):
                stride = s if j == 0 else 1
                total *= stride
                blocks.append(
                    InvertedResidual(c, cout, md(round(c * e)), k, stride, act=act, se=se)
                )
                strides.append(total)
                c = cout
        self.blocks = nn.ModuleList(blocks)
        final, last = md(960 * w), md(1280 * w)
        self.head = ClassifierHead(
            final,
            num_classes,
            pre=ConvBNAct(c, final, 1, act="h_swish"),
            post_pool=nn.Sequential(nn.Conv2d(final, last, 1, bias=False), nn.Hardswish()),
            fc_in=last,
        )
        self.feature_indices = feature_indices_from_strides(strides)


def _stats_mbv3(arch: dict[str, Any], num_classes: int, in_chans: int) -> _Tally:
    w, h = float(arch["width_mult"]), int(arch["resolution"])
    t = _Tally()
    c = md(16 * w)
    t.params += _conv_bn(in_chans, c, 3)
    t.peak(in_chans * h * h, c * _out(h, 2) ** 2)
    h = _out(h, 2)
    h = t.ir(c, c, c, 3, 1, h)
    for width, s, se, stage in zip(_MBV3_WIDTHS, _MBV3_STRIDES, _MBV3_SE, _mb_stages(arch, 5)):
        cout = md(width * w)
        for j, (k, e) in enumerate(stage):
            h = t.ir(c, cout, md(round(c * e)), k, s if j == 0 else 1, h, se)
            c = cout
    final, last = md(960 * w), md(1280 * w)
    t.params += _conv_bn(c, final, 1) + final * last + last * num_classes + num_classes
    t.peak(c * h * h, final * h * h)
    return t


# --------------------------------------------------------------------------- OFA ProxylessNAS
class OFAProxylessNAS(BlockNet):
    """An ``ofa_pn`` subnet: 32-wide stem, 16-wide first block, 5 elastic stages + a 320 block."""

    def __init__(self, arch: dict[str, Any], num_classes: int, in_chans: int) -> None:
        super().__init__()
        w = float(arch["width_mult"])
        stages = _mb_stages(arch, 6)
        eps = 1e-3
        c = md(32 * w)
        self.stem = ConvBNAct(in_chans, c, 3, 2, act="relu6", bn_eps=eps)
        c1 = md(16 * w)
        blocks: list[nn.Module] = [InvertedResidual(c, c1, c, 3, 1, act="relu6", bn_eps=eps)]
        c = c1
        strides, total = [2], 2
        for width, s, stage in zip((*_PN_WIDTHS, 320), (*_PN_STRIDES, 1), stages):
            cout = md(width * w)
            for j, (k, e) in enumerate(stage):
                stride = s if j == 0 else 1
                total *= stride
                blocks.append(
                    InvertedResidual(c, cout, md(round(c * e)), k, stride, act="relu6", bn_eps=eps)
                )
                strides.append(total)
                c = cout
        self.blocks = nn.ModuleList(blocks)
        last = md(1280 * max(1.0, w))
        self.head = ClassifierHead(
            last, num_classes, pre=ConvBNAct(c, last, 1, act="relu6", bn_eps=eps)
        )
        self.feature_indices = feature_indices_from_strides(strides)


def _stats_pn(arch: dict[str, Any], num_classes: int, in_chans: int) -> _Tally:
    w, h = float(arch["width_mult"]), int(arch["resolution"])
    t = _Tally()
    c = md(32 * w)
    t.params += _conv_bn(in_chans, c, 3)
    t.peak(in_chans * h * h, c * _out(h, 2) ** 2)
    h = _out(h, 2)
    c1 = md(16 * w)
    h = t.ir(c, c1, c, 3, 1, h)
    c = c1
    for width, s, stage in zip((*_PN_WIDTHS, 320), (*_PN_STRIDES, 1), _mb_stages(arch, 6)):
        cout = md(width * w)
        for j, (k, e) in enumerate(stage):
            h = t.ir(c, cout, md(round(c * e)), k, s if j == 0 else 1, h)
            c = cout
    last = md(1280 * max(1.0, w))
    t.params += _conv_bn(c, last, 1) + last * num_classes + num_classes
    t.peak(c * h * h, last * h * h)
    return t


# --------------------------------------------------------------------------- OFA ResNet
_RESNET_BASE_DEPTHS = (2, 2, 4, 2)
_RESNET_WIDTHS = (256, 512, 1024, 2048)
_RESNET_STRIDES = (1, 2, 2, 2)


class OFABottleneck(nn.Module):
    """OFA ResNet bottleneck: 1×1 → 3×3 (stride) → 1×1; avg-pool + 1×1 shortcut if shapes change."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.conv1 = ConvBNAct(cin, mid, 1, act="relu")
        self.conv2 = ConvBNAct(mid, mid, 3, stride, act="relu")
        self.conv3 = ConvBNAct(mid, cout, 1, act="none")
        if stride == 1 and cin == cout:
            self.downsample: nn.Module | None = None
        else:
            pool: list[nn.Module] = [nn.AvgPool2d(stride, stride, 0, ceil_mode=True)]
            self.downsample = nn.Sequential(
                *(pool if stride > 1 else []), ConvBNAct(cin, cout, 1, act="none")
            )
        self.act = nn.ReLU()

    def lite_spec(self) -> LiteSpec:
        return LiteSpec("conv", self.in_channels, self.out_channels, self.stride, 3)

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.conv3(self.conv2(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)  # after, as registered
        return self.act(out + identity)


class _ResidualConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(c, c, 3, act="relu")

    def forward(self, x):  # type: ignore[no-untyped-def]
        return x + self.conv(x)


def _resnet_plan(arch: dict[str, Any]) -> tuple[int, int, bool, list[list[tuple[int, float]]]]:
    """(stem mid width, stem width, stem residual?, [(out width, expand)] per stage)."""
    d, e, w = arch["d"], arch["e"], arch["w"]
    if len(d) != 5 or len(w) != 5 or len(e) != 4:
        raise ModelSpecError("ofa_resnet: arch needs d (5), w (5) and e (4 stages)")
    if any(x not in RESNET_DEPTHS for x in d) or any(x not in RESNET_WIDTHS for x in w):
        raise ModelSpecError(f"ofa_resnet: depths in {RESNET_DEPTHS}, widths in {RESNET_WIDTHS}")
    stem = md(64 * w[0])
    stages = []
    for i, (base, width) in enumerate(zip(_RESNET_BASE_DEPTHS, _RESNET_WIDTHS)):
        if len(e[i]) != base + d[i + 1] or any(x not in RESNET_EXPANDS for x in e[i]):
            raise ModelSpecError(
                f"ofa_resnet: stage {i} needs {base + d[i + 1]} expands from {RESNET_EXPANDS}"
            )
        stages.append([(md(width * w[i + 1]), float(x)) for x in e[i]])
    return md(stem // 2), stem, d[0] == max(RESNET_DEPTHS), stages


class OFAResNet(BlockNet):
    """An ``ofa_resnet`` subnet: 3-conv stem + max-pool, 4 elastic bottleneck stages, FC."""

    def __init__(self, arch: dict[str, Any], num_classes: int, in_chans: int) -> None:
        super().__init__()
        mid, stem_c, stem_res, stages = _resnet_plan(arch)
        self.stem = nn.Sequential(
            ConvBNAct(in_chans, mid, 3, 2, act="relu"),
            *([_ResidualConv(mid)] if stem_res else []),
            ConvBNAct(mid, stem_c, 3, 1, act="relu"),
            nn.MaxPool2d(3, 2, 1),
        )
        c, total = stem_c, 4
        blocks: list[nn.Module] = []
        strides: list[int] = []
        for s, stage in zip(_RESNET_STRIDES, stages):
            for j, (cout, e) in enumerate(stage):
                stride = s if j == 0 else 1
                total *= stride
                blocks.append(OFABottleneck(c, cout, md(round(cout * e)), stride))
                strides.append(total)
                c = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(c, num_classes)
        self.feature_indices = feature_indices_from_strides(strides)


def _stats_resnet(arch: dict[str, Any], num_classes: int, in_chans: int) -> _Tally:
    mid, stem_c, stem_res, stages = _resnet_plan(arch)
    h = int(arch["resolution"])
    t = _Tally()
    h2 = _out(h, 2)
    t.params += _conv_bn(in_chans, mid, 3)
    t.peak(in_chans * h * h, mid * h2 * h2)
    if stem_res:
        t.params += _conv_bn(mid, mid, 3)
        t.peak(2 * mid * h2 * h2, mid * h2 * h2)
    t.params += _conv_bn(mid, stem_c, 3)
    t.peak(mid * h2 * h2, stem_c * h2 * h2)
    h = _out(h2, 2)
    t.peak(stem_c * h2 * h2, stem_c * h * h)
    c = stem_c
    for s, stage in zip(_RESNET_STRIDES, stages):
        for j, (cout, e) in enumerate(stage):
            stride = s if j == 0 else 1
            m = md(round(cout * e))
            ho = _out(h, stride)
            t.params += _conv_bn(c, m, 1) + _conv_bn(m, m, 3) + _conv_bn(m, cout, 1)
            if stride != 1 or c != cout:
                t.params += _conv_bn(c, cout, 1)
            x = c * h * h
            t.peak(x, m * h * h)
            t.peak(x, m * h * h, m * ho * ho)
            t.peak(x, m * ho * ho, cout * ho * ho)
            t.peak(x, cout * ho * ho, cout * ho * ho)  # main output + shortcut output
            c, h = cout, ho
    t.params += c * num_classes + num_classes
    return t


def _sample_resnet(rng: random.Random, family: str, seed: int) -> dict[str, Any]:
    d = [rng.choice(RESNET_DEPTHS) for _ in range(5)]
    return {
        "family": family,
        "seed": seed,
        "resolution": rng.choice(RESOLUTIONS),
        "d": d,
        "e": [
            [rng.choice(RESNET_EXPANDS) for _ in range(base + d[i + 1])]
            for i, base in enumerate(_RESNET_BASE_DEPTHS)
        ],
        "w": [rng.choice(RESNET_WIDTHS) for _ in range(5)],
    }


# --------------------------------------------------------------------------- registry
def _fmt(choices: tuple[float, ...]) -> str:
    return "{" + ",".join(str(c) for c in choices) + "}"


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    sampler: Callable[[random.Random, str, int], dict[str, Any]]
    builder: Callable[[dict[str, Any], int, int], BlockNet]
    stats: Callable[[dict[str, Any], int, int], _Tally]


FAMILIES: dict[str, Family] = {
    "ofa_mbv3": Family(
        "ofa_mbv3",
        "OFA MobileNetV3: 5 stages, depth {2,3,4}, kernel {3,5,7}, expand {3,4,6}, "
        f"width {_fmt(MB_WIDTHS)}, resolution {_fmt(RESOLUTIONS)}",
        lambda rng, f, s: _sample_mb(rng, f, s, 5),
        OFAMobileNetV3,
        _stats_mbv3,
    ),
    "ofa_pn": Family(
        "ofa_pn",
        "OFA ProxylessNAS: 5 stages + 320 block, depth {2,3,4}, kernel {3,5,7}, expand {3,4,6}, "
        f"width {_fmt(MB_WIDTHS)}, resolution {_fmt(RESOLUTIONS)}",
        lambda rng, f, s: _sample_mb(rng, f, s, 6),
        OFAProxylessNAS,
        _stats_pn,
    ),
    "ofa_resnet": Family(
        "ofa_resnet",
        "OFA ResNet: 4 bottleneck stages (2,2,4,2)+depth {0,1,2}, expand {0.2,0.25,0.35}, "
        f"width {_fmt(RESNET_WIDTHS)}, resolution {_fmt(RESOLUTIONS)}",
        _sample_resnet,
        OFAResNet,
        _stats_resnet,
    ),
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def _family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelSpecError(f"unknown family {name!r}; valid: {', '.join(FAMILY_NAMES)}") from None


def sample_arch(family: str, seed: int) -> dict[str, Any]:
    """Architecture number ``seed`` of ``family`` (what ``family:FAMILY:SEED`` builds)."""
    fam = _family(family)
    # str seeds hash with SHA-512 inside random.Random: stable across runs and machines
    return fam.sampler(random.Random(f"{family}:{int(seed)}"), family, int(seed))


def sample(family: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` architectures, uniformly in the space: numbers seed, seed+1, ..., seed+n-1."""
    return [sample_arch(family, seed + i) for i in range(n)]


def arch_stats(
    arch: dict[str, Any], num_classes: int = DEFAULT_NUM_CLASSES, in_chans: int = 3
) -> dict[str, int]:
    """Analytic ``params`` and ``memory`` (peak inference activation elements, batch 1, at the
    arch's resolution, MOOFA's measure) without building the model."""
    t = _family(arch.get("family", "")).stats(arch, num_classes, in_chans)
    return {"params": t.params, "memory": t.memory}


def build_arch(
    arch: dict[str, Any],
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_chans: int = 3,
    resolution: int | None = None,
) -> BlockNet:
    """Build a sampled architecture (a plain ``nn.Module``)."""
    if not isinstance(arch, dict) or "family" not in arch:
        raise ModelSpecError("an arch config is a dict with a 'family' key")
    fam = _family(arch["family"])
    try:
        model = fam.builder(arch, num_classes, in_chans)
    except (KeyError, TypeError) as exc:
        raise ModelSpecError(f"{fam.name}: malformed arch config ({exc})") from None
    res = int(resolution if resolution is not None else arch.get("resolution", 32))
    model.input_size = (in_chans, res, res)
    model.num_classes = num_classes
    model.arch = dict(arch)
    return model


def balanced_sample(
    family: str,
    n: int,
    seed: int = 0,
    key: str = "params",
    lo: float | None = None,
    hi: float | None = None,
    pool_size: int | None = None,
    num_classes: int = DEFAULT_NUM_CLASSES,
) -> list[dict[str, Any]]:
    """MOOFA-style balanced sampling: ``n`` architectures spread evenly over ``[lo, hi]`` of
    ``key`` ("params" or "memory") instead of uniformly over the space.

    A pool of uniform samples (numbers ``seed·P … seed·P+P-1``, so every result
    is reproducible as ``family:FAMILY:<arch['seed']>``) is scored analytically;
    ``[lo, hi]`` (default: the pool's range) is cut into ``n`` equal bins and one
    architecture is drawn at random from each bin (the unused one nearest the bin's
    centre when a bin is empty). Each result carries its ``key`` value.
    """
    if key not in ("params", "memory"):
        raise ValueError(f"balanced_sample key must be 'params' or 'memory', not {key!r}")
    if n < 1:
        return []
    pool_n = pool_size or max(20 * n, 400)
    pool = sample(family, pool_n, seed * pool_n)
    values = [arch_stats(a, num_classes)[key] for a in pool]
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    if hi < lo:
        raise ValueError(f"balanced_sample: empty range [{lo}, {hi}]")
    rng = random.Random(f"balanced:{family}:{key}:{seed}")
    width = (hi - lo) / n
    used: set[int] = set()
    out = []
    for b in range(n):
        a, z = lo + b * width, lo + (b + 1) * width
        inside = [
            i
            for i, v in enumerate(values)
            if i not in used and a <= v and (v < z or (b == n - 1 and v <= z))
        ]
        if inside:
            pick = rng.choice(inside)
        else:
            centre = (a + z) / 2
            free = [i for i in range(len(pool)) if i not in used]
            if not free:
                break
            pick = min(free, key=lambda i: (abs(values[i] - centre), i))
        used.add(pick)
        out.append({**pool[pick], key: values[pick]})
    return out


def describe_space(family: str) -> str:
    return _family(family).description


def space_size(family: str) -> int:
    """Number of distinct architectures in the space (resolution and width included)."""
    if family == "ofa_resnet":
        per_stage = [
            sum(len(RESNET_EXPANDS) ** (base + d) for d in RESNET_DEPTHS)
            for base in _RESNET_BASE_DEPTHS
        ]
        return (
            len(RESOLUTIONS) * len(RESNET_DEPTHS) * len(RESNET_WIDTHS) ** 5 * math.prod(per_stage)
        )
    _family(family)
    per_stage = sum((len(KERNELS) * len(EXPANDS)) ** d for d in DEPTHS)
    extra = len(KERNELS) * len(EXPANDS) if family == "ofa_pn" else 1
    return len(RESOLUTIONS) * len(MB_WIDTHS) * per_stage**5 * extra
