"""Pure planning for UCX pulls: which byte ranges move as which messages (no UCX here).

A pull moves a list of regions (tensors) from an owner into a receiver's list of regions of the
same sizes. Both sides see the regions as one logical byte stream (their concatenation). Each side
merges regions that are adjacent in memory into *runs*; a message is a byte range of the logical
stream. A side whose part of a message lies inside one run moves it zero-copy; otherwise it goes
through one staging buffer (gather on the owner, scatter on the receiver).

The receiver makes the plan from its own runs alone (it posts its receives before it asks, so
it cannot wait for the owner's layout): at most ``max_ops`` messages whatever the number of
regions, so the number of UCX operations per pull does not grow with layers x blocks.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Run:
    """Regions adjacent in memory: logical byte range [start, start + nbytes) at address ptr."""

    start: int
    ptr: int
    nbytes: int


@dataclass(frozen=True)
class RegionMap:
    """One side's regions: the caller's tensors, their logical offsets and merged runs."""

    tensors: tuple[torch.Tensor, ...]  # the caller's (contiguous); holding them keeps the memory
    offsets: tuple[int, ...]  # logical start of each region
    sizes: tuple[int, ...]  # bytes
    runs: tuple[Run, ...]
    device: torch.device

    @property
    def total(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    @functools.cached_property
    def views(self) -> tuple[torch.Tensor, ...]:
        """Flat uint8 views of the tensors (no copies); made only when a gather or scatter
        needs them: a view costs a torch dispatch, the zero-copy path needs only addresses."""
        return tuple(t.reshape(-1).view(torch.uint8) for t in self.tensors)

    def bounds(self, limit: int) -> list[int] | None:
        """Logical offsets where a new run starts (0 excluded); None when more than ``limit``."""
        if len(self.runs) - 1 > limit:
            return None
        return [r.start for r in self.runs[1:]]


def _check(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous() on it first)")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty; only non-empty tensors can be transferred")


def region_map(tensors: Sequence[torch.Tensor], what: str) -> RegionMap:
    """Validate ``tensors`` (contiguous, non-empty, one device) and merge them into runs."""
    if len(tensors) == 0:
        raise ValueError(f"{what} is empty: give at least one tensor")
    for i, t in enumerate(tensors):
        _check(t, f"{what}[{i}]")
    tensors = tuple(tensors)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{what} mixes devices {sorted(map(str, devices))}; use one device")
    sizes = tuple(t.nbytes for t in tensors)
    offsets = tuple(_prefix_sums(sizes))
    runs = _merge_runs([t.data_ptr() for t in tensors], sizes, offsets)
    return RegionMap(tensors, offsets, sizes, runs, tensors[0].device)


def _prefix_sums(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def _merge_runs(ptrs: Sequence[int], sizes: Sequence[int],
                offsets: Sequence[int]) -> tuple[Run, ...]:
    runs: list[Run] = []
    for ptr, n, off in zip(ptrs, sizes, offsets):
        if runs and runs[-1].ptr + runs[-1].nbytes == ptr:
            last = runs[-1]
            runs[-1] = Run(last.start, last.ptr, last.nbytes + n)
        else:
            runs.append(Run(off, ptr, n))
    return tuple(runs)


def _segments(total: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    edges = [0, *cuts, total]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def receiver_plan(rmap: RegionMap, max_ops: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of a pull's messages, made by the receiver from its own runs.

    One message per receiver run while there are at most ``max_ops`` of them (the receiver's
    side stays zero-copy; the owner gathers a message that spans several of its runs), else one
    message through a staging buffer on the receiver.
    """
    cuts = rmap.bounds(max_ops - 1)
    return _segments(rmap.total, cuts if cuts is not None else [])


def plan_cuts(plan: Sequence[tuple[int, int]]) -> list[int]:
    """The logical offsets where a plan's messages after the first start (the wire form)."""
    return [start for start, _ in plan[1:]]


def plan_from_cuts(total: int, cuts: Any, max_messages: int) -> list[tuple[int, int]]:
    """The owner's check of a receiver's plan: increasing cuts inside (0, total), few enough."""
    if not isinstance(cuts, list) or not all(type(c) is int for c in cuts):
        raise ValueError("the plan's cuts must be a list of integers")
    if len(cuts) + 1 > max_messages:
        raise ValueError(f"the plan has {len(cuts) + 1} messages, at most {max_messages} allowed")
    if any(not 0 < c < total for c in cuts) or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"the plan's cuts must increase strictly inside (0, {total})")
    return _segments(total, cuts)


def direct_run(rmap: RegionMap, start: int, end: int) -> Run | None:
    """The run holding all of [start, end), or None when the range spans several runs."""
    starts = [r.start for r in rmap.runs]
    i = bisect.bisect_right(starts, start) - 1
    run = rmap.runs[i]
    return run if end <= run.start + run.nbytes else None


def pieces(rmap: RegionMap, start: int, end: int) -> list[tuple[torch.Tensor, int]]:
    """(region byte slice, offset in the message) for each region overlapping [start, end)."""
    out = []
    i = bisect.bisect_right(rmap.offsets, start) - 1
    while i < len(rmap.sizes) and rmap.offsets[i] < end:
        lo = max(start, rmap.offsets[i])
        hi = min(end, rmap.offsets[i] + rmap.sizes[i])
        base = rmap.offsets[i]
        out.append((rmap.views[i][lo - base:hi - base], lo - start))
        i += 1
    return out


# CUDA memory that UCX reads or writes is outside torch's stream order, so it must never be in
# use by queued kernels. Buffers UCX touches are therefore allocated on a stream of their own
# (the caching allocator only reuses a block on the stream it was allocated for, so memory that
# the engine's queued kernels still use is never handed out here), and gathers and scatters run
# on it and are waited for before UCX or the pool gets the buffer. Waiting on that stream, not
# the default one, keeps a pull from waiting behind the engine's queued steps.
_TRANSFER_STREAMS: dict[int, torch.cuda.Stream] = {}


def transfer_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of ``device`` for transfer buffers and copies (created on first use)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _TRANSFER_STREAMS.get(index)
    if stream is None:
        stream = _TRANSFER_STREAMS.setdefault(index, torch.cuda.Stream(device=index))
    return stream


def transfer_empty(shape: Sequence[int] | int, dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor:
    """An empty tensor UCX may write into at once (CUDA: from the transfer stream's memory).

    A CUDA tensor from here that other streams then use must be marked with
    ``record_stream`` before it is dropped (see ``workers.base``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.empty(shape, dtype=dtype, device=device)
    with torch.cuda.stream(transfer_stream(device)):
        return torch.empty(shape, dtype=dtype, device=device)


def _copy_pieces(staging: torch.Tensor, copy: Callable[[], None]) -> None:
    if not staging.is_cuda:
        copy()
        return
    # No wait for the default stream: what is gathered was written by work that has finished
    # (an engine step that was read, a tower the encoder waited for) and blocks scattered into
    # are reserved ones no queued step touches; waiting would queue behind the engine's steps.
    stream = transfer_stream(staging.device)
    with torch.cuda.stream(stream):
        copy()
    stream.synchronize()  # UCX or the next pull may touch the buffer as soon as we return


def gather(rmap: RegionMap, start: int, end: int, staging: torch.Tensor) -> None:
    """Copy [start, end) of the logical stream into ``staging`` (owner side)."""
    def copy() -> None:
        for piece, at in pieces(rmap, start, end):
            staging[at:at + piece.numel()].copy_(piece)
    _copy_pieces(staging, copy)


class StagingPool:
    """Reusable staging buffers, used from one thread (the agent's event loop).

    A fresh large CPU allocation is new mmap'd memory that page-faults on first touch: that
    made a 7 MiB gather ~10x slower than a copy into a buffer already used once.
    """

    def __init__(self, max_bytes: int) -> None:
        self._free: list[torch.Tensor] = []
        self._max_bytes = max_bytes

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A buffer of at least ``nbytes`` on ``device`` (give it back with ``give``)."""
        fits = [b for b in self._free if b.device == device and b.numel() >= nbytes]
        if fits:
            best = min(fits, key=lambda b: b.numel())
            self._free = [b for b in self._free if b is not best]
            return best
        return transfer_empty(nbytes, torch.uint8, device)

    def give(self, buf: torch.Tensor) -> None:
        held = sum(b.numel() for b in self._free)
        if held + buf.numel() <= self._max_bytes:
            self._free.append(buf)


def scatter(rmap: RegionMap, start: int, staging: torch.Tensor) -> None:
    """Copy a received staging buffer into the regions it covers (receiver side)."""
    def copy() -> None:
        for piece, at in pieces(rmap, start, start + staging.numel()):
            piece.copy_(staging[at:at + piece.numel()])
    _copy_pieces(staging, copy)


def sizes_rle(sizes: Sequence[int]) -> list[list[int]]:
    """Run-length encode region sizes ([[nbytes, count], ...]): KV blocks are all one size."""
    out: list[list[int]] = []
    for n in sizes:
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return out


def sizes_from_rle(rle: Sequence[Sequence[int]]) -> list[int]:
    return [n for n, count in rle for _ in range(count)]


def encode(body: dict[str, Any]) -> bytearray:
    """A control message: 4-byte little-endian length, then compact JSON."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    return bytearray(len(payload).to_bytes(4, "little") + payload)


def decode(buf: bytearray) -> dict[str, Any]:
    n = int.from_bytes(buf[:4], "little")
    if not 0 < n <= len(buf) - 4:
        raise ValueError(f"bad control message length {n}")
    return json.loads(bytes(buf[4:4 + n]))


def size_problem(owner: Sequence[int], receiver: Sequence[int]) -> str:
    """Why a receiver's region sizes cannot take the owner's ('' when they can)."""
    if len(owner) != len(receiver):
        return f"owner holds {len(owner)} tensors, dst has {len(receiver)}"
    for i, (a, b) in enumerate(zip(owner, receiver)):
        if a != b:
            return f"dst[{i}] has {b} bytes, the owner's tensor has {a}"
    return ""
