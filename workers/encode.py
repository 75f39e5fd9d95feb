"""Encode worker: media reference in, embedding handle out (the tensor stays here, on UCX).

Handler steps (``handle_encode``):
  1. validate the EncodeRequest (wrong model -> 404);
  2. fetch / read / decode the media through common.media (client errors -> their 4xx);
  3. images: embedding cache by content hash, else the vision tower (engine thread);
     embedding files: checked against the hidden size and used as they are;
  4. register the tensor with the TransferAgent under a fresh key (freed on release or TTL);
  5. answer EncodeResponse with the EmbeddingHandle.
"""

from __future__ import annotations

import asyncio
import uuid

from common.protocol import (EmbeddingHandle, EncodeRequest, EncodeResponse, Role,
                             TransferAddress, encode)
from common.timing import Marks
from workers.base import Worker

_POLL_S = 0.0002  # how often the loop checks that a tower has finished, while one is pending


class _DeviceWaiter:
    """Waits for work queued on the device's stream without blocking the loop or the engine
    thread: ``await done(device)`` records an event and one poller task checks the pending
    events (in stream order, so the oldest first) every ``_POLL_S`` while any is pending.

    Blocking the engine thread instead (one sync per image) serialised the encoder: at 128
    concurrent images it doubled the encode time (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self._pending: list[tuple[object, asyncio.Future]] = []
        self._poller: asyncio.Task | None = None

    async def done(self, device) -> None:
        """The event is recorded after this image's tower: the engine thread had queued it
        (and its result reached us) before, on the same stream."""
        import torch

        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((event, fut))
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        await fut

    async def _poll(self) -> None:
        while self._pending:
            while self._pending and self._pending[0][0].query():
                _, fut = self._pending.pop(0)
                if not fut.done():
                    fut.set_result(None)
            if self._pending:
                await asyncio.sleep(_POLL_S)


class EncodeWorker(Worker):
    role = Role.ENCODE
    unary_endpoints = ("encode",)
    uses_transfer = True
    publishes_card = False  # the LM side publishes what the frontend needs
    _device = _DeviceWaiter()  # one per process (its futures live on the worker's loop)

    async def handle_encode(self, data: bytes) -> bytes:
        marks = Marks("?", "encode")
        with self.inflight():
            req: EncodeRequest = self.parse(data, EncodeRequest, marks)
            item = await self.media_item(req.media, marks)
            marks.mark("media")
            embeds = item.embeds.contiguous()
            if embeds.is_cuda:  # UCX reads it outside the stream: the tower must have finished
                await self._device.done(embeds.device)
            key = f"emb-{req.request_id}-{uuid.uuid4().hex[:8]}"
            remote = self.agent.register(key, [embeds], ttl_s=self.cfg.handle_ttl_s or None)
            handle = EmbeddingHandle(
                owner=TransferAddress(instance_id=self.cfg.instance_id, ucx_address=self.agent.address),
                key=key, shape=tuple(embeds.shape), dtype=str(embeds.dtype).removeprefix("torch."),
                num_tokens=item.num_tokens, extras=item.extras, content_hash=item.content_hash,
                remote=remote or {})
            reply = encode(EncodeResponse(request_id=req.request_id, handle=handle))
            marks.mark("register")
            marks.log()
            return reply


