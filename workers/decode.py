"""Decode worker: a prefilled request's KV handle in, a stream of tokens out.

Handler steps (``handle_decode``):
  1. validate the DecodeRequest (wrong model or KV layout -> 4xx);
  2. engine.reserve_import: blocks of our own for the prompt's KV (waits a little while the cache
     is full, then 503);
  3. pull the owner's KV blocks over UCX straight into those blocks, then release the owner's
     handle (its blocks are unpinned there);
  4. engine.add_imported_request and stream TokenDeltas: the first carries the prefill's first
     token and prompt_tokens; a cancel aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from common.messaging import RemoteError, StreamContext
from common.protocol import DecodeRequest, Role
from common.timing import Marks
from workers.base import Worker, client_error
from workers.engine_loop import stream_deltas

_RESERVE_RETRY_S = 0.05


class DecodeWorker(Worker):
    role = Role.DECODE
    stream_endpoints = ("decode",)
    uses_transfer = True

    async def handle_decode(self, data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        marks = Marks("?", "decode")
        with self.inflight():
            req: DecodeRequest = self.parse(data, DecodeRequest, marks)
            await self._import_kv(req, marks)
            assert self.loop_ is not None
            try:
                _, stream = await self.loop_.add_request(req.request_id, _add_imported, req)
            except ValueError as exc:
                self.loop_.abort(req.request_id)
                raise client_error(400, str(exc)) from exc
            async for chunk in stream_deltas(self.loop_, req.request_id, stream, req.prompt_tokens,
                                             first=(req.first_token,), marks=marks):
                yield chunk

    async def _import_kv(self, req: DecodeRequest, marks: Marks) -> None:
        if req.kv.layout != self.engine.kv_layout:
            raise client_error(400, f"KV layout {req.kv.layout} of the prefill worker does not "
                                    f"match this decode worker's {self.engine.kv_layout}; run "
                                    "both with the same model, dtype and block size")
        blocks = await self._reserve(req)
        if len(blocks) != len(req.kv.block_ids):
            self.loop_.abort(req.request_id)
            raise client_error(400, f"{len(req.kv.block_ids)} KV blocks offered for "
                                    f"{req.kv.num_tokens} tokens; expected {len(blocks)}")
        marks.mark("reserve")
        await self._pull(req, blocks)
        marks.mark("kv_pull")
        marks.note("kv_mb", len(blocks) * self.engine.kv_cache[0].nbytes / 2**20)

    async def _reserve(self, req: DecodeRequest) -> list[int]:
        from workers.engine.block_manager import OutOfBlocks

        self._check_capacity(req)
        deadline = asyncio.get_running_loop().time() + self.cfg.transfer_timeout_s
        while True:
            try:
                return await self.loop_.call(_reserve, req.request_id, req.kv.num_tokens)
            except ValueError as exc:
                raise client_error(400, str(exc)) from exc
            except OutOfBlocks as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise RemoteError(503, "unavailable", "the decode KV cache is full; retry "
                                      "later or add decode workers") from exc
                await asyncio.sleep(_RESERVE_RETRY_S)

    def _check_capacity(self, req: DecodeRequest) -> None:
        """A prompt the prefill side took but this worker can never hold is the deployment's
        limit, not the client's fault: 503 naming the fix (engine.max_model_len never changes)."""
        limit = int(self.engine.max_model_len)
        if req.kv.num_tokens >= limit:
            raise RemoteError(503, "unavailable", f"the decode worker {self.cfg.instance_id} holds at "
                              f"most {limit - 1} prompt tokens, this prompt has {req.kv.num_tokens}; "
                              "start decode workers with a larger --num-kv-blocks / --kv-cache-mb "
                              "/ --max-model-len")

    async def _pull(self, req: DecodeRequest, blocks: list[int]) -> None:
        from common.transfer import TransferError

        dst = [self.engine.kv_cache[b] for b in blocks]
        pull = asyncio.ensure_future(self.agent.pull(req.kv.owner.ucx_address, req.kv.key, dst))
        try:
            await asyncio.shield(pull)
        except (TransferError, ValueError) as exc:
            self.loop_.abort(req.request_id)
            raise RemoteError(503, "unavailable", f"pulling the KV of {req.request_id} from "
                              f"{req.kv.owner.instance_id} failed: {exc}") from exc
        except asyncio.CancelledError:
            # UCX may still be writing into our blocks: free them only once the pull has ended
            # (done, failed or timed out), or another request could get blocks being written.
            self._spawn(self._abort_after(pull, req.request_id))
            raise
        self._spawn(self._release_quietly(req.kv.owner.ucx_address, req.kv.key))

    async def _abort_after(self, pull: asyncio.Future, request_id: str) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await pull
        self.loop_.abort(request_id)


def _reserve(engine: Any, request_id: str, num_tokens: int) -> list[int]:
    return engine.reserve_import(request_id, num_tokens)


def _add_imported(engine: Any, req: DecodeRequest) -> None:
    engine.add_imported_request(req.request_id, req.prompt_tokens, req.first_token, req.sampling,
                                dict(req.extras))
