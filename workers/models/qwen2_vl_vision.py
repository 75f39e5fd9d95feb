"""Qwen2-VL vision tower: Conv3d patch embed, 2-D rotary, full-attention ViT blocks (LayerNorm,
QuickGELU MLP), and a patch merger that folds each 2x2 block of patches into one LM token.

The building blocks here (attention, block, merger, tower skeleton) are shared with Qwen2.5-VL,
whose tower (``qwen2_5_vl_vision``) adds window attention, RMSNorm and a gated MLP.

Parameter names follow the HF checkpoint under the ``visual.`` prefix, so weights load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from workers.models.layers import (
    Conv3dPatchEmbed,
    VisionRotaryEmbedding,
    activation,
    apply_rotary,
    cu_seqlens_np,
    varlen_attention,
    vision_hw_positions_np,
)

Grid = tuple[int, int, int]
# Layouts kept per tower (one per grid signature): serving sees the same image sizes again and
# again, and a layout is small (~40 bytes per patch on the device).
LAYOUT_CACHE_SIZE = 64


def grid_list(grid_thw: torch.Tensor | list) -> list[Grid]:
    """[(t, h, w), ...] as Python ints from a LongTensor[N, 3] or a nested list."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]


@dataclass(frozen=True, eq=False)
class VisionLayout:
    """Everything a tower forward needs that depends only on the grids, on the tower's device.

    Built on the host with integer arithmetic (no device kernels, no sync), copied over in one
    transfer, cached per grid signature. Immutable: CUDA graphs read these tensors in place.

    positions: int64 [N, 2] (row, col) of each patch, in attention order (after ``index``).
    cu_full / max_full: one segment per frame (int32 cu_seqlens) and the longest one.
    cu_window / max_window: one segment per attention window (None for towers without windows).
    index / inverse: merge-block order for window attention and its inverse (None: identity).
    """

    grids: tuple[Grid, ...]
    positions: torch.Tensor
    cu_full: torch.Tensor
    max_full: int
    cu_window: torch.Tensor | None = None
    max_window: int = 0
    index: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        return int(self.positions.shape[0])


def layout_to_device(grids: tuple[Grid, ...], positions: np.ndarray, full_lengths: list[int],
                     device: torch.device, window_lengths: list[int] | None = None,
                     index: np.ndarray | None = None) -> VisionLayout:
    """Pack the host arrays into one int64 buffer, copy it with one (pinned, non-blocking) H2D
    transfer and slice the device copy (cu_seqlens become int32, as the varlen kernel wants)."""
    cu_full, max_full = cu_seqlens_np(full_lengths)
    parts = {"positions": positions.reshape(-1), "cu_full": cu_full}
    max_window = 0
    if window_lengths is not None:
        parts["cu_window"], max_window = cu_seqlens_np(window_lengths)
    if index is not None:
        parts["index"], parts["inverse"] = index, np.argsort(index, kind="stable")
    host = torch.from_numpy(np.concatenate([a.astype(np.int64, copy=False) for a in parts.values()]))
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    views, offset = {}, 0
    for name, a in parts.items():
        views[name], offset = dev[offset:offset + a.size], offset + a.size
    cu_window = views.get("cu_window")
    return VisionLayout(grids, views["positions"].view(-1, 2), views["cu_full"].to(torch.int32), max_full,
                        cu_window=None if cu_window is None else cu_window.to(torch.int32),
                        max_window=max_window, index=views.get("index"), inverse=views.get("inverse"))


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
                sin: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        # Rotary in float32 whatever the weight dtype (the reference does the same).
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, self.scale, max_seqlen)
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
                sin: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin, max_seqlen)
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
        self._layouts: OrderedDict[tuple, VisionLayout] = OrderedDict()  # see layout_for

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

    # ------------------------------------------------------------------ layout (host side)
    def host_layout(self, grids: tuple[Grid, ...], device: torch.device) -> VisionLayout:
        """Full attention over each frame; patches stay in the processor's order."""
        return layout_to_device(grids, vision_hw_positions_np(grids, self.merge),
                                [h * w for t, h, w in grids for _ in range(t)], device)

    def layout_for(self, grids: list[Grid] | tuple[Grid, ...]) -> VisionLayout:
        """The cached layout of this grid signature on the tower's device (built on a miss)."""
        device = self.patch_embed.proj.weight.device
        key = (tuple(tuple(g) for g in grids), str(device))
        cache = self._layouts
        layout = cache.get(key)
        if layout is None:
            layout = cache[key] = self.host_layout(key[0], device)
            while len(cache) > LAYOUT_CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return layout

    # ------------------------------------------------------------------ forward (device side)
    def block_segments(self, i: int, layout: VisionLayout) -> tuple[torch.Tensor, int]:
        """cu_seqlens and longest segment block i attends within (Qwen2-VL: whole frames)."""
        return layout.cu_full, layout.max_full

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        layout = self.layout_for(grid_list(grid_thw))
        return self.forward_layout(pixel_values.to(self.patch_embed.proj.weight.device), layout)

    def forward_layout(self, pixel_values: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
        """The tower on a prepared layout: device work only (no host sync), so a CUDA graph can
        capture it. pixel_values must be on the tower's device."""
        if pixel_values.shape[0] != layout.num_patches:
            raise ValueError(f"{pixel_values.shape[0]} patch rows but the grids {list(layout.grids)} "
                             f"have {layout.num_patches}")
        unit = self.merge * self.merge
        x = self.patch_embed(pixel_values)
        if layout.index is not None:
            x = permute_blocks(x, layout.index, unit)
        # Positions are already in attention order: cos/sin need no permutation.
        cos, sin = self.rotary(layout.positions)
        for i, block in enumerate(self.blocks):
            cu, longest = self.block_segments(i, layout)
            x = block(x, cu, cos, sin, longest)
        merged = self.merger(x)
        return merged if layout.inverse is None else merged[layout.inverse]


def permute_blocks(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder rows of x in groups of ``unit`` consecutive rows (one merge-block per group)."""
    return x.reshape(-1, unit, *x.shape[1:])[index].reshape(x.shape)
