"""One thread that owns the engine; asyncio code talks to it through a thread-safe queue.

The engine is single-threaded by contract, and its steps block for milliseconds to seconds, so a
worker runs it on a thread of its own:

  1. asyncio code submits commands (``call``: run ``fn(engine)`` there, get its result back as an
     awaitable; ``add_request``: also open an output stream for the request);
  2. the thread runs every queued command, then one ``engine.step()`` while anything is unfinished,
     and blocks on the queue when idle;
  3. all ``StepOutput``s of one step go to the event loop in ONE ``loop.call_soon_threadsafe``
     (each wake-up of the loop costs a syscall and a GIL hand-over, so one per step, not one per
     request), which puts each on its request's ``asyncio.Queue``; results and exceptions of
     commands go back the same way.

A consumer that fell behind (several outputs queued for one request) takes them all at once
(``RequestStream.batches``), and ``stream_deltas`` sends them as ONE TokenDelta with several
token ids: under load the per-token cost (encode + NATS publish + the frontend's decode) is paid
per batch of tokens. Apart from the stream interval below, nothing waits to coalesce.

Stream interval: under load the event loop's per-delivery work (a queue wake-up, a TokenDelta, a
NATS publish, per request per step) competes for the GIL with the engine thread's own host work,
and at 128 sequences it made a decode step twice as long as the GPU needed (measured on H200:
15 ms against 7.7). So a stream's outputs are handed over every ``interval`` steps: its first output
(time to first token) and its last always at once, the rest in groups. ``stream_interval`` N >= 1
fixes the group size (1: every step, the old behaviour); 0 (the default) picks it from the load:
1 up to 32 streams, then one more per 32 streams, at most 4 (128 streams: every 4th step, about
one chunk per 30 ms at 7-8 ms steps). Tokens and their order never change, only how they are
grouped into deltas; the time per output token is unchanged, the inter-chunk gap grows.

Aborts are fire-and-forget commands (``abort``), safe from any thread (e.g. a transfer callback).
An exception inside ``engine.step()`` is a bug, not a client error: it is logged, every active
stream gets an error, the requests are aborted, and the thread keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from common.protocol import TokenDelta, encode

log = logging.getLogger(__name__)

_STOP = object()
_IDLE_STEP_S = 0.0005
_AUTO_STREAMS_PER_STEP = 32  # stream_interval 0: one more step between deliveries per 32 streams
_AUTO_MAX_INTERVAL = 4
_STATS_EVERY_S = 10.0  # how often a busy engine logs where its step time went


class EngineStepError(RuntimeError):
    """The engine failed while stepping a request (a bug; the request was aborted)."""


class RequestAborted(Exception):
    """The request was aborted (a cancel) while its stream was being read."""


class RequestStream:
    """Async iterator over one request's StepOutputs; ends after the finished one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        # perf_counter times, set on the engine thread (read after the first output arrived):
        # the request entered the engine; the step that produced its first output began / ended.
        self.added_at = 0.0
        self.first_step_at = 0.0
        self.first_output_at = 0.0
        self.held: list[Any] = []  # outputs waiting for the next delivery (engine thread only)

    def mark_first_output(self, marks: Any) -> None:
        """Add the engine-side stages of the first output to a ``common.timing.Marks``."""
        marks.mark("to_engine", self.added_at)
        marks.mark("engine_wait", self.first_step_at)
        marks.mark("engine_step", self.first_output_at)
        marks.mark("handoff")

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Lists of StepOutputs: everything queued by the time the consumer asks (at least one).
        An exception queued behind outputs is raised once those outputs have been handed out."""
        while True:
            batch: list[Any] = []
            item = await self.queue.get()
            while True:
                if isinstance(item, BaseException):
                    if batch:
                        self.queue.put_nowait(item)  # hand it out after these outputs
                        break  # (nothing is put after an exception, so order is kept)
                    raise item
                batch.append(item)
                if item.finished or self.queue.empty():
                    break
                item = self.queue.get_nowait()
            yield batch
            if batch[-1].finished:
                return


def delivery_interval(stream_interval: int, num_streams: int) -> int:
    """Steps between deliveries of a stream's outputs (see the module docstring)."""
    if stream_interval >= 1:
        return stream_interval
    return max(1, min(_AUTO_MAX_INTERVAL, -(-num_streams // _AUTO_STREAMS_PER_STEP)))


class EngineLoop:
    """Drives ``engine`` from a dedicated thread; construct and use from inside a running loop.

    ``stream_interval``: see the module docstring (0: from the load; N: every N steps)."""

    def __init__(self, engine: Any, name: str = "engine", stream_interval: int = 0) -> None:
        if stream_interval < 0:
            raise ValueError(f"stream_interval must be >= 0, got {stream_interval}")
        self.stream_interval = stream_interval
        self.engine = engine
        self._loop = asyncio.get_running_loop()
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched on the engine thread only
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = threading.Event()
        self._stats_since = time.perf_counter()
        self._deliver_s = 0.0  # time handing outputs to the event loop (also host time)

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------ asyncio side

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(engine, *args)`` on the engine thread; await the result."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._commands.put((fn, args, fut, None))
        return fut

    async def add_request(self, request_id: str, submit: Callable[..., Any], *args: Any
                          ) -> tuple[Any, RequestStream]:
        """Run ``submit(engine, *args)`` (e.g. a bound ``add_request``) and open the request's
        output stream in the same engine-thread turn, so no output can be missed."""
        stream = RequestStream(request_id)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._commands.put((submit, args, fut, stream))
        return await fut, stream

    def abort(self, request_id: str) -> None:
        """Abort ``request_id`` (any stage; unknown ids are ignored). Safe from any thread.

        A consumer still iterating the request's stream gets ``RequestAborted``."""
        self._commands.put((self._abort_on_thread, (request_id,), None, None))

    def submit_nowait(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(engine, *args)`` without waiting (errors are logged). Any thread."""
        self._commands.put((fn, args, None, None))

    def stop(self, timeout: float = 10.0) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while not self._stopped.is_set():
            busy = self._has_work()
            try:
                item = self._commands.get(block=not busy)
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                self._run_command(*item)
                continue  # drain every queued command before the next step
            self._step()

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:  # noqa: BLE001 (a broken engine must not kill the thread)
            log.exception("engine.has_unfinished failed")
            return False

    def _run_command(self, fn: Callable[..., Any], args: tuple[Any, ...],
                     fut: asyncio.Future[Any] | None, stream: RequestStream | None) -> None:
        try:
            result = fn(self.engine, *args)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting coroutine)
            if fut is None:
                log.exception("engine command %s failed", getattr(fn, "__name__", fn))
            else:
                self._loop.call_soon_threadsafe(_set_exception, fut, exc)
            return
        if stream is not None:
            stream.added_at = time.perf_counter()
            self._streams[stream.request_id] = stream
        if fut is not None:
            self._loop.call_soon_threadsafe(_set_result, fut, result)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 (fail the active requests, keep serving)
            log.exception("engine.step failed; aborting %d active requests", len(self._streams))
            self._fail_all(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"))
            return
        if not outputs and not getattr(self.engine, "in_flight", False):
            time.sleep(_IDLE_STEP_S)  # nothing came out (a chunk, or waiting for blocks): don't spin
        ready = []
        ended = time.perf_counter()
        every = delivery_interval(self.stream_interval, len(self._streams))
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if stream is None:
                continue
            first = not stream.first_output_at
            if first:
                stream.first_step_at, stream.first_output_at = started, ended
            stream.held.append(out)
            if first or out.finished or len(stream.held) >= every:
                ready.append((stream.queue, stream.held))
                stream.held = []
        if ready:
            self._loop.call_soon_threadsafe(_deliver, ready)
        self._deliver_s += time.perf_counter() - ended
        self._log_stats(ended)

    def _log_stats(self, now: float) -> None:
        """Every _STATS_EVERY_S while busy: one line on where the engine's step time went."""
        stats = getattr(self.engine, "stats", None)
        if stats is None or now - self._stats_since < _STATS_EVERY_S or not stats.steps:
            return
        wall, steps = now - self._stats_since, stats.steps
        log.info("engine: %s deliver %.2f", stats.take().line(wall), 1e3 * self._deliver_s / steps)
        self._stats_since, self._deliver_s = now, 0.0

    def _abort_on_thread(self, engine: Any, request_id: str) -> None:
        _abort(engine, request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._loop.call_soon_threadsafe(stream.queue.put_nowait, RequestAborted(request_id))

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self._loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
            _abort(self.engine, request_id)
        self._streams.clear()


async def stream_deltas(loop: EngineLoop | None, request_id: str, stream: RequestStream,
                        prompt_tokens: int, first: tuple[int, ...] = (), marks: Any = None) -> Any:
    """StepOutputs -> encoded TokenDeltas; the first carries ``prompt_tokens`` (and ``first``).
    Outputs that queued up while the consumer was busy go out together, as one delta.

    ``marks`` (a ``common.timing.Marks``) gets the engine-side stages of the first engine output
    and the time to hand its delta to the messaging layer, then is logged.
    Leaving early (client cancel, worker stopping) aborts the request in the engine."""
    finished = sent_prompt = False
    try:
        if first:
            yield encode(TokenDelta(request_id=request_id, token_ids=first, prompt_tokens=prompt_tokens))
            sent_prompt = True
        async for batch in stream.batches():
            last = batch[-1]
            finished = bool(last.finished)
            token_ids = tuple(t for out in batch for t in out.new_token_ids)
            if marks is not None:
                stream.mark_first_output(marks)
            yield encode(TokenDelta(request_id=request_id, token_ids=token_ids,
                                    finish_reason=last.finish_reason if finished else None,
                                    prompt_tokens=None if sent_prompt else prompt_tokens))
            if marks is not None:  # resumed: the messaging layer has sent the first delta
                marks.mark("publish")
                marks.log()
                marks = None
            sent_prompt = True
    except RequestAborted:
        finished = True
        yield encode(TokenDelta(request_id=request_id, token_ids=(), finish_reason="abort"))
    finally:
        if not finished and loop is not None:
            log.info("request %s: stream left before the end (cancel); aborting it", request_id)
            loop.abort(request_id)


def add_engine_request(engine: Any, request_id: str, token_ids: tuple[int, ...], items: list[Any],
                       sampling: Any, prefill_only: bool) -> int:
    """Runs on the engine thread (see EngineLoop.add_request)."""
    return engine.add_request(request_id, list(token_ids), items, sampling, prefill_only=prefill_only)


def _abort(engine: Any, request_id: str) -> None:
    try:
        engine.abort(request_id)
    except KeyError:
        pass  # already finished and freed


def _deliver(ready: list[tuple[asyncio.Queue[Any], list[Any]]]) -> None:
    """On the event loop: one step's outputs onto their requests' queues."""
    for q, outs in ready:
        for out in outs:
            q.put_nowait(out)


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
