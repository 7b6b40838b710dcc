"""ResNet-18/50 and ResNeXt-50 (32x4d), laid out exactly as torchvision's.

With 1,000 classes and ``width_mult=1`` the parameter counts are torchvision's:
ResNet-18 11,689,512; ResNet-50 25,557,032; ResNeXt-50 32x4d 25,028,904.
Each residual block is one entry of ``blocks``.
"""

from __future__ import annotations

import torch
from torch import nn

from aiop.models.base import BlockNet
from aiop.models.layers import (
    ClassifierHead,
    LiteSpec,
    feature_indices_from_strides,
    make_divisible,
)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64
    ) -> None:
        super().__init__()
        cout = planes
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, cout, stride)
        self.relu2 = nn.ReLU()

    def lite_spec(self) -> LiteSpec:
        return LiteSpec("conv", self.in_channels, self.out_channels, self.stride, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # shortcut after the main path: forward order follows registration order
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        cout = planes * self.expansion
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)
        self.relu3 = nn.ReLU()

    def lite_spec(self) -> LiteSpec:
        return LiteSpec("conv", self.in_channels, self.out_channels, self.stride, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


_CONFIGS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
}


class ResNet(BlockNet):
    """torchvision's ResNet/ResNeXt; ``width_mult`` scales the stage widths (64·2^i)."""

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        resolution: int = 224,
    ) -> None:
        super().__init__()
        block, layers, groups, base_width = _CONFIGS[arch]
        planes = [make_divisible(64 * width_mult * 2**i, 8) for i in range(4)]
        stem_ch = planes[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_ch, 7, 2, 3, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        strides: list[int] = []
        cin, total = stem_ch, 4
        for i, (p, n) in enumerate(zip(planes, layers)):
            for j in range(n):
                s = 2 if (i > 0 and j == 0) else 1
                total *= s
                blocks.append(block(cin, p, s, groups, base_width))
                strides.append(total)
                cin = p * block.expansion
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(cin, num_classes)
        self.input_size = (in_chans, resolution, resolution)
        self.num_classes = num_classes
        self.feature_indices = feature_indices_from_strides(strides)
