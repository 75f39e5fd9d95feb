"""The CUDA varlen path of the vision attention, the whole tower in bf16 on the GPU, the tower
without device syncs, and its CUDA graphs (replay == eager, one graph per signature, LRU, cap,
replay outputs owned by the caller, the engine's path)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from tests.gpu.conftest import rel_err
from workers.engine.config import EngineConfig
from workers.engine.cuda_graphs import compile_vision_blocks, fuse_mlps_for_gpu
from workers.engine.engine import LLMEngine
from workers.engine.vision_graphs import VisionGraphs
from workers.models import layers
from workers.models.layers import block_diagonal_mask, cu_seqlens_from_lengths, varlen_attention
from workers.models.loader import load_model


def picture(w: int, h: int, seed: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (seed * 40 % 256, 120, 200))
    d = ImageDraw.Draw(im)
    d.rectangle([w // 5, h // 4, w // 2, h // 2], fill=(240, 30 * seed % 256, 20))
    return im


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


# ----------------------------------------------------------------------------- host layout, graphs

PATCH_DIM = 3 * 2 * 14 * 14
ONE = [(1, 16, 16)]
MIXED = [(1, 16, 16), (1, 22, 10), (2, 6, 14)]  # several images, t > 1, edge windows


def gpu_tower(model_dir, dtype=torch.bfloat16, compiled=False):
    """The tiny tower as the engine prepares it on CUDA (fused MLPs, optionally compiled blocks)."""
    model = load_model(model_dir, device="cuda", dtype=dtype, parts=("vision",))
    fuse_mlps_for_gpu(model)
    if compiled:
        compile_vision_blocks(model.visual)
    return model.visual


def pixels_for(grids, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, PATCH_DIM, device="cuda", generator=gen).to(dtype)


@torch.inference_mode()
def eager(tower, pixels, grids):
    return tower(pixels, grids)


@pytest.fixture(scope="module")
def bf16_tower(tiny_gpu_qwen_dir):
    return gpu_tower(tiny_gpu_qwen_dir)


def test_tower_forward_does_not_sync(bf16_tower):
    """The layout is built on the host and copied without a sync; max lengths are host ints."""
    eager(bf16_tower, pixels_for([(1, 8, 8)]), [(1, 8, 8)])  # one-time setup (flash import, cuBLAS)
    torch.cuda.synchronize()
    grids, pixels = [(1, 12, 20), (3, 6, 8)], pixels_for([(1, 12, 20), (3, 6, 8)])  # a new signature
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = eager(bf16_tower, pixels, grids)  # builds the layout
        second = eager(bf16_tower, pixels, grids)  # from the cache
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert rel_err(first, second) < 1e-6


@pytest.mark.parametrize("dtype,compiled,bound", [(torch.bfloat16, False, 1e-2), (torch.bfloat16, True, 1e-2),
                                                  (torch.float32, False, 1e-6)])
def test_graph_replay_equals_eager(tiny_gpu_qwen_dir, dtype, compiled, bound):
    tower = gpu_tower(tiny_gpu_qwen_dir, dtype, compiled)
    graphs = VisionGraphs(tower)
    for grids in (ONE, MIXED):
        for seed in (1, 2):  # the capture call and a replay with new pixels
            pixels = pixels_for(grids, seed, dtype)
            out, ref = graphs(pixels, grids), eager(tower, pixels, grids)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            assert rel_err(out, ref) < bound, (grids, seed)
    assert graphs.failed == set() and graphs.num_captures == 2 and graphs.num_replays == 4
    assert graphs.num_eager == 0


def test_each_signature_gets_its_own_graph(bf16_tower):
    graphs = VisionGraphs(bf16_tower)
    graphs(pixels_for(ONE), ONE)
    graphs(pixels_for(MIXED), MIXED)
    assert list(graphs.graphs) == [tuple(ONE), tuple(MIXED)] and graphs.num_captures == 2
    pixels = pixels_for(ONE, seed=5)
    assert rel_err(graphs(pixels, ONE), eager(bf16_tower, pixels, ONE)) < 1e-2
    assert graphs.num_captures == 2 and graphs.num_replays == 3
    assert list(graphs.graphs) == [tuple(MIXED), tuple(ONE)]  # most recently used last


def test_least_recently_used_graph_is_evicted(bf16_tower):
    graphs = VisionGraphs(bf16_tower, max_graphs=2)
    a, b, c = [(1, 8, 8)], [(1, 8, 12)], [(1, 12, 8)]
    for grids in (a, b, a, c):  # a was used after b, so b goes when c arrives
        graphs(pixels_for(grids), grids)
    assert list(graphs.graphs) == [tuple(a), tuple(c)]
    assert graphs.num_evictions == 1 and graphs.num_captures == 3
    pixels = pixels_for(b, seed=9)
    assert rel_err(graphs(pixels, b), eager(bf16_tower, pixels, b)) < 1e-2  # b is captured again
    assert list(graphs.graphs) == [tuple(c), tuple(b)] and graphs.num_captures == 4


def test_signatures_over_the_patch_cap_run_eagerly(bf16_tower):
    graphs = VisionGraphs(bf16_tower, max_patches=300)
    big = [(1, 16, 20)]  # 320 patches
    pixels = pixels_for(big)
    assert not graphs.can_graph(big) and graphs.can_graph(ONE)
    assert rel_err(graphs(pixels, big), eager(bf16_tower, pixels, big)) < 1e-6
    assert graphs.num_eager == 1 and not graphs.graphs


def test_replay_results_are_not_overwritten_by_the_next_replay(bf16_tower):
    graphs = VisionGraphs(bf16_tower)
    first = graphs(pixels_for(MIXED, seed=1), MIXED)
    kept = first.clone()
    second = graphs(pixels_for(MIXED, seed=2), MIXED)
    third = graphs(pixels_for(MIXED, seed=3), MIXED)
    torch.cuda.synchronize()
    assert graphs.num_captures == 1 and graphs.num_replays == 3
    assert torch.equal(first, kept)
    assert not torch.equal(first, second) and not torch.equal(second, third)
    assert len({first.data_ptr(), second.data_ptr(), third.data_ptr()}) == 3


def test_engine_encodes_through_graphs(tiny_gpu_qwen_dir):
    """The engine default on CUDA (compiled blocks + graphs) gives the eager engine's embeddings."""
    images = [picture(224, 224, 1), picture(140, 308, 2)]
    items = {}
    for use in (True, False):
        engine = LLMEngine(EngineConfig(model=str(tiny_gpu_qwen_dir), device="cuda", dtype="bfloat16",
                                        parts=("vision",), vision_cuda_graphs=use))
        items[use] = engine.encode_images(images)
        items[use] += engine.encode_images(images[:1])  # a second signature
        if use:
            assert engine.vision_graphs.num_captures == 2 and engine.vision_graphs.num_replays == 2
        else:
            assert engine.vision_graphs is None
    for g, e in zip(items[True], items[False]):
        assert g.num_tokens == e.num_tokens and g.extras == e.extras
        assert rel_err(g.embeds, e.embeds) < 1e-2
