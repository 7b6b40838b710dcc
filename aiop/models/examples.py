"""Two small networks defined without the zoo: the demo's and the tests' first subjects."""

from __future__ import annotations

from torch import nn

from aiop.models.base import BlockNet
from aiop.models.layers import LiteSpec


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(BlockNet):
    """Four conv-BN-ReLU blocks and a linear classifier (about 100k parameters)."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, width: int = 16, resolution: int = 28
    ):
        super().__init__()
        self.num_classes = num_classes
        self.input_size = (in_chans, resolution, resolution)
        self.stem = _conv_bn_relu(in_chans, width)
        self.blocks = nn.ModuleList(
            [
                _conv_bn_relu(width, width),
                _conv_bn_relu(width, 2 * width, 2),
                _conv_bn_relu(2 * width, 4 * width, 2),
                _conv_bn_relu(4 * width, 4 * width),
            ]
        )
        self.feature_indices = (1, 2, 3)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(4 * width, num_classes),
        )


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3×3 convolutions and an identity or projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def lite_spec(self) -> LiteSpec:
        """A residual conv block: TinyTL gives it a lite residual branch."""
        return LiteSpec("conv", self.in_channels, self.out_channels, self.stride, 3)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(BlockNet):
    """A ResNet-8-style network for 32 px inputs (about 300k parameters at width 16)."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width: int = 16, resolution: int = 32
    ):
        super().__init__()
        self.num_classes = num_classes
        self.input_size = (in_chans, resolution, resolution)
        self.stem = _conv_bn_relu(in_chans, width)
        self.blocks = nn.ModuleList(
            [
                BasicBlock(width, width),
                BasicBlock(width, 2 * width, 2),
                BasicBlock(2 * width, 4 * width, 2),
            ]
        )
        self.feature_indices = (0, 1, 2)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes)
        )


EXAMPLES = {"small_cnn": SmallCNN, "tiny_resnet": TinyResNet}
