"""Building blocks shared by the zoo and the elastic families.

Every block that TinyTL's lite residual can wrap (inverted residuals, ResNet
basic/bottleneck blocks, DenseNet bottleneck layers) exposes a :class:`LiteSpec`
through ``lite_spec()``; :mod:`aiop.models.tinytl` reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without dropping below 90 % of it
    (the rule torchvision, timm and OFA share)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def activation(name: str) -> nn.Module:
    """An activation module by name (relu, relu6, h_swish, silu, gelu, none)."""
    table = {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "h_swish": nn.Hardswish,
        "silu": nn.SiLU,
        "gelu": nn.GELU,
        "none": nn.Identity,
    }
    try:
        return table[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(table)}") from None


@dataclass(frozen=True)
class LiteSpec:
    """What a lite residual branch needs to know about the block it wraps.

    ``kind`` is ``"conv"`` (NCHW in, NCHW out) or ``"tokens"`` (B×N×D in and out,
    transformer blocks; ``in_channels == out_channels == D``).
    """

    kind: str
    in_channels: int
    out_channels: int
    stride: int = 1
    kernel_size: int = 3


class ConvBNAct(nn.Sequential):
    """conv (no bias) → BatchNorm → activation."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str = "relu",
        bn_eps: float = 1e-5,
        padding: int | None = None,
    ) -> None:
        padding = kernel_size // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=bn_eps),
        ]
        if act != "none":
            layers.append(activation(act))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """OFA/MobileNetV3 squeeze-and-excitation: pool → 1×1 (bias) → ReLU → 1×1 (bias) → h-sigmoid."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = make_divisible(channels // reduction, 8)
        # a module, not x.mean(): thop counts it and ONNX shows a GlobalAveragePool
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, mid, 1, bias=True)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(mid, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        return x * self.gate(self.expand(self.act(self.reduce(y))))


class InvertedResidual(nn.Module):
    """MobileNetV2-style inverted residual: [1×1 expand] → k×k depthwise → [SE] → 1×1 project.

    ``mid`` is the expanded width; the expand conv is omitted when ``mid == cin``
    (expand ratio 1). The identity shortcut is used when ``residual`` and the
    shapes match (stride 1, cin == cout).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        mid: int,
        kernel_size: int = 3,
        stride: int = 1,
        act: str = "relu6",
        se: bool = False,
        bn_eps: float = 1e-5,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.stride, self.kernel_size = stride, kernel_size
        self.expand = ConvBNAct(cin, mid, 1, act=act, bn_eps=bn_eps) if mid != cin else None
        self.depthwise = ConvBNAct(
            mid, mid, kernel_size, stride, groups=mid, act=act, bn_eps=bn_eps
        )
        self.se = SqueezeExcite(mid) if se else None
        self.project = ConvBNAct(mid, cout, 1, act="none", bn_eps=bn_eps)
        self.use_residual = residual and stride == 1 and cin == cout

    def lite_spec(self) -> LiteSpec:
        return LiteSpec("conv", self.in_channels, self.out_channels, self.stride, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.use_residual else y


class ClassifierHead(nn.Module):
    """[pre layers] → global average pool → flatten → [dropout] → linear."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pre: nn.Module | None = None,
        dropout: float = 0.0,
        post_pool: nn.Module | None = None,
        fc_in: int | None = None,
    ) -> None:
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        # post_pool: e.g. MobileNetV3's 1×1 feature-mix layer, applied on the pooled vector.
        self.post_pool = post_pool if post_pool is not None else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(fc_in if fc_in is not None else in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.pre(x))
        x = self.flatten(self.post_pool(x))
        return self.fc(self.dropout(x))


def feature_indices_from_strides(strides: list[int]) -> tuple[int, ...]:
    """Indices of the last block at each of the output strides 4, 8, 16, 32
    (``strides[i]`` is the cumulative stride after block ``i``)."""
    out = []
    for target in (4, 8, 16, 32):
        idx = [i for i, s in enumerate(strides) if s == target]
        if idx:
            out.append(idx[-1])
    return tuple(out)
