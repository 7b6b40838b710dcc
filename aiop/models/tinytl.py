"""TinyTL: lite residual modules, BatchNorm → GroupNorm, and the train methods.

Lite residual (as TinyTL's ``LiteResidualModule``): the branch reads the block's
*input*, AvgPool(downsample) → grouped k×k conv (groups 2, the block's stride) →
BN → ReLU → 1×1 conv → BN whose weight starts at zero, is resized bilinearly to
the block's output size and added to the block's output. So a wrapped model
computes exactly what it did before, until training moves the branch.

Every block that says what it is through ``lite_spec()`` gets one: inverted
residuals (MobileNetV2, ProxylessNAS, MobileViT's MV2 blocks, both OFA MBConv
families), ResNet/ResNeXt/OFA-ResNet basic and bottleneck blocks and DenseNet's
bottleneck layers. Transformer blocks (the CLIP image tower) get the token
analogue: Linear(d, d/4) → GELU → Linear(d/4, d) → LayerNorm with zero weight.
The wrapper sits in ``model.blocks`` where the block was, so block-wise
checkpointing and freezing still see one block.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from aiop.models.layers import LiteSpec, make_divisible

log = logging.getLogger(__name__)

TRAIN_METHODS = ("full", "last", "bias", "lite", "lite+bias", "norm+last")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


class LiteResidual(nn.Module):
    """``main(x) + resize(lite(x))``."""

    def __init__(self, main: nn.Module, lite: nn.Module, kind: str = "conv") -> None:
        super().__init__()
        self.main = main
        self.lite = lite
        self.kind = kind

    def lite_spec(self) -> LiteSpec | None:  # already wrapped: not wrapped twice
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.main(x)
        r = self.lite(x)
        if self.kind == "conv" and r.shape[-2:] != y.shape[-2:]:
            r = F.interpolate(r, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return y + r


def _group_count(cin: int, mid: int, groups: int) -> int:
    g = math.gcd(math.gcd(cin, mid), groups)
    return max(1, g)


def lite_branch_conv(
    cin: int,
    cout: int,
    stride: int = 1,
    kernel_size: int = 5,
    downsample: int = 2,
    groups: int = 2,
    expand: float = 1.0,
    max_params: int | None = None,
) -> nn.Sequential:
    """TinyTL's branch: AvgPool → grouped k×k conv → BN → ReLU → 1×1 conv → zero-init BN.

    The middle width is ``expand`` × the narrower of input and output (TinyTL's
    ``in_channels × expand`` on the narrow MobileNet blocks it was made for), halved
    until the branch has at most ``max_params`` parameters: on wide blocks (a DenseNet
    layer reading 1,024 channels, ResNet-50's last stage) the plain rule made branches
    larger than the whole network, defeating the point of TinyTL-L.
    """
    mid = make_divisible(min(cin, cout) * expand, 8)
    g = _group_count(cin, mid, groups)

    def branch_params(m: int, g: int) -> int:
        return cin * m * kernel_size * kernel_size // g + m * cout

    while max_params is not None and mid > 8 and branch_params(mid, g) > max_params:
        mid = make_divisible(mid // 2, 8)
        g = _group_count(cin, mid, groups)
    layers: list[nn.Module] = []
    if downsample > 1:
        layers.append(nn.AvgPool2d(downsample, downsample, 0, ceil_mode=True))
    layers += [
        nn.Conv2d(cin, mid, kernel_size, stride, kernel_size // 2, groups=g, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        nn.Conv2d(mid, cout, 1, bias=False),
    ]
    final_bn = nn.BatchNorm2d(cout)
    nn.init.zeros_(final_bn.weight)
    layers.append(final_bn)
    return nn.Sequential(*layers)


def lite_branch_tokens(dim: int, reduction: int = 4) -> nn.Sequential:
    """Token analogue for transformer blocks: bottleneck MLP → zero-weight LayerNorm."""
    mid = max(8, dim // reduction)
    norm = nn.LayerNorm(dim)
    nn.init.zeros_(norm.weight)
    return nn.Sequential(
        nn.Linear(dim, mid, bias=False), nn.GELU(), nn.Linear(mid, dim, bias=False), norm
    )


def _follow(module: nn.Module, ref: torch.Tensor) -> nn.Module:
    """Move ``module`` to ``ref``'s device and dtype, only when they differ (``.to`` cannot swap
    parameters created inside FakeTensorMode, where the meta-mode profiler builds models)."""
    p = next(module.parameters(), None)
    if p is not None and (p.device != ref.device or p.dtype != ref.dtype):
        module = module.to(device=ref.device, dtype=ref.dtype)
    return module


def has_lite_residual(model: nn.Module) -> bool:
    return any(isinstance(m, LiteResidual) for m in model.modules())


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no 'blocks' ModuleList (not an aiop BlockNet)"
        )
    return blocks


def insert_lite_residual(
    model: nn.Module,
    downsample: int = 2,
    groups: int = 2,
    expand: float = 1.0,
    max_kernel_size: int = 5,
) -> nn.Module:
    """Wrap every eligible block of ``model.blocks`` with a lite residual, in place.

    TinyTL's defaults: downsample 2, groups 2 (lowered to a common divisor of the
    widths when 2 does not divide), expand 1, kernel ``max_kernel_size`` (5), the
    block's stride. New modules follow the model's device and dtype; blocks already
    wrapped are left alone. Returns the model.
    """
    blocks = _blocks(model)
    ref = next(model.parameters(), None)
    n = 0
    for i, block in enumerate(blocks):
        spec_fn = getattr(block, "lite_spec", None)
        spec = spec_fn() if callable(spec_fn) else None
        if spec is None:
            continue
        if spec.kind == "tokens":
            lite = lite_branch_tokens(spec.in_channels)
        else:
            block_params = sum(p.numel() for p in block.parameters())
            lite = lite_branch_conv(
                spec.in_channels, spec.out_channels, spec.stride, max_kernel_size,
                downsample, groups, expand, max_params=max(block_params // 2, 1),
            )  # fmt: skip
        if ref is not None:
            lite = _follow(lite, ref)
        lite.train(block.training)
        blocks[i] = LiteResidual(block, lite, spec.kind)
        n += 1
    if n == 0:
        log.warning("%s: no block takes a lite residual", type(model).__name__)
    return model


def _gn_groups(channels: int, channels_per_group: int) -> int:
    """TinyTL's C // min(C, cpg) groups, lowered to a divisor of C when that does not divide."""
    g = channels // min(channels, channels_per_group)
    while channels % g:
        g -= 1
    return g


def replace_bn_with_gn(model: nn.Module, channels_per_group: int = 8) -> nn.Module:
    """Replace every BatchNorm2d by a GroupNorm (affine values, requires_grad copied), in place."""
    if channels_per_group < 1:
        raise ValueError("channels_per_group must be >= 1")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.BatchNorm2d):
                continue
            c = child.num_features
            gn = nn.GroupNorm(_gn_groups(c, channels_per_group), c, eps=child.eps, affine=True)
            if child.affine:
                gn = _follow(gn, child.weight)
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
                gn.weight.requires_grad_(child.weight.requires_grad)
                gn.bias.requires_grad_(child.bias.requires_grad)
            gn.train(child.training)
            setattr(parent, name, gn)
    return model


def _head(model: nn.Module) -> nn.Module:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no 'head' module")
    return head


def set_train_method(model: nn.Module, method: str) -> None:
    """Set ``requires_grad`` on every parameter for a TinyTL train method.

    full: everything; last: the head only (FT-Last); bias: every bias + head
    (TinyTL-B); lite: lite residual branches + head (TinyTL-L, inserted if absent);
    lite+bias: both (TinyTL-L+B); norm+last: normalisation affine params + head.
    """
    if method not in TRAIN_METHODS:
        raise ValueError(f"unknown train method {method!r}; valid: {', '.join(TRAIN_METHODS)}")
    if method.startswith("lite") and not has_lite_residual(model):
        insert_lite_residual(model)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    trainable: set[int] = {id(p) for p in _head(model).parameters()}
    if method in ("bias", "lite+bias"):
        trainable |= {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    if method in ("lite", "lite+bias"):
        for m in model.modules():
            if isinstance(m, LiteResidual):
                trainable |= {id(p) for p in m.lite.parameters()}
    if method == "norm+last":
        for m in model.modules():
            if isinstance(m, _NORMS):
                trainable |= {id(p) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
