"""The UCX layer under ``common.transfer``: one worker, its threads, cached endpoints, tag ops.

Choices (measured, see docs/benchmarks and tests/perf/bench_transfer.py):
- ucxx core API, not its asyncio layer: the asyncio layer keeps one module-global context and
  busy-polls request completion with ``asyncio.sleep(0)``, which starves the progress thread on
  a small shared CPU.
- A progress thread (epoll, not polling) drives UCX; posts go through delayed submission so only
  that thread touches the UCP worker. Completions reach the event loop through ucxx's Python
  futures, set by a small notifier thread: no polling in the event loop.
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
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import torch  # noqa: E402
import ucxx  # noqa: E402,F401  (loads libucx and sets UCX defaults before any context exists)
from ucxx._lib import libucxx as ucx_api  # noqa: E402
from ucxx._lib.arr import Array  # noqa: E402

log = logging.getLogger("triad.transfer")

_WAIT = ucx_api.PythonRequestNotifierWaitState
_ENDPOINT_CLOSE_NS = 100_000_000  # bound on closing one endpoint (its peer may be dead)
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
        if torch.cuda.is_available():
            self._worker.set_progress_thread_start_callback(
                _bind_cuda, cb_args=(torch.cuda.current_device(),))
        self._worker.populate_python_futures_pool()
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
        self._stop = threading.Event()
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
        """Hand completed requests' futures to the event loop (ucxx's notifier pattern)."""
        asyncio.set_event_loop(self._loop)  # the futures pool binds futures to this loop
        while True:  # exits once the worker reports Shutdown (that marks the notifier stopped)
            self._worker.populate_python_futures_pool()
            state = self._worker.wait_request_notifier(period_ns=100_000_000)
            if state == _WAIT.Shutdown:
                break
            if state == _WAIT.Ready and not self._stop.is_set():
                self._run_notifier_on_loop()

    def _run_notifier_on_loop(self) -> None:
        try:
            done = asyncio.run_coroutine_threadsafe(self._notify(), self._loop)
            done.result(timeout=1.0)  # wait, so that the next wait does not see the same batch
        except Exception as exc:  # loop closed or busy: the next round retries
            log.debug("request notifier round failed: %r", exc)

    async def _notify(self) -> None:
        self._worker.run_request_notifier()

    # ------------------------------------------------------------------ endpoints and ops

    def endpoint(self, address: str) -> Any:
        """The cached endpoint to a peer's worker address (base64), created on first use."""
        ep = self._eps.get(address)
        if ep is None:
            try:
                raw = base64.b64decode(address, validate=True)
            except ValueError as exc:
                raise ValueError(f"not a base64 UCX worker address: {address[:40]!r}") from exc
            ucx_addr = ucx_api.UCXAddress.create_from_buffer(raw)
            ep = self._worker.create_endpoint_from_worker_address(ucx_addr, False)
            self._eps[address] = ep
        return ep

    def forget(self, address: str) -> None:
        """Drop a peer's endpoint after a timeout: the next use reconnects (the peer may be dead).

        The old endpoint is closed only at ``close()``: closing towards a dead peer can block.
        """
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

    def recv(self, buf: Array, tag: int) -> Any:
        """Receive a message with exactly ``tag`` from any peer into ``buf``."""
        return self._worker.tag_recv(buf, ucx_api.UCXXTag(tag))

    async def wait(self, reqs: Sequence[Any], deadline: float, send_bytes: int = 0) -> bool:
        """Wait for ``reqs`` until ``deadline`` (monotonic); False on timeout, raise on error.

        ``send_bytes``: the data these sends carry. Above the receiver's FIFO capacity the
        progress thread is kicked while they are in flight (smaller ones never stall on it, and
        measured slower with kicks).
        """
        futs = [r.future for r in reqs if not r.completed]
        for f in futs:
            f.add_done_callback(_consume)  # a future failed after we stopped waiting: no warning
        if futs:
            kicker = self._kicker if send_bytes > _fifo_bytes() else None
            if kicker is not None:
                kicker.begin()
            try:
                _, pending = await asyncio.wait(
                    futs, timeout=max(0.0, deadline - time.monotonic()))
            finally:
                if kicker is not None:
                    kicker.end()
            if pending:
                return False
        for r in reqs:
            r.check_error()
        return True

    def abandon(self, reqs: Sequence[Any], recv_tags: Sequence[int], buffers: Any) -> None:
        """After a timeout: complete our own pending receives with a 1-byte self-send.

        ucxx exposes no per-request cancel; a matching message from ourselves retires a posted
        receive so it can never write into memory the caller reuses. Buffers of still-pending
        requests are kept alive here until ``close()``.
        """
        poke = bytearray(1)
        for r in reqs:
            _detach(r)
        for r, tag in zip(reqs, recv_tags):
            if not r.completed:
                _detach(self.send(self.address, Array(poke), tag))
        self._parked.append((list(reqs), (buffers, poke)))
        self._parked = [p for p in self._parked if not all(r.completed for r in p[0])]

    async def close(self) -> None:
        """Cancel what is in flight, close endpoints, stop the threads."""
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


def _detach(req: Any) -> None:
    """Nobody will await ``req``: keep its failure (e.g. cancelled at close) from being logged."""
    if not req.completed:
        req.future.add_done_callback(_consume)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
