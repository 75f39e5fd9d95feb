"""LLMEngine: requests in, tokens out; paged KV, continuous batching, disaggregation hooks.

The engine knows nothing of NATS, etcd or UCX: workers drive it from one thread and move its
tensors (``kv_cache`` blocks, MMItem embeddings) themselves. See docs/interfaces.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from common.protocol import KVLayout, SamplingParams
from workers.engine import config as derived
from workers.engine.block_manager import BlockManager, OutOfBlocks
from workers.engine.config import EngineConfig
from workers.engine.request import (UNKNOWN_TOKEN, ExportedKV, MMItem, Request, Status,
                                    StepOutput, grid_of, image_hash)
from workers.engine.runner import ModelRunner
from workers.engine.sampler import Sampler, make_generator, small_tensor
from workers.engine.scheduler import Scheduler
from workers.models.loader import load_model

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StepStats:
    """Sums over steps since the last ``take()``, split where the host waits for the device.

    schedule: picking chunks and blocks; launch: building inputs and queueing the forward (CUDA:
    asynchronous, so host work); sample: sampling, which ends with the copy of the tokens to the
    host, so it includes waiting for the forward to finish; outputs: appending tokens, stop
    checks, StepOutputs. On CUDA a large ``sample`` share means the device bounds the step.
    An overlapped decode step (see LLMEngine) counts its queueing as launch and the wait for the
    previous step's tokens as sample.
    """

    steps: int = 0
    tokens: int = 0  # tokens run through the model (prefill chunks + decode rows)
    rows: int = 0  # sequences in the steps
    schedule_s: float = 0.0
    launch_s: float = 0.0
    sample_s: float = 0.0
    outputs_s: float = 0.0

    def add(self, rows: int, tokens: int, t0: float, t1: float, t2: float, t3: float,
            t4: float) -> None:
        self.steps += 1
        self.rows += rows
        self.tokens += tokens
        self.schedule_s += t1 - t0
        self.launch_s += t2 - t1
        self.sample_s += t3 - t2
        self.outputs_s += t4 - t3

    def take(self) -> "StepStats":
        """These sums, and start afresh."""
        out = StepStats(**vars(self))
        self.__init__()  # type: ignore[misc]
        return out

    def line(self, wall_s: float) -> str:
        n = max(self.steps, 1)
        ms = {k: 1e3 * getattr(self, f"{k}_s") / n for k in ("schedule", "launch", "sample", "outputs")}
        return (f"{self.steps} steps in {wall_s:.1f} s, {self.rows / n:.1f} seqs and {self.tokens / n:.0f} "
                f"tokens per step; ms per step: " + " ".join(f"{k} {v:.2f}" for k, v in ms.items()))


@dataclass
class _Ahead:
    """A decode step queued on the device whose tokens the host has not read yet.

    ``tokens`` [N] (device) are the sampled ids, ``host`` their pinned copy, complete once
    ``done`` has passed (None on CPU, where everything ran already). ``deferred``: KV blocks of
    rows that finished or were aborted while the step could still write them, freed when it is
    read."""

    reqs: list[Request]
    tokens: torch.Tensor
    host: torch.Tensor
    done: "torch.cuda.Event | None"
    deferred: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = frozenset(id(r) for r in self.reqs)

    def holds(self, req: Request) -> bool:
        return id(req) in self._ids

    def wait(self) -> None:
        """Until the sampled ids are on the host."""
        if self.done is not None:
            self.done.synchronize()


class LLMEngine:
    """One model, one KV cache, one scheduler. Single-threaded.

    Overlapped decode (``EngineConfig.overlap_decode``, on by default on CUDA): a step that only
    decodes is queued on the device and ``step()`` returns before its tokens are read; the next
    ``step()`` queues the following decode step first, feeding it those tokens on the device,
    and only then reads them. The host's work for one step (inputs, outputs, the worker's other
    threads) thus runs while the device computes the previous one, instead of between steps. A
    request that ends at a step (a stop token) has had one more step queued: its output is
    dropped, and its KV blocks are freed only once that step is read. Requests that reach
    ``max_tokens`` are known in advance and never get the extra step. New work (a request to
    admit, an import, a prefill chunk) ends the overlap for one step.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.model = load_model(config.model, device=self.device, dtype=self.dtype, parts=config.parts,
                                load_format=config.load_format, attention_backend=config.attention_backend)
        self._prepare_for_cuda()
        self._processor = None
        self.requests: dict[str, Request] = {}  # waiting or running
        self.pinned: dict[str, Request] = {}  # prefill-only, done, KV kept for export
        self.reserved: dict[str, list[int]] = {}  # blocks handed out by reserve_import
        self._ready: list[StepOutput] = []  # outputs produced outside step() (imports that end at once)
        self.num_preemptions = 0  # requests recomputed because blocks ran out (a metric)
        self.num_overlapped = 0  # decode steps queued before the previous one was read (a metric)
        self.stats = StepStats()  # where step time goes (host vs waiting for the device)
        self.kv_cache: torch.Tensor | None = None
        self._ahead: _Ahead | None = None  # the decode step queued and not read yet
        overlap = config.overlap_decode
        self.overlap_decode = self.device.type == "cuda" if overlap is None else bool(overlap)
        if self.model.has_lm:
            self._init_lm()

    def _prepare_for_cuda(self) -> None:
        """GPU weight layout (exact) and torch.compile of the parts the config asks for (CUDA only,
        before any graph capture)."""
        self.vision_graphs = None  # VisionGraphs when the tower runs through CUDA graphs
        if self.device.type != "cuda":
            return
        from workers.engine import cuda_graphs
        cuda_graphs.fuse_mlps_for_gpu(self.model)
        if self.config.compile_vision and self.model.has_vision:
            cuda_graphs.compile_vision_blocks(self.model.visual)
        if self.config.vision_cuda_graphs and self.model.has_vision:
            # Graphs are captured lazily, per image-size signature (compiled blocks are warmed
            # with the same shapes first); see workers/engine/vision_graphs.py.
            from workers.engine.vision_graphs import VisionGraphs
            self.vision_graphs = VisionGraphs(self.model.visual)
        # The reference backend syncs and loops in Python: compiling around it would only recompile.
        if self.config.compile_lm and self.model.has_lm and getattr(self.model.attn_backend,
                                                                    "supports_cuda_graphs", False):
            cuda_graphs.compile_decoder_layers(self.model)

    def _init_lm(self) -> None:
        m, cfg = self.model, self.config
        num_blocks = derived.num_kv_blocks(cfg, m, self.dtype, self.device)
        self.kv_cache = torch.zeros(num_blocks, m.num_layers, 2, cfg.block_size, m.num_kv_heads,
                                    m.head_dim, dtype=self.dtype, device=self.device)
        self.block_manager = BlockManager(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(m, self.kv_cache, cfg.block_size, self.device)
        self.sampler = Sampler()
        # Two pinned buffers for sampled ids, used in turn: one being read while the next fills.
        pinned = self.device.type == "cuda"
        self._token_bufs = [torch.empty(cfg.max_num_seqs, dtype=torch.long, pin_memory=pinned)
                            for _ in range(2)]
        self._token_buf = 0
        self.eos_ids = derived.eos_token_ids(cfg.model, m.hf_config)
        # A single request must always fit in the cache, or preempting it could never help.
        self.max_model_len = min(derived.max_model_len(cfg, m.hf_config), num_blocks * cfg.block_size)
        self._init_cuda_graphs()

    def _init_cuda_graphs(self) -> None:
        """Capture decode CUDA graphs when running on CUDA with a graph-safe attention backend."""
        if not (self.config.cuda_graphs and self.device.type == "cuda"
                and getattr(self.model.attn_backend, "supports_cuda_graphs", False)):
            return
        from workers.engine.cuda_graphs import DecodeGraphs
        self.runner.graphs = DecodeGraphs(self.model, self.kv_cache, self.config.block_size,
                                          self.config.max_num_seqs, self.max_model_len, self.device).capture()

    @property
    def kv_layout(self) -> KVLayout:
        m = self.model
        return KVLayout(num_layers=m.num_layers, block_size=self.config.block_size,
                        num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, dtype=self.config.dtype)

    # ------------------------------------------------------------------ vision
    @property
    def processor(self):
        if self._processor is None:
            from workers.models.processing import ImageProcessor
            self._processor = ImageProcessor(self.config.model)
        return self._processor

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image],
                      hashes: Sequence[str] | None = None) -> list[MMItem]:
        """Preprocess + vision tower: one MMItem per image (works on a vision-only engine).

        ``hashes``: the images' content hashes when the caller has them already (a worker hashes
        the file bytes); otherwise the pixels are hashed here (~1 ms per 512x512 image)."""
        if not self.model.has_vision:
            raise ValueError("this engine was built without the vision part: add 'vision' to parts")
        if not images:
            return []
        if hashes is not None and len(hashes) != len(images):
            raise ValueError(f"{len(hashes)} hashes for {len(images)} images")
        pixel_values, grid_thw = self.processor.process(list(images))
        if self.device.type == "cuda":  # float32 over pinned memory, cast on the device
            pixel_values = pixel_values.pin_memory().to(self.device, non_blocking=True)
        pixel_values = pixel_values.to(self.device, self.dtype)
        # The grids stay on the host: the tower reads them as Python ints (no device round trip).
        grids = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
        # The graphs return a fresh tensor, never their static buffer.
        tower = self.vision_graphs if self.vision_graphs is not None else self.model.visual
        embeds = tower(pixel_values, grids).split([self.model.tokens_per_image(g) for g in grids])
        hashes = hashes if hashes is not None else [image_hash(im) for im in images]
        return [MMItem(embeds=e, num_tokens=int(e.shape[0]), extras={"grid_thw": list(g)}, content_hash=h)
                for e, g, h in zip(embeds, grids, hashes)]

    def _to_items(self, images: Sequence[MMItem | Image.Image]) -> list[MMItem]:
        """MMItems as given; PIL images encoded here, all in one vision-tower call."""
        pil = [im for im in images if isinstance(im, Image.Image)]
        bad = [type(im).__name__ for im in images if not isinstance(im, (Image.Image, MMItem))]
        if bad:
            raise ValueError(f"images must be PIL images or MMItems, got {bad}")
        encoded = iter(self.encode_images(pil)) if pil else iter(())
        return [next(encoded) if isinstance(im, Image.Image) else im for im in images]

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, token_ids: Sequence[int],
                    images: Sequence[MMItem | Image.Image] = (), sampling: SamplingParams = SamplingParams(),
                    prefill_only: bool = False) -> int:
        """Queue a request; returns its prompt length after image expansion.

        ``token_ids`` hold ONE placeholder (model.image_token_id) per image. Raises ValueError for
        a prompt that does not fit the context, a placeholder/image count mismatch, bad embeddings.
        """
        self._check_new(request_id)
        placeholders = sum(1 for t in token_ids if t == self.model.image_token_id)
        if placeholders != len(images):  # checked before any image is encoded
            raise ValueError(f"prompt has {placeholders} image placeholders but {len(images)} images were given")
        items = self._to_items(images)
        expanded = self.model.expand_prompt(list(token_ids), [it.num_tokens for it in items])
        self._check_prompt(expanded)
        grids = [grid_of(it) for it in items]
        positions, delta = self.model.mrope_positions(expanded, grids)
        req = Request(request_id, expanded, sampling, self._max_tokens(sampling, len(expanded)),
                      positions=positions, rope_delta=delta, prefill_only=prefill_only,
                      eos_ids=self.eos_ids, **self._mm_fields(expanded, items))
        req.generator = make_generator(sampling.seed, self.device)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return len(expanded)

    def _check_new(self, request_id: str) -> None:
        if not self.model.has_lm:
            raise ValueError("this engine was built without the LM part: add 'lm' to parts")
        if request_id in self.requests or request_id in self.pinned or request_id in self.reserved:
            raise ValueError(f"request id {request_id!r} is already in use")

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token id")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens (after image expansion) but the "
                             f"context holds {self.max_model_len} (prompt + output): shorten it")
        bad = [t for t in token_ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.model.vocab_size})")

    def _max_tokens(self, sampling: SamplingParams, prompt_len: int) -> int:
        return min(sampling.max_tokens, self.max_model_len - prompt_len)

    def _mm_fields(self, expanded: list[int], items: list[MMItem]) -> dict:
        if not items:
            return {}
        for i, it in enumerate(items):
            if tuple(it.embeds.shape) != (it.num_tokens, self.model.hidden_size):
                raise ValueError(f"image {i}: embeddings of shape {tuple(it.embeds.shape)}, expected "
                                 f"({it.num_tokens}, {self.model.hidden_size})")
        embeds = torch.cat([it.embeds.to(self.device, self.dtype) for it in items])
        image_id = self.model.image_token_id
        return {"mm_positions": [i for i, t in enumerate(expanded) if t == image_id], "mm_embeds": embeds}

    # ------------------------------------------------------------------ stepping
    def has_unfinished(self) -> bool:
        return bool(self._ready) or self._ahead is not None or (
            self.model.has_lm and self.scheduler.has_work())

    @property
    def in_flight(self) -> bool:
        """A decode step is queued on the device; the next ``step()`` reads its tokens."""
        return self._ahead is not None

    def step(self) -> list[StepOutput]:
        """Schedule, run the model once, sample; one StepOutput per request that made progress.

        With overlapped decode the outputs of a decode step come from the next call (see the
        class docstring): callers loop ``while has_unfinished(): step()``."""
        outputs, self._ready = self._ready, []
        if not self.model.has_lm:
            return outputs
        prev = self._ahead
        if prev is not None:
            t0 = time.perf_counter()
            self._ahead = self._queue_next(prev)  # before reading prev: it overlaps prev's compute
            t2 = time.perf_counter()
            prev.wait()
            t3 = time.perf_counter()
            outputs.extend(self._read_ahead(prev))
            if self._ahead is not None:
                n = len(self._ahead.reqs)
                self.stats.add(n, n, t0, t0, t2, t3, time.perf_counter())
                return outputs
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        self.num_preemptions += len(sched.preempted)
        for req in sched.starved:
            outputs.append(self._finish(req, "length", []))
        if not sched.chunks:
            return outputs
        t1 = time.perf_counter()
        if self.overlap_decode and all(c.num_tokens == 1 and c.samples for c in sched.chunks):
            reqs = [c.req for c in sched.chunks]
            logits, _ = self.runner.execute(sched.chunks)
            self._ahead = self._sample_ahead(reqs, logits)
            t2 = time.perf_counter()
            self.stats.add(len(reqs), len(reqs), t0, t1, t2, t2, t2)
            return outputs
        logits, reqs = self.runner.execute(sched.chunks)
        for chunk in sched.chunks:
            chunk.req.num_computed = chunk.end
        t2 = time.perf_counter()
        if reqs:
            tokens = self.sampler(logits, [r.sampling for r in reqs], [r.generator for r in reqs])
            t3 = time.perf_counter()
            outputs.extend(self._on_token(r, t) for r, t in zip(reqs, tokens))
        else:
            t3 = t2
        self.stats.add(len(sched.chunks), sum(c.num_tokens for c in sched.chunks), t0, t1, t2, t3,
                       time.perf_counter())
        return outputs

    # ------------------------------------------------------------------ overlapped decode
    def _sample_ahead(self, reqs: list[Request], logits: torch.Tensor) -> _Ahead:
        """Queue sampling and the copy of the ids to the host; mark the fed tokens computed."""
        for r in reqs:
            r.num_computed += 1
        tokens = self.sampler.sample(logits, [r.sampling for r in reqs], [r.generator for r in reqs])
        buf = self._token_bufs[self._token_buf]
        if buf.numel() < len(reqs):  # imported requests may run past max_num_seqs
            buf = self._token_bufs[self._token_buf] = torch.empty(
                2 * len(reqs), dtype=torch.long, pin_memory=buf.is_pinned())
        host = buf[:len(reqs)]
        self._token_buf ^= 1
        done = None
        if tokens.is_cuda:
            host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host.copy_(tokens)
        return _Ahead(reqs, tokens, host, done)

    def _queue_next(self, prev: _Ahead) -> _Ahead | None:
        """Queue the decode step after ``prev`` (whose tokens are still on the device), or None
        when the next step must be scheduled from scratch: work to admit or prefill, a request
        outside ``prev``, no free block for a row."""
        sched = self.scheduler
        if sched.waiting and len(sched.running) < sched.max_num_seqs:
            return None
        if any(not prev.holds(r) for r in sched.running):
            return None
        rows, keep = [], []
        for i, r in enumerate(prev.reqs):
            # Still running, and prev's token is not its last (max_tokens is known ahead).
            if r.status is Status.RUNNING and not r.prefill_only and r.num_outputs + 1 < r.max_tokens:
                if not self.block_manager.grow(r.block_ids, r.num_computed + 1):
                    return None  # out of blocks: the scheduler preempts someone
                rows.append(r)
                keep.append(i)
        if not rows:
            return None
        ids = prev.tokens
        if len(keep) < len(prev.reqs):
            ids = prev.tokens.index_select(0, small_tensor(keep, torch.long, self.device))
        logits = self.runner.execute_ahead(rows, ids)
        self.num_overlapped += 1
        return self._sample_ahead(rows, logits)

    def _read_ahead(self, step: _Ahead) -> list[StepOutput]:
        """``step``'s ids (waited for) as outputs; rows gone meanwhile are skipped."""
        outputs = [self._on_token(r, t) for r, t in zip(step.reqs, step.host.tolist())
                   if r.status is Status.RUNNING]
        for blocks in step.deferred:
            self.block_manager.free(blocks)
        return outputs

    def _free_blocks(self, req: Request) -> None:
        """Free ``req``'s blocks now, or once the queued step that may still write them is read."""
        if req.block_ids:
            if self._ahead is not None and self._ahead.holds(req):
                self._ahead.deferred.append(req.block_ids)
            else:
                self.block_manager.free(req.block_ids)
        req.block_ids = []

    def _on_token(self, req: Request, token: int) -> StepOutput:
        reason = req.append_token(token)
        if reason is not None:
            return self._finish(req, reason, [token])
        if req.prefill_only:
            return self._pin(req, token)
        return StepOutput(req.request_id, [token], False, None, req.prompt_len)

    def _finish(self, req: Request, reason: str, tokens: list[int]) -> StepOutput:
        self.scheduler.remove(req)
        self._free_blocks(req)
        req.status = Status.FINISHED
        self.requests.pop(req.request_id, None)
        extras = {"rope_delta": req.rope_delta} if req.prefill_only else {}
        return StepOutput(req.request_id, tokens, True, reason, req.prompt_len, extras=extras)

    def _pin(self, req: Request, token: int) -> StepOutput:
        """A prefill-only request is done: keep its blocks for the decode side to pull."""
        self.scheduler.remove(req)
        req.status = Status.PINNED
        self.requests.pop(req.request_id)
        self.pinned[req.request_id] = req
        kv = ExportedKV(block_ids=list(req.block_ids), num_tokens=req.prompt_len)
        return StepOutput(req.request_id, [token], True, None, req.prompt_len, kv=kv,
                          extras={"rope_delta": req.rope_delta})

    # ------------------------------------------------------------------ disaggregation
    def release(self, request_id: str) -> bool:
        """Unpin a prefill-only request's blocks (after the decode side pulled them)."""
        req = self.pinned.pop(request_id, None)
        if req is None:
            return False
        self.block_manager.free(req.block_ids)
        req.block_ids = []
        return True

    def can_reserve(self, num_tokens: int) -> bool:
        """Whether reserve_import would get its blocks now."""
        return self.block_manager.blocks_for(num_tokens) <= self.block_manager.num_free

    def reserve_import(self, request_id: str, num_tokens: int) -> list[int]:
        """Blocks to copy a remote prefill's KV (``num_tokens`` tokens) into, in token order.

        Raises OutOfBlocks when too few are free right now (retry later), ValueError when the
        prompt could never fit."""
        self._check_new(request_id)
        if not 0 < num_tokens < self.max_model_len:
            raise ValueError(f"cannot import {num_tokens} tokens: the context holds {self.max_model_len}")
        blocks = self.block_manager.allocate(self.block_manager.blocks_for(num_tokens))
        self.reserved[request_id] = blocks
        return blocks

    def add_imported_request(self, request_id: str, prompt_tokens: int, first_token: int,
                             sampling: SamplingParams = SamplingParams(), extras: dict | None = None) -> None:
        """Continue decoding a request whose prompt KV was copied into its reserved blocks.

        Outputs after this are the tokens after ``first_token`` (which the caller already has)."""
        blocks = self.reserved.pop(request_id, None)
        if blocks is None:
            raise ValueError(f"request {request_id!r} has no reserved blocks: call reserve_import first")
        if self.block_manager.blocks_for(prompt_tokens) != len(blocks):
            self.block_manager.free(blocks)
            raise ValueError(f"{prompt_tokens} prompt tokens do not match the {len(blocks)} reserved blocks")
        req = Request(request_id, [UNKNOWN_TOKEN] * prompt_tokens, sampling,
                      self._max_tokens(sampling, prompt_tokens),
                      rope_delta=int((extras or {}).get("rope_delta", 0)), eos_ids=self.eos_ids)
        req.block_ids, req.num_computed, req.recomputable = blocks, prompt_tokens, False
        req.generator = make_generator(sampling.seed, self.device)
        req.status = Status.RUNNING
        reason = req.append_token(first_token)
        if reason is not None:  # the first token already ends it: nothing to decode
            self.block_manager.free(blocks)
            self._ready.append(StepOutput(request_id, [], True, reason, prompt_tokens))
            return
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Stop a request at any stage and free everything it holds; False if unknown."""
        if self.release(request_id):
            return True
        blocks = self.reserved.pop(request_id, None)
        if blocks is not None:
            self.block_manager.free(blocks)
            return True
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        self._free_blocks(req)
        req.status = Status.FINISHED
        return True


__all__ = ["LLMEngine", "OutOfBlocks"]
