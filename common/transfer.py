"""UCX data plane: an owner registers tensors under a key, a receiver pulls them into its own.

ucxx (0.52) has tag messages but no RMA from Python, so a *pull* is receiver-initiated. It takes
one round trip, and its data is its answer:

1. The receiver plans the messages from its own region layout alone (``receiver_plan``: one per
   run of adjacent regions, at most ``max_ops``) and posts, on its data worker, one receive per
   message (tag ``tid + 1 + i``; straight into its tensors or, where its regions are scattered,
   into one staging buffer it scatters afterwards). Only then does it send the request (tag
   ``_REQ_TAG``, from its control worker): the protocol version, the key, its region sizes
   (run-length encoded), the plan's cuts, its data worker's address, its FIFO size and a fresh
   transaction id ``tid``.
2. The owner takes the request on its control worker's notifier thread (no event-loop hop:
   ``_serve_ready``), looks the key up and checks the sizes, the plan and that both sides use
   the same shared-memory FIFO size. On success it posts, right there, each planned message
   that lies inside one of its runs (zero-copy from its registered tensors); a message spanning
   several of its runs is gathered into a staging buffer on its event loop and sent from there.
   There is no success reply: the pull ends when every data receive has completed.
3. On an error (unknown key, size or FIFO-size mismatch, bad plan) the owner sends only an
   error reply, tag ``tid``, its body carrying ``tid``. Each data worker keeps one standing
   receive for those (tag mask ``_REFUSAL_MASK``), which hands the reply to the waiting pull;
   that pull completes its own pre-posted data receives with zero-byte messages to itself
   (nothing is written into its tensors) and raises UnknownKey / ValueError / TransferError.

So a pull costs 1 control operation (the request) plus at most ``max_ops`` data operations,
however many regions (layers x blocks) it covers; a release costs 2 (request, reply receive);
``TransferAgent.stats`` counts them. The price of planning on the receiver: where the owner's
regions are split inside one receiver run, the owner gathers that message (one extra copy on
its side) where it could have sent the pieces separately.

What a small pull waits for, in order (measured, docs/benchmarks.md): the receiver's posts
reach its UCX progress threads; the request reaches the owner's progress thread and notifier
thread, which posts the sends; their progress thread sends; the data reaches the receiver's
data progress thread, its notifier thread and its event loop. Each of those is a thread
wake-up; earlier versions had two round trips and three more event-loop hops.

Threads: the agent lives on one asyncio loop (the one that ran ``start()``); ``register`` and
``unregister`` may also be called from another thread. Pull requests are served on the control
worker's notifier thread: it reads ``_entries`` and each entry's ``busy`` under ``_lock`` and
only posts UCX operations; everything else (waiting for completions, gathers, the staging pool,
stats, releases) runs on the loop. ``on_release(key)`` runs on the thread that frees the
handle: the caller of ``unregister``, or the agent's loop (remote ``release``, TTL expiry,
``close``). It must not block; its exceptions are logged and swallowed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common import transfer_plan as plan_mod
from common.transfer_plan import RegionMap

log = logging.getLogger("triad.transfer")

_REQ_TAG = 0x7472_6961_6400_0001  # control requests to an owner; tids have the top bit set
_PROTO = 2  # pull protocol: 2 = the receiver plans and posts its receives before asking
_REPLY_BYTES = 4096  # the largest reply a receiver takes
# A pull's error reply has tag ``tid`` (top bit set, low 16 bits zero); one standing receive
# per data worker takes them all: tag _REFUSAL_TAG under _REFUSAL_MASK.
_REFUSAL_TAG = 1 << 63
_REFUSAL_MASK = (1 << 63) | 0xFFFF
_MAX_MESSAGES = 1 << 15  # messages one pull may plan (tags tid + 1 ... stay inside one tid)
# Gathers/scatters larger than this run in a worker thread: measured with a pull in flight, a
# 7 MiB / 128-piece gather took ~4 ms in a thread but ~250 ms inline on the event loop.
_STAGE_IN_THREAD_BYTES = 64 << 10


class TransferError(Exception):
    """A transfer failed."""


class TransferTimeout(TransferError):
    """The peer did not answer or finish within the timeout (it may be dead or overloaded)."""


class UnknownKey(TransferError):
    """The owner holds nothing under this key (never registered, released or expired)."""


@dataclass(frozen=True)
class TransferConfig:
    """Settings of one agent."""

    handle_ttl_s: float = 60.0  # an owner frees a handle nobody released after this long
    op_timeout_s: float = 10.0  # bound on a whole pull/release and on each owner-side send
    max_ops: int = 8  # most data messages per pull (UCX operations do not grow with regions)
    control_bytes: int = 64 * 1024  # largest control message an owner accepts
    staging_pool_bytes: int = 256 << 20  # staging buffers kept for reuse (per agent)
    # UCX transports (UCX_TLS syntax; the UCX_TLS environment variable wins). CMA is off: a
    # peer dying mid-read would abort this process (see common/transfer_ucx.py).
    ucx_tls: str | None = "^cma"
    # While a send larger than the shared-memory FIFO is in flight, wake the sending UCX worker
    # this often (0: never): a sender stalled on a full FIFO otherwise waits out a 1 ms epoll
    # timeout (see common/transfer_ucx.py). Idle, it costs nothing.
    kick_interval_us: float = 100.0

    def __post_init__(self) -> None:
        for name in ("handle_ttl_s", "op_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TransferConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_ops < 1:
            raise ValueError(f"TransferConfig.max_ops must be >= 1, got {self.max_ops}")
        if self.kick_interval_us < 0:
            raise ValueError(
                f"TransferConfig.kick_interval_us must be >= 0, got {self.kick_interval_us}")
        if self.control_bytes < 1024:
            raise ValueError(
                f"TransferConfig.control_bytes must be >= 1024, got {self.control_bytes}")


@dataclass
class TransferStats:
    """Counters since start; UCX operations are counted one per tag send/receive posted."""

    pulls: int = 0
    pulled_bytes: int = 0
    pull_control_ops: int = 0  # requests sent (1 per pull) + reply receives (1 per release)
    pull_data_ops: int = 0  # data receives posted (before the owner answers, so on errors too)
    scattered_bytes: int = 0  # bytes received through a staging buffer (one extra copy)
    served_pulls: int = 0
    served_data_ops: int = 0  # data sends posted
    gathered_bytes: int = 0  # bytes sent through a staging buffer (one extra copy)
    timeouts: int = 0
    released: int = 0  # handles freed by unregister or a remote release
    expired: int = 0  # handles freed by TTL


@dataclass
class _Entry:
    rmap: RegionMap
    expires: float
    on_release: Callable[[str], Any] | None
    busy: int = 0  # sends in flight: TTL expiry waits for them (rmap's views keep memory alive)


class TransferAgent:
    """Owner and receiver of tensors over UCX. See the module docstring for the protocol."""

    def __init__(self, config: TransferConfig | None = None) -> None:
        self.config = config or TransferConfig()
        self.stats = TransferStats()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._ucx: Any = None  # control in/out, data out; its address is the published one
        self._data: Any = None  # data in; replaced after a pull times out (see _retire)
        self._retired: list[Any] = []
        self._refusals: dict[int, asyncio.Future[dict[str, Any]]] = {}  # tid -> error reply
        self._inbox: asyncio.Task[Any] | None = None  # reads refusals on the data worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake: asyncio.Event | None = None
        self._pool = plan_mod.StagingPool(self.config.staging_pool_bytes)  # the loop's only
        self._fifo = ""  # shared-memory FIFO size; set by start()
        # The posted request receive; taken and re-posted by _serve_ready (see "Threads").
        self._serve_lock = threading.Lock()
        self._req: Any = None
        self._req_buf = bytearray(self.config.control_bytes)
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the UCX worker and start serving control messages on the running loop."""
        from common.transfer_ucx import UcxWorker, mm_fifo_size  # imports ucxx: agents only

        self._loop = asyncio.get_running_loop()
        self._fifo = mm_fifo_size()
        cfg = self.config
        self._ucx = UcxWorker(self._loop, cfg.ucx_tls, cfg.kick_interval_us * 1e-6)
        self._data = UcxWorker(self._loop, cfg.ucx_tls, 0.0)  # receives only: nothing to kick
        self._wake = asyncio.Event()
        self._start_inbox()
        with self._serve_lock:
            self._post_request_recv()
        self._ucx.on_ready = self._serve_ready
        self._spawn(self._reap())

    @property
    def address(self) -> str:
        """This agent's UCX worker address, base64 (InstanceRecord.ucx_address)."""
        if self._ucx is None:
            raise RuntimeError("TransferAgent.start() has not been awaited")
        return self._ucx.address

    @property
    def num_registered(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        """Stop serving, free every registered handle (calling on_release), close UCX."""
        with self._serve_lock:  # waits for a request being served on the notifier thread
            self._closing = True
        if self._ucx is not None:
            self._ucx.on_ready = None
        await asyncio.sleep(0)  # let continuations it handed to the loop start (then cancel them)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for key in list(self._entries):
            self._drop(key, expired=False)
        for worker in (self._ucx, self._data, *self._retired):
            if worker is not None:
                await worker.close()
        self._ucx = self._data = None
        self._retired.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_threadsafe(self, coro: Coroutine[Any, Any, Any]) -> None:
        """``_spawn`` from another thread (the control worker's notifier)."""
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._spawn, coro)
        except RuntimeError:  # the loop is closed: the agent is gone
            coro.close()

    # ------------------------------------------------------------------ owner side

    def register(self, key: str, tensors: Sequence[torch.Tensor], ttl_s: float | None = None,
                 on_release: Callable[[str], Any] | None = None) -> dict[str, Any]:
        """Hold ``tensors`` (contiguous; not copied) under ``key`` until released or ``ttl_s``.

        Returns a small descriptor for a handle's ``remote`` field.
        """
        rmap = plan_mod.region_map(tensors, "tensors")
        ttl = self.config.handle_ttl_s if ttl_s is None else ttl_s
        if not ttl > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl}")
        with self._lock:
            if key in self._entries:
                raise ValueError(f"key {key!r} is already registered; unregister it first")
            self._entries[key] = _Entry(rmap, time.monotonic() + ttl, on_release)
        self._poke_reaper()
        return {"nbytes": rmap.total, "regions": len(rmap.sizes), "device": rmap.device.type}

    def unregister(self, key: str) -> bool:
        """Free ``key`` now (calls its on_release); False when it was not registered."""
        return self._drop(key, expired=False)

    def _drop(self, key: str, expired: bool) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (expired and entry.busy):  # expiry waits for sends in flight
                return False
            del self._entries[key]
        if expired:
            self.stats.expired += 1
        else:
            self.stats.released += 1
        if entry.on_release is not None:
            try:
                entry.on_release(key)
            except Exception:
                log.exception("on_release(%r) raised", key)
        return True

    def _poke_reaper(self) -> None:
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _reap(self) -> None:
        """Free handles whose TTL ran out (not while a send from them is in flight)."""
        assert self._wake is not None
        while True:
            now = time.monotonic()
            with self._lock:
                due = [k for k, e in self._entries.items() if e.expires <= now and e.busy == 0]
                nxt = min((e.expires for e in self._entries.values()), default=now + 1.0)
            for key in due:
                log.info("transfer handle %r expired unreleased", key)
                self._drop(key, expired=True)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(1.0, max(0.01, nxt - now)))
            except asyncio.TimeoutError:
                pass

    def _post_request_recv(self) -> None:
        """Post the receive for the next control request (under ``_serve_lock``)."""
        self._req = self._ucx.recv(self._ucx.host_buffer(self._req_buf), _REQ_TAG)

    def _serve_ready(self) -> None:
        """Take each control request that arrived, then re-post the receive.

        Runs on the control worker's notifier thread, called each time requests complete and
        before their futures reach the loop: a pull's zero-copy data sends are posted from
        here, with no event-loop hop (measured on the project VM: a request/response round trip
        went from ~550 to ~360 us). Everything else (releases, gathers, waiting for
        completions, stats) is handed to the loop.
        """
        while True:
            with self._serve_lock:
                req = self._req
                if self._closing or req is None or not req.completed:
                    return
                self._req = None
                try:
                    req.check_error()
                    msg = plan_mod.decode(self._req_buf)
                except Exception as exc:  # a malformed or oversized message: drop it
                    log.warning("dropped a bad transfer control message: %r", exc)
                    self._repost_later()  # never spin if the worker itself is failing
                    return
                self._dispatch(msg)  # first: the next request can wait in UCX meanwhile
                try:
                    self._post_request_recv()
                except Exception:
                    log.exception("posting the transfer request receive failed")
                    self._repost_later()
                    return

    def _repost_later(self) -> None:
        """Re-post the request receive from the loop in 10 ms (any thread)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._loop.call_later, 0.01,
                                            self._repost_request_recv)
        except RuntimeError:  # the loop is closed
            pass

    def _repost_request_recv(self) -> None:
        with self._serve_lock:
            if not self._closing and self._req is None and self._ucx is not None:
                try:
                    self._post_request_recv()
                except Exception:
                    log.exception("posting the transfer request receive failed")
                    self._repost_later()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        """One control request, on the notifier thread: a pull is served here, the rest on the
        loop (``on_release`` runs on the loop, as documented). Never raises."""
        op = msg.get("op")
        try:
            if op != "pull":
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._dispatch_on_loop, msg)
                return
            rest = self._serve_pull(msg)
        except Exception:
            log.exception("serving transfer control message %r failed", op)
            return
        self._spawn_threadsafe(_logged(rest, op))

    def _dispatch_on_loop(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        try:
            if op == "release":
                released = self._drop(str(msg["key"]), expired=False)
                rest = self._reply(str(msg["from"]), int(msg["tid"]),
                                   {"ok": True, "released": released})
            else:
                log.warning("unknown transfer control op %r", op)
                return
        except Exception:
            log.exception("serving transfer control message %r failed", op)
            return
        self._spawn(_logged(rest, op))

    def _serve_pull(self, msg: dict[str, Any]) -> Coroutine[Any, Any, None]:
        """Step 2, on the notifier thread: check, then post the zero-copy data sends (or the
        error reply); returns the rest, for the loop."""
        if msg.get("proto") != _PROTO:  # an older receiver waits for its reply on "from"
            return self._reply(str(msg["from"]), int(msg["tid"]), {
                "ok": False, "error": "config_mismatch", "message": (
                    f"the receiver speaks transfer protocol {msg.get('proto', 1)}, this owner "
                    f"{_PROTO}; run one version of Triad on every node")})
        to, tid = str(msg["data_to"]), int(msg["tid"])
        with self._lock:
            entry = self._entries.get(str(msg["key"]))
            if entry is not None:
                entry.busy += 1  # until its sends end: TTL expiry waits
        if entry is None:
            return self._reply(to, tid, {"ok": False, "error": "unknown_key"})
        try:
            plan, error = self._check_pull(entry, msg)
            if error is not None:
                self._unbusy(entry)
                return self._reply(to, tid, error)
            sends = self._start_sends(to, tid, entry.rmap, plan)
        except BaseException:
            self._unbusy(entry)
            raise
        return self._finish_sends(to, entry, sends)

    def _check_pull(self, entry: _Entry, msg: dict[str, Any]
                    ) -> tuple[list[tuple[int, int]], dict[str, Any] | None]:
        """The receiver's plan, or the error reply for a pull the owner must refuse."""
        if msg.get("fifo") != self._fifo:  # would hang: see common/transfer_ucx.py
            return [], {"ok": False, "error": "config_mismatch", "message": (
                f"UCX_MM_FIFO_SIZE differs: this owner uses {self._fifo}, the receiver "
                f"{msg.get('fifo')}; give every process the same value")}
        problem = plan_mod.size_problem(entry.rmap.sizes, plan_mod.sizes_from_rle(msg["sizes"]))
        if problem:
            return [], {"ok": False, "error": "size_mismatch", "message": problem}
        try:
            return plan_mod.plan_from_cuts(entry.rmap.total, msg["cuts"], _MAX_MESSAGES), None
        except ValueError as exc:
            return [], {"ok": False, "error": "bad_plan", "message": str(exc)}

    def _unbusy(self, entry: _Entry) -> None:
        with self._lock:
            entry.busy -= 1

    def _start_sends(self, peer: str, tid: int, rmap: RegionMap,
                     plan: list[tuple[int, int]]) -> _Sends:
        """Post every planned message that lies inside one run of ``rmap`` (zero-copy); the
        others are gathered by ``_finish_sends`` on the loop. A served pull has no reply: its
        data is the answer. Any thread; touches no stats."""
        sends = _Sends(tid)
        try:
            for i, (start, end) in enumerate(plan):
                run = plan_mod.direct_run(rmap, start, end)
                if run is None:
                    sends.later.append((i, start, end))
                    continue
                buf = self._ucx.tensor_buffer(run.ptr + (start - run.start), end - start,
                                              rmap.device)
                sends.reqs.append(self._ucx.send(peer, buf, tid + 1 + i))
        except BaseException:  # could not post (a bad address?): the receiver times out
            self._ucx.abandon_threadsafe(sends.reqs, sends)  # UCX may still read the buffers
            raise
        return sends

    async def _finish_sends(self, peer: str, entry: _Entry, sends: _Sends) -> None:
        """On the loop: gather and post the messages ``_start_sends`` left (big gathers in a
        thread), then wait for every send, bounded by ``op_timeout_s``."""
        rmap = entry.rmap
        deadline = time.monotonic() + self.config.op_timeout_s
        try:
            try:
                for i, start, end in sends.later:
                    staging = self._pool.take(end - start, rmap.device)
                    sends.staged.append(staging)
                    await _stage(plan_mod.gather, end - start, rmap, start, end, staging)
                    self.stats.gathered_bytes += end - start
                    buf = self._ucx.tensor_buffer(staging.data_ptr(), end - start, rmap.device)
                    sends.reqs.append(self._ucx.send(peer, buf, sends.tid + 1 + i))
            except BaseException:  # a gather failed or we were cancelled: the receiver times out
                self._ucx.abandon(sends.reqs, [], sends)
                raise
            finally:
                self.stats.served_data_ops += len(sends.reqs)
            done = await self._ucx.wait(sends.reqs, deadline, send_bytes=rmap.total)
        finally:
            self._unbusy(entry)
        if not done:
            self.stats.timeouts += 1
            log.warning("sending %d bytes to a receiver timed out; dropping its endpoint",
                        rmap.total)
            self._ucx.forget(peer)
            self._ucx.abandon(sends.reqs, [], sends)  # UCX may still read them: never reused
            return
        for staging in sends.staged:
            self._pool.give(staging)
        self.stats.served_pulls += 1

    def _reply(self, peer: str, tid: int, body: dict[str, Any]) -> Coroutine[Any, Any, None]:
        """Post a reply with tag ``tid`` now (any thread; the body carries ``tid`` too, for a
        receiver's refusal inbox); returns the wait for its completion, for the loop."""
        deadline = time.monotonic() + self.config.op_timeout_s
        data = plan_mod.encode({**body, "tid": tid})
        req = self._ucx.send(peer, self._ucx.host_buffer(data), tid)
        return self._reply_sent(peer, req, data, deadline)

    async def _reply_sent(self, peer: str, req: Any, data: bytearray, deadline: float) -> None:
        if not await self._ucx.wait([req], deadline):
            self._ucx.forget(peer)
            self._ucx.abandon([req], [], data)

    # ------------------------------------------------------------------ receiver side

    async def pull(self, owner_address: str, key: str, dst: Sequence[torch.Tensor],
                   timeout: float | None = None) -> None:
        """Copy the owner's tensors under ``key`` into ``dst`` (same sizes, contiguous).

        Raises UnknownKey, ValueError (sizes differ from the owner's; nothing moved) or
        TransferTimeout (no full answer within ``timeout``, default ``op_timeout_s``; the
        agent stays usable and reconnects to that owner on the next call).
        """
        rmap = plan_mod.region_map(dst, "dst")
        deadline = time.monotonic() + (timeout or self.config.op_timeout_s)
        self._require_started()
        tid = _new_tid()
        data = self._data
        plan = plan_mod.receiver_plan(rmap, self.config.max_ops)
        # Step 1: every data receive is posted before the request leaves, so the data can
        # come back in one round trip. An error reply comes to the standing refusal receive.
        reqs, tags, staged = [], [], []
        for i, (start, end) in enumerate(plan):
            run = plan_mod.direct_run(rmap, start, end)
            if run is not None:
                ptr = run.ptr + (start - run.start)
            else:
                staging = self._pool.take(end - start, rmap.device)
                staged.append((start, staging[:end - start], staging))
                ptr = staging.data_ptr()
            tags.append(tid + 1 + i)
            reqs.append(data.recv(data.tensor_buffer(ptr, end - start, rmap.device), tags[-1]))
        keep = (staged, rmap)  # memory UCX may write into until the receives end
        body = plan_mod.encode({
            "op": "pull", "proto": _PROTO, "key": key, "sizes": plan_mod.sizes_rle(rmap.sizes),
            "cuts": plan_mod.plan_cuts(plan), "data_to": data.address, "fifo": self._fifo,
            "tid": tid})
        refusal = asyncio.get_running_loop().create_future()
        self._refusals[tid] = refusal
        send = self._ucx.send(owner_address, self._ucx.host_buffer(body), _REQ_TAG)
        self.stats.pull_control_ops += 1
        self.stats.pull_data_ops += len(plan)
        try:
            try:
                # Success is every data message (there is no reply then). The request's send
                # is on the control worker and has long completed by then.
                done = await data.wait([send, *reqs], deadline, until=refusal.done,
                                       watch=[refusal])
            finally:
                self._refusals.pop(tid, None)
        except BaseException:  # cancelled, or a UCX error: as on a timeout
            self._abandon_pull(owner_address, data, reqs, tags, send, (keep, body))
            raise
        if refusal.done():
            if await self._retire_receives(data, reqs, tags, keep, deadline):
                for _, _, staging in staged:
                    self._pool.give(staging)
            raise _reply_error(refusal.result(), key)
        if not done:
            self._abandon_pull(owner_address, data, reqs, tags, send, (keep, body))
            raise TransferTimeout(f"owner did not answer or finish the pull of {key!r} in "
                                  f"time ({len(plan)} messages)")
        for start, view, staging in staged:
            await _stage(plan_mod.scatter, view.numel(), rmap, start, view)
            self.stats.scattered_bytes += view.numel()
            self._pool.give(staging)
        self.stats.pulls += 1
        self.stats.pulled_bytes += rmap.total

    async def release(self, owner_address: str, key: str, timeout: float | None = None) -> bool:
        """Tell the owner it may free ``key`` (its on_release runs); True if it held the key."""
        deadline = time.monotonic() + (timeout or self.config.op_timeout_s)
        reply = await self._request(owner_address, {"op": "release", "key": key}, _new_tid(),
                                    deadline)
        return bool(reply.get("released"))

    async def _request(self, owner: str, body: dict[str, Any], tid: int,
                       deadline: float) -> dict[str, Any]:
        """A release: post the reply receive, send the request, wait for both."""
        self._require_started()
        reply_buf = bytearray(4096)
        recv = self._ucx.recv(self._ucx.host_buffer(reply_buf), tid)
        data = plan_mod.encode({**body, "tid": tid, "from": self._ucx.address})
        send = self._ucx.send(owner, self._ucx.host_buffer(data), _REQ_TAG)
        self.stats.pull_control_ops += 2
        try:
            done = await self._ucx.wait([recv, send], deadline)
        except asyncio.CancelledError:
            self._timed_out(owner, [recv, send], [tid], (reply_buf, data))
            raise
        if not done:
            self._timed_out(owner, [recv, send], [tid], (reply_buf, data))
            raise TransferTimeout(f"owner did not answer {body['op']} of {body['key']!r} in time")
        return plan_mod.decode(reply_buf)

    def _abandon_pull(self, owner: str, data: Any, reqs: list[Any], tags: list[int],
                      send: Any, keep: Any) -> None:
        """A pull timed out, was cancelled or failed: the owner may still be sending (or have
        died mid-message): retire the receives, drop the owner's endpoint and the data worker."""
        self.stats.timeouts += 1
        self._ucx.forget(owner)
        self._ucx.abandon([send], [], keep)
        data.abandon(reqs, tags, keep)  # ``keep`` is never reused: UCX may still write into it
        self._retire(data)

    async def _retire_receives(self, data: Any, reqs: list[Any], tags: list[int], keep: Any,
                               deadline: float) -> bool:
        """An error reply: the owner sends no data. Complete the pre-posted data receives with
        zero-byte messages to ourselves (nothing lands in dst) and wait for that, bounded;
        True when they all completed (their buffers are free again)."""
        pokes = data.poke(tags)
        try:
            ok = await data.wait([*reqs, *pokes], max(deadline, time.monotonic() + 1.0))
        except Exception:  # a receive failed: nothing was written, but the worker is suspect
            ok = False
        if not ok:  # should not happen: keep the memory and move to a fresh data worker
            data.abandon([*reqs, *pokes], [], keep)
            self._retire(data)
        return ok

    def _start_inbox(self) -> None:
        if self._inbox is not None:
            self._inbox.cancel()
        self._inbox = asyncio.get_running_loop().create_task(self._read_refusals(self._data))
        self._tasks.add(self._inbox)
        self._inbox.add_done_callback(self._tasks.discard)

    async def _read_refusals(self, data: Any) -> None:
        """The standing receive for error replies on data worker ``data``: each one goes to
        the pull that waits for it (by ``tid``). Costs nothing per successful pull."""
        buf = bytearray(_REPLY_BYTES)
        while True:
            req = data.recv(data.host_buffer(buf), _REFUSAL_TAG, _REFUSAL_MASK)
            try:
                await data.wait([req], float("inf"))
                reply = plan_mod.decode(buf)
            except asyncio.CancelledError:  # agent closed or worker retired
                data.abandon([req], [_REFUSAL_TAG], buf)
                raise
            except Exception as exc:  # malformed or oversized: that pull times out
                log.warning("dropped a bad transfer error reply: %r", exc)
                await asyncio.sleep(0.01)  # never spin if the worker itself is failing
                continue
            waiter = self._refusals.get(reply.get("tid"))  # type: ignore[arg-type]
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)

    def _retire(self, data: Any) -> None:
        """Swap in a fresh data worker after a data receive timed out.

        A peer killed while writing into our shared-memory receive FIFO leaves a slot that is
        never completed; UCX then delivers nothing more from *any* peer to that worker (seen in
        tests). Data arrives on this separate, unpublished worker, so it can be replaced; the old
        one is parked until close(). The published control worker only takes small messages.
        """
        if data is self._data:
            from common.transfer_ucx import UcxWorker

            self._retired.append(data)
            self._data = UcxWorker(asyncio.get_running_loop(), self.config.ucx_tls, 0.0)
            self._start_inbox()

    def _require_started(self) -> None:
        if self._ucx is None:
            raise RuntimeError("TransferAgent.start() has not been awaited (or it was closed)")


# ---------------------------------------------------------------------- helpers


@dataclass
class _Sends:
    """What one served pull has in flight: zero-copy data sends, then gathered ones."""

    tid: int
    reqs: list[Any] = field(default_factory=list)
    staged: list[torch.Tensor] = field(default_factory=list)  # gathered; back to the pool after
    later: list[tuple[int, int, int]] = field(default_factory=list)  # (i, start, end) to gather


def _new_tid() -> int:
    # Top bit set (never _REQ_TAG); the low 16 bits number the messages of one transaction.
    return (1 << 63) | (random.getrandbits(47) << 16)


async def _logged(job: Coroutine[Any, Any, None], op: Any) -> None:
    try:
        await job
    except Exception:
        log.exception("serving transfer control message %r failed", op)


async def _stage(fn: Callable[..., Any], nbytes: int, *args: Any) -> Any:
    """Run a gather/scatter; big ones in a thread (torch copies release the GIL)."""
    if nbytes > _STAGE_IN_THREAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _reply_error(reply: dict[str, Any], key: str) -> Exception:
    if reply.get("error") == "unknown_key":
        return UnknownKey(f"owner holds no tensors under {key!r} (never registered, released "
                          "or expired)")
    if reply.get("error") == "size_mismatch":
        return ValueError(f"pull of {key!r}: {reply.get('message')}; allocate dst to match")
    if reply.get("error") in ("config_mismatch", "bad_plan"):
        return TransferError(f"pull of {key!r} refused: {reply.get('message')}")
    return TransferError(f"owner refused pull of {key!r}: {reply}")
