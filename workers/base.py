"""What every worker role shares: configuration, lifecycle, endpoints, media -> embeddings.

Lifecycle (``Worker.run``):
  1. build the engine (only the parts the role needs) and start its thread (engine_loop.py);
  2. connect Discovery (etcd) and Messenger (NATS); start a TransferAgent (UCX) if the role moves
     tensors;
  3. serve the role's endpoints on its instance subject and on its role subject (queue group),
     plus ``cancel`` on the instance subject;
  4. register the InstanceRecord (with the UCX address) under a lease, and the ModelCard with it;
  5. log readiness; on SIGTERM / SIGINT drain: deregister first (no new routing), wait for
     in-flight work and pinned handles (up to ``drain_timeout_s``), then close everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import ClusterConfig
from common.media import LoadedEmbedding, MediaConfig, MediaError, load_media
from common.messaging import Messenger, RemoteError, Service
from common.protocol import (CancelRequest, EmbeddingHandle, InstanceRecord, MediaRef, ModelCard,
                             ProtocolError, Role, decode, encode, instance_prefix,
                             instance_subject, role_subject)
from common.timing import Marks
from workers.embedding_cache import CachedEmbedding, EmbeddingCache
from workers.engine_loop import EngineLoop, add_engine_request

log = logging.getLogger("triad.worker")

ROLE_PARTS = {Role.ENCODE: ("vision",), Role.PREFILL: ("vision", "lm"), Role.DECODE: ("lm",),
              Role.AGG: ("vision", "lm")}
_GRID_KEYS = ("grid_thw", "image_grid_thw")  # aux keys of an embedding file that give the grid


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process: its role, model and engine sizing, handle lifetimes, drain time."""

    role: Role
    model: str
    served_model_name: str = ""  # default: the model directory's name
    device: str = "cpu"
    dtype: str = "float32"
    kv_cache_mb: int | None = None
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    load_format: str = "auto"
    attention_backend: str = "auto"  # "auto": "triton" on a CUDA device, else "reference"
    cuda_graphs: bool = True  # decode CUDA graphs (CUDA with a graph-safe backend only)
    compile_lm: bool = True  # torch.compile the LM decoder layers (CUDA only)
    compile_vision: bool = True  # torch.compile the vision blocks (CUDA only)
    vision_cuda_graphs: bool = True  # the vision tower through CUDA graphs per image size (CUDA only)
    overlap_decode: bool = True  # queue a decode step before reading the last one's tokens (CUDA only)
    embedding_cache_mb: float = 256.0
    handle_ttl_s: float = 60.0  # an unreleased embedding / KV handle is freed after this
    transfer_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0
    # Requests one worker takes at once (running, queued in the engine, or loading media); more get
    # a 503 "overloaded" at once instead of piling up. 0: 4 x max_num_seqs.
    max_inflight: int = 0
    # Engine steps between two deltas of one stream: 0 picks it from the load (1 up to 32 running
    # requests, at most 4), N >= 1 fixes it (1: a delta every step). See workers/engine_loop.py.
    stream_interval: int = 0
    instance_id: str = ""  # default: <role>-<host>-<pid>-<random>

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        if not Path(self.model).is_dir():
            raise ValueError(f"--model {self.model!r} is not a directory; give a checkpoint directory")
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", Path(self.model).resolve().name)
        if not self.instance_id:
            rid = f"{self.role.value}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            object.__setattr__(self, "instance_id", rid)
        if self.attention_backend == "auto":
            object.__setattr__(self, "attention_backend", default_attention_backend(self.device))
        for name in ("embedding_cache_mb", "handle_ttl_s", "transfer_timeout_s", "drain_timeout_s",
                     "max_inflight", "stream_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.max_inflight:
            object.__setattr__(self, "max_inflight", 4 * self.max_num_seqs)

    def engine_config(self) -> Any:
        from workers.engine.config import EngineConfig

        return EngineConfig(
            model=self.model, device=self.device, dtype=self.dtype, block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks, kv_cache_mb=self.kv_cache_mb,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, load_format=self.load_format,
            parts=ROLE_PARTS[self.role], attention_backend=self.attention_backend,
            cuda_graphs=self.cuda_graphs, compile_lm=self.compile_lm, compile_vision=self.compile_vision,
            vision_cuda_graphs=self.vision_cuda_graphs,
            overlap_decode=None if self.overlap_decode else False)


def default_attention_backend(device: str) -> str:
    """The fast Triton kernels on CUDA (graph-safe, needed for decode CUDA graphs); the reference
    backend everywhere else."""
    return "triton" if device.startswith("cuda") else "reference"


def client_error(code: int, message: str, param: str | None = None) -> RemoteError:
    """An error the caller caused (4xx), in the shape the frontend passes to the client."""
    kind = {404: "not_found_error", 403: "permission_error"}.get(code, "invalid_request_error")
    return RemoteError(code, kind, message)


class Worker:
    """Base of the four roles; subclasses set the class attributes and write the handlers."""

    role: Role
    unary_endpoints: tuple[str, ...] = ()
    stream_endpoints: tuple[str, ...] = ()
    uses_transfer = False
    publishes_card = True

    def __init__(self, cfg: WorkerConfig, cluster: ClusterConfig, media: MediaConfig) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.media_cfg = media
        self.engine: Any = None
        self.loop_: EngineLoop | None = None
        self.agent: Any = None
        self.disc: Any = None
        self.messenger: Messenger | None = None
        self.registration: Any = None
        self.cache = EmbeddingCache(int(cfg.embedding_cache_mb * 1024 * 1024))
        self.prefix = instance_prefix(cluster.namespace, cfg.instance_id)
        self._services: list[Service] = []
        self._inflight = 0
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain; the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.start()
            await self._stop.wait()
            log.info("stop requested: draining")
        finally:
            await self.shutdown()
        return 0

    async def start(self) -> None:
        await self._build_engine()
        self.disc, self.messenger = await self._connect()
        if self.uses_transfer:
            await self._start_transfer()
        await self._serve()
        await self._register()
        log.info("READY role=%s instance=%s model=%s subject=%s", self.role.value,
                 self.cfg.instance_id, self.cfg.served_model_name, self.prefix)

    async def _build_engine(self) -> None:
        from workers.engine.engine import LLMEngine

        engine_cfg = self.cfg.engine_config()
        log.info("loading %s (parts %s) on %s", self.cfg.model, engine_cfg.parts, self.cfg.device)
        self.engine = await asyncio.to_thread(LLMEngine, engine_cfg)
        self.loop_ = EngineLoop(self.engine, name=f"engine-{self.role.value}",
                                stream_interval=self.cfg.stream_interval)
        self.loop_.start()

    async def _connect(self) -> tuple[Any, Messenger]:
        from common.discovery import Discovery

        disc = await Discovery.connect(self.cluster.etcd_endpoints, self.cluster.namespace)
        messenger = await Messenger.connect(self.cluster.nats_server, name=self.cfg.instance_id)
        return disc, messenger

    async def _start_transfer(self) -> None:
        from common.transfer import TransferAgent, TransferConfig

        self.agent = TransferAgent(TransferConfig(handle_ttl_s=self.cfg.handle_ttl_s or 60.0,
                                                  op_timeout_s=self.cfg.transfer_timeout_s))
        await self.agent.start()

    async def _serve(self) -> None:
        assert self.messenger is not None
        m, ns, role, model = self.messenger, self.cluster.namespace, self.role, self.cfg.served_model_name
        for ep in self.unary_endpoints + self.stream_endpoints:
            handler = getattr(self, f"handle_{ep}")
            serve = m.serve_unary if ep in self.unary_endpoints else m.serve_stream
            self._services.append(await serve(instance_subject(self.prefix, ep), handler))
            self._services.append(await serve(role_subject(ns, role, model, ep), handler,
                                              queue=role.value))
        self._services.append(await m.serve_unary(instance_subject(self.prefix, "cancel"),
                                                  self.handle_cancel))

    def instance_record(self) -> InstanceRecord:
        return InstanceRecord(
            instance_id=self.cfg.instance_id, role=self.role, model=self.cfg.served_model_name,
            subject=self.prefix, ucx_address=self.agent.address if self.agent is not None else "",
            host=self.cluster.advertise_host, capacity=self.cfg.max_num_seqs, pid=os.getpid())

    def model_card(self) -> ModelCard:
        eng = self.engine
        return ModelCard(
            name=self.cfg.served_model_name, path=str(Path(self.cfg.model).resolve()),
            context_length=int(eng.max_model_len), image_token_id=int(eng.model.image_token_id),
            eos_token_ids=tuple(sorted(int(t) for t in eng.eos_ids)))

    async def _register(self) -> None:
        self.registration = await self.disc.register(self.instance_record(),
                                                     ttl=self.cluster.lease_ttl_s)
        if self.publishes_card:
            await self.disc.put_model_card(self.model_card(), lease_of=self.registration)
            self._spawn(self._keep_card())

    async def _keep_card(self) -> None:
        """Every worker of a model writes the same card key under its own lease; when the lease
        that wrote it last expires (that worker died) the key goes: write it back."""
        card = self.model_card()
        while True:
            await asyncio.sleep(self.cluster.lease_ttl_s / 3)
            with contextlib.suppress(Exception):
                if await self.disc.get_model_card(card.name) is None:
                    await self.disc.put_model_card(card, lease_of=self.registration)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Deregister, wait for in-flight work (bounded), close everything. Idempotent."""
        for task in list(self._tasks):
            task.cancel()
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.deregister()
            self.registration = None
        await self._wait_idle(self.cfg.drain_timeout_s)
        for svc in self._services:
            with contextlib.suppress(Exception):
                await svc.stop()
        self._services.clear()
        await self._close_clients()
        if self.loop_ is not None:
            await asyncio.to_thread(self.loop_.stop)
            self.loop_ = None
        log.info("stopped")

    async def _wait_idle(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.busy() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.busy():
            log.warning("drain timed out with %d requests in flight", self._inflight)

    def busy(self) -> bool:
        """Work that must finish before exit (subclasses add pinned handles)."""
        return self._inflight > 0

    async def _close_clients(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.close()
        if self.messenger is not None:
            with contextlib.suppress(Exception):
                await self.messenger.close()
        if self.disc is not None:
            with contextlib.suppress(Exception):
                await self.disc.close()

    # ------------------------------------------------------------------ request helpers

    @contextlib.contextmanager
    def inflight(self) -> Iterator[None]:
        """Count one request in flight, or refuse it (503 overloaded) when the worker is full:
        bounded admission instead of unbounded work (and request bytes) piling up."""
        if self._inflight >= self.cfg.max_inflight:
            raise RemoteError(503, "overloaded", f"worker {self.cfg.instance_id} is overloaded: "
                              f"{self._inflight} requests in flight (its --max-inflight limit); "
                              "retry shortly, or add workers")
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

    def parse(self, data: bytes, expect: type, marks: Marks | None = None) -> Any:
        """Decode and check the request: a malformed message or another model is the caller's.
        ``marks`` (the request's timing) gets its id and a ``parse`` stage."""
        try:
            msg = decode(data, expect)
        except ProtocolError as exc:
            raise client_error(400, f"malformed {expect.__name__}: {exc}") from exc
        if getattr(msg, "model", self.cfg.served_model_name) != self.cfg.served_model_name:
            raise client_error(404, f"this worker serves {self.cfg.served_model_name!r}, "
                                    f"not {msg.model!r}")
        # One line per accepted request: which instance served which hop (operators, e2e tests).
        images = getattr(msg, "images", None)
        detail = "" if images is None else f" with {len(images)} image(s)"
        log.info("request %s: %s%s", getattr(msg, "request_id", "?"), expect.__name__, detail)
        if marks is not None:
            marks.request_id = getattr(msg, "request_id", "?")
            marks.mark("parse")
        return msg

    async def handle_cancel(self, data: bytes) -> bytes:
        """Abort a request at whatever stage this worker holds it."""
        msg = decode(data, CancelRequest)
        self.on_cancel(msg.request_id)
        from common.protocol import Ack
        return encode(Ack())

    def on_cancel(self, request_id: str) -> None:
        if self.loop_ is not None:
            self.loop_.abort(request_id)

    # ------------------------------------------------------------------ media -> embeddings

    async def media_item(self, ref: MediaRef, marks: Marks | None = None) -> Any:
        """Load one media reference and turn it into an MMItem (vision tower, or the file as is).

        Images are looked up in the embedding cache by the sha256 of their bytes first.
        ``marks`` gets the fetch/decode and vision-tower times as notes."""
        from workers.engine.request import MMItem

        started = time.perf_counter()
        try:
            loaded = await load_media(ref, self.media_cfg, self.engine.model.hidden_size)
        except MediaError as exc:
            raise client_error(exc.code, exc.message) from exc
        fetched = time.perf_counter()
        if marks is not None:
            marks.note("img_fetch", (fetched - started) * 1e3)
        if isinstance(loaded, LoadedEmbedding):
            return MMItem(embeds=loaded.embeds.to(self.engine.dtype), num_tokens=loaded.embeds.shape[0],
                          extras=_grid_extras(loaded, spatial_merge_size(self.engine.model)),
                          content_hash=loaded.content_hash)
        hit = self.cache.get(loaded.content_hash)
        if hit is None:
            assert self.loop_ is not None
            item = (await self.loop_.call(lambda e: e.encode_images([loaded.image],
                                                                    [loaded.content_hash])))[0]
            hit = CachedEmbedding(item.embeds, item.num_tokens, dict(item.extras))
            self.cache.put(loaded.content_hash, hit)
            if marks is not None:
                marks.note("img_vision", (time.perf_counter() - fetched) * 1e3)
        return MMItem(embeds=hit.embeds, num_tokens=hit.num_tokens, extras=dict(hit.extras),
                      content_hash=loaded.content_hash)

    async def pull_embedding(self, handle: EmbeddingHandle, marks: Marks | None = None) -> Any:
        """Pull an encoder's embedding into a tensor of our own, then tell the owner to free it."""
        from common.transfer import TransferError
        from common.transfer_plan import transfer_empty
        from workers.engine.request import MMItem

        if self.agent is None:
            raise client_error(400, "this worker takes media references, not embedding handles")
        dtype = getattr(torch, handle.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise client_error(400, f"embedding handle has unknown dtype {handle.dtype!r}")
        # Pulled in place, into memory no queued kernel uses (see common.transfer_plan).
        dst = transfer_empty(tuple(handle.shape), dtype, self.engine.device)
        started = time.perf_counter()
        try:
            await self.agent.pull(handle.owner.ucx_address, handle.key, [dst])
        except (TransferError, ValueError) as exc:
            raise RemoteError(503, "unavailable", f"pulling embedding {handle.key} from "
                              f"{handle.owner.instance_id} failed: {exc}") from exc
        if dst.is_cuda:  # the engine reads it on its stream: free it only after that work
            dst.record_stream(torch.cuda.current_stream(dst.device))
        if marks is not None:
            marks.note("emb_pull", (time.perf_counter() - started) * 1e3)
            marks.note("emb_mb", dst.numel() * dst.element_size() / 2**20)
        self._spawn(self._release_quietly(handle.owner.ucx_address, handle.key))
        return MMItem(embeds=dst.to(self.engine.device, self.engine.dtype),
                      num_tokens=handle.num_tokens, extras=dict(handle.extras),
                      content_hash=handle.content_hash)

    async def _release_quietly(self, owner_address: str, key: str) -> None:
        try:
            await self.agent.release(owner_address, key)
        except Exception as exc:  # noqa: BLE001 (the owner's TTL frees it anyway)
            log.warning("release of %s failed (%s); the owner's TTL will free it", key, exc)

    async def image_items(self, images: tuple[Any, ...], marks: Marks | None = None) -> list[Any]:
        """Every ImageInput of a request as an MMItem, fetched/pulled concurrently, in order.
        ``marks`` gets a ``media`` stage (and per-item notes)."""
        async def one(inp: Any) -> Any:
            if inp.handle is not None:
                return await self.pull_embedding(inp.handle, marks)
            if inp.media is not None:
                return await self.media_item(inp.media, marks)
            raise client_error(400, "an image input has neither a handle nor a media reference")
        items = list(await asyncio.gather(*(one(i) for i in images)))
        if marks is not None:
            marks.mark("media")
        return items

    async def start_request(self, req: Any, items: list[Any], prefill_only: bool) -> tuple[int, Any]:
        """Queue a prefill/generate request on the engine: (prompt length, its output stream).
        A prompt the engine refuses (too long, image count mismatch) is the client's 400."""
        assert self.loop_ is not None
        try:
            return await self.loop_.add_request(req.request_id, add_engine_request, req.request_id,
                                                req.token_ids, items, req.sampling, prefill_only)
        except ValueError as exc:
            raise client_error(400, str(exc)) from exc


def _grid_extras(loaded: LoadedEmbedding, merge: int) -> dict[str, Any]:
    """The patch grid of an embedding file: its aux ``grid_thw`` when present (checked against
    the row count), else a grid that makes the n rows one flat run: (1, merge, n * merge)."""
    n = int(loaded.embeds.shape[0])
    for key in _GRID_KEYS:
        grid = loaded.aux.get(key)
        if grid is None:
            continue
        values = grid.flatten().tolist() if isinstance(grid, torch.Tensor) else list(grid)
        if not (len(values) == 3 and all(isinstance(v, int) and v > 0 for v in values)):
            raise client_error(400, f"embedding file key {key!r} must be three positive ints [t, h, w]")
        t, h, w = values
        if t * h * w != n * merge * merge:
            raise client_error(400, f"embedding file {key}={values} gives {t * h * w // merge ** 2} "
                                    f"tokens but mm_embeddings has {n} rows; fix one of them")
        return {"grid_thw": [t, h, w]}
    return {"grid_thw": [1, merge, n * merge]}


def spatial_merge_size(model: Any) -> int:
    vision = getattr(model.hf_config, "vision_config", None)
    return int(getattr(vision, "spatial_merge_size", 1) or 1)
