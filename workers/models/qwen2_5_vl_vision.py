"""Qwen2.5-VL vision tower: the Qwen2-VL tower with RMSNorm, a gated (SwiGLU) MLP with bias, and
window attention: most blocks attend only within square windows of ``window_size`` pixels; the
blocks in ``fullatt_block_indexes`` attend over the whole image.

Window attention without a loop over windows: the patches are permuted (at merge-block
granularity) so every window is a contiguous run, the windows become cu_seqlens segments, and
``varlen_attention`` handles all of them in one call. The merger output is permuted back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from workers.models.layers import (
    GatedMLP,
    RMSNorm,
    cu_seqlens_from_lengths,
    vision_hw_positions,
)
from workers.models.qwen2_vl_vision import (
    Grid,
    PatchMerger,
    Qwen2VisionTransformer,
    VisionBlock,
    grid_list,
)


def rms_norm(dim: int) -> nn.Module:
    return RMSNorm(dim, eps=1e-6)


@dataclass(frozen=True)
class WindowLayout:
    """How merge-blocks are reordered into windows.

    index: LongTensor[num_merge_blocks], new order of the merge-blocks (windows contiguous).
    cu_seqlens: int32[num_windows + 1], window boundaries in patches (after reordering).
    """

    index: torch.Tensor
    cu_seqlens: torch.Tensor


def window_layout(grids: list[Grid], merge: int, window_merged: int,
                  device: torch.device | None = None) -> WindowLayout:
    """Windows of ``window_merged`` x ``window_merged`` merge-blocks per frame, in raster order of
    windows and raster order inside a window (edge windows are smaller)."""
    orders, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        n_wh, n_ww = -(-gh // window_merged), -(-gw // window_merged)
        rows = torch.arange(gh, device=device)[:, None] // window_merged
        cols = torch.arange(gw, device=device)[None, :] // window_merged
        frame_ids = (rows * n_ww + cols).flatten()
        ids = (torch.arange(t, device=device)[:, None] * (n_wh * n_ww) + frame_ids[None, :]).flatten()
        # Stable sort keeps raster order inside each window.
        orders.append(torch.argsort(ids, stable=True) + offset)
        counts = torch.bincount(ids, minlength=t * n_wh * n_ww)
        lengths.extend(int(c) * merge * merge for c in counts.tolist() if c > 0)
        offset += t * gh * gw
    return WindowLayout(torch.cat(orders), cu_seqlens_from_lengths(lengths, device))


def permute_blocks(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder rows of x in groups of ``unit`` consecutive rows (one merge-block per group)."""
    return x.reshape(-1, unit, *x.shape[1:])[index].reshape(x.shape)


class Qwen2_5_VisionTransformer(Qwen2VisionTransformer):
    """Qwen2.5-VL vision tower: pixel patches [N, C*Tp*P*P] + grid_thw -> [N / merge^2, out_dim]."""

    def __init__(self, vc) -> None:
        super().__init__(vc)
        self.window_merged = vc.window_size // self.merge // vc.patch_size
        self.full_attention_blocks = frozenset(vc.fullatt_block_indexes)

    @staticmethod
    def embed_dim_of(vc) -> int:
        return vc.hidden_size

    @staticmethod
    def out_dim_of(vc) -> int:
        return vc.out_hidden_size

    def make_block(self, vc, dim: int, heads: int) -> nn.Module:
        return VisionBlock(dim, heads, rms_norm, GatedMLP(dim, vc.intermediate_size, vc.hidden_act, bias=True))

    def make_merger(self, vc, dim: int) -> nn.Module:
        return PatchMerger(self.out_dim_of(vc), dim, self.merge, rms_norm(dim))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        grids = grid_list(grid_thw)
        device = self.patch_embed.proj.weight.device
        unit = self.merge * self.merge
        layout = window_layout(grids, self.merge, self.window_merged, device)
        x = permute_blocks(self.patch_embed(pixel_values.to(device)), layout.index, unit)
        cos, sin = self.rotary(vision_hw_positions(grids, self.merge, device))
        cos, sin = permute_blocks(cos, layout.index, unit), permute_blocks(sin, layout.index, unit)
        # Windows never cross frames, so whole frames stay contiguous after the permutation.
        cu_full = cu_seqlens_from_lengths([h * w for t, h, w in grids for _ in range(t)], device)
        for i, block in enumerate(self.blocks):
            cu = cu_full if i in self.full_attention_blocks else layout.cu_seqlens
            x = block(x, cu, cos, sin)
        merged = self.merger(x)
        return merged[torch.argsort(layout.index)]
