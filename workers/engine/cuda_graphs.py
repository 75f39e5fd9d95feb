"""CUDA graphs for decode steps.

A decode step of a 7B model is a few hundred small kernel launches; at small batch sizes launching
them from Python costs more than running them. We capture ``model.forward`` once per padded batch
size (bucket) and replay it:

1. capture: static device buffers (token ids, mRoPE positions, slots, KV lengths, block tables)
   sized for the largest bucket; one graph per bucket, largest first, all in one memory pool.
   Padding rows have slot -1 (their K/V is never written) and KV length 0 (their attention reads
   nothing and outputs 0).
2. run: fill pinned host mirrors of those buffers from the step's chunks (numpy views, no per-row
   tensor ops), copy them with non_blocking H2D copies, replay the bucket's graph, and return the
   first n rows of its static output. No host sync inside the step.

Only attention backends that read everything from device tensors can be captured
(``supports_cuda_graphs``); the reference backend is not one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine.attention import AttentionMetadata
from workers.engine.scheduler import Chunk
from workers.models.layers import GatedMLP

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes to capture: the default ladder up to ``max_batch``, plus max_batch."""
    top = min(max_batch, DEFAULT_BUCKETS[-1])
    return sorted({b for b in DEFAULT_BUCKETS if b <= top} | {top})


@dataclass
class _StaticInputs:
    """Device buffers a graph reads, and their pinned host mirrors (with numpy views)."""

    ids: torch.Tensor  # [M] int64
    positions: torch.Tensor  # [3, M] int64
    slots: torch.Tensor  # [M] int64
    seq_lens: torch.Tensor  # [M] int32
    tables: torch.Tensor  # [M, W] int32
    query_start: torch.Tensor  # [M + 1] int32 (0, 1, 2, ...: one token per sequence)

    @classmethod
    def allocate(cls, max_batch: int, width: int, device: torch.device | str) -> "_StaticInputs":
        def z(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)
        return cls(z(max_batch), z(3, max_batch), z(max_batch), z(max_batch, dtype=torch.int32),
                   z(max_batch, width, dtype=torch.int32),
                   torch.arange(max_batch + 1, dtype=torch.int32, device=device))

    def pinned_mirror(self) -> "_StaticInputs":
        return _StaticInputs(*(t.cpu().pin_memory() for t in
                               (self.ids, self.positions, self.slots, self.seq_lens, self.tables,
                                self.query_start)))

    def meta(self, bs: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(query_start_loc=self.query_start[:bs + 1], seq_lens=self.seq_lens[:bs],
                                 block_tables=self.tables[:bs], slot_mapping=self.slots[:bs],
                                 max_query_len=1, max_seq_len=max_seq_len,
                                 query_lens=[1] * bs, seq_lens_cpu=[max_seq_len] * bs)


class DecodeGraphs:
    """Captured decode steps for every bucket up to ``max_batch`` sequences."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, max_batch: int,
                 max_model_len: int, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if not getattr(model.attn_backend, "supports_cuda_graphs", False):
            raise ValueError(f"attention backend {model.attn_backend.name!r} cannot run inside a CUDA "
                             "graph: use 'triton' or turn cuda_graphs off")
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.buckets = batch_buckets(max_batch)
        self.width = -(-max_model_len // block_size)
        self.max_seq_len = self.width * block_size
        self.dev = _StaticInputs.allocate(self.buckets[-1], self.width, device)
        self.host = self.dev.pinned_mirror()
        self._np = {name: getattr(self.host, name).numpy() for name in
                    ("ids", "positions", "slots", "seq_lens", "tables")}
        self._copied = torch.cuda.Event()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._image_token_id = int(model.image_token_id)
        self.num_replays = 0  # a metric (and proof in tests that decode steps ran as graphs)

    # ------------------------------------------------------------------ capture
    @torch.inference_mode()
    def capture(self) -> "DecodeGraphs":
        """Capture one graph per bucket (largest first so smaller ones reuse its memory)."""
        pool = None
        for bs in reversed(self.buckets):
            graph, out = self._capture_one(bs, pool)
            pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        return self

    def _forward(self, bs: int) -> torch.Tensor:
        d = self.dev
        return self.model.forward(d.ids[:bs], d.positions[:, :bs], d.meta(bs, self.max_seq_len),
                                  self.kv_cache)

    def _capture_one(self, bs: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.dev.slots.fill_(-1)  # capture-time runs must not write the cache
        self.dev.seq_lens.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, allocator settles
            for _ in range(2):
                self._forward(bs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self._forward(bs)
        return graph, out

    # ------------------------------------------------------------------ replay
    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def can_run(self, chunks: list[Chunk]) -> bool:
        """True for a batch of single-token steps that fits a bucket and needs no image rows."""
        if not chunks or self.bucket_for(len(chunks)) is None:
            return False
        for c in chunks:
            if c.num_tokens != 1 or not c.samples or c.req.token_ids[c.start] == self._image_token_id:
                return False
        return True

    def run(self, chunks: list[Chunk], token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [n, hidden] of the chunks' tokens (a view of the graph's static output).

        ``token_ids`` [n] (device): the chunks' token ids when the host does not know them yet
        (the step that samples them is still running; see LLMEngine's overlapped decode)."""
        n = len(chunks)
        bs = self.bucket_for(n)
        self._copied.synchronize()  # the previous step's H2D copies have read the mirrors
        self._fill_host(chunks, bs, token_ids is None)
        d, h = self.dev, self.host
        for name in ("ids", "positions", "slots", "seq_lens"):
            getattr(d, name).copy_(getattr(h, name), non_blocking=True)
        d.tables[:bs].copy_(h.tables[:bs], non_blocking=True)
        self._copied.record()
        if token_ids is not None:  # device to device, in stream order after the sampling step
            d.ids[:n].copy_(token_ids)
        graph, out = self.graphs[bs]
        graph.replay()
        self.num_replays += 1
        return out[:n]

    def _fill_host(self, chunks: list[Chunk], bs: int, with_ids: bool = True) -> None:
        ids, pos, slots, lens, tables = (self._np[k] for k in ("ids", "positions", "slots", "seq_lens", "tables"))
        block = self.block_size
        for b, c in enumerate(chunks):
            req, p = c.req, c.start
            if with_ids:
                ids[b] = req.token_ids[p]
            pos[:, b] = self._position(req, p)
            slots[b] = req.block_ids[p // block] * block + p % block
            lens[b] = c.end
            tables[b, :len(req.block_ids)] = req.block_ids
        n = len(chunks)
        ids[n:bs], pos[:, n:bs], slots[n:bs], lens[n:bs] = 0, 0, -1, 0

    @staticmethod
    def _position(req, p: int):
        """mRoPE position (3 axes) of token p: the prompt table's column, else p + rope_delta."""
        table = req.positions
        if table is not None and p < table.shape[1]:
            return table[:, p].numpy()
        return p + req.rope_delta


def compile_vision_blocks(visual: torch.nn.Module) -> None:
    """``torch.compile`` every vision block in place (dynamic shapes: any number of patches).

    It fuses the norms, the float32 rotary and the MLP's elementwise work; the attention itself
    stays one eager flash-varlen call (``layers._cuda_varlen`` is excluded from compilation).
    The longest segment reaches it as a block argument (a Python int, symbolic under
    ``dynamic=True``, so new image sizes do not recompile). Compiled blocks can be captured in
    the tower's CUDA graphs (``vision_graphs.VisionGraphs`` warms them on the captured shapes).
    """
    for block in visual.blocks:
        block.compile(dynamic=True)


def fuse_mlps_for_gpu(model: torch.nn.Module) -> int:
    """Give every gated MLP its GPU layout (fused gate/up, aligned hidden size; same function).
    Returns how many were changed. See ``layers.GatedMLP.fuse_for_gpu``."""
    mlps = [m for m in model.modules() if isinstance(m, GatedMLP)]
    for m in mlps:
        m.fuse_for_gpu()
    return len(mlps)


def compile_decoder_layers(model) -> None:
    """``torch.compile`` every LM decoder layer in place (dynamic token count).

    The attention backend call is excluded from compilation (a graph break), so each layer becomes
    two fused graphs around the paged-attention kernels; compile before capturing CUDA graphs.
    """
    # layer_idx is a static int attribute, so each layer is its own compiled variant (identical
    # graphs: Inductor's cache makes the 2nd..Nth cheap). Raise the limit so that no layer silently
    # falls back to eager. (allow_unspec_int_on_nn_module would avoid this but is global, and it
    # made the vision tower's compiled code ~10% slower.)
    limit = 4 * len(model.language_model.layers) + 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for layer in model.language_model.layers:
        layer.compile(dynamic=True)
