"""Layers shared by our model implementations: norms, MLPs, rotary embeddings, varlen attention.

Numerics follow the Hugging Face reference in fp32 (norms and rotary angles are computed in
float32 whatever the weight dtype) so that logits match it to ~1e-5.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as the reference does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def activation(name: str) -> nn.Module:
    """The activation a HF config names (only those our architectures use)."""
    table = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "quick_gelu": QuickGELU,
             "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh")}
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]()


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the fast GELU approximation Qwen2-VL's vision MLP uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU when act is SiLU."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act_fn = activation(act)
        self.gate_up: nn.Linear | None = None  # set by fuse_for_gpu (after the weights are loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def fuse_for_gpu(self, multiple: int = 64) -> None:
        """GPU inference layout, same function: gate and up become one matmul, and the hidden size
        is zero-padded to a multiple of ``multiple``.

        Why: cuBLAS takes its fast (TMA) kernels only for 16-byte aligned rows; Qwen2.5-VL's vision
        MLP (hidden 3420) otherwise runs at a third of the matmul rate. Padded units are exact
        zeros: gate = up = 0 there, and their down_proj columns are 0.
        """
        if self.gate_up is not None:
            return
        hidden = self.gate_proj.out_features
        pad = -hidden % multiple
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        fused = nn.Linear(gate.in_features, 2 * (hidden + pad), bias=gate.bias is not None,
                          device=gate.weight.device, dtype=gate.weight.dtype)
        fused.weight.copy_(torch.cat([F.pad(gate.weight, (0, 0, 0, pad)), F.pad(up.weight, (0, 0, 0, pad))]))
        if gate.bias is not None:
            fused.bias.copy_(torch.cat([F.pad(gate.bias, (0, pad)), F.pad(up.bias, (0, pad))]))
        if pad:
            new_down = nn.Linear(hidden + pad, down.out_features, bias=down.bias is not None,
                                 device=down.weight.device, dtype=down.weight.dtype)
            new_down.weight.copy_(F.pad(down.weight, (0, pad)))
            if down.bias is not None:
                new_down.bias.copy_(down.bias)
            self.down_proj = new_down
        self.gate_up = fused.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        del self.gate_proj, self.up_proj  # free the unfused copies


# ----------------------------------------------------------------------------- rotary embeddings


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D] (broadcast over heads)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def inverse_frequencies(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2i/dim) for i in [0, dim/2), in float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))


class MRotaryEmbedding(nn.Module):
    """Multimodal RoPE: the head dim's frequency bands are split into (t, h, w) sections
    (``mrope_section``, summing to head_dim / 2) and each section rotates by its own axis' position.

    Text tokens have equal positions on all three axes, so for them this is plain 1-D RoPE.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]) -> None:
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        self.head_dim, self.theta, self.mrope_section = head_dim, theta, list(mrope_section)
        self._inv_freq: torch.Tensor | None = None  # not a buffer: models are built on "meta"

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = inverse_frequencies(self.head_dim, self.theta, device)
        return self._inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [3, T] (t, h, w) -> (cos, sin), each [T, head_dim] in ``dtype``."""
        if positions.dim() == 1:
            positions = positions[None].expand(3, -1)
        freqs = positions[..., None].float() * self.inv_freq(positions.device)  # [3, T, D/2]
        # Band j of the head dim takes its angle from the axis its section belongs to.
        parts = freqs.split(self.mrope_section, dim=-1)
        freqs = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class VisionRotaryEmbedding(nn.Module):
    """2-D rotary for vision patches: the first half of the frequency bands rotate by the row
    index, the second half by the column index (both use the same head_dim/4 frequencies)."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.spatial_dim, self.theta = head_dim // 2, theta

    def forward(self, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw_positions: [N, 2] (row, col) -> (cos, sin) float32, each [N, head_dim]."""
        inv = inverse_frequencies(self.spatial_dim, self.theta, hw_positions.device)
        freqs = hw_positions[..., None].float() * inv  # [N, 2, head_dim/4]
        freqs = freqs.flatten(1)  # [N, head_dim/2]: row bands then column bands
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def vision_hw_positions_np(grid_thw: list[tuple[int, int, int]], merge: int) -> np.ndarray:
    """(row, col) of every patch, int64 [N, 2], in the order the image processor emits patches:
    frames, then merge-blocks in raster order, then the merge x merge patches of a block in raster
    order.

    Built on the host: no device kernels and no sync, so the result can be cached per grid
    signature and copied over in one go (the device-side original is tests/unit/vision_reference.py).
    """
    out = [_frame_hw_positions(int(h), int(w), merge) for t, h, w in grid_thw for _ in range(t)]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


@functools.lru_cache(maxsize=256)
def _frame_hw_positions(h: int, w: int, merge: int) -> np.ndarray:
    """(row, col) of one frame's patches (memoised: batches repeat image sizes; read-only)."""
    if h % merge or w % merge:
        raise ValueError(f"grid {(h, w)}: h and w must be multiples of the merge size {merge}")
    # Index order: block row, block col, row in block, col in block (the processor's order).
    br, bc, ir, ic = np.meshgrid(np.arange(h // merge), np.arange(w // merge), np.arange(merge),
                                 np.arange(merge), indexing="ij")
    frame = np.stack(((br * merge + ir).ravel(), (bc * merge + ic).ravel()), axis=-1).astype(np.int64)
    frame.flags.writeable = False
    return frame


# ----------------------------------------------------------------------------- varlen attention


def cu_seqlens_from_lengths(lengths: list[int], device: torch.device | None = None) -> torch.Tensor:
    """[0, l0, l0+l1, ...] as int32 (the flash-attention varlen convention)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32, device=device).cumsum(0)
    return cu


def cu_seqlens_np(lengths: list[int]) -> tuple[np.ndarray, int]:
    """``cu_seqlens_from_lengths`` on the host (int32, the same values) and the longest segment.

    The longest segment is what the flash varlen kernel needs as a Python int; knowing it on the
    host spares the device sync of ``_max_segment``.
    """
    cu = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=cu[1:])
    return cu.astype(np.int32), max(lengths, default=0)


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Bool [total, total] mask: token i may attend to token j iff they lie in the same segment.

    ``output_size`` tells repeat_interleave the result size, so it needs no device sync (and can
    run inside a CUDA graph: the float32 CUDA path of the tower uses this mask)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                  output_size=total)
    return seg[:, None] == seg[None, :]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float, max_seqlen: int | None = None) -> torch.Tensor:
    """Non-causal attention within each [cu[i], cu[i+1]) segment of packed q/k/v ([N, H, D]).

    On CUDA (fp16/bf16): the flash varlen kernel over cu_seqlens (no N x N mask, no loop).
    Elsewhere: one SDPA call with a block-diagonal mask (no Python loop over segments).
    ``max_seqlen``: the longest segment, when the caller knows it on the host (the tower's cached
    layout does); None reads it from the device once per cu_seqlens tensor (a sync).
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
        return _cuda_varlen(q, k, v, cu_seqlens, scale, max_seqlen)
    if cu_seqlens.numel() == 2:
        mask = None  # one segment: plain full attention
    else:
        mask = block_diagonal_mask(cu_seqlens, q.shape[0])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


_VARLEN: list = []  # [varlen_attn or None, accepts_scale], filled on first use


def _flash_varlen():
    """torch.nn.attention.varlen.varlen_attn when this torch has it, else None."""
    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
            _VARLEN.extend([varlen_attn, "scale" in inspect.signature(varlen_attn).parameters])
        except ImportError:
            _VARLEN.extend([None, False])
    return _VARLEN[0]


# cu_seqlens tensor id -> (weakref to it, longest segment). A tower reuses the same two cu_seqlens
# tensors (windows, full images) in every block: one device sync per tensor, not per block.
_MAX_LEN_CACHE: dict[int, tuple] = {}


def _max_segment(cu_seqlens: torch.Tensor) -> int:
    hit = _MAX_LEN_CACHE.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1]
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if len(_MAX_LEN_CACHE) > 64:
        _MAX_LEN_CACHE.clear()
    _MAX_LEN_CACHE[id(cu_seqlens)] = (weakref.ref(cu_seqlens), longest)
    return longest


@torch.compiler.disable
def _cuda_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 scale: float, max_seqlen: int | None = None) -> torch.Tensor:
    varlen_attn, accepts_scale = _VARLEN
    cu = cu_seqlens.to(torch.int32)
    longest = _max_segment(cu_seqlens) if max_seqlen is None else int(max_seqlen)
    if accepts_scale:
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale)
    # Older signature (no scale): the kernel uses 1/sqrt(D); fold the difference into q.
    q = q * (scale * q.shape[-1] ** 0.5) if abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-6 else q
    return varlen_attn(q, k, v, cu, cu, longest, longest)


class Conv3dPatchEmbed(nn.Module):
    """Patch embedding of flattened [N, C * Tp * P * P] patches with a stride == kernel Conv3d.

    The weight keeps the checkpoint's Conv3d shape; since each patch is exactly one kernel window
    the convolution is a matmul, which is what we run.
    """

    def __init__(self, in_channels: int, temporal_patch: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(temporal_patch, patch, patch),
                              stride=(temporal_patch, patch, patch), bias=False)
        self.dim = dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.reshape(self.dim, -1)
        x = pixel_values.to(weight.dtype).reshape(-1, weight.shape[1])
        return F.linear(x, weight)
