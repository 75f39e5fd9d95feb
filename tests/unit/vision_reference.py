"""The vision tower's original device-side layout functions, kept as the reference that the
host-side versions (``layers.vision_hw_positions_np``, ``qwen2_5_vl_vision.window_order_np``) are
tested against bit for bit. Production code no longer calls them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.models.layers import cu_seqlens_from_lengths
from workers.models.qwen2_vl_vision import Grid


def vision_hw_positions(grid_thw: list[tuple[int, int, int]], merge: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """(row, col) of every patch, in the order the image processor emits patches: frames, then
    merge-blocks in raster order, then the merge x merge patches of a block in raster order."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        shape = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(shape).transpose(1, 2).flatten()
        cols = cols.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(out, dim=0)


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
