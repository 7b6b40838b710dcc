"""DenseNet-121, torchvision's layout (7,978,856 params at 1,000 classes).

Each dense layer is one block: ``x → cat([x, layer(x)], 1)`` (torchvision keeps a
list and concatenates inside the layer; the arithmetic and parameters are the
same). Transitions are blocks too; ``norm5`` and its ReLU belong to the head.
"""

from __future__ import annotations

import torch
from torch import nn

from aiop.models.base import BlockNet
from aiop.models.layers import ClassifierHead, LiteSpec, feature_indices_from_strides


class DenseLayer(nn.Module):
    """BN → ReLU → 1×1 (bn_size·growth) → BN → ReLU → 3×3 (growth), concatenated to the input."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cin + growth
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def lite_spec(self) -> LiteSpec:
        return LiteSpec("conv", self.in_channels, self.out_channels, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(new)))
        return torch.cat([x, new], 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


class DenseNet(BlockNet):
    """DenseNet-BC; ``width_mult`` scales the growth rate and the stem width."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        resolution: int = 224,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
    ) -> None:
        super().__init__()
        growth = max(4, round(growth_rate * width_mult))
        c = max(8, round(num_init_features * width_mult))
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c, 7, 2, 3, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        strides: list[int] = []
        stride = 4
        for i, n in enumerate(block_config):
            for _ in range(n):
                blocks.append(DenseLayer(c, growth, bn_size))
                strides.append(stride)
                c += growth
            if i != len(block_config) - 1:
                blocks.append(Transition(c, c // 2))
                c //= 2
                stride *= 2
                # a transition's output is not a feature map of its own stride's stage end
                strides.append(-1)
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(c, num_classes, pre=nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()))
        self.input_size = (in_chans, resolution, resolution)
        self.num_classes = num_classes
        self.feature_indices = feature_indices_from_strides(strides)
