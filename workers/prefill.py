"""Prefill worker: prompt (+ images) in, first token + a handle on the prompt's KV blocks out.

Handler steps (``handle_prefill``):
  1. validate the PrefillRequest (wrong model -> 404);
  2. every image: an EmbeddingHandle is pulled over UCX into our own tensor and released at its
     owner; a media reference is fetched and encoded in-process (EP/D);
  3. engine.add_request(prefill_only=True): expand placeholders, prefill, sample the first token
     (a prompt too long for the context -> 400);
  4. the request's KV blocks stay pinned: register them with the TransferAgent (released by the
     decode side, by a CancelRequest, or after the handle TTL -> engine.release);
  5. answer PrefillResponse(first_token, prompt_tokens, KVHandle, extras with rope_delta). If the
     first token already finished the request (EOS, max_tokens 1) the engine freed it: kv=None.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from common.messaging import RemoteError
from common.protocol import (KVHandle, PrefillRequest, PrefillResponse, Role, TransferAddress,
                             encode)
from common.timing import Marks
from workers.base import Worker
from workers.engine_loop import RequestAborted

log = logging.getLogger("triad.worker")


class PrefillWorker(Worker):
    role = Role.PREFILL
    unary_endpoints = ("prefill",)
    uses_transfer = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._exports: dict[str, str] = {}  # request_id -> transfer key of its pinned KV

    async def handle_prefill(self, data: bytes) -> bytes:
        marks = Marks("?", "prefill")
        with self.inflight():
            req: PrefillRequest = self.parse(data, PrefillRequest, marks)
            items = await self.image_items(req.images, marks)
            out = await self._prefill(req, items, marks)
            reply = encode(self._respond(req, out))
            marks.mark("export")
            marks.log()
            return reply

    async def _prefill(self, req: PrefillRequest, items: list[Any], marks: Marks) -> Any:
        _, stream = await self.start_request(req, items, prefill_only=True)
        try:
            async for out in stream:
                if out.finished:
                    stream.mark_first_output(marks)
                    return out
        except RequestAborted as exc:
            raise RemoteError(499, "cancelled", f"request {req.request_id} was cancelled") from exc
        except asyncio.CancelledError:
            self.loop_.abort(req.request_id)
            raise
        raise RemoteError(500, "internal_error", "the engine ended the prefill without output")

    def _respond(self, req: PrefillRequest, out: Any) -> PrefillResponse:
        common = dict(request_id=req.request_id, first_token=int(out.new_token_ids[0]),
                      prompt_tokens=int(out.prompt_tokens), extras=dict(out.extras))
        if out.kv is None:
            return PrefillResponse(kv=None, finish_reason=out.finish_reason, **common)
        return PrefillResponse(kv=self._export(req.request_id, out.kv), **common)

    def _export(self, request_id: str, kv: Any) -> KVHandle:
        """Register the pinned blocks (one contiguous region each: block-major cache)."""
        key = f"kv-{request_id}-{uuid.uuid4().hex[:8]}"
        regions = [self.engine.kv_cache[b] for b in kv.block_ids]
        self._exports[request_id] = key
        remote = self.agent.register(key, regions, ttl_s=self.cfg.handle_ttl_s or None,
                                     on_release=lambda _key: self._on_release(request_id))
        return KVHandle(
            owner=TransferAddress(instance_id=self.cfg.instance_id, ucx_address=self.agent.address),
            key=key, block_ids=tuple(kv.block_ids), num_tokens=kv.num_tokens,
            layout=self.engine.kv_layout, remote=remote or {})

    def _on_release(self, request_id: str) -> None:
        """Called by the TransferAgent (maybe from another thread): unpin on the engine thread."""
        if self.loop_ is not None:
            self.loop_.submit_nowait(_release, request_id)
        self._exports.pop(request_id, None)  # dict.pop is atomic under the GIL

    def on_cancel(self, request_id: str) -> None:
        key = self._exports.get(request_id)
        if key is not None:
            self.agent.unregister(key)  # calls _on_release
        super().on_cancel(request_id)
        if self.loop_ is not None:  # queued after the abort: reports the count it left
            self.loop_.submit_nowait(_report_free, request_id, "cancelled")

    def busy(self) -> bool:
        return super().busy() or bool(self._exports)


def _release(engine: Any, request_id: str) -> None:
    """Engine thread: unpin a request's exported KV blocks."""
    engine.release(request_id)
    _report_free(engine, request_id, "KV handle released")


def _report_free(engine: Any, request_id: str, why: str) -> None:
    """Engine thread: log the free block count, so a leak of pinned KV blocks is visible."""
    bm = engine.block_manager
    log.info("request %s: %s; %d of %d KV blocks free", request_id, why, bm.num_free, bm.num_blocks)
