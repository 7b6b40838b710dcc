"""MobileNetV2 (torchvision layout, 3,504,872 params at 1,000 classes) and
ProxylessNAS-Mobile (MIT-HAN-lab's ``proxylessnas_mobile``, 4,080,512 params).

One inverted-residual block per entry of ``blocks``; the final 1×1 expansion conv
belongs to the head.
"""

from __future__ import annotations

from torch import nn

from aiop.models.base import BlockNet
from aiop.models.layers import (
    ClassifierHead,
    ConvBNAct,
    InvertedResidual,
    feature_indices_from_strides,
    make_divisible,
)

# (expand ratio t, channels c, repeats n, first stride s), torchvision's table.
_MBV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(BlockNet):
    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        resolution: int = 224,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult, 8)
        last = make_divisible(1280 * max(1.0, width_mult), 8)
        self.stem = ConvBNAct(in_chans, cin, 3, 2, act="relu6")
        blocks, strides, total = [], [], 2
        for t, c, n, s in _MBV2_SETTINGS:
            cout = make_divisible(c * width_mult, 8)
            for i in range(n):
                stride = s if i == 0 else 1
                total *= stride
                mid = round(cin * t)
                blocks.append(InvertedResidual(cin, cout, mid, 3, stride, act="relu6"))
                strides.append(total)
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(
            last, num_classes, pre=ConvBNAct(cin, last, 1, act="relu6"), dropout=dropout
        )
        self.input_size = (in_chans, resolution, resolution)
        self.num_classes = num_classes
        self.feature_indices = feature_indices_from_strides(strides)


# ProxylessNAS-Mobile, per stage: (out channels, kernel, expand ratio, is-a-real-block).
# Units that the search turned into identities ("zero" ops with a shortcut) are left out:
# they have no parameters and compute nothing.
_PROXYLESS_MOBILE = (
    ((16, 3, 1, True),),
    ((32, 5, 3, True), (32, 3, 3, True), (32, 3, 3, False), (32, 3, 3, False)),
    ((40, 7, 3, True), (40, 3, 3, True), (40, 5, 3, True), (40, 5, 3, True)),
    (
        (80, 7, 6, True), (80, 5, 3, True), (80, 5, 3, True), (80, 5, 3, True),
        (96, 5, 6, True), (96, 5, 3, True), (96, 5, 3, True), (96, 5, 3, True),
    ),
    ((192, 7, 6, True), (192, 7, 6, True), (192, 7, 3, True), (192, 7, 3, True), (320, 7, 6, True)),
)  # fmt: skip


class ProxylessNASMobile(BlockNet):
    """ProxylessNAS-Mobile: 3×3 stem (32), 21 MBConv units (2 identity), 1×1 → 1280, FC."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        resolution: int = 224,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        eps = 1e-3
        cin = make_divisible(32 * width_mult, 8)
        last = make_divisible(1280 * max(1.0, width_mult), 8)
        self.stem = ConvBNAct(in_chans, cin, 3, 2, act="relu6", bn_eps=eps)
        blocks, strides, total = [], [], 2
        for si, stage in enumerate(_PROXYLESS_MOBILE):
            for j, (c, k, e, real) in enumerate(stage):
                cout = make_divisible(c * width_mult, 8)
                stride = 2 if (si > 0 and j == 0) else 1
                if real:
                    total *= stride
                    # a shortcut exists when shapes allow, except on a stage's first unit
                    shortcut = j > 0 and cout == cin
                    blocks.append(
                        InvertedResidual(
                            cin, cout, cin * e, k, stride, act="relu6", bn_eps=eps,
                            residual=shortcut,
                        )
                    )  # fmt: skip
                    strides.append(total)
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(
            last, num_classes, pre=ConvBNAct(cin, last, 1, act="relu6", bn_eps=eps), dropout=dropout
        )
        self.input_size = (in_chans, resolution, resolution)
        self.num_classes = num_classes
        self.feature_indices = feature_indices_from_strides(strides)
