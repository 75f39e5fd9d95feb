"""Aggregated worker: one process encodes, prefills and decodes.

Handler steps (``handle_generate``):
  1. validate the GenerateRequest (wrong model -> 404);
  2. every image: media reference -> fetch/decode -> cached or fresh vision-tower embedding;
  3. engine.add_request (a prompt too long for the context -> 400);
  4. stream TokenDeltas as the engine thread produces tokens (the first carries prompt_tokens);
     a cancel aborts the request in the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from common.messaging import StreamContext
from common.protocol import GenerateRequest, Role
from common.timing import Marks
from workers.base import Worker
from workers.engine_loop import stream_deltas


class AggWorker(Worker):
    role = Role.AGG
    stream_endpoints = ("generate",)
    uses_transfer = False

    async def handle_generate(self, data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        marks = Marks("?", "agg")
        with self.inflight():
            req: GenerateRequest = self.parse(data, GenerateRequest, marks)
            items = await self.image_items(req.images, marks)
            prompt_len, stream = await self.start_request(req, items, prefill_only=False)
            async for chunk in stream_deltas(self.loop_, req.request_id, stream, prompt_len,
                                             marks=marks):
                yield chunk
