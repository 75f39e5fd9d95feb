"""The UCX layer under ``common.transfer``: one worker, its threads, cached endpoints, tag ops.

Choices (measured, see docs/benchmarks and tests/perf/bench_transfer.py):
- ucxx core API, not its asyncio layer: the asyncio layer keeps one module-global context and
  busy-polls request completion with ``asyncio.sleep(0)``, which starves the progress thread on
  a small shared CPU.
- A progress thread (epoll, not polling) drives UCX; posts go through delayed submission so only
  that thread touches the UCP worker. ucxx signals the worker when a post is registered, so the
  progress thread picks it up at once, not at its 1 ms epoll timeout (measured: an explicit
  ``ucp_worker_signal`` after each post changed nothing). Completions reach the event loop
  through ucxx's Python futures, set by a small notifier thread that hands each batch to the
  loop with one ``call_soon_threadsafe``: no polling in the event loop.
- Thread safety: everything here runs on the agent's event loop, except
  - the kicker thread (only ``ucp_worker_signal``, which UCX makes thread-safe);
  - the notifier thread: ucxx's notifier API, then the ``on_ready`` hook, through which the
    agent posts sends and receives (``send``, ``recv``, ``endpoint``, ``tensor_buffer``,
    ``abandon_threadsafe``). ucxx guards what a post touches (futures pool, delayed
    submissions, in-flight requests) with its own mutexes; the endpoint cache has a lock.
    ``wait``, ``abandon``, ``poke``, ``forget`` and ``close`` stay on the loop.
  Each completed request costs wake-ups of the progress thread, the notifier thread and the
  loop; on the project's small VM each wake-up of an idle thread is tens of microseconds, so
  a pull is built to need as few of them in sequence as possible (see common/transfer.py).
- Waits look at the requests' asyncio futures only, never at ``UCXRequest.completed``: that
  call releases the GIL, and on a busy 2-core machine reacquiring it often meant waiting for a
  notifier thread (seen in profiles at tens of microseconds per call).
- Endpoints are created from exchanged worker addresses with error handling OFF: only then does
  UCX use shared memory between processes (several GiB/s) instead of TCP. The price is that a
  dead peer never fails an operation, so every wait here takes a deadline.
- CMA is left out by default (``TransferConfig.ucx_tls = "^cma"``): without error handling, a
  CMA rendezvous read from a peer that died mid-transfer is a fatal UCX error that aborts the
  *receiver* (seen: process_vm_readv ... No such process). Shared-memory copy-in/copy-out
  survives it (the receive just times out) and measured as fast or faster here on 2 cores.
- Large messages then go as "rendezvous fragmented copy-in copy-out": the sender copies 8 KiB
  fragments into the receiver's shared-memory FIFO, the receiver copies them out. When the FIFO
  is full the sender's request goes pending and its progress thread sleeps in epoll; the
  receiver draining the FIFO does not wake it, so it resumes only at the epoll timeout (1 ms).
  With the default 256-slot FIFO (2 MiB) that capped a pull at ~1.2 GiB/s whenever sender and
  receiver ran on one core (the "slow mode": seen when the second core was busy; pinning both
  processes to one core reproduces it every time). The fix, measured in docs/benchmarks.md:
  - a 1024-slot FIFO (``MM_FIFO_SIZE``; ~8 MiB more shared memory per worker): a stall comes
    4x less often. UCX does not exchange the FIFO size: two processes with different sizes
    hang (seen), so every process must use the same one (``mm_fifo_size()``; pulls carry it
    and an owner refuses a mismatch with a clear error);
  - a *kicker* that signals the sending worker (``ucp_worker_signal``) every
    ``kick_interval_s`` while a send larger than the FIFO is in flight, and sleeps otherwise
    (another +15-25% when the pair shares a core; smaller sends cannot fill the FIFO).
  A polling progress thread made everything worse: spinning threads took the core the copies
  needed.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import torch  # noqa: E402
import ucxx  # noqa: E402,F401  (loads libucx and sets UCX defaults before any context exists)
from ucxx._lib import libucxx as ucx_api  # noqa: E402
from ucxx._lib.arr import Array  # noqa: E402

log = logging.getLogger("triad.transfer")

_WAIT = ucx_api.PythonRequestNotifierWaitState
_ENDPOINT_CLOSE_NS = 100_000_000  # bound on closing one endpoint (its peer may be dead)
_EMPTY = bytearray(0)  # the payload of a poke (see UcxWorker.poke)
# Shared-memory receive FIFO slots (UCX default 256 = 2 MiB of 8 KiB fragments); see above.
# The UCX_MM_FIFO_SIZE environment variable wins; every process must use the same value.
MM_FIFO_SIZE = 1024


class _CudaBytes:
    """Exposes a CUDA byte range to ucxx through ``__cuda_array_interface__`` (no copy)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "data": (ptr, False), "shape": (nbytes,), "typestr": "|u1",
            "strides": None, "version": 3,
        }


def as_buffer(ptr: int, nbytes: int, cuda: bool) -> Array:
    """A ucxx buffer over ``nbytes`` of tensor memory at ``ptr`` (zero-copy).

    The caller keeps the tensor that owns the memory alive until the operation completes.
    """
    if cuda:
        return Array(_CudaBytes(ptr, nbytes))
    return Array((ctypes.c_uint8 * nbytes).from_address(ptr))


def _bind_cuda(device: int) -> None:
    # UCX's progress thread moves CUDA memory: it needs the device's context current.
    torch.cuda.set_device(device)
    torch.cuda.current_stream(device)


class UcxWorker:
    """A UCP worker with a progress thread, completion futures on ``loop`` and an endpoint cache."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: str | None,
                 kick_interval_s: float = 100e-6) -> None:
        self._loop = loop
        self._ctx = ucx_api.UCXContext(
            config_dict=_ucx_options(tls),
            feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
        self._worker = ucx_api.UCXWorker(
            self._ctx, enable_delayed_submission=True, enable_python_future=True)
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else -1
        if self._cuda_device >= 0:
            self._worker.set_progress_thread_start_callback(
                _bind_cuda, cb_args=(self._cuda_device,))
        self._worker.populate_python_futures_pool()
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
        self._stop = threading.Event()
        # Called on the notifier thread each time requests complete (and every 100 ms), before
        # their futures are handed to the loop; must be quick and never block.
        self.on_ready: Callable[[], None] | None = None
        self._ep_lock = threading.Lock()  # endpoints are made on the loop and the notifier
        self._notifier = threading.Thread(target=self._notify_loop, name="ucx-notifier",
                                          daemon=True)
        self._notifier.start()
        self.address = base64.b64encode(self._worker.address.tobytes()).decode()
        self._eps: dict[str, Any] = {}
        self._parked: list[tuple[Any, Any]] = []  # (requests, buffers) outliving a timed-out wait
        self._dead_eps: list[Any] = []  # endpoints dropped after a timeout, closed at close()
        self._kicker = _start_kicker(self._worker.handle, kick_interval_s)

    # ------------------------------------------------------------------ threads

    def _notify_loop(self) -> None:
        """Hand completed requests' futures to the event loop (ucxx's notifier pattern).

        ucxx sets the futures in ``run_request_notifier``, which must run on the loop (they are
        plain asyncio futures): one ``call_soon_threadsafe`` per batch, then this thread waits
        until it ran, so that its next wait does not see the same batch again.
        """
        asyncio.set_event_loop(self._loop)  # the futures pool binds futures to this loop
        if torch.cuda.is_available():  # on_ready may post sends of CUDA memory from here
            _bind_cuda(self._cuda_device)
        ran = threading.Event()

        def deliver() -> None:
            try:
                self._worker.run_request_notifier()
            finally:
                ran.set()

        while True:  # exits once the worker reports Shutdown (that marks the notifier stopped)
            self._worker.populate_python_futures_pool()
            state = self._worker.wait_request_notifier(period_ns=100_000_000)
            if state == _WAIT.Shutdown:
                break
            if self._stop.is_set():
                continue
            hook = self.on_ready
            if hook is not None:
                try:
                    hook()
                except Exception:
                    log.exception("UCX on_ready hook failed")
            if state == _WAIT.Ready:
                ran.clear()
                try:
                    self._loop.call_soon_threadsafe(deliver)
                except RuntimeError as exc:  # the loop is closed: nothing left to notify
                    log.debug("request notifier round failed: %r", exc)
                    continue
                if not ran.wait(1.0):  # the loop is busy: the next round retries
                    log.debug("request notifier round not run within 1 s")

    # ------------------------------------------------------------------ endpoints and ops

    def endpoint(self, address: str) -> Any:
        """The cached endpoint to a peer's worker address (base64), created on first use."""
        ep = self._eps.get(address)
        if ep is None:
            try:
                raw = base64.b64decode(address, validate=True)
            except ValueError as exc:
                raise ValueError(f"not a base64 UCX worker address: {address[:40]!r}") from exc
            with self._ep_lock:
                ep = self._eps.get(address)
                if ep is None:
                    ucx_addr = ucx_api.UCXAddress.create_from_buffer(raw)
                    ep = self._worker.create_endpoint_from_worker_address(ucx_addr, False)
                    self._eps[address] = ep
        return ep

    def forget(self, address: str) -> None:
        """Drop a peer's endpoint after a timeout: the next use reconnects (the peer may be dead).

        The old endpoint is closed only at ``close()``: closing towards a dead peer can block.
        """
        with self._ep_lock:
            ep = self._eps.pop(address, None)
        if ep is not None:
            self._dead_eps.append(ep)

    @staticmethod
    def host_buffer(buf: bytearray) -> Array:
        return Array(buf)

    @staticmethod
    def tensor_buffer(ptr: int, nbytes: int, device: torch.device) -> Array:
        """Tensor memory (CPU or CUDA) at ``ptr`` as a ucxx buffer, zero-copy."""
        return as_buffer(ptr, nbytes, device.type == "cuda")

    def send(self, address: str, buf: Array, tag: int) -> Any:
        return self.endpoint(address).tag_send(buf, ucx_api.UCXXTag(tag))

    def recv(self, buf: Array, tag: int, mask: int | None = None) -> Any:
        """Receive a message with exactly ``tag`` (or, with ``mask``, any tag ``t`` with
        ``t & mask == tag``) from any peer into ``buf``."""
        if mask is None:
            return self._worker.tag_recv(buf, ucx_api.UCXXTag(tag))
        return self._worker.tag_recv(buf, ucx_api.UCXXTag(tag), ucx_api.UCXXTagMask(mask))

    async def wait(self, reqs: Sequence[Any], deadline: float, send_bytes: int = 0,
                   until: Callable[[], bool] | None = None,
                   watch: Sequence[asyncio.Future[Any]] = ()) -> bool:
        """Wait for ``reqs`` until ``deadline`` (monotonic); False on timeout, raise on error.

        ``send_bytes``: the data these sends carry. Above the receiver's FIFO capacity the
        progress thread is kicked while they are in flight (smaller ones never stall on it, and
        measured slower with kicks). ``until``: checked after each completion of ``reqs`` or
        of a future in ``watch``; when it returns True the wait ends at once (True), some of
        ``reqs`` possibly still pending.
        """
        # Only the asyncio futures are looked at: a request's own ``completed`` releases the
        # GIL, and on a busy small CPU each such call can wait for a notifier thread.
        futs = [r.future for r in reqs]
        pending = [f for f in futs if not f.done()]
        if pending and until is not None and until():
            for f in pending:
                f.add_done_callback(_consume)  # a failure after we stopped waiting: no warning
        elif pending:
            kicker = self._kicker if send_bytes > _fifo_bytes() else None
            if kicker is not None:
                kicker.begin()
            try:
                if not await _all_done(pending, deadline, until, watch):
                    return False
            finally:
                if kicker is not None:
                    kicker.end()
        errors = [f.exception() for f in futs if f.done() and not f.cancelled()]
        for exc in errors:
            if exc is not None:
                raise exc
        return True

    def poke(self, recv_tags: Sequence[int]) -> list[Any]:
        """Zero-byte messages to ourselves, one per tag: each completes one of our own posted
        receives with that tag and writes nothing into its buffer (ucxx has no cancel)."""
        return [self.send(self.address, Array(_EMPTY), tag) for tag in recv_tags]

    def abandon(self, reqs: Sequence[Any], recv_tags: Sequence[int], buffers: Any) -> None:
        """Give up on ``reqs``: retire our pending receives among them (``recv_tags``, in the
        order of ``reqs``) with ``poke``, and keep ``buffers`` alive while any is pending.

        A retired receive may still be written into by a peer that matched it first, and a send
        may still be read from: the buffers are kept (never reused) until all of them and the
        pokes completed, or until ``close()``.
        """
        for r in reqs:
            _detach(r)
        pending = [tag for r, tag in zip(reqs, recv_tags) if not r.completed]
        pokes = self.poke(pending)
        for p in pokes:
            _detach(p)
        self._parked = [p for p in self._parked if not all(r.completed for r in p[0])]
        self._parked.append(([*reqs, *pokes], buffers))

    def abandon_threadsafe(self, reqs: Sequence[Any], buffers: Any) -> None:
        """``abandon`` of sends, from another thread (done on the loop)."""
        try:
            self._loop.call_soon_threadsafe(self.abandon, list(reqs), [], buffers)
        except RuntimeError:  # the loop is closed
            pass

    async def close(self) -> None:
        """Cancel what is in flight, close endpoints, stop the threads."""
        self.on_ready = None
        if self._kicker is not None:
            await asyncio.to_thread(self._kicker.stop)  # before the worker it signals goes
        self._worker.cancel_inflight_requests(period=_ENDPOINT_CLOSE_NS, max_attempts=1)
        for ep in [*self._eps.values(), *self._dead_eps]:
            ep.close_blocking(period=_ENDPOINT_CLOSE_NS, max_attempts=1)
        self._eps.clear()
        self._dead_eps.clear()
        self._worker.stop_progress_thread()
        await asyncio.sleep(0.01)  # let the notifier deliver the cancellations
        self._stop.set()
        self._worker.stop_request_notifier_thread()
        await asyncio.to_thread(self._notifier.join, 2.0)
        # ucxx's notifier reports "running" to the worker's destructor (which then warns) while
        # a completion is undelivered or after a wait that began once stopped: drain, then stop.
        for _ in range(2):
            if self._worker.wait_request_notifier(period_ns=1) == _WAIT.Ready:
                self._worker.run_request_notifier()
        self._worker.stop_request_notifier_thread()
        self._parked.clear()


def mm_fifo_size() -> str:
    """The shared-memory FIFO size this process's workers use (UCX_MM_FIFO_SIZE wins)."""
    return os.environ.get("UCX_MM_FIFO_SIZE", str(MM_FIFO_SIZE))


def _fifo_bytes() -> int:
    """Data the receiver's shared-memory FIFO holds (8 KiB fragments; see UCX_MM_SEG_SIZE)."""
    try:
        return int(mm_fifo_size()) * 8192
    except ValueError:  # UCX rejects a bad value itself when the worker starts
        return MM_FIFO_SIZE * 8192


def _ucx_options(tls: str | None) -> dict[str, str]:
    """UCX context settings; the matching UCX_* environment variables win."""
    options = {"MM_FIFO_SIZE": mm_fifo_size()}
    if tls and "UCX_TLS" not in os.environ:
        options["TLS"] = tls
    return options


def _ucp_worker_signal() -> Any:
    """``ucp_worker_signal`` from the libucp that ucxx loaded (ucxx does not expose it)."""
    import libucx

    lib = ctypes.CDLL(os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so.0"))
    fn = lib.ucp_worker_signal
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    return fn


def _start_kicker(worker_handle: int, interval_s: float) -> _Kicker | None:
    """A kicker for this worker, or None when off or when libucp cannot be found (slower only)."""
    if not interval_s:
        return None
    try:
        return _Kicker(worker_handle, interval_s)
    except (ImportError, OSError, AttributeError) as exc:
        log.warning("UCX kicker unavailable (%r): large pulls may be slower on a busy CPU", exc)
        return None


class _Kicker:
    """Wakes a worker's progress thread every ``interval_s`` while data sends are in flight.

    A sender blocked on a full shared-memory FIFO is never woken by the receiver draining it
    (see the module docstring); ``ucp_worker_signal`` is UCX's thread-safe way to wake the
    worker's epoll wait, after which the progress thread retries the pending sends. Idle, the
    thread sleeps on an event (waking once a second): nothing is spent while nothing is sent.
    """

    def __init__(self, worker_handle: int, interval_s: float) -> None:
        self._signal = _ucp_worker_signal()
        self._handle = worker_handle
        self._interval_s = interval_s
        self._active = 0  # sends in flight; changed on the event loop only
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ucx-kicker", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        self._active += 1
        self._wake.set()

    def end(self) -> None:
        self._active -= 1
        if self._active == 0 and not self._stopped:
            self._wake.clear()

    def stop(self) -> None:
        """Stop and join the thread (before the worker is destroyed)."""
        self._stopped = True
        self._wake.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        while True:
            self._wake.wait(1.0)  # the timeout only bounds a stop() racing an end()
            if self._stopped:
                return
            while self._active > 0 and not self._stopped:
                self._signal(self._handle)
                time.sleep(self._interval_s)


async def _all_done(futs: Sequence[asyncio.Future[Any]], deadline: float,
                    until: Callable[[], bool] | None = None,
                    watched: Sequence[asyncio.Future[Any]] = ()) -> bool:
    """Wait until every future in ``futs`` is done or ``until()`` holds (checked as any of
    ``futs`` or ``watched`` completes): True; or until ``deadline`` (monotonic): False.

    ``asyncio.wait`` with less work per wake-up: one waiter, one timer, no sets. The futures
    are never cancelled; a failure in ``futs`` we stopped waiting for is consumed (no warning).
    """
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    left = len(futs)

    def one_done(_: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if (left == 0 or (until is not None and until())) and not waiter.done():
            waiter.set_result(True)

    def check(_: asyncio.Future[Any]) -> None:
        if until is not None and until() and not waiter.done():
            waiter.set_result(True)

    for f in futs:
        f.add_done_callback(one_done)
    for f in watched:
        f.add_done_callback(check)
    timer = None
    if deadline != float("inf"):
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, waiter)
    try:
        return await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for f in watched:
            f.remove_done_callback(check)
        for f in futs:
            if f.done():
                _consume(f)
            else:
                f.remove_done_callback(one_done)
                f.add_done_callback(_consume)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _detach(req: Any) -> None:
    """Nobody will await ``req``: keep its failure (e.g. cancelled at close) from being logged."""
    if not req.completed:
        req.future.add_done_callback(_consume)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
