"""The contract every aiop model follows, so that m-configurations apply to any of them.

A :class:`BlockNet` is ``head(blocks(stem(x)))`` where ``blocks`` is an
``nn.ModuleList`` of single-tensor-in, single-tensor-out modules. That split is
what gradient checkpointing cuts into segments, what freezing walks in forward
order, and where task heads tap multi-scale features (``feature_indices``).

Models with other inputs (the CLIP-style dual encoder) override
:meth:`BlockNet.make_batch` and :meth:`BlockNet.loss`; training code only ever
calls ``model(*inputs)``, ``model.loss(outputs, targets)`` and
``model.make_batch(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class BlockNet(nn.Module):
    """A network as stem → blocks → head.

    Subclasses set ``stem``, ``blocks`` (``nn.ModuleList``), ``head`` and
    ``input_size`` = (C, H, W), and may set ``feature_indices``: the indices of
    blocks whose outputs are the multi-scale features (strides 4, 8, 16, 32
    typically) that dense-prediction heads use.
    """

    stem: nn.Module
    blocks: nn.ModuleList
    head: nn.Module
    input_size: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000
    feature_indices: tuple[int, ...] = ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def multiscale_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the blocks listed in ``feature_indices`` (the last block if none)."""
        wanted = set(self.feature_indices) or {len(self.blocks) - 1}
        feats = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                feats.append(x)
        return feats

    # -- what a training step needs --------------------------------------
    def example_input_shape(
        self, batch_size: int, resolution: int | None = None
    ) -> tuple[int, ...]:
        c, h, w = self.input_size
        if resolution is not None:
            h = w = resolution
        return (batch_size, c, h, w)

    def make_batch(
        self,
        batch_size: int,
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """A random (inputs, targets) batch of the right shapes for one training step."""
        shape = self.example_input_shape(batch_size, resolution)
        x = torch.randn(shape, generator=generator, device=device)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=generator, device=device)
        return (x,), y

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)


def parameterised_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in registration order (forward order for aiop
    models, whose ``__init__`` defines layers in the order ``forward`` uses them)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def split_segments(n_blocks: int, segments: int) -> list[Sequence[int]]:
    """Split block indices 0..n_blocks-1 into ``segments`` contiguous, near-equal runs."""
    if not 1 <= segments <= n_blocks:
        raise ValueError(f"cannot split {n_blocks} blocks into {segments} segments")
    bounds = [round(i * n_blocks / segments) for i in range(segments + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(segments)]
