"""Response bodies: OpenAI chat.completion objects and server-sent-event chunk streams.

SSE framing: each event is ``data: <json>\\n\\n``; the stream ends with ``data: [DONE]\\n\\n``.
An error after the stream has started (the status line is already sent) is one
``data: {"error": {...}}`` event followed by ``[DONE]``, as OpenAI does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from frontend.completion import Piece, Stats
from frontend.errors import APIError
from frontend.schemas import (AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta,
                              Usage)

log = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


def sse_frame(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(stats: Stats) -> Usage:
    return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                 total_tokens=stats.prompt_tokens + stats.completion_tokens)


def completion_body(request_id: str, model: str, text: str, stats: Stats) -> dict[str, Any]:
    choice = Choice(message=AssistantMessage(content=text), finish_reason=stats.finish_reason)
    return ChatCompletion(id=request_id, created=int(time.time()), model=model, choices=[choice],
                          usage=usage(stats)).model_dump()


class ChunkMaker:
    """Builds the chunk dicts of one stream (same id, created and model on every chunk)."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id, self.model, self.include_usage = request_id, model, include_usage
        self.created = int(time.time())

    def chunk(self, delta: Delta | None, finish_reason: str | None = None,
              usage_: Usage | None = None) -> dict[str, Any]:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]
        body = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=choices, usage=usage_).model_dump()
        for choice in body["choices"]:  # deltas carry only the fields that changed
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not self.include_usage:
            body.pop("usage")
        return body


async def sse_events(request_id: str, model: str, first: Piece | None, pieces: AsyncIterator[Piece],
                     stats: Stats, include_usage: bool) -> AsyncIterator[str]:
    """The SSE frames of a streamed completion, starting from an already received first piece."""
    maker = ChunkMaker(request_id, model, include_usage)
    try:
        yield sse_frame(maker.chunk(Delta(role="assistant", content="")))
        piece = first
        while piece is not None:
            if piece.text:
                yield sse_frame(maker.chunk(Delta(content=piece.text)))
            if piece.finish_reason is not None:
                yield sse_frame(maker.chunk(Delta(), piece.finish_reason))
            piece = await anext(pieces, None)
        if include_usage:
            yield sse_frame(maker.chunk(None, usage_=usage(stats)))
    except APIError as exc:
        log.warning("stream %s failed after it started: %s %s", request_id, exc.status, exc.message)
        yield sse_frame(exc.body())
    finally:
        await pieces.aclose()
    yield DONE


class SSEResponse(StreamingResponse):
    """A text/event-stream response that calls ``on_close`` however it ends (done, error, client gone)."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
