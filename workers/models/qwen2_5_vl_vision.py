"""Qwen2.5-VL vision tower: the Qwen2-VL tower with RMSNorm, a gated (SwiGLU) MLP with bias, and
window attention: most blocks attend only within square windows of ``window_size`` pixels; the
blocks in ``fullatt_block_indexes`` attend over the whole image.

Window attention without a loop over windows: the patches are permuted (at merge-block
granularity) so every window is a contiguous run, the windows become cu_seqlens segments, and
``varlen_attention`` handles all of them in one call. The merger output is permuted back.

The window order is computed on the host (``window_order_np``) and cached with the rest of the
layout per grid signature (``Qwen2VisionTransformer.layout_for``); tests/unit/vision_reference.py
keeps the original device-side formulation, which the host version is tested against.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn

from workers.models.layers import (
    GatedMLP,
    RMSNorm,
    vision_hw_positions_np,
)
from workers.models.qwen2_vl_vision import (
    Grid,
    PatchMerger,
    Qwen2VisionTransformer,
    VisionBlock,
    VisionLayout,
    layout_to_device,
)


def rms_norm(dim: int) -> nn.Module:
    return RMSNorm(dim, eps=1e-6)


def window_order_np(grids: list[Grid] | tuple[Grid, ...], merge: int,
                    window_merged: int) -> tuple[np.ndarray, list[int]]:
    """``window_layout`` on the host: (int64 merge-block order, window lengths in patches).

    Same values as the device version (a stable sort has one answer), with no kernels and no
    sync; the windows of a frame are never empty, as ceil division leaves no empty window row.
    """
    orders, lengths, offset = [], [], 0
    for t, h, w in grids:
        order, frame_lengths = _image_window_order(int(t), int(h), int(w), merge, window_merged)
        orders.append(order + offset)
        lengths.extend(frame_lengths)
        offset += order.size
    index = np.concatenate(orders) if orders else np.zeros(0, dtype=np.int64)
    return index, lengths


@functools.lru_cache(maxsize=256)
def _image_window_order(t: int, h: int, w: int, merge: int,
                        window_merged: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """One image's merge-block order and window lengths (memoised: batches repeat image sizes)."""
    gh, gw = h // merge, w // merge
    n_wh, n_ww = -(-gh // window_merged), -(-gw // window_merged)
    frame_ids = ((np.arange(gh)[:, None] // window_merged) * n_ww + np.arange(gw)[None, :] // window_merged).ravel()
    ids = (np.arange(t)[:, None] * (n_wh * n_ww) + frame_ids[None, :]).ravel()
    order = np.argsort(ids, kind="stable").astype(np.int64)  # raster order inside each window
    order.flags.writeable = False
    counts = np.bincount(ids, minlength=t * n_wh * n_ww)
    return order, tuple(int(c) * merge * merge for c in counts if c > 0)


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

    def host_layout(self, grids: tuple[Grid, ...], device: torch.device) -> VisionLayout:
        """Window order, window and frame segments, and the rotary positions already permuted
        into window order (so cos/sin need no permutation on the device)."""
        index, window_lengths = window_order_np(grids, self.merge, self.window_merged)
        unit = self.merge * self.merge
        positions = vision_hw_positions_np(grids, self.merge).reshape(-1, unit, 2)[index].reshape(-1, 2)
        # Windows never cross frames, so whole frames stay contiguous after the permutation.
        return layout_to_device(grids, positions, [h * w for t, h, w in grids for _ in range(t)], device,
                                window_lengths=window_lengths, index=index)

    def block_segments(self, i: int, layout: VisionLayout) -> tuple[torch.Tensor, int]:
        if i in self.full_attention_blocks:
            return layout.cu_full, layout.max_full
        return layout.cu_window, layout.max_window
