"""One chat completion in flight: token events -> detokenized, stop-checked text pieces.

The worker pipeline runs in its own asyncio task and hands pieces over a queue. Whoever consumes
them (an SSE response or a collector) only ever *cancels* that task when it leaves, which is a
single synchronous call: the pipeline's own cleanup (stream cancels, prefill CancelRequest) then
runs in plain asyncio, out of reach of the HTTP server's cancel scopes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from common import protocol as P
from common.timing import Marks
from frontend.detok import IncrementalDetokenizer, StopMatcher
from frontend.errors import APIError
from frontend.metrics import FrontendMetrics
from frontend.orchestrator import Orchestrator, TokenEvent
from frontend.preprocess import ChatTokenizer, Prompt

_END = object()


@dataclass(frozen=True)
class Piece:
    """New output text; ``finish_reason`` is set on the last piece."""

    text: str
    finish_reason: str | None = None


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None


class CompletionRun:
    """Run one request; iterate ``pieces()`` once. ``stats`` holds usage when it ends."""

    def __init__(self, orchestrator: Orchestrator, tokenizer: ChatTokenizer, metrics: FrontendMetrics,
                 request_id: str, model: str, prompt: Prompt, sampling: P.SamplingParams,
                 stops: tuple[str, ...], started: float | None = None) -> None:
        self._orch = orchestrator
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops)
        self._metrics = metrics
        self._args = (request_id, model, prompt, sampling)
        self.stats = Stats() if started is None else Stats(started=started)  # TTFT counts from arrival
        self.marks = Marks(request_id, "frontend", t0=self.stats.started)
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> "CompletionRun":
        self._task = asyncio.get_running_loop().create_task(self._produce())
        return self

    async def pieces(self) -> AsyncIterator[Piece]:
        """Output pieces in order; raises the pipeline's APIError. Leaving early cancels the request."""
        assert self._task is not None, "start() first"
        try:
            while (item := await self._queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def wait_closed(self) -> None:
        """Until the pipeline task (and its cleanup) has finished."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # ------------------------------------------------------------------ producer side

    async def _produce(self) -> None:
        events = self._orch.generate(*self._args, marks=self.marks)
        try:
            async for event in events:
                if self.stats.last_token_at is None:
                    self.marks.mark("first_event")
                piece = self._on_event(event)
                if piece is not None:
                    self._queue.put_nowait(piece)
                if self.stats.finish_reason is not None:
                    break
            else:
                raise APIError(502, "the worker ended the stream without a finish reason")
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, who answers the client)
            self._queue.put_nowait(exc if isinstance(exc, APIError) else APIError(500, f"internal error: {exc}"))
        else:
            self._queue.put_nowait(_END)
        finally:
            await events.aclose()  # early exit: cancels the stream / prefill (see Orchestrator)

    def _on_event(self, event: TokenEvent) -> Piece | None:
        text, used = "", 0
        # Token by token: a coalesced delta may carry tokens past a stop string, which must be
        # neither shown nor counted in usage.
        for token in event.token_ids:
            used += 1
            text += self._stops.add(self._detok.add((token,)))
            if self._stops.stopped:
                break
        self._count(event, used)
        if self._stops.stopped:
            self.stats.finish_reason = "stop"
        elif event.finish_reason is not None:
            text += self._stops.add(self._detok.flush())
            text += "" if self._stops.stopped else self._stops.flush()
            self.stats.finish_reason = "stop" if self._stops.stopped else _finish(event.finish_reason)
        if self.stats.finish_reason is not None:
            self._metrics.e2e.observe(time.perf_counter() - self.stats.started)
            return Piece(text, self.stats.finish_reason)
        return Piece(text) if text else None

    def _count(self, event: TokenEvent, n: int) -> None:
        """Metrics and usage for the first ``n`` tokens of ``event`` (those the client gets)."""
        now = time.perf_counter()
        if event.prompt_tokens is not None and not self.stats.prompt_tokens:
            self.stats.prompt_tokens = event.prompt_tokens
            self._metrics.prompt_tokens.inc(event.prompt_tokens)
        if n and self.stats.last_token_at is None:
            self._metrics.ttft.observe(now - self.stats.started)
        elif n and self.stats.last_token_at is not None:
            gap = (now - self.stats.last_token_at) / n
            for _ in range(n):
                self._metrics.itl.observe(gap)
        if n:
            self.stats.last_token_at = now
            self.stats.completion_tokens += n
            self._metrics.completion_tokens.inc(n)


def _finish(reason: str) -> str:
    """Worker finish reasons -> OpenAI's ("abort" only reaches a client when a worker gave up)."""
    return reason if reason in ("stop", "length") else "abort"
