"""The CUDA varlen path of the vision attention, and the whole tower in bf16 on the GPU."""

from __future__ import annotations

import torch

from tests.gpu.conftest import rel_err
from workers.engine.cuda_graphs import fuse_mlps_for_gpu
from workers.models import layers
from workers.models.layers import block_diagonal_mask, cu_seqlens_from_lengths, varlen_attention
from workers.models.loader import load_model


def dense_reference(q, k, v, cu, scale):
    """float32 attention with an explicit block-diagonal mask (the CPU path's formula)."""
    mask = block_diagonal_mask(cu, q.shape[0])
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float())


def test_cuda_varlen_uses_flash_and_matches_dense():
    assert layers._flash_varlen() is not None, "torch.nn.attention.varlen is missing on this GPU build"
    for lengths in ([64] * 20 + [16, 48], [1296, 1296, 64, 7], [3]):
        n, heads, d = sum(lengths), 16, 80
        cu = cu_seqlens_from_lengths(lengths, "cuda")
        qkv = torch.randn(n, 3, heads, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(1)  # strided views, as the tower passes them
        out = varlen_attention(q, k, v, cu, d ** -0.5)
        assert out.shape == (n, heads, d) and out.dtype == torch.bfloat16
        assert rel_err(out, dense_reference(q, k, v, cu, d ** -0.5)) < 1e-2


def test_cuda_varlen_with_a_non_default_scale():
    n, heads, d = 200, 4, 64
    cu = cu_seqlens_from_lengths([120, 80], "cuda")
    q, k, v = (torch.randn(n, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = varlen_attention(q, k, v, cu, 0.05)
    assert rel_err(out, dense_reference(q, k, v, cu, 0.05)) < 1e-2


def test_vision_tower_bf16_gpu_matches_fp32_cpu(tiny_gpu_qwen_dir):
    """Windows + full-attention blocks over two images of different sizes."""
    cpu = load_model(tiny_gpu_qwen_dir, device="cpu", dtype=torch.float32, parts=("vision",))
    gpu = load_model(tiny_gpu_qwen_dir, device="cuda", dtype=torch.bfloat16, parts=("vision",))
    grid = torch.tensor([[1, 16, 16], [1, 22, 10]])
    patch_dim = 3 * 2 * 14 * 14
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim)
    ref = cpu.encode_images(pixels, grid)
    out = gpu.encode_images(pixels.to("cuda", torch.bfloat16), grid.cuda())
    assert [o.shape for o in out] == [r.shape for r in ref]
    for o, r in zip(out, ref):
        assert rel_err(o.cpu(), r) < 3e-2


def test_fused_padded_mlps_compute_the_same_function(tiny_gpu_qwen_dir):
    """fuse_for_gpu (one gate/up matmul, hidden padded to a multiple of 64) changes no output."""
    model = load_model(tiny_gpu_qwen_dir, device="cuda", dtype=torch.float32, parts=("vision",))
    grid = torch.tensor([[1, 16, 16]], device="cuda")
    pixels = torch.randn(256, 3 * 2 * 14 * 14, device="cuda")
    before = model.encode_images(pixels, grid)[0]
    assert fuse_mlps_for_gpu(model) == len(model.visual.blocks)
    assert model.visual.blocks[0].mlp.gate_up.weight.shape[0] % 128 == 0
    after = model.encode_images(pixels, grid)[0]
    assert rel_err(after, before) < 1e-5
