"""Task heads that attach to any aiop backbone through its multi-scale features.

A :class:`TaskModel` is ``head(features(stem → blocks))``: the backbone's own
``stem`` and ``blocks`` (the same module objects, so parameter names, TinyTL
lite residuals, freezing and gradient checkpointing all apply unchanged) and a
task head that reads the outputs of the blocks in ``feature_indices``. It is a
:class:`~aiop.models.base.BlockNet`, so m-configurations, the profiler and the
CG exporter treat backbone + head like any zoo model.

Heads (outputs are tensors or tuples of tensors, so ONNX export works):

* ``classification``: 1×1 conv → BN → ReLU → global pool → linear (logits).
* ``semantic``: an FPN (1×1 laterals, top-down nearest upsampling + add, 3×3
  smoothing) at the finest tapped stride, a 3×3 conv and a 1×1 classifier over
  background + 10 digits, upsampled bilinearly to the input size and refined by
  one shallow layer that also sees the pixels (:class:`InputRefine`).
* ``detection``: CenterNet (Zhou et al., 2019) on the FPN output: per-class
  centre heatmaps, box width/height and sub-cell centre offsets.
* ``instance``: CenterNet plus a class-agnostic foreground-mask branch; an
  instance mask is the foreground inside the instance's box.
* ``panoptic``: CenterNet plus the semantic branch (Panoptic-FPN style:
  instances from the detector, classes and foreground from the semantic map).
* ``pose``: 14 keypoint heatmaps (LSP order) on the FPN output.

The taps are taken with forward hooks on the tapped blocks, not by indexing
the block list, so a gradient-checkpointed ``blocks`` (whose iteration yields
whole segments) still hands the head the exact per-block features.

The lateral 1×1 convolutions are :class:`ElasticConv2d`: built for the widest
backbone of a pool, they take the first ``C`` input channels of a narrower
one (Once-for-All's weight sharing), which is how one shared head serves every
sampled backbone of a family (:mod:`aiop.tasks.shared_head`);
:func:`load_head_state` copies such a shared head into one architecture's
exact-width head.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aiop.models.base import BlockNet

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("classification", "detection", "instance", "semantic", "panoptic", "pose")
NUM_CLASSES = 10
NUM_KEYPOINTS = 14
# Background + one class per digit: the semantic maps' label space.
NUM_SEMANTIC = NUM_CLASSES + 1
DEFAULT_WIDTH = 64
# CenterNet's prior: sigmoid(-2.19) = 0.1, so the focal loss starts stable.
_HEATMAP_PRIOR_BIAS = -2.19


class HeadError(ValueError):
    """A task that does not exist, or a head that cannot attach to a backbone."""


def check_task(task: str) -> str:
    if task not in TASKS:
        raise HeadError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    return task


@dataclass(frozen=True)
class BackboneInfo:
    """What a head needs to know about a backbone's tapped features."""

    name: str
    indices: tuple[int, ...]  # block indices tapped, in forward order
    channels: tuple[int, ...]
    sizes: tuple[int, ...]  # spatial side of each feature at ``resolution``
    resolution: int

    @property
    def strides(self) -> tuple[float, ...]:
        return tuple(self.resolution / s for s in self.sizes)


def probe_backbone(
    backbone: nn.Module, resolution: int | None = None, *, name: str | None = None
) -> BackboneInfo:
    """Channels and sizes of a backbone's multi-scale features, from one no-grad forward.

    Raises :class:`HeadError` naming the backbone when it is not a BlockNet or
    its features are not ``N×C×H×W`` maps (a transformer's tokens, a dual encoder).
    """
    label = name or getattr(backbone, "name", None) or type(backbone).__name__
    if not isinstance(backbone, BlockNet):
        raise HeadError(
            f"{label}: task heads attach to aiop BlockNet backbones (stem/blocks/head), "
            f"not {type(backbone).__name__}"
        )
    c, h, w = backbone.input_size
    res = int(resolution or h)
    if h != w and resolution is None:
        raise HeadError(f"{label}: task heads need square inputs, got {h}x{w}")
    wanted = sorted(set(backbone.feature_indices) or {len(backbone.blocks) - 1})
    # A transformer backbone (CLIP's image tower) keeps tokens, not maps: refuse it up front.
    if not backbone.feature_indices and type(backbone).make_batch is not BlockNet.make_batch:
        raise HeadError(
            f"{label}: has no spatial multi-scale features (feature_indices is empty and it "
            "takes more than an image), so no dense or classification task head can attach"
        )
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            feats = backbone.multiscale_features(torch.zeros(1, c, res, res, device=device))
    except Exception as exc:  # any failure here means the head cannot attach; say why
        raise HeadError(
            f"{label}: forward at {res}px failed ({str(exc).splitlines()[0]})"
        ) from None
    finally:
        backbone.train(was_training)
    bad = [tuple(f.shape) for f in feats if f.dim() != 4]
    if bad:
        raise HeadError(
            f"{label}: its features are not N×C×H×W maps (got shapes {bad}); "
            "no spatial task head can attach"
        )
    return BackboneInfo(
        name=label,
        indices=tuple(wanted),
        channels=tuple(int(f.shape[1]) for f in feats),
        sizes=tuple(int(f.shape[-1]) for f in feats),
        resolution=res,
    )


# --------------------------------------------------------------------------- building blocks
class ElasticConv2d(nn.Conv2d):
    """A convolution that also accepts fewer input channels than it was built for.

    With ``C`` < ``in_channels`` input channels it uses the first ``C`` input
    channels of its weight (OFA-style weight sharing); with exactly
    ``in_channels`` it is a plain convolution, so an exact-width head exports
    as an ordinary Conv node.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin = x.shape[1]
        if cin == self.in_channels:
            return super().forward(x)
        if cin > self.in_channels:
            raise HeadError(
                f"head built for {self.in_channels} input channels got {cin}: "
                "build the shared head for the widest backbone of the pool"
            )
        return F.conv2d(x, self.weight[:, :cin], self.bias, self.stride, self.padding)


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


def _branch(width: int, out: int, bias: float = 0.0) -> nn.Sequential:
    """CenterNet's output branch: 3×3 conv → ReLU → 1×1 conv."""
    last = nn.Conv2d(width, out, 1)
    nn.init.constant_(last.bias, bias)
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), last)


class FPN(nn.Module):
    """Feature pyramid: laterals to ``width`` channels, top-down nearest upsampling + add,
    3×3 smoothing of the finest level (the only one the heads read)."""

    def __init__(self, in_channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(ElasticConv2d(c, width, 1) for c in in_channels)
        self.smooth = _conv_bn_relu(width, width, 3)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.laterals[-1](feats[-1])
        for lateral, f in zip(reversed(self.laterals[:-1]), reversed(feats[:-1])):
            y = lateral(f)
            x = y + F.interpolate(x, size=y.shape[-2:], mode="nearest")
        return self.smooth(x)


class InputRefine(nn.Module):
    """Full-resolution refinement of upsampled logits: concatenate the input image, 3×3 conv,
    ReLU, 1×1 conv, added to the logits.

    Digit strokes are 1–3 px wide while the FPN works at stride 4, so upsampled
    logits alone are blobs whose IoU with a stroke mask stays low; one shallow
    layer that sees the pixels (U-Net's first level, in miniature) sharpens them.
    """

    def __init__(self, channels: int, image_channels: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + image_channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.out.weight)  # starts as the plain upsampled logits
        nn.init.zeros_(self.out.bias)

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return up + self.out(F.relu(self.conv(torch.cat([up, image], dim=1))))


# --------------------------------------------------------------------------- heads
class ClassificationHead(nn.Module):
    """Last feature → 1×1 conv → BN → ReLU → global average pool → linear."""

    def __init__(self, in_channels: Sequence[int], width: int = 128) -> None:
        super().__init__()
        self.pre = ElasticConv2d(in_channels[-1], width, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, NUM_CLASSES)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = F.relu(self.bn(self.pre(feats[-1])))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SemanticHead(nn.Module):
    """FPN → 3×3 conv → 1×1 over background + 10 classes, upsampled to the input."""

    def __init__(self, in_channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.fpn = FPN(in_channels, width)
        self.sem = nn.Sequential(_conv_bn_relu(width, width, 3), nn.Conv2d(width, NUM_SEMANTIC, 1))
        self.refine = InputRefine(NUM_SEMANTIC)

    def forward(self, feats: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        return self.refine(self.sem(self.fpn(feats)), image)


class CenterNetHead(nn.Module):
    """CenterNet on the FPN output; ``extra`` adds ``"mask"`` (1 foreground logit) or
    ``"semantic"`` (background + 10 classes), both upsampled to the input size and refined
    with the pixels (:class:`InputRefine`)."""

    def __init__(self, in_channels: Sequence[int], width: int, extra: str | None = None) -> None:
        super().__init__()
        self.fpn = FPN(in_channels, width)
        self.heatmap = _branch(width, NUM_CLASSES, _HEATMAP_PRIOR_BIAS)
        self.size = _branch(width, 2)
        self.offset = _branch(width, 2)
        self.extra = extra
        if extra == "mask":
            self.mask = _branch(width, 1)
            self.refine = InputRefine(1)
        elif extra == "semantic":
            self.sem = nn.Sequential(
                _conv_bn_relu(width, width, 3), nn.Conv2d(width, NUM_SEMANTIC, 1)
            )
            self.refine = InputRefine(NUM_SEMANTIC)
        elif extra is not None:
            raise HeadError(f"unknown CenterNet extra branch {extra!r}")

    def forward(
        self, feats: Sequence[torch.Tensor], image: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        x = self.fpn(feats)
        out = (self.heatmap(x), self.size(x), self.offset(x))
        if self.extra == "mask":
            return (*out, self.refine(self.mask(x), image))
        if self.extra == "semantic":
            return (*out, self.refine(self.sem(x), image))
        return out


class PoseHead(nn.Module):
    """FPN → 3×3 conv → 1×1 to 14 keypoint heatmaps at the FPN's stride."""

    def __init__(self, in_channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.fpn = FPN(in_channels, width)
        self.out = nn.Sequential(_conv_bn_relu(width, width, 3), nn.Conv2d(width, NUM_KEYPOINTS, 1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.out(self.fpn(feats))


def build_head(task: str, in_channels: Sequence[int], width: int = DEFAULT_WIDTH) -> nn.Module:
    """The head of ``task`` for features with ``in_channels`` (one entry per tapped level)."""
    check_task(task)
    if not in_channels:
        raise HeadError("a task head needs at least one feature level")
    if task == "classification":
        return ClassificationHead(in_channels, width=2 * width)
    if task == "semantic":
        return SemanticHead(in_channels, width)
    if task == "pose":
        return PoseHead(in_channels, width)
    extra = {"detection": None, "instance": "mask", "panoptic": "semantic"}[task]
    return CenterNetHead(in_channels, width, extra)


# --------------------------------------------------------------------------- the task model
def _tap_hook(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook on a tapped block: hand its output to the TaskModel that is listening.

    A module-level function (not a closure) so that ``copy.deepcopy`` of a
    TaskModel (the profiler copies modules) keeps working hooks."""
    sink = module.__dict__.get("_aiop_sink")
    if sink is not None:
        sink.append(output)


class TaskModel(BlockNet):
    """Backbone (its stem and blocks) + a task head, as one BlockNet.

    ``forward(images)`` returns the head's raw outputs; :meth:`loss` takes them and
    the dense targets of :func:`aiop.tasks.train.encode_targets` (a tuple of
    tensors with the batch first, so micro-batching cuts them like the images).
    """

    def __init__(
        self,
        backbone: BlockNet,
        task: str,
        *,
        resolution: int | None = None,
        width: int = DEFAULT_WIDTH,
        name: str | None = None,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.task = check_task(task)
        label = name or getattr(backbone, "spec", None) or type(backbone).__name__
        info = probe_backbone(backbone, resolution, name=label)
        if task == "classification":  # only the last feature matters: tap the last block
            last = len(backbone.blocks) - 1
            info = probe_last(backbone, info, last)
        self.info = info
        self.backbone_name = label
        self.width = width
        self.stem = backbone.stem
        self.blocks = backbone.blocks
        self.head = head if head is not None else build_head(task, info.channels, width)
        self.input_size = (backbone.input_size[0], info.resolution, info.resolution)
        self.num_classes = NUM_CLASSES
        self.feature_indices = info.indices
        self.arch = dict(getattr(backbone, "arch", {}) or {})
        for i in info.indices:
            block = self.blocks[i]
            if _tap_hook not in block._forward_hooks.values():
                block.register_forward_hook(_tap_hook)

    @property
    def output_size(self) -> int:
        """Side of the dense head outputs (heatmaps) at the model's resolution."""
        return self.info.sizes[0]

    def multiscale_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = [self.blocks[i] for i in self.feature_indices]
        sinks: list[list[torch.Tensor]] = [[] for _ in taps]
        for block, sink in zip(taps, sinks):
            block.__dict__["_aiop_sink"] = sink
        try:
            x = self.stem(x)
            for block in self.blocks:  # segments under checkpointing: the hooks still fire
                x = block(x)
        finally:
            for block in taps:
                block.__dict__["_aiop_sink"] = None
        return [sink[0] for sink in sinks]

    def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        feats = self.multiscale_features(x)
        if self.task in ("classification", "pose"):
            return self.head(feats)
        return self.head(feats, x)  # dense heads refine their full-size maps with the pixels

    def make_batch(
        self,
        batch_size: int,
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """Random images and random dense targets of the right shapes (for the profiler: no
        data-dependent shapes, so it also runs on fake tensors)."""
        from aiop.tasks.train import random_dense_targets

        shape = self.example_input_shape(batch_size, resolution)
        x = torch.rand(shape, generator=generator, device=device)
        res = shape[-1]
        out = math.ceil(res / self.info.resolution * self.output_size)
        return (x,), random_dense_targets(
            self.task, batch_size, res, out, generator=generator, device=device
        )

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        from aiop.tasks.train import task_loss

        return task_loss(self.task, outputs, targets)


def probe_last(backbone: BlockNet, info: BackboneInfo, last: int) -> BackboneInfo:
    """``info`` reduced to the last block's output (what classification reads)."""
    if info.indices and info.indices[-1] == last:
        return BackboneInfo(
            info.name, (last,), info.channels[-1:], info.sizes[-1:], info.resolution
        )
    saved = backbone.feature_indices
    try:
        backbone.feature_indices = (last,)
        return probe_backbone(backbone, info.resolution, name=info.name)
    finally:
        backbone.feature_indices = saved


def load_head_state(head: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a (possibly wider, shared) head's state into ``head``.

    Tensors of the same shape are copied; wider ones (an elastic lateral built for
    more input channels) are cut to their leading slice. A missing or narrower
    tensor raises :class:`HeadError`.
    """
    own = head.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise HeadError(f"shared head state lacks {len(missing)} tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for key, dst in own.items():
            src = state[key]
            if src.dim() != dst.dim() or any(s < d for s, d in zip(src.shape, dst.shape)):
                raise HeadError(
                    f"shared head tensor {key} has shape {tuple(src.shape)}, "
                    f"this head needs {tuple(dst.shape)}"
                )
            dst.copy_(src[tuple(slice(0, d) for d in dst.shape)])
