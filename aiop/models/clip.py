"""A small CLIP-style dual encoder: ViT image tower + causal text transformer + contrastive head.

Default (``zoo:clip_vit``): 64×64×3 images cut in 8×8 patches (64 tokens + CLS),
image tower 6 blocks × 192 wide × 3 heads; text tower over 32 tokens from a
4,096-word vocabulary, 4 blocks × 128 wide × 4 heads; both projected to a
128-d joint space (``num_classes`` sets that width). ``width_mult`` scales both
towers (64-wide heads in the image tower, 32-wide in the text tower).

Contract choices: ``stem`` is the patch embedding, ``blocks`` are the image
tower's transformer blocks (what checkpointing and freezing cut), ``text`` is the
whole text tower, ``head`` holds the two projections and the learnable logit
scale. ``model(image)`` gives normalised image embeddings; ``model(image, tokens)``
gives the B×B image-to-text logits (stem → blocks → text → head, the registration
order); ``loss`` is the symmetric contrastive CE
against the diagonal. The text feature is the last position's (the batches here
have no padding), which avoids an argmax over token ids.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aiop.models.base import BlockNet
from aiop.models.layers import make_divisible
from aiop.models.transformer import TransformerBlock


def _l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / ‖x‖ from plain ops (F.normalize exports as ReduceL2, outside the CG vocabulary)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


class LearnedTokens(nn.Module):
    """Learned position embeddings (and optionally a CLS token) in a module of their own, so
    that parameterised modules listed in registration order follow forward order."""

    def __init__(self, n: int, dim: int, cls: bool, std: float) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        nn.init.normal_(self.pos_embed, std=std)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=std)


class PatchEmbed(nn.Module):
    """Patchify conv → tokens, prepend CLS, add learned position embeddings."""

    def __init__(self, in_chans: int, dim: int, patch: int, resolution: int) -> None:
        super().__init__()
        self.grid = resolution // patch
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.tokens = LearnedTokens(self.grid * self.grid + 1, dim, cls=True, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        _, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos, cls = self.tokens.pos_embed, self.tokens.cls_token
        assert cls is not None
        if gh != self.grid or gw != self.grid:  # another resolution: resize the grid part
            grid = pos[:, 1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
        # expand_as a slice (not expand(b, -1, -1)) keeps the exported graph's shapes static
        x = torch.cat([cls.expand_as(x[:, :1]), x], 1)
        return x + pos


class TextEncoder(nn.Module):
    """Token + position embeddings → causal transformer blocks → final LayerNorm."""

    def __init__(self, vocab: int, context: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(vocab, dim)
        self.positions = LearnedTokens(context, dim, cls=False, std=0.01)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(dim, heads, 4.0, act="gelu", causal=True, context=context)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.positions.pos_embed
        if tokens.shape[1] != pos.shape[1]:  # shorter captions: slice (a dynamic shape in ONNX)
            pos = pos[:, : tokens.shape[1]]
        x = self.token_embed(tokens) + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, -1]


class LogitScale(nn.Module):
    """CLIP's learnable temperature, log(1/0.07) at init."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))


class ContrastiveHead(nn.Module):
    """Image LN + projection, text projection, and the learnable temperature."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.image_norm = nn.LayerNorm(image_dim)
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.temperature = LogitScale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings from the image tower's tokens (CLS pooled)."""
        return _l2_normalize(self.image_proj(self.image_norm(x[:, 0])))

    def embed_text(self, t: torch.Tensor) -> torch.Tensor:
        return _l2_normalize(self.text_proj(t))

    def logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.temperature.logit_scale.exp() * img @ txt.t()


class CLIPDualEncoder(BlockNet):
    def __init__(
        self,
        num_classes: int = 128,
        in_chans: int = 3,
        width_mult: float = 1.0,
        resolution: int = 64,
        patch: int = 8,
        image_depth: int = 6,
        text_depth: int = 4,
        vocab: int = 4096,
        context: int = 32,
    ) -> None:
        super().__init__()
        if resolution % patch:
            raise ValueError(
                f"clip_vit: resolution {resolution} is not a multiple of patch {patch}"
            )
        iw = max(64, make_divisible(192 * width_mult, 64))
        tw = max(32, make_divisible(128 * width_mult, 32))
        self.vocab, self.context = vocab, context
        self.stem = PatchEmbed(in_chans, iw, patch, resolution)
        self.blocks = nn.ModuleList(
            [TransformerBlock(iw, iw // 64, 4.0, act="gelu") for _ in range(image_depth)]
        )
        self.text = TextEncoder(vocab, context, tw, text_depth, tw // 32)
        self.head = ContrastiveHead(iw, tw, num_classes)
        self.input_size = (in_chans, resolution, resolution)
        self.num_classes = num_classes
        self.feature_indices = ()

    def forward(self, image: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.forward_features(image)
        if tokens is None:
            return self.head(feats)
        # text tower before the head: the order the modules are registered in
        txt = self.text(tokens)
        img = self.head(feats)
        return self.head.logits(img, self.head.embed_text(txt))

    def make_batch(
        self,
        batch_size: int,
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """((images, tokens), targets): random images and captions; pair i matches i."""
        shape = self.example_input_shape(batch_size, resolution)
        image = torch.randn(shape, generator=generator, device=device)
        tokens = torch.randint(
            0, self.vocab, (batch_size, self.context), generator=generator, device=device
        )
        return (image, tokens), torch.arange(batch_size, device=device)

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the B×B logits (image→text and text→image)."""
        return 0.5 * (F.cross_entropy(outputs, targets) + F.cross_entropy(outputs.t(), targets))
