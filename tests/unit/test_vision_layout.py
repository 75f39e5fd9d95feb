"""The vision tower's host-side layout (window order, cu_seqlens, rotary positions, longest
segments; built with numpy, cached per grid signature) against the original device-side functions,
and the tower's output against the original forward, bit for bit (float32, CPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from workers.base import WorkerConfig
from workers.models import qwen2_vl_vision
from tests.unit.vision_reference import vision_hw_positions, window_layout
from workers.models.layers import (block_diagonal_mask, cu_seqlens_from_lengths, cu_seqlens_np,
                                   vision_hw_positions_np)
from workers.models.loader import load_model
from workers.models.qwen2_5_vl_vision import window_order_np
from workers.models.qwen2_vl_vision import permute_blocks

PATCH_DIM = 3 * 2 * 14 * 14


def random_grids(rng: random.Random, merge: int, max_images: int = 4, max_side: int = 30) -> list:
    """1-4 images, t in 1..3, sides any multiple of merge (so rarely a multiple of the window)."""
    return [(rng.randint(1, 3), merge * rng.randint(1, max_side), merge * rng.randint(1, max_side))
            for _ in range(rng.randint(1, max_images))]


def longest(cu: torch.Tensor) -> int:
    """The longest segment as ``layers._max_segment`` reads it (from the tensor)."""
    return int((cu[1:] - cu[:-1]).max())


@pytest.fixture(scope="module")
def tower(tiny_qwen_dir):
    return load_model(tiny_qwen_dir, parts=("vision",)).visual


@pytest.fixture(scope="module")
def tower2vl(tiny_qwen2vl_dir):
    return load_model(tiny_qwen2vl_dir, parts=("vision",)).visual


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("merge", [1, 2])
def test_host_positions_equal_the_device_function(merge):
    rng = random.Random(merge)
    for _ in range(100):
        grids = random_grids(rng, merge)
        got = torch.from_numpy(vision_hw_positions_np(grids, merge))
        want = vision_hw_positions(grids, merge)
        assert got.dtype == want.dtype == torch.int64
        assert torch.equal(got, want), grids


def test_host_positions_reject_sides_that_do_not_merge():
    with pytest.raises(ValueError, match="multiples of the merge size"):
        vision_hw_positions_np([(1, 6, 5)], 2)


@pytest.mark.parametrize("window_merged", [1, 2, 3, 4, 5, 8])
def test_host_window_order_equals_window_layout(window_merged):
    rng = random.Random(100 + window_merged)
    for _ in range(60):
        merge = rng.choice([1, 2])
        grids = random_grids(rng, merge)
        index, lengths = window_order_np(grids, merge, window_merged)
        cu, max_len = cu_seqlens_np(lengths)
        want = window_layout(grids, merge, window_merged)
        assert index.dtype == np.int64 and torch.equal(torch.from_numpy(index), want.index), grids
        assert cu.dtype == np.int32 and torch.equal(torch.from_numpy(cu), want.cu_seqlens), grids
        assert max_len == longest(want.cu_seqlens)


def test_host_cu_seqlens_equal_the_device_function():
    rng = random.Random(7)
    for n in [0, 1, 2, 17]:
        lengths = [rng.randint(1, 5000) for _ in range(n)]
        cu, max_len = cu_seqlens_np(lengths)
        want = cu_seqlens_from_lengths(lengths)
        assert cu.dtype == np.int32 and torch.equal(torch.from_numpy(cu), want)
        assert max_len == (max(lengths) if lengths else 0)


def test_block_diagonal_mask_matches_segments():
    lengths = [3, 1, 5, 2]
    cu, total = cu_seqlens_from_lengths(lengths), sum(lengths)
    seg = [i for i, n in enumerate(lengths) for _ in range(n)]
    want = torch.tensor([[a == b for b in seg] for a in seg])
    assert torch.equal(block_diagonal_mask(cu, total), want)


# ----------------------------------------------------------------------------- the tower's layout


def test_tower_layout_equals_the_original_functions(tower):
    rng = random.Random(3)
    unit = tower.merge ** 2
    for _ in range(40):
        grids = random_grids(rng, tower.merge)
        lay = tower.layout_for(grids)
        old = window_layout(grids, tower.merge, tower.window_merged)
        cu_full = cu_seqlens_from_lengths([h * w for t, h, w in grids for _ in range(t)])
        positions = permute_blocks(vision_hw_positions(grids, tower.merge), old.index, unit)
        assert lay.grids == tuple(grids) and lay.num_patches == sum(t * h * w for t, h, w in grids)
        assert lay.index.dtype == torch.int64 and torch.equal(lay.index, old.index)
        assert torch.equal(lay.inverse, torch.argsort(old.index))
        assert lay.cu_window.dtype == torch.int32 and torch.equal(lay.cu_window, old.cu_seqlens)
        assert lay.cu_full.dtype == torch.int32 and torch.equal(lay.cu_full, cu_full)
        assert (lay.max_window, lay.max_full) == (longest(old.cu_seqlens), longest(cu_full))
        assert torch.equal(lay.positions, positions)


def test_qwen2vl_tower_layout_has_no_windows(tower2vl):
    grids = [(2, 8, 12), (1, 4, 6)]
    lay = tower2vl.layout_for(grids)
    assert lay.index is None and lay.inverse is None and lay.cu_window is None
    assert torch.equal(lay.positions, vision_hw_positions(grids, tower2vl.merge))
    assert torch.equal(lay.cu_full, cu_seqlens_from_lengths([96, 96, 24]))
    assert lay.max_full == 96


def test_layouts_are_cached_per_signature_and_bounded(tower, monkeypatch):
    monkeypatch.setattr(qwen2_vl_vision, "LAYOUT_CACHE_SIZE", 4)
    tower._layouts.clear()
    first = tower.layout_for([(1, 8, 8), (1, 4, 6)])
    assert tower.layout_for([[1, 8, 8], [1, 4, 6]]) is first  # lists or tuples: one signature
    assert tower.layout_for([(1, 4, 6), (1, 8, 8)]) is not first  # the order of images matters
    for side in (2, 4, 6, 8):
        tower.layout_for([(1, 2, side)])
    assert len(tower._layouts) == 4
    assert tower.layout_for([(1, 8, 8), (1, 4, 6)]) is not first  # the oldest went first
    recent = tower.layout_for([(1, 2, 8)])
    assert tower.layout_for([(1, 2, 8)]) is recent


# ----------------------------------------------------------------------------- the tower's output


def original_qwen2_5_forward(tower, pixel_values, grids):
    """The tower's forward before the host layout (device-side layout, permuted cos/sin, argsort)."""
    unit = tower.merge * tower.merge
    layout = window_layout(grids, tower.merge, tower.window_merged)
    x = permute_blocks(tower.patch_embed(pixel_values), layout.index, unit)
    cos, sin = tower.rotary(vision_hw_positions(grids, tower.merge))
    cos, sin = permute_blocks(cos, layout.index, unit), permute_blocks(sin, layout.index, unit)
    cu_full = cu_seqlens_from_lengths([h * w for t, h, w in grids for _ in range(t)])
    for i, block in enumerate(tower.blocks):
        x = block(x, cu_full if i in tower.full_attention_blocks else layout.cu_seqlens, cos, sin)
    return tower.merger(x)[torch.argsort(layout.index)]


def original_qwen2_forward(tower, pixel_values, grids):
    x = tower.patch_embed(pixel_values)
    cos, sin = tower.rotary(vision_hw_positions(grids, tower.merge))
    cu = cu_seqlens_from_lengths([h * w for t, h, w in grids for _ in range(t)])
    for block in tower.blocks:
        x = block(x, cu, cos, sin)
    return tower.merger(x)


GRID_SETS = [[(1, 16, 16)], [(1, 22, 10), (2, 6, 14)], [(3, 10, 18), (1, 4, 4), (1, 34, 2)], [(1, 2, 2)]]


@pytest.mark.parametrize("grids", GRID_SETS)
def test_qwen2_5_tower_output_is_unchanged(tower, grids):
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original_qwen2_5_forward(tower, pixels, grids)
        got = tower(pixels, torch.tensor(grids))
        again = tower(pixels, grids)  # from the layout cache
    assert got.shape == want.shape == (sum(t * h * w for t, h, w in grids) // 4, tower.merger.mlp[-1].out_features)
    assert torch.equal(got, want) and torch.equal(again, want)


@pytest.mark.parametrize("grids", GRID_SETS[:3])
def test_qwen2_tower_output_is_unchanged(tower2vl, grids):
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = original_qwen2_forward(tower2vl, pixels, grids)
        got = tower2vl(pixels, grids)
    assert torch.equal(got, want)


def test_compiled_blocks_take_new_sizes_without_recompiling(tiny_qwen_dir, tower):
    """The longest segment reaches the blocks as an int; under dynamic=True it is symbolic, so a
    new image size reuses the compiled code (dynamo's eager backend: same ops, same bits)."""
    compiled = load_model(tiny_qwen_dir, parts=("vision",)).visual
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for block in compiled.blocks:
        block.compile(dynamic=True, backend=count)
    # Several segments in every block (the CPU path specialises on "one segment" or not).
    for i, grids in enumerate([[(1, 16, 16), (1, 8, 8)], [(1, 22, 10), (2, 6, 14)], [(3, 10, 18)]]):
        pixels = torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM)
        with torch.no_grad():
            assert torch.equal(compiled(pixels, grids), tower(pixels, grids))
        if i == 0:
            first = len(graphs)
    assert first >= 1 and len(graphs) == first


def test_forward_rejects_pixels_that_do_not_match_the_grids(tower):
    with pytest.raises(ValueError, match="patch rows"):
        tower(torch.zeros(60, PATCH_DIM), [(1, 8, 8)])


# ----------------------------------------------------------------------------- configuration


def test_vision_graphs_flag_reaches_the_engine_config(tmp_path):
    from workers.__main__ import build_parser, configs

    def worker(*flags: str) -> WorkerConfig:
        return configs(build_parser().parse_args(["--role", "encode", "--model", str(tmp_path), *flags]))[0]

    assert worker().engine_config().vision_cuda_graphs is True
    assert worker("--no-vision-cuda-graphs").engine_config().vision_cuda_graphs is False


def test_vision_graphs_need_a_cuda_tower(tower):
    from workers.engine.vision_graphs import VisionGraphs

    with pytest.raises(ValueError, match="CUDA device"):
        VisionGraphs(tower)
