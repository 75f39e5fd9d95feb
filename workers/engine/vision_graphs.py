"""CUDA graphs for the vision tower, one per grid signature.

At batch 1 the tower is host-bound: ~0.8 ms of Python and kernel dispatch per block (32 blocks)
against ~3-4 ms of GPU work for a 512x512 image. Everything a forward reads that depends on the
grids (window order, cu_seqlens, rotary positions, and the longest segments as Python ints) is
fixed per grid signature (``Qwen2VisionTransformer.layout_for``), so the whole forward from patch
embedding to the merger's inverse permutation can be captured once per signature and replayed:

1. first call with a signature: build (or take the cached) layout, copy the pixels into a static
   buffer, warm up twice on a side stream (compiled blocks meet these exact shapes before the
   capture, so nothing compiles during it), capture, replay.
2. later calls: copy the pixels into the static buffer, replay, return a **clone** of the static
   output. Callers keep embeddings (embedding caches, UCX handles, requests) while later images
   are encoded, so a view of the static output would be overwritten by the next replay.

All graphs share one memory pool: they never run concurrently and every output is cloned before
the next replay, so the pool needs the largest single forward's activations, not their sum. At most
``max_graphs`` graphs are kept (least recently used goes first) and only signatures of at most
``max_patches`` patches are captured; anything else runs the tower eagerly (same layout cache).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from workers.models.qwen2_vl_vision import Grid, VisionLayout, grid_list

log = logging.getLogger(__name__)

DEFAULT_MAX_GRAPHS = 8
# 16384 patches = 12 images of 512x512; the activations of such a forward on the 7B tower take
# well under 1 GB of the shared pool. Larger batches are GPU-bound: a graph would not pay there.
DEFAULT_MAX_PATCHES = 16384
WARMUP_RUNS = 2


@dataclass(eq=False)
class _Graph:
    """One captured forward: its graph, the buffers it reads and writes, and the layout it reads
    (held here so that evicting the layout from the tower's cache cannot free memory in use)."""

    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # static input [N, patch_dim], the tower's dtype
    out: torch.Tensor  # static output [N / merge^2, out_dim]
    layout: VisionLayout


class VisionGraphs:
    """Runs a vision tower (``Qwen2VisionTransformer`` or a subclass) through CUDA graphs.

    Call it like the tower: ``graphs(pixel_values, grid_thw) -> [N / merge^2, out_dim]``; the
    result is always a fresh tensor the caller owns.
    """

    def __init__(self, visual: torch.nn.Module, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 max_patches: int = DEFAULT_MAX_PATCHES) -> None:
        weight = visual.patch_embed.proj.weight
        if weight.device.type != "cuda":
            raise ValueError("vision CUDA graphs need the vision tower on a CUDA device")
        if max_graphs < 1 or max_patches < 1:
            raise ValueError(f"max_graphs ({max_graphs}) and max_patches ({max_patches}) must be >= 1")
        self.visual, self.device, self.dtype = visual, weight.device, weight.dtype
        self.max_graphs, self.max_patches = max_graphs, max_patches
        self.graphs: OrderedDict[tuple[Grid, ...], _Graph] = OrderedDict()
        self.failed: set[tuple[Grid, ...]] = set()  # signatures whose capture failed: run eagerly
        self._pool = None  # one memory pool for all graphs, created on the first capture
        # Metrics (and, in tests, proof of which path ran).
        self.num_captures = self.num_replays = self.num_eager = self.num_evictions = 0

    def can_graph(self, grids: list[Grid] | tuple[Grid, ...]) -> bool:
        """Whether this signature runs as a graph (small enough, and its capture did not fail)."""
        key = tuple(tuple(g) for g in grids)
        return sum(t * h * w for t, h, w in key) <= self.max_patches and key not in self.failed

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        key = tuple(grid_list(grid_thw))
        if not self.can_graph(key):
            self.num_eager += 1
            return self.visual(pixel_values, list(key))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, pixel_values)
            if entry is None:
                self.num_eager += 1
                return self.visual(pixel_values, list(key))
        else:
            self.graphs.move_to_end(key)
            self._load(entry, pixel_values)
        entry.graph.replay()
        self.num_replays += 1
        return entry.out.clone()

    def _load(self, entry: _Graph, pixel_values: torch.Tensor) -> None:
        if tuple(pixel_values.shape) != tuple(entry.pixels.shape):
            raise ValueError(f"pixel values of shape {tuple(pixel_values.shape)} for grids "
                             f"{list(entry.layout.grids)}, expected {tuple(entry.pixels.shape)}")
        entry.pixels.copy_(pixel_values, non_blocking=True)  # any device/dtype: converted here

    # ------------------------------------------------------------------ capture
    def _capture(self, key: tuple[Grid, ...], pixel_values: torch.Tensor) -> _Graph | None:
        """Capture the forward of this signature (evicting the least recently used graph when
        full). Returns None when the capture fails: the caller runs the tower eagerly, and this
        signature is not tried again."""
        layout = self.visual.layout_for(key)
        pixels = torch.empty(tuple(pixel_values.shape), dtype=self.dtype, device=self.device)
        entry = _Graph(torch.cuda.CUDAGraph(), pixels, pixels, layout)  # out is set below
        self._load(entry, pixel_values)
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
            self.num_evictions += 1
        try:
            entry.out = self._record(entry)
        except RuntimeError as exc:  # e.g. an op that syncs: keep serving, without a graph
            log.warning("vision CUDA graph capture failed for grids %s (running eagerly): %s", list(key), exc)
            self.failed.add(key)
            return None
        self.graphs[key] = entry
        self.num_captures += 1
        return entry

    def _record(self, entry: _Graph) -> torch.Tensor:
        forward = self.visual.forward_layout
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: compiled code and kernels meet these exact shapes
            for _ in range(WARMUP_RUNS):
                forward(entry.pixels, entry.layout)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: the capture happens while serving, and other threads of the worker (UCX
        # transfers, the event loop) may use CUDA meanwhile; only this thread must not sync.
        with torch.cuda.graph(entry.graph, pool=self._pool, capture_error_mode="thread_local"):
            out = forward(entry.pixels, entry.layout)
        return out
