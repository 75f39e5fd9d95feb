"""Request/reply and streaming over NATS (DESIGN section 3). The only module that imports nats.

Payloads are opaque bytes (normally ``protocol.encode(msg)``). What this module adds on top of NATS:

* Unary: ``request()`` -> one reply. An error reply carries the ``Triad-Kind: error`` header and an
  ``ErrorReply`` body, and is raised on the caller's side as ``RemoteError``.
* Streams: the client subscribes to a fresh inbox and publishes the request with that inbox as
  the reply subject and a stream id. The responder answers with frames, each carrying a
  ``Triad-Seq`` header (0, 1, 2, ...) and a ``Triad-Kind``:
    start (seq 0; names the responder's control subject, where cancels go)
    data  (one handler item each)
    end   (the handler finished)  |  error (ErrorReply body)
  The client checks that sequence numbers have no gap. Leaving a stream early publishes a cancel
  to the control subject: the responder sets ``StreamContext.cancelled`` and cancels the task.
* Size: a message larger than the server's ``max_payload`` (payload plus header bytes, as the
  server counts them) raises ``PayloadTooLarge`` at once instead of costing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
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
_CANCEL_GRACE_S = 1.0  # how long a leaving client waits for the start frame to learn where to cancel


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

    def __init__(self, nc: Client, servers: str) -> None:
        self._nc = nc
        self.servers = servers
        self._services: set[Service] = set()

    @classmethod
    async def connect(cls, servers: str, name: str = "", timeout: float = 5.0) -> Messenger:
        """Connect (raise MessagingError if no server answers within ``timeout``); after that the
        connection reconnects by itself forever and restores its subscriptions."""
        nc = Client()

        async def on_error(exc: Exception) -> None:
            log.debug("nats %s: %s", servers, exc)

        try:
            async with asyncio.timeout(timeout):
                await nc.connect(servers.split(","), name=name or None, error_cb=on_error,
                                 max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                 connect_timeout=2)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise MessagingError(f"NATS at {servers} did not answer within {timeout} s: {exc}") from exc
        return cls(nc, servers)

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

    def stream(self, subject: str, payload: bytes, timeout: float) -> ClientStream:
        """``async with m.stream(...) as s: async for chunk in s`` (timeout: first item and gaps)."""
        return ClientStream(self, subject, payload, timeout)

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
        for svc in list(self._services):
            await svc.stop()
        if self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
        await self._nc.close()


class ClientStream:
    """The client's end of one stream; iterate it inside ``async with``."""

    def __init__(self, m: Messenger, subject: str, payload: bytes, timeout: float) -> None:
        self._m = m
        self._subject = subject
        self._payload = payload
        self._timeout = timeout
        self.stream_id = uuid.uuid4().hex
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Any = None
        self._control = ""
        self._next_seq = 0
        self._done = False

    async def __aenter__(self) -> ClientStream:
        headers = {H_STREAM: self.stream_id}
        self._m.check_size(self._payload, headers, "stream request")
        nc = self._m._nc
        inbox = nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            self._queue.put_nowait(msg)

        self._sub = await nc.subscribe(inbox, cb=on_msg)
        await nc.publish(self._subject, self._payload, reply=inbox, headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if not self._done:
                await self._cancel()
        finally:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def __aiter__(self) -> ClientStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            kind, msg = await self._next_frame(self._timeout)
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
            raise RequestTimeout(f"stream from {self._subject!r}: nothing for {timeout} s") from None
        if _is_no_responders(msg):
            self._done = True
            raise NoResponders(f"no service listens on {self._subject!r}")
        headers = msg.headers or {}
        seq, kind = int(headers.get(H_SEQ, -1)), headers.get(H_KIND, "")
        if seq != self._next_seq:
            self._done = True
            raise StreamGap(f"stream from {self._subject!r}: expected frame {self._next_seq}, got {seq}")
        self._next_seq += 1
        if kind == "start":
            self._control = headers.get(H_CONTROL, "")
        return kind, msg

    async def _cancel(self) -> None:
        """Tell the responder to stop; wait briefly for the start frame if it has not come yet."""
        with contextlib.suppress(MessagingError):
            while not self._control and self._next_seq == 0:
                await self._next_frame(min(self._timeout, _CANCEL_GRACE_S))
        self._done = True
        if self._control and self._m._nc.is_connected:
            await self._m._publish(self._control, b"", headers={H_STREAM: self.stream_id})


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
        self._streams: dict[str, tuple[asyncio.Task[None], StreamContext]] = {}
        self.control_subject = ""
        self.handled = 0  # requests taken (visible for tests and metrics)

    async def _start(self) -> None:
        nc = self._m._nc
        self._subs.append(await nc.subscribe(self.subject, queue=self.queue or "", cb=self._on_request))
        if self._stream is not None:
            self.control_subject = nc.new_inbox()
            self._subs.append(await nc.subscribe(self.control_subject, cb=self._on_control))
        await nc.flush(timeout=5)  # the subscription is live at the server when we return

    async def stop(self) -> None:
        for sub in self._subs:
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
            task, ctx = entry
            ctx.cancelled.set()
            task.cancel()

    async def _send_error(self, reply: str, code: int, type_: str, message: str) -> None:
        headers = {H_KIND: "error"}
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
        self._streams[stream_id] = (asyncio.current_task(), ctx)  # type: ignore[assignment]
        try:
            await _StreamWriter(self, msg.reply).run(self._stream, msg.data, ctx)  # type: ignore[arg-type]
        finally:
            self._streams.pop(stream_id, None)


class _StreamWriter:
    """Sends one stream's frames with consecutive sequence numbers."""

    def __init__(self, svc: Service, inbox: str) -> None:
        self._svc = svc
        self._m = svc._m
        self._inbox = inbox
        self._seq = 0

    async def _send(self, kind: str, payload: bytes = b"", extra: dict[str, str] | None = None) -> None:
        # The sequence number is used up only once the frame is sent, so a frame refused for its
        # size leaves no gap before the error frame that follows it.
        headers = {H_KIND: kind, H_SEQ: str(self._seq), **(extra or {})}
        self._m.check_size(payload, headers, f"stream {kind} frame from {self._svc.subject}")
        await self._m._nc.publish(self._inbox, payload, headers=headers)
        self._seq += 1

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
