"""MobileViT XXS / XS / S, laid out as timm's ``mobilevit_*`` (byobnet).

At 1,000 classes the parameter counts are timm's: 1,272,024 (XXS),
2,317,848 (XS) and 5,578,632 (S). Blocks: every inverted residual and every
MobileViT block is one entry of ``blocks``; the final 1×1 conv is in the head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aiop.models.base import BlockNet
from aiop.models.layers import (
    ClassifierHead,
    ConvBNAct,
    InvertedResidual,
    feature_indices_from_strides,
    make_divisible,
)
from aiop.models.transformer import TransformerBlock


class MobileViTBlock(nn.Module):
    """Local 3×3 conv → 1×1 to d → unfold 2×2 patches → transformers → fold → 1×1 → fuse 3×3."""

    def __init__(
        self,
        channels: int,
        dim: int,
        depth: int,
        patch_size: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.patch = patch_size
        self.conv_kxk = ConvBNAct(channels, channels, 3, act="silu")
        self.conv_1x1 = nn.Conv2d(channels, dim, 1, bias=False)
        self.transformer = nn.Sequential(
            *[TransformerBlock(dim, num_heads, mlp_ratio, act="silu") for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_proj = ConvBNAct(dim, channels, 1, act="silu")
        self.conv_fusion = ConvBNAct(2 * channels, channels, 3, act="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        p = self.patch
        b, c, h, w = x.shape
        nh, nw = math.ceil(h / p), math.ceil(w / p)
        resized = nh * p != h or nw * p != w
        if resized:  # as timm: stretch to a whole number of patches, and back afterwards
            x = F.interpolate(x, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        # [B, C, nh·p, nw·p] → [B·p·p, nh·nw, C]: one sequence per position inside a patch
        x = x.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, c)
        x = self.norm(self.transformer(x))
        x = x.reshape(b, p, p, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, nh * p, nw * p)
        if resized:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = self.conv_proj(x)
        return self.conv_fusion(torch.cat([shortcut, x], 1))


# name: (IR expansion, stage channels, transformer dims, final features)
_VARIANTS = {
    "xxs": (2.0, (16, 24, 48, 64, 80), (64, 80, 96), 320),
    "xs": (4.0, (32, 48, 64, 80, 96), (96, 120, 144), 384),
    "s": (4.0, (32, 64, 96, 128, 160), (144, 192, 240), 640),
}
_DEPTHS = (2, 4, 3)  # transformer layers in the three MobileViT stages


class MobileViT(BlockNet):
    def __init__(
        self,
        variant: str = "xxs",
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        resolution: int = 256,
    ) -> None:
        super().__init__()
        br, chans, dims, num_features = _VARIANTS[variant]
        chans = tuple(make_divisible(c * width_mult, 8) for c in chans)
        dims = tuple(make_divisible(d * width_mult, 8) for d in dims)
        num_features = make_divisible(num_features * width_mult, 8)
        stem = 16
        self.stem = ConvBNAct(in_chans, stem, 3, 2, act="silu")
        blocks: list[nn.Module] = []
        strides: list[int] = []
        total, cin = 2, stem

        def ir(cout: int, stride: int) -> None:
            nonlocal cin, total
            # timm's bottle_in: the expanded width is a multiple of 8 of cin·ratio
            mid = make_divisible(cin * br, 8)
            blocks.append(InvertedResidual(cin, cout, mid, 3, stride, act="silu"))
            total *= stride
            strides.append(total)
            cin = cout

        ir(chans[0], 1)
        for i in range(3):
            ir(chans[1], 2 if i == 0 else 1)
        for c, d, depth in zip(chans[2:], dims, _DEPTHS):
            ir(c, 2)
            blocks.append(MobileViTBlock(c, d, depth))
            strides.append(total)
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(
            num_features, num_classes, pre=ConvBNAct(cin, num_features, 1, act="silu")
        )
        self.input_size = (in_chans, resolution, resolution)
        self.num_classes = num_classes
        self.feature_indices = feature_indices_from_strides(strides)
