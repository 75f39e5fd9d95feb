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

import uuid

from common.protocol import (EmbeddingHandle, EncodeRequest, EncodeResponse, Role,
                             TransferAddress, encode)
from common.timing import Marks
from workers.base import Worker


class EncodeWorker(Worker):
    role = Role.ENCODE
    unary_endpoints = ("encode",)
    uses_transfer = True
    publishes_card = False  # the LM side publishes what the frontend needs

    async def handle_encode(self, data: bytes) -> bytes:
        marks = Marks("?", "encode")
        with self.inflight():
            req: EncodeRequest = self.parse(data, EncodeRequest, marks)
            item = await self.media_item(req.media, marks)
            marks.mark("media")
            embeds = item.embeds.contiguous()
            if embeds.is_cuda:  # UCX reads it outside the stream: the tower must have finished
                await self.loop_.call(_wait_for_device)
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


def _wait_for_device(engine) -> None:
    """On the engine thread: wait for the work queued there (the vision tower) to finish."""
    import torch

    torch.cuda.current_stream(engine.device).synchronize()
