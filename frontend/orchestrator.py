"""Drive one request through the workers (DESIGN section 2, steps 3-5 and 7, frontend side).

``Orchestrator.generate`` yields ``TokenEvent``s whatever the topology:

E/P/D (encode + prefill + decode instances registered for the model):
  1. one EncodeRequest per image, fanned out over encode instances concurrently -> EmbeddingHandles
  2. PrefillRequest with ImageInput(handle=...) -> PrefillResponse (first token, KVHandle)
  3. DecodeRequest -> stream of TokenDelta
EP/D (prefill + decode, no encode): step 1 is skipped; images go as ImageInput(media=...).
Agg (agg instances only): one GenerateRequest -> stream of TokenDelta.
Text-only requests skip step 1 in every topology.

Every hop goes to one instance's own subject: the least-loaded live one in the discovery snapshot.
An instance that vanished before accepting (NoResponders) is skipped and another one tried.
Closing the generator early (client gone, stop string) cancels everywhere: the open decode/agg
stream sends its cancel on exit, and the prefill instance gets a CancelRequest while it still holds
the request (running, or holding its KV blocks for a decode that never took them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from common import protocol as P
from common.messaging import MessagingError, Messenger, NoResponders, PayloadTooLarge, RemoteError, RequestTimeout
from common.timing import Marks
from frontend.errors import APIError, from_worker, unavailable
from frontend.preprocess import Prompt
from frontend.router import ModelInstances, Router, Topology

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrchestratorConfig:
    """``request_timeout_s`` bounds every unary hop and every wait for the next stream item."""

    request_timeout_s: float = 60.0
    max_attempts: int = 3  # instances tried per hop when one vanished (NoResponders)

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class TokenEvent:
    """New tokens from a worker; ``prompt_tokens`` (after image expansion) is set on the first."""

    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    prompt_tokens: int | None = None


class Orchestrator:
    """Routes the hops of a request to worker instances over NATS."""

    def __init__(self, messenger: Messenger, snapshot: Callable[[], Iterable[P.InstanceRecord]],
                 router: Router | None = None, config: OrchestratorConfig = OrchestratorConfig()) -> None:
        self._m = messenger
        self._snapshot = snapshot
        self.router = router or Router()
        self.cfg = config
        self._background: set[asyncio.Task[Any]] = set()

    def instances(self, model: str) -> ModelInstances:
        return ModelInstances.from_snapshot(model, self._snapshot())

    async def generate(self, request_id: str, model: str, prompt: Prompt,
                       sampling: P.SamplingParams, marks: Marks | None = None) -> AsyncIterator[TokenEvent]:
        """Token events for one request; raises APIError (4xx from workers, 503/504 on failures).
        ``marks`` (common.timing) gets one stage per hop, up to the first token."""
        topology = self.instances(model).require_topology()
        if topology is Topology.AGG:
            images = tuple(P.ImageInput(media=m) for m in prompt.media)
            req = P.GenerateRequest(request_id=request_id, model=model, token_ids=prompt.token_ids,
                                    images=images, sampling=sampling)
            async for delta in self._stream(P.Role.AGG, model, "generate", P.encode(req)):
                yield _event(delta)
            return
        async for event in self._disaggregated(request_id, model, prompt, sampling, topology, marks):
            yield event

    # ------------------------------------------------------------------ disaggregated pipeline

    async def _disaggregated(self, request_id: str, model: str, prompt: Prompt, sampling: P.SamplingParams,
                             topology: Topology, marks: Marks | None) -> AsyncIterator[TokenEvent]:
        # 1. encode (E/P/D with images only)
        if topology is Topology.EPD and prompt.media:
            handles = await self._encode_all(request_id, model, prompt.media)
            images = tuple(P.ImageInput(handle=h) for h in handles)
            _mark(marks, "encode_hop")
        else:
            images = tuple(P.ImageInput(media=m) for m in prompt.media)
        # 2. prefill -> first token + KV handle
        req = P.PrefillRequest(request_id=request_id, model=model, token_ids=prompt.token_ids,
                               images=images, sampling=sampling)
        first, prefill_rec = await self._prefill(req, model)
        _mark(marks, "prefill_hop")
        if first.kv is None:  # finished at its first token (EOS, max_tokens=1): nothing to decode
            yield TokenEvent((first.first_token,), first.finish_reason or "stop", first.prompt_tokens)
            return
        # 3. decode stream. The first token is sent with the decode stream's first delta, not before:
        # a decode worker that refuses the request (KV layout, full cache) then still gets its 4xx/503
        # to the client as an HTTP status instead of an error in the middle of an SSE stream.
        kv_taken = False
        try:
            dec = P.DecodeRequest(request_id=request_id, model=model, prompt_tokens=first.prompt_tokens,
                                  first_token=first.first_token, kv=first.kv, sampling=sampling,
                                  extras=first.extras)
            async for delta in self._stream(P.Role.DECODE, model, "decode", P.encode(dec)):
                if not kv_taken:
                    delta = _with_first_token(delta, first)
                kv_taken = True  # the decode worker pulled the KV and released the prefill blocks
                yield _event(delta)
        finally:
            if not kv_taken:  # nobody took the pinned KV blocks: free them now, not at lease expiry
                self._cancel_in_background(prefill_rec, request_id)

    async def _encode_all(self, request_id: str, model: str,
                          media: tuple[P.MediaRef, ...]) -> list[P.EmbeddingHandle]:
        """Step 1: one EncodeRequest per item, all at once (the router spreads them over instances)."""
        async def one(i: int, ref: P.MediaRef) -> P.EmbeddingHandle:
            req = P.EncodeRequest(request_id=f"{request_id}-img{i}", model=model, media=ref)
            reply, _ = await self._unary(P.Role.ENCODE, model, "encode", P.encode(req), P.EncodeResponse)
            return reply.handle

        tasks = [asyncio.ensure_future(one(i, ref)) for i, ref in enumerate(media)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:  # one failed: the others are of no use
                t.cancel()

    async def _prefill(self, req: P.PrefillRequest, model: str) -> tuple[P.PrefillResponse, P.InstanceRecord]:
        """Step 2; if we stop waiting (client gone, timeout), the prefill instance is told to cancel."""
        chosen: list[P.InstanceRecord] = []
        try:
            return await self._unary(P.Role.PREFILL, model, "prefill", P.encode(req), P.PrefillResponse,
                                     chosen=chosen)
        except (asyncio.CancelledError, APIError) as exc:
            if chosen and not (isinstance(exc, APIError) and exc.status < 500):
                self._cancel_in_background(chosen[-1], req.request_id)
            raise

    # ------------------------------------------------------------------ hops

    async def _unary(self, role: P.Role, model: str, endpoint: str, payload: bytes, expect: type,
                     chosen: list[P.InstanceRecord] | None = None) -> tuple[Any, P.InstanceRecord]:
        """One request/reply to the least-loaded instance of ``role``, skipping vanished ones."""
        tried: set[str] = set()
        while True:
            rec = self._pick(role, model, tried)
            if chosen is not None:
                chosen.append(rec)
            try:
                with self.router.track(rec.instance_id), self._errors(role, rec):
                    data = await self._m.request(P.instance_subject(rec.subject, endpoint), payload,
                                                 timeout=self.cfg.request_timeout_s)
                    return P.decode(data, expect), rec
            except NoResponders:
                tried.add(rec.instance_id)

    async def _stream(self, role: P.Role, model: str, endpoint: str, payload: bytes) -> AsyncIterator[P.TokenDelta]:
        """A TokenDelta stream from the least-loaded instance; retried elsewhere only before any item."""
        tried: set[str] = set()
        while True:
            rec = self._pick(role, model, tried)
            subject = P.instance_subject(rec.subject, endpoint)
            got_any = False
            try:
                with self.router.track(rec.instance_id), self._errors(role, rec):
                    async with self._m.stream(subject, payload, timeout=self.cfg.request_timeout_s) as s:
                        async for chunk in s:
                            got_any = True
                            yield P.decode(chunk, P.TokenDelta)
                return
            except NoResponders:
                if got_any:
                    raise unavailable(f"the {role.value} worker {rec.instance_id} went away mid-stream") from None
                tried.add(rec.instance_id)

    def _pick(self, role: P.Role, model: str, tried: set[str]) -> P.InstanceRecord:
        candidates = self.instances(model).of(role)
        rec = self.router.pick(candidates, exclude=tried) if len(tried) < self.cfg.max_attempts else None
        if rec is None:
            detail = f" ({len(tried)} tried, none answered)" if tried else ""
            raise unavailable(f"no live {role.value} worker for model {model!r}{detail}; start one or retry")
        return rec

    @contextmanager
    def _errors(self, role: P.Role, rec: P.InstanceRecord) -> Iterator[None]:
        """Messaging failures -> HTTP errors; NoResponders passes through for the retry loop."""
        try:
            yield
        except RemoteError as exc:
            raise from_worker(exc.code, exc.type, exc.message) from None
        except RequestTimeout:
            raise APIError(504, f"the {role.value} worker {rec.instance_id} did not answer within "
                           f"{self.cfg.request_timeout_s:g} s") from None
        except PayloadTooLarge as exc:
            raise APIError(413, f"the request is too large to send to a {role.value} worker ({exc}); "
                           "send images by http(s) URL instead of inline data: URLs") from None
        except P.ProtocolError as exc:
            raise APIError(502, f"the {role.value} worker {rec.instance_id} sent a bad reply: {exc}") from None
        except NoResponders:
            raise
        except MessagingError as exc:
            raise unavailable(f"messaging with the {role.value} worker {rec.instance_id} failed: {exc}") from None

    # ------------------------------------------------------------------ cancellation

    def _cancel_in_background(self, rec: P.InstanceRecord, request_id: str) -> None:
        """Publish a CancelRequest from its own task: the caller may itself be being cancelled."""
        task = asyncio.get_running_loop().create_task(self._send_cancel(rec, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_cancel(self, rec: P.InstanceRecord, request_id: str) -> None:
        try:
            await self._m.publish(P.instance_subject(rec.subject, "cancel"),
                                  P.encode(P.CancelRequest(request_id=request_id)))
        except MessagingError as exc:
            log.warning("could not cancel %s on %s: %s", request_id, rec.instance_id, exc)

    async def drain(self) -> None:
        """Wait for pending cancel messages (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _with_first_token(delta: P.TokenDelta, first: P.PrefillResponse) -> P.TokenDelta:
    """The decode worker's first delta repeats the prefill's first token (with prompt_tokens set);
    should one not, the token is put in front here, so it is emitted exactly once either way."""
    if delta.prompt_tokens is not None and delta.token_ids[:1] == (first.first_token,):
        return delta
    return delta.model_copy(update={"token_ids": (first.first_token, *delta.token_ids),
                                    "prompt_tokens": first.prompt_tokens})


def _mark(marks: Marks | None, stage: str) -> None:
    if marks is not None:
        marks.mark(stage)


def _event(delta: P.TokenDelta) -> TokenEvent:
    return TokenEvent(tuple(delta.token_ids), delta.finish_reason, delta.prompt_tokens)
