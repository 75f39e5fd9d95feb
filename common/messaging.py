"""Request/reply and streaming over NATS (DESIGN section 3). The only module that imports nats.

Payloads are opaque bytes (normally ``protocol.encode(msg)``). What this module adds on top of NATS:

* Unary: ``request()`` -> one reply. An error reply carries the ``Triad-Kind: error`` header and an
  ``ErrorReply`` body, and is raised on the caller's side as ``RemoteError``.
* Streams: the client subscribes to a fresh inbox and publishes the request with that inbox as
  the reply subject and a stream id. The responder answers with frames, each carrying a
  ``Triad-Seq`` header (0, 1, 2, ...) and a ``Triad-Kind``:
    start (seq 0; names the responder's control subject, where cancels go)
    data  (one handler item each)
    sync  (no content: sent after the responder reconnected to NATS, so that a frame lost with
          the old connection shows as a gap now instead of as silence until the timeout)
    end   (the handler finished)  |  error (ErrorReply body)
  The client checks that sequence numbers have no gap. Leaving a stream early publishes a cancel
  to the control subject: the responder sets ``StreamContext.cancelled`` and cancels the task.
* Size: a message larger than the server's ``max_payload`` (payload plus header bytes, as the
  server counts them) raises ``PayloadTooLarge`` at once instead of costing the connection.
* Load: nothing may turn a lost message into a hang. Subscriptions get explicit, generous pending
  limits (``MessagingConfig``); a message nats-py still drops (slow consumer) is logged at WARNING
  with its subject and answered at once: a dropped request with a 503 "overloaded" error to its
  sender, a dropped stream frame by failing that stream (``StreamGap``). A request the server lost
  (e.g. it cut off a slow responder) cannot be answered by anyone, so the client gives every stream
  ``accept_timeout_s`` to send its start frame and raises ``NotAccepted`` after that; should the
  start frame come later after all, the stream is cancelled in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from common.protocol import ErrorReply, ProtocolError, decode

log = logging.getLogger(__name__)

H_KIND = "Triad-Kind"
H_SEQ = "Triad-Seq"
H_STREAM = "Triad-Stream"
H_CONTROL = "Triad-Control"
_NATS_STATUS = "Status"
_HDR_LINE = b"NATS/1.0\r\n"
_MB = 1024 * 1024
_RESYNC_WINDOW_S = 30.0  # streams that ended this recently get a sync frame after a reconnect


@dataclass(frozen=True)
class MessagingConfig:
    """Limits of one connection. Environment overrides (``from_env``): TRIAD_NATS_PENDING_MB,
    TRIAD_NATS_PENDING_MSGS, TRIAD_STREAM_ACCEPT_TIMEOUT_S, TRIAD_STREAM_LATE_CANCEL_S."""

    # Per subscription, what nats-py buffers for a callback before it drops messages. A worker's
    # request subject takes whole images as data: URLs (~0.7 MB each), so be generous.
    pending_bytes_limit: int = 1024 * _MB
    pending_msgs_limit: int = 1_000_000
    # A responder sends a stream's start frame before its handler runs: one that has not come in
    # this long means the request was lost (or the responder is stalled).
    accept_timeout_s: float = 5.0
    # After leaving a stream whose start frame had not come: how long a late one is still cancelled.
    late_cancel_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("pending_bytes_limit", "pending_msgs_limit", "accept_timeout_s", "late_cancel_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MessagingConfig.{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_env(cls) -> MessagingConfig:
        env, d = os.environ, cls()
        try:
            pending_mb = float(env.get("TRIAD_NATS_PENDING_MB", d.pending_bytes_limit / _MB))
            return cls(pending_bytes_limit=int(pending_mb * _MB),
                       pending_msgs_limit=int(env.get("TRIAD_NATS_PENDING_MSGS", d.pending_msgs_limit)),
                       accept_timeout_s=float(env.get("TRIAD_STREAM_ACCEPT_TIMEOUT_S", d.accept_timeout_s)),
                       late_cancel_s=float(env.get("TRIAD_STREAM_LATE_CANCEL_S", d.late_cancel_s)))
        except ValueError as exc:
            raise ValueError(f"bad TRIAD_NATS_* / TRIAD_STREAM_* environment variable: {exc}") from exc


class MessagingError(Exception):
    """Base of every error this module raises."""


class RemoteError(MessagingError):
    """The responder answered with an error (``code`` is an HTTP status: 4xx = caller's fault)."""

    def __init__(self, code: int, type: str, message: str) -> None:  # noqa: A002 (wire field name)
        super().__init__(f"{code} {type}: {message}")
        self.code = code
        self.type = type
        self.message = message


class RequestTimeout(MessagingError):
    """No reply (or no next stream item) within the timeout."""


class NoResponders(MessagingError):
    """Nobody serves the subject: fails at once instead of waiting for a timeout."""


class PayloadTooLarge(MessagingError):
    """A message exceeds the server's max_payload; raised before anything is sent."""


class StreamGap(MessagingError):
    """Stream frames arrived out of order or some were lost (e.g. a slow consumer)."""


class NotAccepted(NoResponders):
    """A stream's responder did not accept the request within the accept timeout: it is
    overloaded or stalled, died holding it, or the request was lost on the way. Like
    NoResponders, safe to retry elsewhere (a late start is cancelled by the client)."""


Handler = Callable[[bytes], Awaitable[bytes]]


@dataclass
class StreamContext:
    """Given to a stream handler: ``cancelled`` is set when the client cancels."""

    stream_id: str
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


StreamHandler = Callable[[bytes, StreamContext], AsyncIterator[bytes]]


def header_size(headers: dict[str, str] | None) -> int:
    """Bytes the header block takes on the wire (the server counts them against max_payload)."""
    if not headers:
        return 0
    return len(_HDR_LINE) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


def _error_body(code: int, type_: str, message: str) -> bytes:
    return ErrorReply(code=code, type=type_, message=message).model_dump_json().encode()


def _remote_error(data: bytes) -> RemoteError:
    try:
        err = decode(data, ErrorReply)
    except ProtocolError:
        return RemoteError(502, "bad_gateway", f"undecodable error reply: {data[:200]!r}")
    return RemoteError(err.code, err.type, err.message)


def _is_no_responders(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get(_NATS_STATUS) == "503" and not msg.data


class Messenger:
    """One NATS connection: serve subjects, send requests, open streams."""

    def __init__(self, nc: Client, servers: str, config: MessagingConfig | None = None) -> None:
        self._nc = nc
        self.servers = servers
        self.config = config or MessagingConfig()
        self._services: set[Service] = set()
        self._owners: dict[int, Service] = {}  # subscription id -> the service it feeds
        self._inboxes: dict[str, ClientStream] = {}  # inbox subject -> the open stream reading it
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._ended: deque[tuple[float, str, int]] = deque(maxlen=4096)  # (when, inbox, next seq)

    @classmethod
    async def connect(cls, servers: str, name: str = "", timeout: float = 5.0,
                      config: MessagingConfig | None = None) -> Messenger:
        """Connect (raise MessagingError if no server answers within ``timeout``); after that the
        connection reconnects by itself forever and restores its subscriptions. ``config``
        defaults to ``MessagingConfig.from_env()``."""
        nc = Client()
        m = cls(nc, servers, config or MessagingConfig.from_env())
        try:
            async with asyncio.timeout(timeout):
                await nc.connect(servers.split(","), name=name or None, error_cb=m._on_error,
                                 disconnected_cb=m._on_disconnect, reconnected_cb=m._on_reconnect,
                                 max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                 connect_timeout=2)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise MessagingError(f"NATS at {servers} did not answer within {timeout} s: {exc}") from exc
        return m

    # ------------------------------------------------------------------ connection events

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            await self._on_dropped(exc)
        else:
            log.warning("NATS %s: %s", self.servers, exc)

    async def _on_dropped(self, exc: nats.errors.SlowConsumerError) -> None:
        """nats-py dropped a message it had no room for: tell whoever waits for it, at once."""
        stream = self._inboxes.get(exc.subject)
        if stream is not None:
            log.warning("NATS dropped a frame of the stream on %s (this process fell behind reading; "
                        "pending limit %d msgs / %d bytes)", exc.subject, self.config.pending_msgs_limit,
                        self.config.pending_bytes_limit)
            stream.fail(StreamGap(f"frames of the stream from {stream.subject!r} were dropped: this "
                                  "process fell behind reading (NATS slow consumer)"))
            return
        svc = self._owners.get(exc.sid)
        log.warning("NATS dropped a message on %s (slow consumer: this process fell behind reading; "
                    "pending limit %d msgs / %d bytes)%s", exc.subject, self.config.pending_msgs_limit,
                    self.config.pending_bytes_limit, "; answering 503" if svc and exc.reply else "")
        if svc is not None and exc.reply:
            await svc.refuse(exc.reply)

    async def _on_disconnect(self) -> None:
        if not self._closing:
            log.warning("disconnected from NATS %s; reconnecting. Messages in flight are lost: if "
                        "the nats-server log says 'Slow Consumer Detected', this process fell behind "
                        "reading (raise max_pending / write_deadline in the server config)", self.servers)

    async def _on_reconnect(self) -> None:
        url = self._nc.connected_url
        log.warning("reconnected to NATS at %s; sending sync frames on open streams",
                    url.netloc if url else "?")
        self._spawn(self._resync())

    async def _resync(self) -> None:
        """A sync frame on every stream we serve or ended lately: a client whose frames died with
        the old connection sees the gap now (StreamGap) instead of waiting for its timeout."""
        for svc in list(self._services):
            for writer in svc.writers():
                await writer.sync()
        horizon = time.monotonic() - _RESYNC_WINDOW_S
        for when, inbox, seq in list(self._ended):
            if when >= horizon:
                with contextlib.suppress(Exception):
                    await self._nc.publish(inbox, b"", headers={H_KIND: "sync", H_SEQ: str(seq)})

    async def _subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]], queue: str = "") -> Any:
        """A subscription with this connection's pending limits."""
        return await self._nc.subscribe(subject, queue=queue, cb=cb,
                                        pending_msgs_limit=self.config.pending_msgs_limit,
                                        pending_bytes_limit=self.config.pending_bytes_limit)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def max_payload(self) -> int:
        """Largest message (payload + headers) the server accepts, in bytes."""
        return self._nc.max_payload

    @property
    def is_connected(self) -> bool:
        return self._nc.is_connected

    def check_size(self, payload: bytes, headers: dict[str, str] | None = None,
                   what: str = "message") -> None:
        """Raise PayloadTooLarge naming the size and the limit."""
        hdr = header_size(headers)
        if len(payload) + hdr > self.max_payload:
            raise PayloadTooLarge(
                f"{what} of {len(payload) + hdr} bytes (payload {len(payload)} + headers {hdr}) "
                f"exceeds the NATS server's max_payload of {self.max_payload} bytes; send large data "
                "over the transfer plane (UCX) or raise max_payload in the server config"
            )

    async def _publish(self, subject: str, payload: bytes, reply: str = "",
                       headers: dict[str, str] | None = None) -> None:
        self.check_size(payload, headers)
        await self._nc.publish(subject, payload, reply=reply, headers=headers)

    # ------------------------------------------------------------------ client side

    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        """Send one request, return the reply; RemoteError if the responder answered an error."""
        self.check_size(payload, None, "request")
        try:
            msg = await self._nc.request(subject, payload, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoResponders(f"no service listens on {subject!r}") from None
        except nats.errors.TimeoutError:
            raise RequestTimeout(f"no reply from {subject!r} within {timeout} s") from None
        except nats.errors.Error as exc:  # closed, reconnecting with a full buffer, ...
            raise MessagingError(f"request to {subject!r} failed: {exc!r}") from exc
        if msg.headers and msg.headers.get(H_KIND) == "error":
            raise _remote_error(msg.data)
        return msg.data

    def stream(self, subject: str, payload: bytes, timeout: float,
               accept_timeout: float | None = None) -> ClientStream:
        """``async with m.stream(...) as s: async for chunk in s`` (timeout: first item and gaps).

        ``accept_timeout`` (default ``config.accept_timeout_s``): the responder's start frame must
        come within it, or ``NotAccepted`` is raised (the request was lost or the responder stalls)."""
        accept = self.config.accept_timeout_s if accept_timeout is None else accept_timeout
        return ClientStream(self, subject, payload, timeout, accept)

    async def publish(self, subject: str, payload: bytes) -> None:
        """Fire and forget (e.g. a CancelRequest to one instance)."""
        await self._publish(subject, payload)

    async def flush(self, timeout: float = 5.0) -> None:
        await self._nc.flush(timeout=timeout)

    # ------------------------------------------------------------------ server side

    async def serve_unary(self, subject: str, handler: Handler, queue: str | None = None) -> Service:
        """Answer requests on ``subject`` (in queue group ``queue`` when given) with ``handler``."""
        svc = Service(self, subject, queue, unary=handler)
        await svc._start()
        self._services.add(svc)
        return svc

    async def serve_stream(self, subject: str, handler: StreamHandler,
                           queue: str | None = None) -> Service:
        """Answer stream requests on ``subject``: each item the handler yields is one frame."""
        svc = Service(self, subject, queue, stream=handler)
        await svc._start()
        self._services.add(svc)
        return svc

    async def close(self) -> None:
        """Stop every service, flush what is pending and close the connection."""
        self._closing = True
        for svc in list(self._services):
            await svc.stop()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
        await self._nc.close()


class ClientStream:
    """The client's end of one stream; iterate it inside ``async with``."""

    def __init__(self, m: Messenger, subject: str, payload: bytes, timeout: float,
                 accept_timeout: float) -> None:
        self._m = m
        self.subject = subject
        self._payload = payload
        self._timeout = timeout
        self._accept_timeout = min(accept_timeout, timeout)
        self.stream_id = uuid.uuid4().hex
        self._queue: asyncio.Queue[Msg | MessagingError] = asyncio.Queue()
        self._sub: Any = None
        self._inbox = ""
        self._control = ""
        self._next_seq = 0
        self._done = False

    async def __aenter__(self) -> ClientStream:
        headers = {H_STREAM: self.stream_id}
        self._m.check_size(self._payload, headers, "stream request")
        nc = self._m._nc
        self._inbox = nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            self._queue.put_nowait(msg)

        self._sub = await self._m._subscribe(self._inbox, on_msg)
        self._m._inboxes[self._inbox] = self
        try:
            await nc.publish(self.subject, self._payload, reply=self._inbox, headers=headers)
        except nats.errors.Error as exc:
            await self._close_sub()
            raise MessagingError(f"stream request to {self.subject!r} failed: {exc!r}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._done:
            await self._close_sub()
        elif self._control:
            await self._send_cancel()
            await self._close_sub()
        else:  # not started yet: the responder may still take it; cancel it when it does
            self._m._spawn(self._cancel_when_started())

    def fail(self, exc: MessagingError) -> None:
        """End the stream with ``exc`` (e.g. frames were dropped); the reader raises it."""
        self._queue.put_nowait(exc)

    def __aiter__(self) -> ClientStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            accepting = self._next_seq == 0
            try:
                kind, msg = await self._next_frame(self._accept_timeout if accepting else self._timeout)
            except RequestTimeout:
                if accepting and self._accept_timeout < self._timeout:
                    raise NotAccepted(
                        f"stream request to {self.subject!r} was not accepted within "
                        f"{self._accept_timeout:g} s: the worker is overloaded or stalled, or the "
                        "request was lost on the way; retry, or add workers") from None
                raise
            if kind == "data":
                return msg.data
            if kind == "end":
                self._done = True
            elif kind == "error":
                self._done = True
                raise _remote_error(msg.data)
        raise StopAsyncIteration

    async def _next_frame(self, timeout: float) -> tuple[str, Msg]:
        """The next frame, checked for order; records the control subject of a start frame."""
        try:
            async with asyncio.timeout(timeout):
                msg = await self._queue.get()
        except TimeoutError:
            raise RequestTimeout(f"stream from {self.subject!r}: nothing for {timeout:g} s") from None
        if isinstance(msg, MessagingError):
            self._done = True
            raise msg
        if _is_no_responders(msg):
            self._done = True
            raise NoResponders(f"no service listens on {self.subject!r}")
        headers = msg.headers or {}
        seq, kind = int(headers.get(H_SEQ, -1)), headers.get(H_KIND, "")
        if seq != self._next_seq:
            self._done = True
            raise StreamGap(f"stream from {self.subject!r}: expected frame {self._next_seq}, got {seq}"
                            " (frames were lost: a NATS slow consumer or reconnect)")
        self._next_seq += 1
        if kind == "start":
            self._control = headers.get(H_CONTROL, "")
        return kind, msg

    async def _cancel_when_started(self) -> None:
        """Runs in the background after leaving a stream that had not started: wait (bounded)
        for a late start frame and cancel that stream, so no worker runs a request nobody reads."""
        try:
            with contextlib.suppress(MessagingError):
                while not self._control and not self._done:
                    await self._next_frame(self._m.config.late_cancel_s)
            if self._control:
                log.info("stream %s on %s started after its client left; cancelling it",
                         self.stream_id, self.subject)
                await self._send_cancel()
        finally:
            await self._close_sub()

    async def _send_cancel(self) -> None:
        self._done = True
        if self._m._nc.is_connected:
            with contextlib.suppress(MessagingError, nats.errors.Error):
                await self._m._publish(self._control, b"", headers={H_STREAM: self.stream_id})

    async def _close_sub(self) -> None:
        self._m._inboxes.pop(self._inbox, None)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


class Service:
    """A subscription answering requests; ``stop()`` unsubscribes and cancels what is running."""

    def __init__(self, m: Messenger, subject: str, queue: str | None,
                 unary: Handler | None = None, stream: StreamHandler | None = None) -> None:
        self._m = m
        self.subject = subject
        self.queue = queue
        self._unary = unary
        self._stream = stream
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: dict[str, tuple[asyncio.Task[None], StreamContext, _StreamWriter]] = {}
        self.control_subject = ""
        self.handled = 0  # requests taken (visible for tests and metrics)

    async def _start(self) -> None:
        nc = self._m._nc
        sub = await self._m._subscribe(self.subject, self._on_request, queue=self.queue or "")
        self._subs.append(sub)
        self._m._owners[sub._id] = self
        if self._stream is not None:
            self.control_subject = nc.new_inbox()
            self._subs.append(await self._m._subscribe(self.control_subject, self._on_control))
        await nc.flush(timeout=5)  # the subscription is live at the server when we return

    async def stop(self) -> None:
        for sub in self._subs:
            self._m._owners.pop(sub._id, None)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._m._services.discard(self)

    async def _on_request(self, msg: Msg) -> None:
        # Run each request in its own task so a slow handler does not hold up the subscription.
        self.handled += 1
        run = self._run_unary(msg) if self._unary is not None else self._run_stream(msg)
        task = asyncio.create_task(run)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_control(self, msg: Msg) -> None:
        entry = self._streams.get((msg.headers or {}).get(H_STREAM, ""))
        if entry is not None:
            task, ctx, _ = entry
            ctx.cancelled.set()
            task.cancel()

    async def refuse(self, reply: str) -> None:
        """Answer a request that was dropped before it reached us with a 503 "overloaded"
        (a stream's answer is an error frame 0, as if the handler had refused it)."""
        text = (f"{self.subject} dropped the request: this worker fell behind reading its messages "
                "(NATS slow consumer); retry shortly, or add workers")
        seq = {H_SEQ: "0"} if self._stream is not None else {}
        await self._send_error(reply, 503, "overloaded", text, seq)

    async def _send_error(self, reply: str, code: int, type_: str, message: str,
                          extra: dict[str, str] | None = None) -> None:
        headers = {H_KIND: "error", **(extra or {})}
        try:
            await self._m._publish(reply, _error_body(code, type_, message[:2000]), headers=headers)
        except Exception as exc:  # noqa: BLE001 (the connection may be gone; nothing more to do)
            log.warning("could not send error reply on %s: %s", self.subject, exc)

    async def _run_unary(self, msg: Msg) -> None:
        assert self._unary is not None
        try:
            reply = await self._unary(msg.data)
            if msg.reply:
                self._m.check_size(reply, None, f"reply from {self.subject}")
                await self._m._nc.publish(msg.reply, reply)
        except RemoteError as exc:
            if msg.reply:
                await self._send_error(msg.reply, exc.code, exc.type, exc.message)
        except asyncio.CancelledError:
            if msg.reply:
                await self._send_error(msg.reply, 503, "unavailable", f"{self.subject} is stopping")
            raise
        except Exception as exc:  # noqa: BLE001 (a failing handler must not take the service down)
            log.exception("handler for %s failed", self.subject)
            if msg.reply:
                await self._send_error(msg.reply, 500, "internal_error", f"{type(exc).__name__}: {exc}")

    async def _run_stream(self, msg: Msg) -> None:
        stream_id = (msg.headers or {}).get(H_STREAM, "")
        if not msg.reply or not stream_id:
            log.warning("ignoring stream request on %s without inbox or stream id", self.subject)
            return
        ctx = StreamContext(stream_id)
        writer = _StreamWriter(self, msg.reply)
        self._streams[stream_id] = (asyncio.current_task(), ctx, writer)  # type: ignore[assignment]
        try:
            await writer.run(self._stream, msg.data, ctx)  # type: ignore[arg-type]
        finally:
            self._streams.pop(stream_id, None)
            self._m._ended.append((time.monotonic(), msg.reply, writer.next_seq))

    def writers(self) -> list[_StreamWriter]:
        """The writers of the streams running now."""
        return [writer for _, _, writer in self._streams.values()]


class _StreamWriter:
    """Sends one stream's frames with consecutive sequence numbers."""

    def __init__(self, svc: Service, inbox: str) -> None:
        self._svc = svc
        self._m = svc._m
        self._inbox = inbox
        self._seq = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    async def _send(self, kind: str, payload: bytes = b"", extra: dict[str, str] | None = None) -> None:
        # The sequence number is used up only once the frame passed the size check, so a frame
        # refused for its size leaves no gap before the error frame that follows it; it is taken
        # before the publish yields, so a sync frame sent meanwhile cannot reuse it.
        headers = {H_KIND: kind, H_SEQ: str(self._seq), **(extra or {})}
        self._m.check_size(payload, headers, f"stream {kind} frame from {self._svc.subject}")
        self._seq += 1
        await self._m._nc.publish(self._inbox, payload, headers=headers)

    async def sync(self) -> None:
        try:
            await self._send("sync")
        except Exception as exc:  # noqa: BLE001 (the connection may be gone again)
            log.warning("could not send a sync frame on %s: %s", self._svc.subject, exc)

    async def run(self, handler: StreamHandler, payload: bytes, ctx: StreamContext) -> None:
        try:
            await self._send("start", extra={H_CONTROL: self._svc.control_subject})
            items = handler(payload, ctx)
            if not hasattr(items, "__aiter__"):
                if inspect.iscoroutine(items):
                    items.close()
                raise TypeError(f"stream handler for {self._svc.subject} is not an async generator")
            async for item in items:
                await self._send("data", item)
            await self._send("end")
        except asyncio.CancelledError:
            if not ctx.cancelled.is_set():  # we are stopping, the client still waits: tell it
                await self._error(503, "unavailable", f"{self._svc.subject} is stopping")
            raise
        except RemoteError as exc:
            await self._error(exc.code, exc.type, exc.message)
        except Exception as exc:  # noqa: BLE001 (a failing handler must not take the service down)
            log.exception("stream handler for %s failed", self._svc.subject)
            await self._error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    async def _error(self, code: int, type_: str, message: str) -> None:
        try:
            await self._send("error", _error_body(code, type_, message[:2000]))
        except Exception as exc:  # noqa: BLE001 (the connection may be gone; nothing more to do)
            log.warning("could not send error frame on %s: %s", self._svc.subject, exc)
