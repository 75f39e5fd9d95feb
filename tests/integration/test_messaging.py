"""Messaging against a real nats-server: requests, streams, cancels, limits, restarts, routing."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.messaging import (
    MessagingConfig,
    Messenger,
    MessagingError,
    NoResponders,
    PayloadTooLarge,
    RemoteError,
    RequestTimeout,
    StreamContext,
)
from common.protocol import ErrorReply, TokenDelta, decode, encode
from tests.support.servers import ServerProc, _nats_ready, find_binary, free_port, start_nats


@pytest.fixture
async def m(nats_server: ServerProc) -> AsyncIterator[Messenger]:
    messenger = await Messenger.connect(nats_server.url, name="test")
    yield messenger
    await messenger.close()


async def echo(data: bytes) -> bytes:
    return data


async def count_to(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
    for i in range(int(data)):
        yield i.to_bytes(4, "big")


async def test_connect_to_nothing_fails_clearly() -> None:
    with pytest.raises(MessagingError, match="did not answer"):
        await Messenger.connect(f"nats://127.0.0.1:{free_port()}", timeout=1.0)


async def test_request_reply_and_errors(m: Messenger, namespace: str) -> None:
    async def handler(data: bytes) -> bytes:
        if data == b"bad":
            raise RemoteError(400, "invalid_request", "bad input: send something else")
        if data == b"crash":
            raise KeyError("boom")
        return encode(TokenDelta(request_id=data.decode(), token_ids=(1, 2)))

    await m.serve_unary(f"{namespace}.x", handler, queue="decode")
    reply = decode(await m.request(f"{namespace}.x", b"r1", timeout=2), TokenDelta)
    assert reply.request_id == "r1" and reply.token_ids == (1, 2)
    with pytest.raises(RemoteError) as info:
        await m.request(f"{namespace}.x", b"bad", timeout=2)
    assert (info.value.code, info.value.type) == (400, "invalid_request")
    assert "send something else" in info.value.message
    with pytest.raises(RemoteError) as info:
        await m.request(f"{namespace}.x", b"crash", timeout=2)
    assert info.value.code == 500 and "KeyError" in info.value.message
    assert decode(await m.request(f"{namespace}.x", b"r2", timeout=2)).request_id == "r2"


async def test_no_responders_fails_fast(m: Messenger, namespace: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(NoResponders):
        await m.request(f"{namespace}.nobody", b"x", timeout=5)
    with pytest.raises(NoResponders):
        async with m.stream(f"{namespace}.nobody", b"x", timeout=5) as s:
            async for _ in s:
                pass
    assert time.monotonic() - t0 < 1.0


async def test_slow_responder_times_out(m: Messenger, namespace: str) -> None:
    async def slow(data: bytes) -> bytes:
        await asyncio.sleep(3)
        return data

    await m.serve_unary(f"{namespace}.slow", slow)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout):
        await m.request(f"{namespace}.slow", b"x", timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 1.5


async def test_ten_thousand_streamed_in_order(m: Messenger, namespace: str) -> None:
    await m.serve_stream(f"{namespace}.count", count_to)
    async with m.stream(f"{namespace}.count", b"10000", timeout=5) as s:
        got = [int.from_bytes(chunk, "big") async for chunk in s]
    assert got == list(range(10_000))


async def test_stream_error_frame(m: Messenger, namespace: str) -> None:
    async def fails_after_two(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"
        raise RemoteError(413, "too_long", "prompt too long: shorten it")

    await m.serve_stream(f"{namespace}.fail", fails_after_two)
    got = []
    with pytest.raises(RemoteError) as info:
        async with m.stream(f"{namespace}.fail", b"", timeout=2) as s:
            async for chunk in s:
                got.append(chunk)
    assert got == [b"a", b"b"] and info.value.code == 413
    assert decode(ErrorReply(code=413, message="x").model_dump_json()).code == 413


async def test_cancel_reaches_responder_and_stops_stream(m: Messenger, namespace: str) -> None:
    produced: list[int] = []
    cancelled = asyncio.Event()
    task_cancelled = asyncio.Event()

    async def forever(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        try:
            while True:
                produced.append(len(produced))
                yield b"tok"
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            task_cancelled.set()
            raise
        finally:
            if ctx.cancelled.is_set():
                cancelled.set()

    await m.serve_stream(f"{namespace}.forever", forever)
    received = 0
    async with m.stream(f"{namespace}.forever", b"", timeout=2) as s:
        async for _ in s:
            received += 1
            if received == 5:
                break  # leaving early sends the cancel
    await asyncio.wait_for(cancelled.wait(), 2)
    assert task_cancelled.is_set()
    n = len(produced)
    await asyncio.sleep(0.2)
    assert len(produced) == n  # the handler really stopped


async def test_idle_stream_times_out_and_cancels(m: Messenger, namespace: str) -> None:
    cancelled = asyncio.Event()

    async def stalls(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        yield b"first"
        try:
            await asyncio.sleep(30)
        finally:
            if ctx.cancelled.is_set():
                cancelled.set()
        yield b"never"

    await m.serve_stream(f"{namespace}.stall", stalls)
    with pytest.raises(RequestTimeout):
        async with m.stream(f"{namespace}.stall", b"", timeout=0.3) as s:
            assert await anext(s) == b"first"
            await anext(s)
    await asyncio.wait_for(cancelled.wait(), 2)


async def test_bad_handler_gives_500_and_service_survives(m: Messenger, namespace: str) -> None:
    async def not_a_generator(data: bytes, ctx: StreamContext) -> bytes:  # a wrong handler
        return data

    svc = await m.serve_stream(f"{namespace}.bad", not_a_generator)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(RemoteError) as info:
            async with m.stream(f"{namespace}.bad", b"", timeout=2) as s:
                async for _ in s:
                    pass
        assert info.value.code == 500
    assert svc.handled == 2


async def test_stopping_service_ends_open_streams(m: Messenger, namespace: str) -> None:
    async def slow(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        yield b"x"
        await asyncio.sleep(30)
        yield b"y"

    svc = await m.serve_stream(f"{namespace}.stopping", slow)
    with pytest.raises(RemoteError) as info:
        async with m.stream(f"{namespace}.stopping", b"", timeout=5) as s:
            assert await anext(s) == b"x"
            await svc.stop()
            await anext(s)
    assert info.value.code == 503


async def test_oversize_fails_at_once_and_connection_survives(tmp_path: Path, namespace: str) -> None:
    limit = 64 * 1024
    with start_nats(tmp_path, max_payload=limit) as server:
        m = await Messenger.connect(server.url)
        try:
            assert m.max_payload == limit

            async def big_reply(data: bytes) -> bytes:
                return b"r" * (limit + 1)

            async def big_item(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
                yield b"z" * limit  # fits alone, not with the frame headers

            await m.serve_unary(f"{namespace}.echo", echo)
            await m.serve_unary(f"{namespace}.big", big_reply)
            await m.serve_stream(f"{namespace}.bigitem", big_item)
            t0 = time.monotonic()
            with pytest.raises(PayloadTooLarge, match=f"{limit + 1} bytes.*max_payload of {limit}"):
                await m.request(f"{namespace}.echo", b"x" * (limit + 1), timeout=5)
            with pytest.raises(PayloadTooLarge, match=f"max_payload of {limit}"):
                await m.publish(f"{namespace}.echo", b"x" * (limit + 1))
            # Fits on its own; the stream headers push it over: nats-py's own check would let it
            # through and the server would drop the connection.
            with pytest.raises(PayloadTooLarge, match="headers"):
                async with m.stream(f"{namespace}.echo", b"x" * (limit - 10), timeout=5):
                    pass
            assert time.monotonic() - t0 < 0.5
            with pytest.raises(RemoteError, match="max_payload"):
                await m.request(f"{namespace}.big", b"", timeout=5)
            with pytest.raises(RemoteError, match="max_payload"):
                async with m.stream(f"{namespace}.bigitem", b"", timeout=5) as s:
                    async for _ in s:
                        pass
            assert m.is_connected
            assert await m.request(f"{namespace}.echo", b"x" * (limit - 1), timeout=5) == b"x" * (limit - 1)
        finally:
            await m.close()


async def test_survives_nats_restart(own_nats: ServerProc, namespace: str) -> None:
    worker = await Messenger.connect(own_nats.url, name="worker")
    client = await Messenger.connect(own_nats.url, name="client")
    try:
        await worker.serve_unary(f"{namespace}.echo", echo, queue="encode")
        await worker.serve_stream(f"{namespace}.count", count_to)
        assert await client.request(f"{namespace}.echo", b"before", timeout=2) == b"before"
        await asyncio.to_thread(own_nats.restart, 0.3)
        reply = await _retry_request(client, f"{namespace}.echo", b"after", within=10)
        assert reply == b"after"
        async with client.stream(f"{namespace}.count", b"100", timeout=5) as s:
            assert [int.from_bytes(c, "big") async for c in s] == list(range(100))
    finally:
        await client.close()
        await worker.close()


async def test_queue_group_spreads_and_instance_routing_is_exact(nats_server: ServerProc,
                                                                  namespace: str) -> None:
    workers = [await Messenger.connect(nats_server.url, name=f"w{i}") for i in range(2)]
    client = await Messenger.connect(nats_server.url, name="client")
    try:
        role_svcs, inst_svcs = [], []
        for i, w in enumerate(workers):
            async def whoami(data: bytes, i: int = i) -> bytes:
                return str(i).encode()
            role_svcs.append(await w.serve_unary(f"{namespace}.decode.m.decode", whoami, queue="decode"))
            inst_svcs.append(await w.serve_unary(f"{namespace}.inst.w{i}.decode", whoami))
        replies = await asyncio.gather(*(client.request(f"{namespace}.decode.m.decode", b"", timeout=5)
                                         for _ in range(200)))
        counts = [replies.count(b"0"), replies.count(b"1")]
        assert sum(counts) == 200 and min(counts) >= 30, counts  # each took its share
        assert [s.handled for s in role_svcs] == counts  # queue group: each request handled once
        for _ in range(20):
            assert await client.request(f"{namespace}.inst.w1.decode", b"", timeout=5) == b"1"
        assert [s.handled for s in inst_svcs] == [0, 20]
    finally:
        await client.close()
        for w in workers:
            await w.close()


async def _retry_request(m: Messenger, subject: str, payload: bytes, within: float) -> bytes:
    """Requests fail while the client and the responder reconnect; the first success wins."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await m.request(subject, payload, timeout=0.5)
        except MessagingError:  # NoResponders, RequestTimeout, not connected yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)



# ---------------------------------------------------------------------- load: no hangs, no silent loss

LOAD_PAYLOAD = 700_000  # about one 512x512 PNG as a data: URL


class ThreadResponder:
    """A responder with its own event loop on its own thread (as a worker process has), so a test
    can stall that loop (``block``) the way a busy engine and the GIL stall a worker's."""

    def __init__(self, url: str, config: MessagingConfig | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="responder", daemon=True)
        self._thread.start()
        self.m: Messenger = self.call(Messenger.connect(url, name="responder", config=config))

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def block(self, seconds: float) -> None:
        """Stall the responder's loop (nothing on it runs, its socket is not read)."""
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    def stop(self) -> None:
        try:
            self.call(self.m.close(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def _start_nats_conf(tmp_path: Path, max_pending: int) -> ServerProc:
    """A nats-server with this max_pending (its max_payload may not exceed it), stopped by PID."""
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\nmax_payload: {min(8 << 20, max_pending)}\n"
                    f"max_pending: {max_pending}\n")
    return ServerProc("nats", [find_binary("nats-server"), "-c", str(conf)], f"nats://127.0.0.1:{port}",
                      tmp_path / "nats.log", _nats_ready(port)).start()


async def three_items(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
    for i in range(3):
        yield f"{len(data)}:{i}".encode()


async def _one_stream(client: Messenger, subject: str, payload: bytes, timeout: float = 30.0,
                      accept: float | None = None) -> tuple[str, float, list[bytes] | Exception]:
    """(outcome, seconds, items or the exception): outcome is "ok" or the error's class name."""
    t0 = time.monotonic()
    items: list[bytes] = []
    try:
        async with client.stream(subject, payload, timeout=timeout, accept_timeout=accept) as s:
            async for chunk in s:
                items.append(chunk)
    except MessagingError as exc:
        return type(exc).__name__, time.monotonic() - t0, exc
    return "ok", time.monotonic() - t0, items


async def test_requests_lost_by_the_server_fail_fast(tmp_path: Path, namespace: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The H100 failure on CPU: a responder whose loop stalls while ~17 MB of requests queue for
    it exceeds the server's max_pending; the server cuts it off and drops what was in flight.
    Every client must get its full stream or a clear error within the accept timeout, not hang."""
    accept = 2.0
    with _start_nats_conf(tmp_path, 4 << 20) as server:
        responder = ThreadResponder(server.url)
        client = await Messenger.connect(server.url, name="client")
        try:
            subject = f"{namespace}.gen"
            responder.call(responder.m.serve_stream(subject, three_items))
            responder.block(3.0)
            payload = b"u" * LOAD_PAYLOAD
            results = await asyncio.gather(*(_one_stream(client, subject, payload, accept=accept)
                                             for _ in range(24)))
            outcomes = collections.Counter(r[0] for r in results)
            assert "Slow Consumer Detected" in server.log_tail(50)  # the cause, as on H100
            assert set(outcomes) <= {"ok", "NotAccepted", "NoResponders", "StreamGap", "RemoteError"}, outcomes
            assert outcomes["NotAccepted"] + outcomes["StreamGap"] >= 1, outcomes  # losses were seen
            for outcome, seconds, got in results:
                if outcome == "ok":  # complete and in order, never partial
                    assert got == [f"{LOAD_PAYLOAD}:{i}".encode() for i in range(3)]
                else:
                    assert seconds < 3.0 + accept + 2.0, (outcome, seconds, got)
            # After the responder reconnected a retry works; it said what happened, at WARNING.
            outcome, _, got = await _retry_stream(client, subject, payload, within=15)
            assert outcome == "ok" and len(got) == 3
            assert "disconnected from NATS" in caplog.text and "Slow Consumer" in caplog.text
        finally:
            await client.close()
            responder.stop()


async def _retry_stream(client: Messenger, subject: str, payload: bytes,
                        within: float) -> tuple[str, float, Any]:
    deadline = time.monotonic() + within
    while True:
        result = await _one_stream(client, subject, payload, timeout=5, accept=2)
        if result[0] == "ok" or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


async def test_generous_limits_take_a_burst_of_large_requests(tmp_path: Path, namespace: str) -> None:
    """The same stalled responder with launch/common.sh's max_pending: nothing is lost."""
    with _start_nats_conf(tmp_path, 1 << 30) as server:
        responder = ThreadResponder(server.url)
        client = await Messenger.connect(server.url, name="client")
        try:
            subject = f"{namespace}.gen"
            responder.call(responder.m.serve_stream(subject, three_items))
            responder.block(3.0)
            results = await asyncio.gather(*(_one_stream(client, subject, b"u" * LOAD_PAYLOAD, accept=10)
                                             for _ in range(24)))
            assert [r[0] for r in results] == ["ok"] * 24, [r[:2] for r in results]
        finally:
            await client.close()
            responder.stop()


async def test_messages_the_client_library_drops_are_answered_503(nats_server: ServerProc,
                                                                  namespace: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """nats-py drops what exceeds a subscription's pending limit (slow consumer): the responder
    logs it at WARNING and answers the dropped request with 503 "overloaded" at once."""
    tight = MessagingConfig(pending_msgs_limit=1)
    responder = await Messenger.connect(nats_server.url, name="tight", config=tight)
    client = await Messenger.connect(nats_server.url, name="client")
    try:
        await responder.serve_stream(f"{namespace}.s", three_items)
        await responder.serve_unary(f"{namespace}.u", echo)
        t0 = time.monotonic()
        streams = await asyncio.gather(*(_one_stream(client, f"{namespace}.s", b"x" * 100, accept=10)
                                         for _ in range(300)))
        unary = await asyncio.gather(*(client.request(f"{namespace}.u", b"x", timeout=10)
                                       for _ in range(300)), return_exceptions=True)
        assert time.monotonic() - t0 < 10
        refused = [r[2] for r in streams if r[0] != "ok"] + [r for r in unary if r != b"x"]
        assert refused, "nothing was dropped: the test did not load the responder enough"
        for exc in refused:
            assert isinstance(exc, RemoteError) and (exc.code, exc.type) == (503, "overloaded"), exc
            assert "slow consumer" in exc.message and "retry" in exc.message
        assert all(r[2] == [b"100:0", b"100:1", b"100:2"] for r in streams if r[0] == "ok")
        assert "NATS dropped a message on" in caplog.text and f"{namespace}." in caplog.text
    finally:
        await client.close()
        await responder.close()


async def test_unaccepted_stream_fails_fast_and_a_late_start_is_cancelled(nats_server: ServerProc,
                                                                          namespace: str) -> None:
    responder = ThreadResponder(nats_server.url)
    client = await Messenger.connect(nats_server.url, name="client")
    started, cancelled = threading.Event(), threading.Event()

    async def slow_to_start(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        started.set()
        try:
            while True:
                yield b"tok"
                await asyncio.sleep(0.01)
        finally:
            if ctx.cancelled.is_set():
                cancelled.set()

    try:
        subject = f"{namespace}.late"
        responder.call(responder.m.serve_stream(subject, slow_to_start))
        responder.block(1.5)
        outcome, seconds, exc = await _one_stream(client, subject, b"", timeout=30, accept=0.3)
        assert outcome == "NotAccepted" and 0.25 < seconds < 1.2, (outcome, seconds)
        assert "not accepted within 0.3 s" in str(exc) and "overloaded" in str(exc)
        # The responder takes it once its loop runs again; the client's late cancel stops it.
        assert await asyncio.to_thread(started.wait, 10)
        assert await asyncio.to_thread(cancelled.wait, 10)
    finally:
        await client.close()
        responder.stop()
