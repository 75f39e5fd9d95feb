"""UCX data plane: an owner registers tensors under a key, a receiver pulls them into its own.

ucxx (0.52) has tag messages but no RMA from Python, so a *pull* is receiver-initiated:

1. The receiver posts a receive for the owner's reply, then sends a control message (tag
   ``_REQ_TAG``) with the key, its region sizes (run-length encoded), where its memory runs
   break, its own worker address and a fresh transaction id ``tid``.
2. The owner looks the key up, checks the sizes and that both sides use the same shared-memory
   FIFO size (a mismatch -> an error reply, nothing moves) and plans at most ``max_ops``
   messages (``transfer_plan.make_plan``); it replies with the plan.
3. The receiver posts one receive per message (tag ``tid + 1 + i``) straight into its tensors
   (or, where its regions are scattered, into one staging buffer it scatters afterwards); the
   owner sends each message from its registered tensors (or from a gathered staging buffer).

So one pull costs 2 control operations plus at most ``max_ops`` data operations, however many
regions (layers x blocks) it covers; ``TransferAgent.stats`` counts them.

Threads: the agent lives on one asyncio loop (the one that ran ``start()``); ``register`` and
``unregister`` may also be called from another thread. ``on_release(key)`` runs on the thread
that frees the handle: the caller of ``unregister``, or the agent's loop (remote ``release``,
TTL expiry, ``close``). It must not block; its exceptions are logged and swallowed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common import transfer_plan as plan_mod
from common.transfer_plan import RegionMap

log = logging.getLogger("triad.transfer")

_REQ_TAG = 0x7472_6961_6400_0001  # control requests to an owner; tids have the top bit set
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
    pull_control_ops: int = 0  # request send + reply receive, per pull or release
    pull_data_ops: int = 0  # data receives posted
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake: asyncio.Event | None = None
        self._pool = plan_mod.StagingPool(self.config.staging_pool_bytes)
        self._fifo = ""  # shared-memory FIFO size; set by start()

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
        self._spawn(self._serve())
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
            entry = self._entries.pop(key, None)
        if entry is None:
            return False
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

    async def _serve(self) -> None:
        """Receive control messages forever; each is handled in its own task."""
        buf = bytearray(self.config.control_bytes)
        while True:
            req = self._ucx.recv(self._ucx.host_buffer(buf), _REQ_TAG)
            try:
                await self._ucx.wait([req], float("inf"))
                msg = plan_mod.decode(buf)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a malformed or oversized message: drop it, keep serving
                log.warning("dropped a bad transfer control message: %r", exc)
                await asyncio.sleep(0.01)  # never spin if the worker itself is failing
                continue
            self._spawn(self._handle(msg))

    async def _handle(self, msg: dict[str, Any]) -> None:
        try:
            if msg.get("op") == "pull":
                await self._serve_pull(msg)
            elif msg.get("op") == "release":
                released = self._drop(str(msg["key"]), expired=False)
                await self._reply(msg, {"ok": True, "released": released})
            else:
                log.warning("unknown transfer control op %r", msg.get("op"))
        except Exception:
            log.exception("serving transfer control message %r failed", msg.get("op"))

    async def _serve_pull(self, msg: dict[str, Any]) -> None:
        entry = self._entries.get(str(msg["key"]))
        if entry is None:
            await self._reply(msg, {"ok": False, "error": "unknown_key"})
            return
        if msg.get("fifo", self._fifo) != self._fifo:  # would hang: see common/transfer_ucx.py
            await self._reply(msg, {"ok": False, "error": "config_mismatch", "message": (
                f"UCX_MM_FIFO_SIZE differs: this owner uses {self._fifo}, the receiver "
                f"{msg['fifo']}; give every process the same value")})
            return
        wanted = plan_mod.sizes_from_rle(msg["sizes"])
        problem = plan_mod.size_problem(entry.rmap.sizes, wanted)
        if problem:
            await self._reply(msg, {"ok": False, "error": "size_mismatch", "message": problem})
            return
        cfg = self.config
        plan = plan_mod.make_plan(entry.rmap.total, entry.rmap.bounds(cfg.max_ops),
                                  msg["bounds"], cfg.max_ops)
        entry.busy += 1
        try:
            await self._reply(msg, {"ok": True, "plan": plan})
            await self._send_plan(str(msg.get("data_to", msg["from"])), int(msg["tid"]),
                                  entry.rmap, plan)
        finally:
            entry.busy -= 1

    async def _send_plan(self, peer: str, tid: int, rmap: RegionMap,
                         plan: list[tuple[int, int]]) -> None:
        """Step 3, owner side: one send per planned message, gathered where rmap is split."""
        deadline = time.monotonic() + self.config.op_timeout_s
        staged, reqs = [], []
        for i, (start, end) in enumerate(plan):
            ptr, staging = await self._source(rmap, start, end)
            if staging is not None:
                staged.append(staging)
            reqs.append(self._ucx.send(peer, self._ucx.tensor_buffer(ptr, end - start, rmap.device),
                                       tid + 1 + i))
        self.stats.served_data_ops += len(reqs)
        if not await self._ucx.wait(reqs, deadline, send_bytes=rmap.total):
            self.stats.timeouts += 1
            log.warning("sending %d bytes to a receiver timed out; dropping its endpoint",
                        rmap.total)
            self._ucx.forget(peer)
            self._ucx.abandon(reqs, [], staged)  # UCX may still read them: never reused
            return
        for staging in staged:
            self._pool.give(staging)
        self.stats.served_pulls += 1

    async def _source(self, rmap: RegionMap, start: int,
                      end: int) -> tuple[int, torch.Tensor | None]:
        run = plan_mod.direct_run(rmap, start, end)
        if run is not None:
            return run.ptr + (start - run.start), None
        staging = self._pool.take(end - start, rmap.device)
        await _stage(plan_mod.gather, end - start, rmap, start, end, staging)
        self.stats.gathered_bytes += end - start
        return staging.data_ptr(), staging

    async def _reply(self, msg: dict[str, Any], body: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.config.op_timeout_s
        data = plan_mod.encode(body)
        req = self._ucx.send(str(msg["from"]), self._ucx.host_buffer(data), int(msg["tid"]))
        if not await self._ucx.wait([req], deadline):
            self._ucx.forget(str(msg["from"]))
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
        tid = _new_tid()
        self._require_started()
        data = self._data
        body = {"op": "pull", "key": key, "sizes": plan_mod.sizes_rle(rmap.sizes),
                "bounds": rmap.bounds(self.config.max_ops), "data_to": data.address,
                "fifo": self._fifo}
        reply = await self._request(owner_address, body, tid, deadline)
        if not reply.get("ok"):
            raise _reply_error(reply, key)
        await self._receive_plan(data, owner_address, tid, rmap,
                                 [tuple(s) for s in reply["plan"]], deadline)
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
        """Steps 1-2: post the reply receive, send the request, wait for both."""
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

    async def _receive_plan(self, data: Any, owner: str, tid: int, rmap: RegionMap,
                            plan: list[tuple[int, int]], deadline: float) -> None:
        """Step 3, receiver side: one receive per message (on the data worker ``data``);
        staged ones are scattered after."""
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
        self.stats.pull_data_ops += len(reqs)
        try:
            done = await data.wait(reqs, deadline)
        except asyncio.CancelledError:
            # The caller gave up (e.g. its client left): the posted receives still point into
            # its tensors, so retire them and keep that memory (rmap.views) alive as on a timeout.
            self._abandon_data(owner, data, reqs, tags, (staged, rmap))
            raise
        if not done:
            self._abandon_data(owner, data, reqs, tags, (staged, rmap))
            raise TransferTimeout(
                f"owner stopped sending within the timeout ({len(plan)} messages)")
        for start, view, staging in staged:
            await _stage(plan_mod.scatter, view.numel(), rmap, start, view)
            self.stats.scattered_bytes += view.numel()
            self._pool.give(staging)

    def _abandon_data(self, owner: str, data: Any, reqs: list[Any], tags: list[int],
                      keep: Any) -> None:
        self.stats.timeouts += 1
        self._ucx.forget(owner)
        data.abandon(reqs, tags, keep)  # ``keep`` is never reused: UCX may still write into it
        self._retire(data)

    def _timed_out(self, owner: str, reqs: list[Any], tags: list[int], keep: Any) -> None:
        self.stats.timeouts += 1
        self._ucx.forget(owner)
        self._ucx.abandon(reqs, tags, keep)

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

    def _require_started(self) -> None:
        if self._ucx is None:
            raise RuntimeError("TransferAgent.start() has not been awaited (or it was closed)")


# ---------------------------------------------------------------------- helpers


def _new_tid() -> int:
    # Top bit set (never _REQ_TAG); the low 16 bits number the messages of one transaction.
    return (1 << 63) | (random.getrandbits(47) << 16)


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
    if reply.get("error") == "config_mismatch":
        return TransferError(f"pull of {key!r} refused: {reply.get('message')}")
    return TransferError(f"owner refused pull of {key!r}: {reply}")
