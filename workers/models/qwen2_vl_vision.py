"""Qwen2-VL vision tower: Conv3d patch embed, 2-D rotary, full-attention ViT blocks (LayerNorm,
QuickGELU MLP), and a patch merger that folds each 2x2 block of patches into one LM token.

The building blocks here (attention, block, merger, tower skeleton) are shared with Qwen2.5-VL,
whose tower (``qwen2_5_vl_vision``) adds window attention, RMSNorm and a gated MLP.

Parameter names follow the HF checkpoint under the ``visual.`` prefix, so weights load unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from workers.models.layers import (
    Conv3dPatchEmbed,
    VisionRotaryEmbedding,
    activation,
    apply_rotary,
    cu_seqlens_from_lengths,
    varlen_attention,
    vision_hw_positions,
)

Grid = tuple[int, int, int]


def grid_list(grid_thw: torch.Tensor | list) -> list[Grid]:
    """[(t, h, w), ...] as Python ints from a LongTensor[N, 3] or a nested list."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def rope_theta_of(vision_config) -> float:
    params = getattr(vision_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


class VisionAttention(nn.Module):
    """Bidirectional attention within cu_seqlens segments (whole images or windows)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        # Rotary in float32 whatever the weight dtype (the reference does the same).
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, self.scale)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))) (Qwen2-VL's vision MLP)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, norm: Callable[[int], nn.Module], mlp: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each merge x merge block (contiguous in the input order),
    and project to the LM hidden size through a 2-layer GELU MLP."""

    def __init__(self, out_dim: int, dim: int, merge: int, norm: nn.Module) -> None:
        super().__init__()
        self.in_dim = dim * merge * merge
        self.ln_q = norm
        self.mlp = nn.Sequential(nn.Linear(self.in_dim, self.in_dim), nn.GELU(), nn.Linear(self.in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.in_dim))


def layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


class Qwen2VisionTransformer(nn.Module):
    """Qwen2-VL vision tower: pixel patches [N, C*Tp*P*P] + grid_thw -> [N / merge^2, out_dim]."""

    def __init__(self, vc) -> None:
        super().__init__()
        self.merge = vc.spatial_merge_size
        dim, heads = self.embed_dim_of(vc), vc.num_heads
        self.patch_embed = Conv3dPatchEmbed(vc.in_channels, vc.temporal_patch_size, vc.patch_size, dim)
        self.rotary = VisionRotaryEmbedding(dim // heads, rope_theta_of(vc))
        self.blocks = nn.ModuleList([self.make_block(vc, dim, heads) for _ in range(vc.depth)])
        self.merger = self.make_merger(vc, dim)

    # Hooks the Qwen2.5-VL tower overrides.
    @staticmethod
    def embed_dim_of(vc) -> int:
        return vc.embed_dim

    @staticmethod
    def out_dim_of(vc) -> int:
        return vc.hidden_size

    def make_block(self, vc, dim: int, heads: int) -> nn.Module:
        mlp = VisionMLP(dim, int(dim * vc.mlp_ratio), vc.hidden_act)
        return VisionBlock(dim, heads, layer_norm, mlp)

    def make_merger(self, vc, dim: int) -> nn.Module:
        return PatchMerger(self.out_dim_of(vc), dim, self.merge, layer_norm(dim))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        grids = grid_list(grid_thw)
        device = self.patch_embed.proj.weight.device
        x = self.patch_embed(pixel_values.to(device))
        cos, sin = self.rotary(vision_hw_positions(grids, self.merge, device))
        # Each frame of each image is one attention segment.
        cu = cu_seqlens_from_lengths([h * w for t, h, w in grids for _ in range(t)], device)
        for block in self.blocks:
            x = block(x, cu, cos, sin)
        return self.merger(x)
