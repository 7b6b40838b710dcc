"""Plain pre-norm transformer pieces shared by MobileViT and the CLIP-style encoder.

Attention is written as matmul → softmax → matmul (not
``F.scaled_dot_product_attention``) so an exported ONNX graph shows the attention
MatMuls and Softmax that training keeps alive.
"""

from __future__ import annotations

import torch
from torch import nn

from aiop.models.layers import LiteSpec, activation


class MatMul(nn.Module):
    """``torch.matmul`` as a module, so that thop (``aiop.models.thop_flops``) counts it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.scores = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.mix = MatMul()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.scores(q * self.scale, k.transpose(-2, -1))
        if mask is not None:
            attn = attn + mask
        attn = self.softmax(attn)
        out = self.mix(attn, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)) (timm's ViT ``Block`` without layer scale)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        qkv_bias: bool = True,
        causal: bool = False,
        context: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.causal = causal
        if causal:
            # -inf above the diagonal, for sequences up to ``context`` long; not a state-dict
            # entry. A buffer (not built in forward) keeps the exported shapes static.
            mask = torch.full((context, context), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)

    def lite_spec(self) -> LiteSpec:
        return LiteSpec("tokens", self.dim, self.dim, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.causal:
            n = x.shape[1]
            mask = self.mask if n == self.mask.shape[0] else self.mask[:n, :n]
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))
